"""A device that has answered by the time its doorbell write returns (the sim's model run
inline after each doorbell, as benchmarks/nvme_perf.py's QD1 rows do): commands complete
without an event-loop turn each, yet other tasks get turns, cancellation arrives, and the
interrupt they raised is read, not left to wake anyone later."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import aiovfio
import aiovfio.nvme.batch
import aiovfio.nvme.queue
from aiovfio.nvme import Namespace, NvmeStatusError, open_controller
from aiovfio.nvme.spec import IoOpcode, doorbell_offsets
from aiovfio.sim import Machine
from aiovfio.sim.models import Nvme
from aiovfio.testing.target import SIM_NVME, Target

from .conftest import MakeTarget

pytestmark = pytest.mark.anyio


class InlineKernel:
    """The sim's kernel, running the machine until idle after every pwrite (a doorbell);
    counts eventfd reads that found a count."""

    def __init__(self, machine: Machine) -> None:
        self._inner = machine.kernel
        self._run = machine.run_until_idle
        self.reads = 0
        #: the file offsets of every pwrite (register writes)
        self.writes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        self.writes.append(offset)
        self._inner.pwrite(fd, data, offset)
        self._run()

    def eventfd_read(self, fd: int) -> int:
        n: int = self._inner.eventfd_read(fd)
        self.reads += 1
        return n


@pytest.fixture
def inline() -> Iterator[InlineKernel]:
    machine = Machine(clock="manual")
    machine.add_device(Nvme(size=8 << 20), name=SIM_NVME)
    target = Target(machine.kernel, "", SIM_NVME, machine)
    try:
        yield InlineKernel(machine)
        assert target.leaks() == [], target.leaks()
        assert [r.message for r in machine.faults if r.kind == "iommu"] == []
    finally:
        target.close()


Reader = Callable[..., Awaitable[None]]


def _nothing() -> None:
    pass


async def _one_by_one(
    ns: Namespace, buf: aiovfio.DmaBuffer, n: int, started: Callable[[], None] = _nothing
) -> None:
    started()
    for i in range(n):
        await ns.read_into(i * 8, buf)


async def _batched(
    ns: Namespace, buf: aiovfio.DmaBuffer, n: int, started: Callable[[], None] = _nothing
) -> None:
    async with ns.batch(depth=1) as batch:  # entering is a checkpoint
        started()
        for i in range(n):
            batch.read_into(i * 8, buf)
            assert await batch.completions() == [buf]


READERS = [pytest.param(_one_by_one, id="per-command"), pytest.param(_batched, id="batch")]


async def _counting(turns: list[int], stop: anyio.Event) -> None:
    while not stop.is_set():
        turns[0] += 1
        await anyio.lowlevel.checkpoint()


@pytest.mark.parametrize("reader", READERS)
async def test_answered_commands_take_no_loop_turn_each(
    inline: InlineKernel, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in (aiovfio.nvme.queue, aiovfio.nvme.batch):
        monkeypatch.setattr(module, "TURN_EVERY", 10**9)  # no forced turn in this test
    async with aiovfio.open_device(SIM_NVME, kernel=inline) as dev:  # type: ignore[arg-type]
        async with open_controller(dev, queue_depth=1) as ctrl, dev.dma_buffer(4096) as buf:
            ns = ctrl.namespace()
            await ns.write(0, os.urandom(64 * 512))
            turns, stop = [0], anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_counting, turns, stop)
                await anyio.sleep(0.001)
                before = [0]
                await reader(ns, buf, 40, lambda: before.__setitem__(0, turns[0]))
                assert turns[0] == before[0]  # forty commands, no turn of the loop
                stop.set()
            assert bytes(buf.view) == await ns.read(39 * 8, 8)


@pytest.mark.parametrize("every", [8, aiovfio.nvme.queue.TURN_EVERY])
@pytest.mark.parametrize("reader", READERS)
async def test_other_tasks_still_get_turns(
    inline: InlineKernel, reader: Reader, every: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A turn at least every TURN_EVERY answered commands (a count: the same points in
    every run), whether one at a time or through a batch."""
    for module in (aiovfio.nvme.queue, aiovfio.nvme.batch):
        monkeypatch.setattr(module, "TURN_EVERY", every)
    async with aiovfio.open_device(SIM_NVME, kernel=inline) as dev:  # type: ignore[arg-type]
        async with open_controller(dev, queue_depth=1) as ctrl, dev.dma_buffer(4096) as buf:
            ns = ctrl.namespace()
            turns, stop = [0], anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_counting, turns, stop)
                await anyio.sleep(0.001)
                before = [0]
                commands = 5 * every
                await reader(ns, buf, commands, lambda: before.__setitem__(0, turns[0]))
                # one turn per `every` commands, give or take the first (the budget
                # left over from opening the controller) and trio's shuffled order of
                # the two tasks in a scheduler batch (a turn seen one turn late)
                assert 3 <= turns[0] - before[0] <= 6
                stop.set()


@pytest.mark.parametrize("reader", READERS)
async def test_a_deadline_ends_a_loop_of_answered_commands(
    inline: InlineKernel, reader: Reader
) -> None:
    async with aiovfio.open_device(SIM_NVME, kernel=inline) as dev:  # type: ignore[arg-type]
        async with open_controller(dev, queue_depth=1) as ctrl, dev.dma_buffer(4096) as buf:
            ns = ctrl.namespace()
            with anyio.move_on_after(0.02) as scope:
                while True:
                    await reader(ns, buf, 10)
            assert scope.cancelled_caught
            assert ctrl.queues[0].inflight == 0
            await ns.write(0, b"\x5a" * 512)  # the controller goes on
            assert await ns.read(0, 1) == b"\x5a" * 512
        assert ctrl.shutdown_clean is True


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("reader", READERS)
async def test_asyncio_wait_for_ends_a_loop_of_answered_commands(
    inline: InlineKernel, reader: Reader
) -> None:
    async with aiovfio.open_device(SIM_NVME, kernel=inline) as dev:  # type: ignore[arg-type]
        async with open_controller(dev, queue_depth=1) as ctrl, dev.dma_buffer(4096) as buf:
            ns = ctrl.namespace()

            async def forever() -> None:
                while True:
                    await reader(ns, buf, 10)

            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(forever(), 0.02)
            assert ctrl.queues[0].inflight == 0
            assert await ns.read(0, 1) == bytes(512)


@pytest.mark.parametrize("reader", READERS)
async def test_no_interrupt_is_left_to_wake_the_loop_later(
    inline: InlineKernel, reader: Reader
) -> None:
    async with aiovfio.open_device(SIM_NVME, kernel=inline) as dev:  # type: ignore[arg-type]
        async with open_controller(dev, queue_depth=1) as ctrl, dev.dma_buffer(4096) as buf:
            ns = ctrl.namespace()
            await reader(ns, buf, 20)
            reads = inline.reads
            assert reads >= 20  # each command's interrupt read by the command itself
            await anyio.sleep(0.02)  # the loop idles: nothing pending wakes its reader
            assert inline.reads == reads


@pytest.mark.parametrize("reader", READERS)
async def test_the_cq_head_doorbell_waits_while_nothing_is_in_flight(
    inline: InlineKernel, reader: Reader
) -> None:
    async with aiovfio.open_device(SIM_NVME, kernel=inline) as dev:  # type: ignore[arg-type]
        async with open_controller(dev, queue_depth=1) as ctrl, dev.dma_buffer(4096) as buf:
            ns = ctrl.namespace()
            q = ctrl.queues[0]
            assert q.cq_size == 256 > q.size == 2  # the CQ fills its page
            data = os.urandom(8 * 512)
            await ns.write(5 * 8, data)
            sq_db, cq_db = doorbell_offsets(1, ctrl.cap.doorbell_stride)
            base = dev.bar(0).info.offset
            inline.writes.clear()
            await reader(ns, buf, 3 * q.cq_size)  # the CQ wraps three times
            assert inline.writes.count(base + sq_db) == 3 * q.cq_size  # one per command
            # one head write per cq_size - size + 1 completions, not one per command
            assert inline.writes.count(base + cq_db) == 3 * q.cq_size // (q.cq_size - 1)
            await ns.read_into(5 * 8, buf)
            assert bytes(buf.view) == data


class EdgeIrq(Nvme):
    """Signals a CQ's vector only when it posts to a CQ it sees fully consumed (head ==
    tail): a device that needs the head doorbell before it interrupts again."""

    def _post(self, cq: Any) -> None:
        enabled = cq.irq_enabled
        if cq.pending:
            cq.irq_enabled = False
        try:
            super()._post(cq)
        finally:
            cq.irq_enabled = enabled


@pytest.mark.parametrize("reader", READERS)
async def test_the_cq_head_is_rung_before_sleeping_on_the_interrupt(
    make_target: MakeTarget, reader: Reader
) -> None:
    t = make_target(model=EdgeIrq(size=8 << 20))  # the machine's clock: commands take time
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        async with open_controller(dev, queue_depth=1) as ctrl, dev.dma_buffer(4096) as buf:
            ns = ctrl.namespace()
            with anyio.fail_after(20):  # a missing head write hangs until the command timeout
                await reader(ns, buf, 30)
                await _one_by_one(ns, buf, 5)
                await _batched(ns, buf, 5)
    assert t.leaks() == []


class CountingKernel:
    """The sim's kernel, recording the file offset of every pwrite (register writes)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.writes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        self.writes.append(offset)
        self._inner.pwrite(fd, data, offset)


async def test_commands_from_many_tasks_share_sq_doorbells(make_target: MakeTarget) -> None:
    t = make_target(size=8 << 20)
    kernel = CountingKernel(t.kernel)
    async with aiovfio.open_device(t.nvme, kernel=kernel) as dev:  # type: ignore[arg-type]
        async with open_controller(dev, queue_depth=16) as ctrl, dev.dma_buffer(16 * 4096) as big:
            ns = ctrl.namespace()
            data = os.urandom(16 * 4096)
            await ns.write(0, data)
            sq_db, _ = doorbell_offsets(1, ctrl.cap.doorbell_stride)
            where = dev.bar(0).info.offset + sq_db
            kernel.writes.clear()

            async def reader(i: int) -> None:
                view = big.view[i * 4096 : (i + 1) * 4096]
                for _ in range(20):
                    await ns.read_into(i * 8, view)
                view.release()

            async with anyio.create_task_group() as tg:
                for i in range(16):
                    tg.start_soon(reader, i)
            assert bytes(big.view) == data
            # tasks woken by one reap submit together and one doorbell write sends them
            # (asyncio: a call_soon callback; trio: the queue's ringer task)
            assert kernel.writes.count(where) < 16 * 20


async def test_an_answered_error_status(inline: InlineKernel) -> None:
    async with aiovfio.open_device(SIM_NVME, kernel=inline) as dev:  # type: ignore[arg-type]
        async with open_controller(dev, queue_depth=1) as ctrl, dev.dma_buffer(4096) as buf:
            ns = ctrl.namespace()
            with pytest.raises(NvmeStatusError, match="LBA Out of Range"):  # per command
                await ns.command(int(IoOpcode.READ), buffer=buf, cdw10=ns.blocks, cdw12=7)
            async with ns.batch(depth=1) as batch:
                # past the end only with the checks bypassed: the controller's own status
                batch._blocks = 1 << 40
                batch.read_into(ns.blocks, buf, tag="bad")
                with pytest.raises(NvmeStatusError, match="LBA Out of Range") as info:
                    await batch.completions()
                assert info.value.tag == "bad"
                batch._blocks = ns.blocks
                batch.read_into(0, buf, tag="good")
                assert await batch.completions() == ["good"]
            assert ctrl.queues[0].free == 1


class _Stop(Exception):
    pass


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.parametrize("reader", READERS)
async def test_trio_a_scope_cancelled_by_the_task_raises_at_its_next_command(
    inline: InlineKernel, reader: Reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On trio an answered command still raises at once in a cancelled scope: the cancel
    status and the pending KeyboardInterrupt flag are read directly (no coroutine per
    command) and trio's checkpoint_if_cancelled asked when either is set."""
    for module in (aiovfio.nvme.queue, aiovfio.nvme.batch):
        monkeypatch.setattr(module, "TURN_EVERY", 10**9)  # no forced turn: only the check
    async with aiovfio.open_device(SIM_NVME, kernel=inline) as dev:  # type: ignore[arg-type]
        async with open_controller(dev, queue_depth=1) as ctrl, dev.dma_buffer(4096) as buf:
            ns = ctrl.namespace()
            q = ctrl.queues[0]
            # this trio has the flags: the per-command check is the direct read
            assert not isinstance(q._trio_run, aiovfio.nvme.queue._AskTrio)
            sq_db, _ = doorbell_offsets(1, ctrl.cap.doorbell_stride)
            where = dev.bar(0).info.offset + sq_db
            done = [0]

            def counted() -> None:
                done[0] += 1
                if done[0] == 5:
                    scope.cancel()  # the task itself: no scheduler turn in between

            with anyio.CancelScope() as scope:
                if reader is _one_by_one:
                    for i in range(10):
                        await ns.read_into(i * 8, buf)
                        counted()
                else:
                    async with ns.batch(depth=1) as batch:
                        for i in range(10):
                            batch.read_into(i * 8, buf)
                            assert await batch.completions() == [buf]
                            counted()
            assert scope.cancelled_caught
            assert done[0] == 5  # the command after the cancel raised
            assert q.inflight == 0 and q.free == q.depth
            rung = inline.writes.count(where)
            with anyio.CancelScope() as scope:
                scope.cancel()
                await ns.read_into(0, buf)  # cancelled before it starts: nothing rung
                raise _Stop  # not reached
            assert scope.cancelled_caught
            assert inline.writes.count(where) == rung
            assert q.free == q.depth
            await ns.read_into(0, buf)  # the queue goes on
        assert ctrl.shutdown_clean is True


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_without_the_flags_every_command_asks_trio(
    inline: InlineKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trio whose task or runner lacks the flags: each command awaits
    checkpoint_if_cancelled, as before; a cancelled scope still raises at once."""
    import trio

    from aiovfio.nvme.queue import _AskTrio, _trio_run_flags

    assert not isinstance(_trio_run_flags(), _AskTrio)  # this trio has them
    with monkeypatch.context() as m:
        m.setattr(trio.lowlevel, "current_task", lambda: object())
        assert isinstance(_trio_run_flags(), _AskTrio)
    monkeypatch.setattr(aiovfio.nvme.queue, "_trio_run_flags", _AskTrio)
    monkeypatch.setattr(aiovfio.nvme.queue, "TURN_EVERY", 10**9)
    asked = [0]
    real = trio.lowlevel.checkpoint_if_cancelled

    async def counting() -> None:
        asked[0] += 1
        await real()

    async with aiovfio.open_device(SIM_NVME, kernel=inline) as dev:  # type: ignore[arg-type]
        async with open_controller(dev, queue_depth=1) as ctrl, dev.dma_buffer(4096) as buf:
            q = ctrl.queues[0]
            assert isinstance(q._trio_run, _AskTrio)
            q._checkpoint_if_cancelled = counting
            ns = ctrl.namespace()
            for i in range(4):
                await ns.read_into(i * 8, buf)
            assert asked[0] == 4
            with anyio.CancelScope() as scope:
                scope.cancel()
                await ns.read_into(0, buf)
            assert scope.cancelled_caught
            assert q.free == q.depth


async def test_a_closed_buffer_is_refused_on_the_hot_path(inline: InlineKernel) -> None:
    async with aiovfio.open_device(SIM_NVME, kernel=inline) as dev:  # type: ignore[arg-type]
        async with open_controller(dev, queue_depth=1) as ctrl:
            ns = ctrl.namespace()
            async with dev.dma_buffer(4096) as buf:
                await ns.read_into(0, buf)
            rung = len(inline.writes)
            with pytest.raises(aiovfio.ClosedResourceError):
                await ns.read_into(0, buf)
            with pytest.raises(aiovfio.ClosedResourceError):
                await ns.write_from(0, buf)
            async with ns.batch(depth=1) as batch:
                with pytest.raises(aiovfio.ClosedResourceError):
                    batch.read_into(0, buf)
                with pytest.raises(aiovfio.ClosedResourceError):
                    batch.write_from(0, buf)
                assert batch.inflight == 0
            assert len(inline.writes) == rung  # nothing was submitted
            assert ctrl.queues[0].free == ctrl.queues[0].depth


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_a_keyboard_interrupt_never_splits_an_entry_from_its_doorbell() -> None:
    """QueuePair.start (entry, doorbell, look) is KI-protected: trio delivers a SIGINT
    that lands in it at the task's next checkpoint, not between the entry and the ring."""
    import trio

    from aiovfio import _ki
    from aiovfio.nvme.queue import QueuePair

    _ki.activate()
    marked = trio._core._ki._CODE_KI_PROTECTION_STATUS_WMAP  # trio >= 0.27: per code object
    assert marked[QueuePair.start.__code__] is True
    assert trio.lowlevel.currently_ki_protected() is False  # the test itself is not


@pytest.mark.parametrize(("depth", "rung_at"), [(8, [4, 8]), (5, [2, 4]), (3, [])])
async def test_a_batch_rings_when_half_its_depth_is_queued(
    inline: InlineKernel, depth: int, rung_at: list[int]
) -> None:
    """A batch of depth >= 4 rings the SQ doorbell each time depth // 2 entries were
    written since the last ring (the device starts on them while the rest are written);
    completions() rings what is left. Smaller batches ring only in completions()."""
    async with aiovfio.open_device(SIM_NVME, kernel=inline) as dev:  # type: ignore[arg-type]
        async with open_controller(dev, queue_depth=8) as ctrl:
            ns = ctrl.namespace()
            sq_db, _ = doorbell_offsets(1, ctrl.cap.doorbell_stride)
            doorbell = dev.bar(0).info.offset + sq_db
            async with contextlib.AsyncExitStack() as stack:
                bufs = [await stack.enter_async_context(dev.dma_buffer(4096)) for _ in range(depth)]
                async with ns.batch(depth=depth) as batch:
                    inline.writes.clear()
                    rings = []
                    for i, buf in enumerate(bufs, 1):
                        batch.read_into(i * 8, buf, i)
                        if inline.writes.count(doorbell) > len(rings):
                            rings.append(i)
                    assert rings == rung_at
                    tags: list[int] = []
                    while len(tags) < depth:
                        tags += await batch.completions()
                    assert sorted(tags) == list(range(1, depth + 1))
                    left = depth - (rung_at[-1] if rung_at else 0)
                    assert inline.writes.count(doorbell) == len(rung_at) + (1 if left else 0)
