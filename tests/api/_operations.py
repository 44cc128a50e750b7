"""A catalogue of every public operation that reaches the kernel, and the tools to break them.

The exhaustive suites (test_cancellation, test_errno_injection,
test_hypothesis) run each `Operation` from a clean simulated machine and
interrupt it at every point: each checkpoint, each kernel call. An operation
is self-contained: it opens what it needs and releases it, so after any
interruption the machine must be clean again (`machine.leaks() == []`).

Tools:

* `new_target()`: a fresh machine (manual clock, so device work runs only
  when an operation says so) with edu, nvme and `RamBars`, a small model whose
  BARs are mmap'd (whole, and sparse) so that the mmap path is covered too.
* `HookedKernel`: a `Kernel` that forwards to the machine's and calls hooks
  before and after every method, on whichever thread the call runs.
* `Stepper`: awaits a coroutine one suspension at a time and calls a hook at
  each, so a test can enumerate every checkpoint an operation passes.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import threading
import types
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import Any, Generic, TypeVar, cast

import anyio
import anyio.from_thread
from attrs import define, field, frozen

import aiovfio
from aiovfio import errors
from aiovfio._uapi.vfio import PciRegion
from aiovfio.kernel import Kernel
from aiovfio.sim import DeviceContext, DeviceModel, IrqSpec, Machine, RegionSpec
from aiovfio.sim.models import Edu, Nvme
from aiovfio.testing.target import SIM_EDU, SIM_NVME, Target

__all__ = [
    "EDU_IDENT",
    "OPERATIONS",
    "RAM",
    "ACQUIRING",
    "HookedKernel",
    "Interrupt",
    "Operation",
    "RamBars",
    "Stepper",
    "assert_fresh_open_works",
    "await_chain",
    "call_in_loop",
    "closing_machine",
    "group_number",
    "with_kernel",
    "is_pure_checkpoint",
    "new_target",
]

T = TypeVar("T")

EDU_IDENT = 0x010000ED
EDU_MASK = (1 << 28) - 1
#: the third device of `new_target()`: a RamBars model
RAM = "0000:00:06.0"
PAGE = 4096

# edu registers
_LIVENESS, _STATUS, _IRQ_STATUS, _IRQ_RAISE, _IRQ_ACK = 0x04, 0x20, 0x24, 0x60, 0x64
_DMA_SRC, _DMA_DST, _DMA_CNT, _DMA_CMD = 0x80, 0x88, 0x90, 0x98
_EDU_BUF = 0x40000

#: Kernel methods whose result is a new resource (an fd, an mmap): a
#: BaseException raised after one of them returns loses it, in any Python
#: code, so the suites do not raise there.
ACQUIRING = frozenset({"open_container", "open_group", "group_get_device_fd", "eventfd", "mmap"})


class Interrupt(BaseException):
    """A KeyboardInterrupt-like exception that no `except Exception` may swallow."""


# --- a model with mmap'd BARs ----------------------------------------------------------------


@define(eq=False, kw_only=True)
class RamBars(DeviceModel):
    """BAR0: 16 KiB mmap'd whole. BAR2: 16 KiB, page 1 mmap'd, the rest trapped registers."""

    vendor_id = 0x1AF4
    device_id = 0x10F0
    interrupt_pin = 0

    _ctx: DeviceContext | None = field(default=None, init=False, repr=False)
    _regs: dict[tuple[int, int, int], int] = field(factory=dict, init=False, repr=False)

    def regions(self) -> Sequence[RegionSpec]:
        return (
            RegionSpec(index=PciRegion.BAR0, size=0x4000, mmap_areas=((0, 0x4000),)),
            RegionSpec(index=PciRegion.BAR2, size=0x4000, mmap_areas=((0x1000, 0x1000),)),
        )

    def irqs(self) -> Sequence[IrqSpec]:
        return ()

    def capabilities(self) -> Sequence[tuple[int, bytes]]:
        return ()

    def attach(self, ctx: DeviceContext) -> None:
        self._ctx = ctx

    def read(self, region: int, offset: int, size: int) -> int:
        return self._regs.get((region, offset, size), 0)

    def write(self, region: int, offset: int, size: int, value: int) -> None:
        self._regs[(region, offset, size)] = value


def new_target(machine: Machine | None = None) -> Target:
    """A fresh simulated machine: edu 00:04.0, nvme 00:05.0, RamBars 00:06.0, manual clock."""
    if machine is None:
        machine = Machine(clock="manual")
    machine.add_device(Edu(), name=SIM_EDU)
    machine.add_device(Nvme(), name=SIM_NVME)
    machine.add_device(RamBars(), name=RAM)
    return Target(machine.kernel, SIM_EDU, SIM_NVME, machine)


def with_kernel(target: Target, kernel: Kernel) -> Target:
    """The same machine and devices, reached through another Kernel (e.g. a HookedKernel)."""
    return Target(kernel, target.edu, target.nvme, target.machine)


# --- hooks on the kernel boundary --------------------------------------------------------------


Hook = Callable[[int, str], None]


class HookedKernel:
    """Forwards every Kernel method to `inner`; `before(n, name)` and `after(n, name)` run
    around the n-th call (counting from 1), in the thread the call runs in.

    `calls` lists the method names in call order, `failed` the numbers of
    those that raised (their `after` hook does not run).
    """

    def __init__(self, inner: Kernel) -> None:
        self._inner = inner
        self.name = inner.name
        self.calls: list[str] = []
        #: the numbers of the calls that raised
        self.failed: set[int] = set()
        self.before: Hook | None = None
        self.after: Hook | None = None
        self._lock = threading.Lock()

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._inner, attr)
        if attr.startswith("_") or not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls.append(attr)
                n = len(self.calls)
            if self.before is not None:
                self.before(n, attr)
            try:
                result = value(*args, **kwargs)
            except BaseException:
                self.failed.add(n)
                raise
            if self.after is not None:
                self.after(n, attr)
            return result

        return call

    def as_kernel(self) -> Kernel:
        return cast(Kernel, self)


def call_in_loop(fn: Callable[[], object], loop_thread: int) -> None:
    """Run `fn` on the event loop: directly when already there, else from an anyio worker."""
    if threading.get_ident() == loop_thread:
        fn()
    else:
        anyio.from_thread.run_sync(fn)


# --- stepping through a coroutine's suspensions --------------------------------------------


#: What the hook returns: None to let the suspension happen, or an exception
#: to throw into the coroutine at that point instead.
StepHook = Callable[[int, object, Coroutine[Any, Any, Any]], BaseException | None]


class Stepper(Generic[T]):
    """`await Stepper(coro, hook)` runs `coro` like `await coro`, calling `hook(j, yielded, coro)`
    before its j-th suspension (counting from 1). `yields` counts suspensions.

    Every suspension of a coroutine on asyncio, uvloop and trio passes here, so
    iterating j enumerates exactly the points where a cancellation can be
    delivered.
    """

    def __init__(self, coro: Coroutine[Any, Any, T], hook: StepHook | None = None) -> None:
        self._coro = coro
        self._hook = hook
        self.yields = 0

    def __await__(self) -> Generator[Any, Any, T]:
        coro = self._coro
        send: Any = None
        throw: BaseException | None = None
        while True:
            try:
                if throw is not None:
                    exc, throw = throw, None
                    yielded = coro.throw(exc)
                    del exc
                else:
                    yielded = coro.send(send)
            except StopIteration as stop:
                return cast(T, stop.value)
            self.yields += 1
            if self._hook is not None:
                replacement = self._hook(self.yields, yielded, coro)
                if replacement is not None:
                    throw = replacement
                    continue
            try:
                send = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                throw = exc
                send = None


def await_chain(coro: object) -> list[types.CodeType]:
    """The code objects of the chain of awaits `coro` is suspended in, outermost first.

    Async generators (`asynccontextmanager`) are followed through their
    `asend`/`athrow` awaitables, which expose the generator only to the GC.
    """
    out: list[types.CodeType] = []
    obj: Any = coro
    while obj is not None:
        if isinstance(obj, types.CoroutineType):
            out.append(obj.cr_code)
            obj = obj.cr_await
        elif isinstance(obj, types.GeneratorType):
            out.append(obj.gi_code)
            obj = obj.gi_yieldfrom
        elif isinstance(obj, types.AsyncGeneratorType):
            out.append(obj.ag_code)
            obj = obj.ag_await
        elif type(obj).__name__ in ("async_generator_asend", "async_generator_athrow"):
            gens = [r for r in gc.get_referents(obj) if isinstance(r, types.AsyncGeneratorType)]
            obj = gens[0] if gens else None
        else:
            break
    return out


def is_pure_checkpoint(yielded: object, coro: object) -> bool:
    """Whether this suspension is the schedule point of a plain checkpoint.

    There an exception can be thrown in instead of suspending without
    abandoning anything in progress (a worker thread, a lock, an fd wait):
    anyio's checkpoint on asyncio (`await sleep(0)`, a bare yield), and
    `trio.lowlevel.checkpoint` (its `cancel_shielded_checkpoint` half; trio
    delivers a pending KeyboardInterrupt in the other half).
    """
    chain = await_chain(coro)
    names = [c.co_name for c in chain[-3:]]
    if yielded is None:
        return names == ["checkpoint", "sleep", "__sleep0"] and "anyio" in chain[-3].co_filename
    if getattr(yielded, "__name__", None) == "CancelShieldedCheckpoint":
        return names[:2] == ["checkpoint", "cancel_shielded_checkpoint"] and chain[
            -3
        ].co_filename.endswith("_core/_run.py")
    return False


# --- the catalogue ---------------------------------------------------------------------------


OpFn = Callable[[Target], Coroutine[Any, Any, None]]


@frozen
class Operation:
    """One public operation, self-contained: it opens what it needs and releases it."""

    name: str
    fn: OpFn

    def __call__(self, target: Target) -> Coroutine[Any, Any, None]:
        return self.fn(target)


def group_number(t: Target, bdf: str) -> int:
    """The IOMMU group of `bdf`, as a driver finds it in sysfs before `Container.group(n)`."""
    try:
        number = t.kernel.iommu_group(bdf)
    except OSError as exc:
        raise errors.from_oserror(exc, "sysfs iommu_group", f"PCI device {bdf}") from exc
    assert number is not None
    return number


def _open(t: Target, bdf: str | None = None, **kw: Any) -> Any:
    return aiovfio.open_device(bdf or t.edu, kernel=t.kernel, **kw)


async def op_open_device(t: Target) -> None:
    async with _open(t) as dev:
        assert dev.info.is_pci


async def op_explicit_container(t: Target) -> None:
    number = group_number(t, t.edu)
    async with aiovfio.Container(kernel=t.kernel) as container:
        async with container.group(number) as group:
            assert group.viable
            async with group.open_device(t.edu) as dev:
                assert dev.info.num_regions >= 8
            assert container.iommu_info.min_page_size == PAGE


async def op_two_groups(t: Target) -> None:
    assert t.nvme is not None
    g_edu, g_nvme = group_number(t, t.edu), group_number(t, t.nvme)
    async with aiovfio.Container(kernel=t.kernel) as container:
        async with container.group(g_edu) as ge, container.group(g_nvme) as gn:
            async with ge.open_device(t.edu) as edu, gn.open_device(t.nvme) as nvme:
                assert edu.bar(0).read32(0) == EDU_IDENT
                assert nvme.bar(0).read32(0x08) >= 0x10000  # VS


async def op_regions(t: Target) -> None:
    async with _open(t) as dev:
        # an index whose info the kernel refuses with EINVAL is skipped, by design
        assert all(r.size for r in dev.regions)
        assert dev.region_info(0).size == 1 << 20
        assert dev.region_info(PciRegion.CONFIG).size >= 256


async def op_bar_access(t: Target) -> None:
    async with _open(t) as dev:
        bar = dev.bar(0)
        assert bar.read32(0) == EDU_IDENT
        bar.write32(_LIVENESS, 0x12345678)
        assert bar.read32(_LIVENESS) == 0xEDCBA987


async def op_mapped_bars(t: Target) -> None:
    async with _open(t, RAM) as dev:
        whole, sparse = dev.bar(0), dev.bar(2)
        assert whole.mapped and not sparse.mapped
        whole.write64(8, 0x1122334455667788)
        assert whole.read32(12) == 0x11223344
        sparse.write32(0x1000, 7)  # the mmap'd page
        sparse.write32(0x10, 9)  # a trapped register
        assert (sparse.read32(0x1000), sparse.read32(0x10)) == (7, 9)


async def op_config(t: Target) -> None:
    async with _open(t) as dev:
        cfg = dev.config
        assert (cfg.vendor_id, cfg.device_id) == (0x1234, 0x11E8)
        assert cfg.capabilities()
        cfg.enable()


async def op_irq_info(t: Target) -> None:
    async with _open(t) as dev:
        assert dev.irq_info("msi").count == 1
        assert dev.irq_info("intx").count == 1
        assert dev.irq_info("msix").count == 0


async def op_msi(t: Target) -> None:
    async with _open(t) as dev, dev.interrupts("msi") as (irq,):
        assert not irq.closed


async def op_msix(t: Target) -> None:
    async with _open(t, t.nvme) as dev, dev.interrupts("msix", 4) as irqs:
        assert len(irqs) == 4


async def op_intx_unmask(t: Target) -> None:
    async with _open(t) as dev:
        bar = dev.bar(0)
        async with dev.interrupts("intx") as (irq,):
            bar.write32(_IRQ_RAISE, 0x10)
            assert await irq.receive() == 1
            bar.write32(_IRQ_ACK, 0x10)
            irq.unmask()


async def op_trigger(t: Target) -> None:
    async with _open(t) as dev, dev.interrupts("msi") as (irq,):
        irq.trigger()


async def op_receive(t: Target) -> None:
    async with _open(t) as dev, dev.interrupts("msi") as (irq,):
        irq.trigger()
        irq.trigger()
        assert await irq.receive() == 2


async def op_dma_buffer(t: Target) -> None:
    async with _open(t, dma_mask=EDU_MASK) as dev, dev.dma_buffer(2 * PAGE) as buf:
        assert buf.iova + buf.size - 1 <= EDU_MASK


async def op_map_dma(t: Target) -> None:
    mem = mmap.mmap(-1, 2 * PAGE)
    try:
        async with _open(t) as dev, dev.map_dma(mem) as mapping:
            assert mapping.size == 2 * PAGE
    finally:
        mem.close()


async def op_reset_nvme(t: Target) -> None:
    async with _open(t, t.nvme) as dev:
        await dev.reset()


async def op_reset_unsupported(t: Target) -> None:
    async with _open(t) as dev:
        try:
            await dev.reset()
        except aiovfio.NotOffered:
            pass
        else:
            raise AssertionError("edu offers no reset, yet reset() returned")


async def _edu_dma(
    t: Target, bar: aiovfio.Region, irq: aiovfio.InterruptStream, src: int, dst: int, to_ram: bool
) -> None:
    bar.write64(_DMA_SRC, src)
    bar.write64(_DMA_DST, dst)
    bar.write64(_DMA_CNT, 256)
    bar.write64(_DMA_CMD, 0x1 | 0x4 | (0x2 if to_ram else 0))
    if t.machine is not None:
        t.machine.run_until_idle()
    assert await irq.receive() == 1
    bar.write32(_IRQ_ACK, bar.read32(_IRQ_STATUS))


async def op_edu_dma_round_trip(t: Target) -> None:
    async with _open(t, dma_mask=EDU_MASK) as dev:
        dev.config.enable()
        bar = dev.bar(0)
        async with dev.interrupts("msi") as (irq,), dev.dma_buffer(PAGE) as buf:
            buf.view[:256] = bytes(range(256))
            await _edu_dma(t, bar, irq, buf.iova, _EDU_BUF, to_ram=False)
            await _edu_dma(t, bar, irq, _EDU_BUF, buf.iova + 2048, to_ram=True)
            assert bytes(buf.view[2048:2304]) == bytes(range(256))


async def op_space_retires(t: Target) -> None:
    """A buffer entered by hand outlives its group: the DMA space retires and ends it."""
    number = group_number(t, t.edu)
    async with aiovfio.Container(kernel=t.kernel) as container:
        async with container.group(number) as group:
            buf = group.dma_space.dma_buffer(PAGE)
            await buf.__aenter__()
        assert buf.closed


async def op_hand_entered_irq(t: Target) -> None:
    """An interrupt set entered by hand (a REPL, a driver's start() without stop()):
    leaving the device disables it and closes its eventfds."""
    async with _open(t) as dev:
        iset = dev.interrupts("msi")
        await iset.__aenter__()
    assert iset.closed


async def op_release_request(t: Target) -> None:
    """The kernel asks for the device back while the driver waits for an interrupt."""
    assert t.machine is not None
    machine = t.machine
    try:
        async with _open(t) as dev, dev.interrupts("msi") as (irq,):
            if not machine.request_release(t.edu):
                return  # no REQ watch (its IRQ info failed with EINVAL: "no REQ index")
            await irq.receive()
    except aiovfio.DeviceReleaseRequested:
        return
    raise AssertionError("the release request did not end the block")


def _device_runs_after_pwrite(machine: Machine) -> Hook:
    """An `after` hook: the manual clock runs what a register write scheduled, at once
    (a doorbell's command, CC.EN's ready): device work inline, deterministic."""

    def after(n: int, name: str) -> None:
        if name == "pwrite":
            machine.run_until_idle()

    return after


def _same_trio_schedule() -> None:
    """Seed the generator trio shuffles each scheduler batch with, when on trio.

    The driver runs several tasks (its reapers, the ringer, the watchdog) beside
    the caller's; trio runs the tasks woken together in a random order, so two
    runs could make the same kernel calls in another order. The sweeps replay a
    run point by point by call number: each run of the op starts from the same
    seed. (`trio._core._run._r` is trio's own; without it nothing is seeded.)
    """
    try:
        import trio

        trio.lowlevel.current_task()
    except (ImportError, RuntimeError):
        return  # not on trio
    shuffler = getattr(getattr(getattr(trio, "_core", None), "_run", None), "_r", None)
    if shuffler is not None:
        shuffler.seed(0x15)


async def op_nvme_io(t: Target) -> None:
    """aiovfio.nvme end to end: the controller up, a block written and read back one
    command at a time and through a batch, then shut down (the model runs inline)."""
    from aiovfio.nvme import open_controller

    assert t.machine is not None and t.nvme is not None
    _same_trio_schedule()
    kernel = HookedKernel(t.kernel)
    kernel.after = _device_runs_after_pwrite(t.machine)
    async with (
        aiovfio.open_device(t.nvme, kernel=kernel.as_kernel()) as dev,
        open_controller(dev, queue_depth=4) as ctrl,
    ):
        ns = ctrl.namespace(1)
        block = bytes(range(256)) * (ns.block_size // 256)
        await ns.write(3, block)
        assert await ns.read(3, 1) == block
        # whole DmaBuffers (no view slices: a slice alive when its buffer closes is
        # the op's own leak, not the driver's)
        async with (
            dev.dma_buffer(ns.block_size) as one,
            dev.dma_buffer(ns.block_size) as two,
            ns.batch(2) as batch,
        ):
            batch.read_into(3, one, 0)
            batch.read_into(4, two, 1)
            tags: list[int] = []
            while len(tags) < 2:
                tags += await batch.completions()
            assert sorted(tags) == [0, 1]
            assert one.view.tobytes()[: len(block)] == block  # (a page: LBA 3 and on)


OPERATIONS: tuple[Operation, ...] = tuple(
    Operation(name.removeprefix("op_"), fn)
    for name, fn in (
        ("op_open_device", op_open_device),
        ("op_explicit_container", op_explicit_container),
        ("op_two_groups", op_two_groups),
        ("op_regions", op_regions),
        ("op_bar_access", op_bar_access),
        ("op_mapped_bars", op_mapped_bars),
        ("op_config", op_config),
        ("op_irq_info", op_irq_info),
        ("op_msi", op_msi),
        ("op_msix", op_msix),
        ("op_intx_unmask", op_intx_unmask),
        ("op_trigger", op_trigger),
        ("op_receive", op_receive),
        ("op_dma_buffer", op_dma_buffer),
        ("op_map_dma", op_map_dma),
        ("op_reset_nvme", op_reset_nvme),
        ("op_reset_unsupported", op_reset_unsupported),
        ("op_edu_dma_round_trip", op_edu_dma_round_trip),
        ("op_space_retires", op_space_retires),
        ("op_hand_entered_irq", op_hand_entered_irq),
        ("op_release_request", op_release_request),
        ("op_nvme_io", op_nvme_io),
    )
)


async def assert_fresh_open_works(t: Target) -> None:
    """After whatever happened, the machine is clean and edu opens and answers again."""
    assert t.machine is not None
    assert t.machine.leaks() == []
    async with _open(t) as edu:
        assert edu.bar(0).read32(0) == EDU_IDENT
    assert t.machine.leaks() == []


@contextlib.contextmanager
def closing_machine(target: Target, case: str = "") -> Generator[Target, None, None]:
    """Close the machine afterwards; a failure inside is annotated with `case`."""
    try:
        yield target
    except BaseException as exc:
        if case and hasattr(exc, "add_note"):
            exc.add_note(f"case: {case}")
        raise
    finally:
        if target.machine is not None:
            target.machine.close()
