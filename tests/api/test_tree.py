"""Issue 10: one resource tree around an owned DMA space; lifetimes that hold in any order.

One test per defect the issue lists, on asyncio, uvloop and trio (the
suite's `anyio_backend` fixture). Those marked `kernel` also run on the real
kernel inside the QEMU guest (6.1 and 6.12).
"""

from __future__ import annotations

import errno
import gc
import mmap
import os
import pickle
import sys
import threading
import time
import warnings
from typing import Any

import anyio
import pytest

import aiovfio
from aiovfio import repl
from aiovfio.sim import Machine
from aiovfio.sim.models import Edu
from aiovfio.testing.target import Target

from ._operations import HookedKernel, closing_machine, group_number, new_target, with_kernel

pytestmark = pytest.mark.anyio

PAGE = 4096
EDU_MASK = (1 << 28) - 1
SRC, DST, CNT, CMD, IRQ_STATUS, IRQ_ACK = 0x80, 0x88, 0x90, 0x98, 0x24, 0x64
EDU_BUF = 0x40000


async def _edu_dma(
    t: Target, bar: aiovfio.Region, irq: aiovfio.InterruptStream, src: int, dst: int, n: int
) -> None:
    """One edu DMA of `n` bytes: to its internal buffer when dst is EDU_BUF, else to RAM."""
    bar.write64(SRC, src)
    bar.write64(DST, dst)
    bar.write64(CNT, n)
    bar.write64(CMD, 0x1 | 0x4 | (0x2 if src == EDU_BUF else 0))
    if t.machine is not None:
        t.machine.run_until_idle()
    with anyio.fail_after(20):
        await irq.receive()
    bar.write32(IRQ_ACK, bar.read32(IRQ_STATUS))


def _sim_mappings(t: Target) -> list[str]:
    assert t.machine is not None
    return [line for line in t.machine.leaks() if line.startswith("DMA mapping")]


# --- 1. a mapping never outlives its address space -----------------------------------------


@pytest.mark.kernel
@pytest.mark.needs_iommu(
    "a type1 Container of its own: noiommu groups take VFIO_NOIOMMU_IOMMU only"
)
async def test_a_mapping_ends_with_its_address_space_and_spares_the_next(
    vfio_target: Target,
) -> None:
    """A mapping that outlived the container's last group used to be unmapped later, by
    IOVA, in the container's next IOMMU, removing another buffer's mapping; closing
    that buffer then raised a bare ValueError."""
    t = vfio_target
    number = group_number(t, t.edu)
    first = mmap.mmap(-1, PAGE)
    second = mmap.mmap(-1, PAGE)
    try:
        async with aiovfio.Container(kernel=t.kernel) as container:
            group = container.group(number)
            await group.__aenter__()
            stale = container.map_dma(first)
            await stale.__aenter__()
            iova = stale.iova
            old_space = container.dma_space
            await group.aclose()  # the last group: the address space retires
            assert old_space.closed and stale.closed and not stale.mapped
            with pytest.raises(aiovfio.ClosedResourceError):
                stale.iova  # noqa: B018 - the attribute is what is checked
            first.close()  # no longer pinned: the mapping really is gone
            async with container.group(number) as g2, g2.open_device(t.edu) as dev:
                assert container.dma_space is not old_space
                second[:16] = b"second buffer!!!"
                async with container.map_dma(second, iova=iova) as live:
                    await stale.aclose()  # ended: nothing to do, and nothing removed
                    dev.config.enable()
                    bar = dev.bar(0)
                    async with dev.interrupts("msi") as (irq,):
                        await _edu_dma(t, bar, irq, live.iova, EDU_BUF, 16)
                        await _edu_dma(t, bar, irq, EDU_BUF, live.iova + 64, 16)
                    assert second[64:80] == b"second buffer!!!"  # still mapped
                assert not live.mapped
    finally:
        second.close()
        if not first.closed:
            first.close()


async def test_retiring_retries_a_failed_unmap_once(sim_machine: Target) -> None:
    t = sim_machine
    assert t.machine is not None
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        buf = dev.dma_buffer(PAGE)
        await buf.__aenter__()  # entered by hand: the space ends it
        t.machine.inject("unmap_dma", errno.EIO, nth=1)
    t.machine.clear_injections()
    assert buf.closed and _sim_mappings(t) == []


async def test_a_failed_unmap_is_retried_when_the_block_ends(sim_machine: Target) -> None:
    t = sim_machine
    assert t.machine is not None
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        async with dev.dma_buffer(PAGE):
            t.machine.inject("unmap_dma", errno.EIO, nth=1)
        assert dev.dma_space.mapping_count == 0
        assert _sim_mappings(t) == []
        t.machine.inject("unmap_dma", errno.EIO, times=2)
        with pytest.raises(aiovfio.KernelError, match="VFIO_IOMMU_UNMAP_DMA"):
            async with dev.dma_buffer(PAGE):
                pass
        t.machine.clear_injections()


# --- 2. / 4. release never depends on the parent, and raises nothing -----------------------


async def test_leaving_a_device_with_a_hand_entered_interrupt_set(sim_machine: Target) -> None:
    """It raised ClosedResourceError from the device's own teardown, sent no disable and
    replaced the exception in flight."""
    t = sim_machine
    assert t.machine is not None
    calls = t.machine.kernel_calls
    with pytest.raises(LookupError, match="the driver's own"):
        async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
            iset = dev.interrupts("msi")
            (irq,) = await iset.__aenter__()
            before = calls["device_set_irqs"]
            raise LookupError("the driver's own error")
    assert calls["device_set_irqs"] == before + 2  # the MSI disable, then REQ's
    assert iset.closed and irq.closed
    assert t.machine.leaks() == []


async def test_repl_release_with_an_interrupt_set_entered_by_hand() -> None:
    machine = Machine()
    machine.add_device(Edu(), name="0000:00:04.0")
    try:
        dev = await repl.attach(machine)
        iset = dev.interrupts("msi")
        await iset.__aenter__()
        dev.dma_buffer(PAGE)  # made, never entered: nothing to release
        buf = dev.dma_buffer(PAGE)
        await buf.__aenter__()
        await repl.release()
        assert iset.closed and buf.closed and dev.closed
        assert machine.leaks() == []
    finally:
        await repl.session.aclose()
        machine.close()


async def test_a_second_concurrent_close_waits_for_the_first(anyio_backend: Any) -> None:
    """The second aclose() returned before the device fd was closed."""
    with closing_machine(new_target()) as base:
        kernel = HookedKernel(base.kernel)
        loop_thread = threading.get_ident()
        gate = threading.Event()
        blocked = threading.Event()

        def hold_device_close(n: int, name: str) -> None:
            if name == "close" and threading.get_ident() != loop_thread and not gate.is_set():
                blocked.set()
                gate.wait(10)

        t = with_kernel(base, kernel.as_kernel())
        async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
            kernel.before = hold_device_close
            order: list[str] = []

            async def close(who: str) -> None:
                await dev.aclose()
                order.append(who)

            async with anyio.create_task_group() as tg:
                tg.start_soon(close, "first")
                await anyio.to_thread.run_sync(blocked.wait, 10)
                tg.start_soon(close, "second")
                await anyio.wait_all_tasks_blocked()
                assert order == [] and dev.closed
                gate.set()
            assert sorted(order) == ["first", "second"]
            kernel.before = None
        assert base.machine is not None
        assert base.machine.leaks() == []


# --- 3. / 5. the one-mode rule on entry ---------------------------------------------------


@pytest.mark.kernel
async def test_one_interrupt_mode_at_a_time_is_checked_on_entry(vfio_target: Target) -> None:
    """A second MSI set made while one was entered silently stole the vector; leaving the
    first then raised EINVAL."""
    t = vfio_target
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        first = dev.interrupts("msi")
        second = dev.interrupts("msi")  # made while none is entered: fine
        intx = dev.interrupts("intx")
        async with first as (irq,):
            for other in (second, intx):
                with pytest.raises(aiovfio.BusyResourceError, match=r"msi x1 of .* enabled"):
                    async with other:
                        pass
                assert other.closed
            irq.trigger()  # still ours
            with anyio.fail_after(10):
                assert await irq.receive() == 1
        async with dev.interrupts("intx") as (line,):
            assert not line.closed
    assert t.leaks() == []


# --- 4. enter once; closed attributes raise --------------------------------------------------


async def test_entering_twice_is_refused_and_acquires_nothing(sim_machine: Target) -> None:
    t = sim_machine
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        mem = mmap.mmap(-1, PAGE)
        try:
            buf = dev.dma_buffer(PAGE)
            mapping = dev.map_dma(mem)
            async with buf, mapping:
                count = dev.dma_space.mapping_count
                for handle in (buf, mapping):
                    with pytest.raises(aiovfio.UsageError, match="entered only once"):
                        await handle.__aenter__()
                assert dev.dma_space.mapping_count == count == 2
            for handle in (buf, mapping):
                with pytest.raises(aiovfio.ClosedResourceError):
                    await handle.__aenter__()
            with pytest.raises(aiovfio.ClosedResourceError):
                buf.iova  # noqa: B018
            with pytest.raises(aiovfio.ClosedResourceError):
                buf.view  # noqa: B018
            with pytest.raises(aiovfio.ClosedResourceError):
                mapping.iova  # noqa: B018
            assert dev.dma_space.mapping_count == 0
            iset = dev.interrupts("msi")
            async with iset as (irq,):
                with pytest.raises(aiovfio.UsageError, match="entered only once"):
                    await iset.__aenter__()
            with pytest.raises(aiovfio.ClosedResourceError):
                irq.fd  # noqa: B018
        finally:
            mem.close()
    for attr in ("fd", "info"):
        with pytest.raises(aiovfio.ClosedResourceError):
            getattr(dev, attr)


async def test_a_handle_collected_open_warns_and_releases(sim_machine: Target) -> None:
    t = sim_machine
    assert t.machine is not None
    container = aiovfio.Container(kernel=t.kernel)
    await container.__aenter__()
    with pytest.warns(ResourceWarning, match="never closed"):
        del container  # the last reference: collected at once
    gc.collect()
    assert t.machine.leaks() == []


# --- 6. DMA memory -------------------------------------------------------------------------


@pytest.mark.parametrize("page", [16 * 1024, 64 * 1024])
async def test_buffers_are_aligned_to_a_large_iommu_page(anyio_backend: Any, page: int) -> None:
    """With an IOMMU page larger than the CPU page, dma_buffer() failed about 15 times in 16."""
    with Machine(page_size=page) as machine:
        machine.add_device(Edu(), name="0000:00:04.0")
        async with aiovfio.open_device("0000:00:04.0", kernel=machine.kernel) as dev:
            assert dev.dma_space.page_size == page
            for _ in range(16):
                async with dev.dma_buffer(100) as buf:
                    assert buf.size == page and buf.iova % page == 0
                    assert aiovfio.dma.buffer_address(buf.view)[0] % page == 0
        assert machine.leaks() == []


@pytest.mark.parametrize("exporter", ["pickle-buffer", "numpy", "slice"])
async def test_an_exported_view_never_keeps_the_mapping(sim_machine: Target, exporter: str) -> None:
    """Leaving the block raised a bare BufferError before the unmap."""
    t = sim_machine
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        holder: Any = None
        buf = dev.dma_buffer(PAGE)
        await buf.__aenter__()
        buf.view[:4] = b"data"
        if exporter == "pickle-buffer":
            holder = pickle.PickleBuffer(buf.view)
        elif exporter == "numpy":
            np = pytest.importorskip("numpy")
            holder = np.frombuffer(buf.view, dtype=np.uint8)
        else:
            holder = buf.view[:8]
        with pytest.warns(ResourceWarning, match="unmapped, but its memory is still exported"):
            await buf.aclose()
        assert dev.dma_space.mapping_count == 0 and _sim_mappings(t) == []
        assert bytes(memoryview(holder)[:4]) == b"data"  # the memory lives on with its holder
        del holder
        gc.collect()


async def test_the_exported_view_warning_names_the_holder(sim_machine: Target) -> None:
    t = sim_machine
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            async with dev.dma_buffer(PAGE) as buf:
                held = pickle.PickleBuffer(buf.view)
        assert any("PickleBuffer" in str(w.message) for w in caught), [
            str(w.message) for w in caught
        ]
        del held


# --- 8. receive always checkpoints ----------------------------------------------------------


async def test_receive_in_a_cancelled_scope_is_cancelled_with_a_count_pending(
    sim_machine: Target,
) -> None:
    """On trio, receive() returned the pending count inside a cancelled scope."""
    t = sim_machine
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        async with dev.interrupts("msi") as (irq,):
            irq.trigger()
            assert await irq.receive() == 1  # the asyncio reader is registered now
            irq.trigger()
            irq.trigger()
            await anyio.sleep(0.05)  # asyncio: the reader takes the count into the stream
            with anyio.CancelScope() as scope:
                scope.cancel()
                await irq.receive()
                pytest.fail("receive() returned inside a cancelled scope")
            assert scope.cancelled_caught
            assert await irq.receive() == 2  # nothing was lost


async def test_a_busy_device_cannot_starve_a_driver(sim_machine: Target) -> None:
    t = sim_machine
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        async with dev.interrupts("msi") as (irq,):
            seen = 0
            with anyio.move_on_after(0.2) as scope:
                while True:
                    irq.trigger()  # always one pending: receive never has to wait
                    seen += await irq.receive()
            assert scope.cancelled_caught and seen > 0


# --- 9. argument checks, names and hints ----------------------------------------------------


async def test_bool_is_not_an_int(sim_machine: Target) -> None:
    t = sim_machine
    assert t.machine is not None
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        bar, cfg = dev.bar(0), dev.config
        calls = sum(t.machine.kernel_calls.values())
        for call in (
            lambda: bar.read32(True),
            lambda: bar.read8(False),
            lambda: bar.write8(True, 1),
            lambda: bar.write32(0x4, True),
            lambda: bar.read(True, 4),
            lambda: cfg.read16(False),
            lambda: dev.bar(True),
            lambda: dev.region_info(False),
            lambda: dev.interrupts("msi", True),
            lambda: dev.dma_buffer(True),
        ):
            with pytest.raises(aiovfio.InvalidArgument):
                call()
        assert sum(t.machine.kernel_calls.values()) == calls  # refused before any syscall


async def test_kernel_must_be_a_kernel(anyio_backend: Any) -> None:
    for bad in ("sim", 42):
        with pytest.raises(aiovfio.InvalidArgument, match="kernel= takes a Kernel"):
            async with aiovfio.open_device("0000:00:04.0", kernel=bad):  # type: ignore[arg-type]
                pass
        with pytest.raises(aiovfio.InvalidArgument, match="kernel= takes a Kernel"):
            aiovfio.Container(kernel=bad)  # type: ignore[arg-type]


async def test_the_command_setter_takes_ints_only(sim_machine: Target) -> None:
    t = sim_machine
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        cfg = dev.config
        for bad in ("7", 1.5, None, True, 1 << 16, -1):
            with pytest.raises(aiovfio.InvalidArgument):
                cfg.command = bad  # type: ignore[assignment]
        cfg.command = cfg.command | 0x2
        assert cfg.command & 0x2


async def test_released_buffers_are_usage_errors(sim_machine: Target) -> None:
    t = sim_machine
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        mem = mmap.mmap(-1, PAGE)
        view = memoryview(mem)
        view.release()
        closed = mmap.mmap(-1, PAGE)
        closed.close()
        for dead in (view, closed):
            with pytest.raises(aiovfio.UsageError, match="released or closed"):
                dev.bar(0).write(0, dead)
            with pytest.raises(aiovfio.UsageError, match="released or closed"):
                dev.map_dma(dead)
        mem.close()


async def test_a_bad_region_index_names_the_regions(sim_machine: Target) -> None:
    t = sim_machine
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        with pytest.raises(
            aiovfio.InvalidArgument, match=r"no region 42; its regions are 0 \(BAR0"
        ):
            dev.region_info(42)
        with pytest.raises(aiovfio.InvalidArgument, match="config"):
            dev.region_info(-1)


async def test_enomem_says_which_limit_was_hit(sim_machine: Target) -> None:
    t = sim_machine
    assert t.machine is not None
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        t.machine.inject("map_dma", errno.ENOMEM, nth=1)
        with pytest.raises(aiovfio.OutOfMemory, match="RLIMIT_MEMLOCK") as info:
            async with dev.dma_buffer(PAGE):
                pass
        assert "pinned" in str(info.value) and info.value.errno == errno.ENOMEM
        t.machine.clear_injections()


async def test_ebusy_on_a_group_this_process_holds_names_the_holder(sim_machine: Target) -> None:
    t = sim_machine
    async with aiovfio.open_device(t.edu, kernel=t.kernel):
        with pytest.raises(aiovfio.KernelBusy, match=r"in this process, as <Group \d+ fd="):
            async with aiovfio.open_device(t.edu, kernel=t.kernel):
                pass


def test_the_confusable_names_are_renamed_with_deprecated_aliases() -> None:
    assert issubclass(aiovfio.NotOffered, aiovfio.UsageError)
    assert issubclass(aiovfio.KernelBusy, aiovfio.KernelError)
    with pytest.warns(DeprecationWarning, match="renamed NotOffered"):
        assert aiovfio.Unsupported is aiovfio.NotOffered
    with pytest.warns(DeprecationWarning, match="renamed KernelBusy"):
        assert aiovfio.errors.ResourceBusy is aiovfio.KernelBusy
    with pytest.raises(AttributeError):
        aiovfio.NoSuchName  # type: ignore[attr-defined]  # noqa: B018


# --- 10. REQ: the kernel asks for the device back -----------------------------------------------


async def test_req_cancels_the_block_and_releases_everything(sim_machine: Target) -> None:
    t = sim_machine
    assert t.machine is not None
    machine = t.machine
    reached = False
    with pytest.raises(
        aiovfio.DeviceReleaseRequested, match=r"asked for device 0000:00:04\.0 back"
    ):
        async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
            async with dev.interrupts("msi") as (irq,), dev.dma_buffer(PAGE):
                machine.request_release(t.edu)
                reached = True
                await irq.receive()  # the driver waits for its device
    assert reached and machine.leaks() == []


async def test_req_with_a_policy_of_its_own(sim_machine: Target) -> None:
    t = sim_machine
    assert t.machine is not None
    asked = anyio.Event()
    async with aiovfio.open_device(
        t.edu, kernel=t.kernel, on_release_request=lambda dev: asked.set()
    ) as dev:
        t.machine.request_release(t.edu)
        with anyio.fail_after(10):
            await asked.wait()
        assert not dev.closed  # the policy decides; here the block ends by itself
    assert t.machine.leaks() == []


async def test_req_ignored_leaves_req_to_the_driver(sim_machine: Target) -> None:
    t = sim_machine
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        with pytest.raises(aiovfio.BusyResourceError, match="on_release_request='ignore'"):
            async with dev.interrupts("req"):
                pass
    async with aiovfio.open_device(t.edu, kernel=t.kernel, on_release_request="ignore") as dev:
        async with dev.interrupts("req") as (req,):
            assert not req.closed
    with pytest.raises(aiovfio.InvalidArgument, match="on_release_request"):
        async with aiovfio.open_device(t.edu, kernel=t.kernel, on_release_request="later"):  # type: ignore[arg-type]
            pass


async def test_the_block_exception_is_not_wrapped(sim_machine: Target) -> None:
    t = sim_machine
    with pytest.raises(KeyError):
        async with aiovfio.open_device(t.edu, kernel=t.kernel):
            raise KeyError("plain")


# --- 6. the shared zero page (Linux 6.1) -----------------------------------------------------


def _linux_6_1(t: Target) -> bool:
    return t.machine is None and os.uname().release.startswith("6.1.")


@pytest.mark.kernel
@pytest.mark.parametrize("populate", [True, False], ids=["write-faulted", "untouched"])
async def test_a_read_only_buffer_filled_after_mapping_reaches_the_device(
    vfio_target: Target, monkeypatch: pytest.MonkeyPatch, populate: bool
) -> None:
    """Linux 6.1 pins the shared zero page for a read-only pin of untouched memory: the
    device read zeros whatever the CPU wrote after mapping. `untouched` turns aiovfio's
    write-fault off and shows the kernel's behaviour (zeros on 6.1 only); `write-faulted`
    is what dma_buffer(readonly=True) does, right on every kernel."""
    t = vfio_target
    if not populate:
        monkeypatch.setattr(aiovfio.dma, "populate_write", lambda view, page=PAGE: None)
    pattern = bytes(range(1, 256)) + b"\xff"
    async with aiovfio.open_device(t.edu, kernel=t.kernel, dma_mask=EDU_MASK) as dev:
        dev.config.enable()
        bar = dev.bar(0)
        async with (
            dev.interrupts("msi") as (irq,),
            dev.dma_buffer(PAGE, readonly=True) as src,
            dev.dma_buffer(PAGE) as dst,
        ):
            src.view[:256] = pattern  # the CPU fills it after it was mapped (a queue, a payload)
            await _edu_dma(t, bar, irq, src.iova, EDU_BUF, 256)
            await _edu_dma(t, bar, irq, EDU_BUF, dst.iova, 256)
            got = bytes(dst.view[:256])
    if not populate and _linux_6_1(t):
        assert got == bytes(256), "6.1 no longer pins the zero page: drop the write fault?"
    else:
        assert got == pattern


# --- 10. REQ in the guest: an unbind from another process completes -------------------------------


async def _unbind_from_another_process(t: Target) -> float:
    """Write the device's address to its driver's unbind file from a child process;
    return how long the write took (seconds)."""
    if t.machine is not None:  # the sim: its unbind refuses an open device and signals REQ
        start = time.perf_counter()
        machine = t.machine
        await anyio.to_thread.run_sync(machine.request_release, t.edu)
        return time.perf_counter() - start
    code = (
        "import sys, time; t = time.perf_counter(); "
        "open('/sys/bus/pci/drivers/vfio-pci/unbind', 'w').write(sys.argv[1]); "
        "print(time.perf_counter() - t)"
    )
    result = await anyio.run_process([sys.executable, "-c", code, t.edu])
    return float(result.stdout.decode())


@pytest.mark.kernel
async def test_unbind_while_the_driver_waits_completes_and_nothing_leaks(
    vfio_target: Target,
) -> None:
    t = vfio_target
    took: list[float] = []
    waiting = anyio.Event()

    async def unbind() -> None:  # outside the device's scope, as another process is
        await waiting.wait()
        took.append(await _unbind_from_another_process(t))

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(unbind)
            with pytest.raises(aiovfio.DeviceReleaseRequested, match="asked for device"):
                async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
                    async with dev.interrupts("msi") as (irq,), dev.dma_buffer(PAGE):
                        waiting.set()
                        await irq.receive()  # the driver awaits its device's interrupt
                        pytest.fail("the interrupt arrived instead of the release request")
    if t.machine is not None:
        t.machine.set_driver(t.edu, None)  # released: the unbind goes through now
        t.machine.set_driver(t.edu, "vfio-pci")
    else:
        assert not os.path.exists(f"/sys/bus/pci/drivers/vfio-pci/{t.edu}")  # noqa: ASYNC240
        with open("/sys/bus/pci/drivers/vfio-pci/bind", "w") as f:  # noqa: ASYNC230
            f.write(t.edu)
    print(f"[unbind] the unbind took {took[0] * 1000:.0f} ms")
    assert took and took[0] < 1.0, f"the unbind took {took[0]:.2f} s"
    assert t.leaks() == []
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as again:  # bound and usable again
        assert again.bar(0).read32(0) == 0x010000ED
