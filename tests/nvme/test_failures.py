"""A controller that never gets ready, dies or hangs mid-I/O, and I/O cancelled mid-transfer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from attrs import define, field

import aiovfio
from aiovfio.nvme import CommandTimeout, ControllerFailed, ControllerNotReady, open_controller
from aiovfio.sim.models import Nvme
from aiovfio.sim.models._nvme_spec import Command, Status
from aiovfio.sim.models.nvme import _Completion, _Result

from .conftest import MakeTarget

pytestmark = pytest.mark.anyio

_CSTS_CFS = 0x2


@define(eq=False, kw_only=True)
class NeverReady(Nvme):
    """Accepts CC.EN but never sets CSTS.RDY; CAP.TO is 500 ms."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._cap = (self._cap & ~(0xFF << 24)) | 1 << 24

    def _write_cc(self, new: int) -> None:
        self._cc = new


@define(eq=False, kw_only=True)
class SlowIo(Nvme):
    """Admin commands at once, I/O after `io_latency` seconds."""

    io_latency: float = 0.0

    def _schedule_sq(self, sq: object) -> None:
        if getattr(sq, "qid", 0) and not getattr(sq, "scheduled", True):
            sq.scheduled = True  # type: ignore[attr-defined]
            self._context.schedule(self.io_latency, lambda: self._process_sq(sq))  # type: ignore[arg-type]
            return
        super()._schedule_sq(sq)  # type: ignore[arg-type]


async def test_a_controller_that_never_gets_ready(make_target: MakeTarget) -> None:
    t = make_target(model=NeverReady())
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        with anyio.fail_after(10):
            with pytest.raises(ControllerNotReady, match=r"CSTS.RDY=1 within 0.5 s"):
                async with open_controller(dev):
                    pytest.fail("the body must not run")
    assert t.leaks() == []


async def _readers_in_flight(
    ns: aiovfio.nvme.Namespace, n: int, errors: list[BaseException]
) -> None:
    async def reader(i: int) -> None:
        try:
            await ns.read(i, 8)
        except ControllerFailed as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(reader, i)


async def test_a_fatal_status_mid_io_fails_every_command(make_target: MakeTarget) -> None:
    model = SlowIo(io_latency=60.0)  # no I/O completes on its own
    t = make_target(model=model)
    errors: list[BaseException] = []
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        async with open_controller(dev, io_queues=2, queue_depth=4) as ctrl:
            ns = ctrl.namespace()
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_readers_in_flight, ns, 12, errors)
                    while sum(q.inflight for q in ctrl.queues) < 8:  # noqa: ASYNC110
                        await anyio.sleep(0.01)  # (what is watched has no event)
                    model._csts |= _CSTS_CFS  # the controller dies
            assert len(errors) == 12
            assert all("CSTS.CFS" in str(e) for e in errors), errors
            with pytest.raises(ControllerFailed):
                await ns.read(0, 1)
            assert ctrl.failure is errors[0]
        assert ctrl.shutdown_clean is False
        assert dev.bar(0).read32(0x14) == 0  # disabled
    assert t.leaks() == []


async def test_a_command_timeout_fails_the_controller(make_target: MakeTarget) -> None:
    t = make_target(model=Nvme(command_latency=60.0))
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        with anyio.fail_after(10):
            # The bring-up's admin commands take 60 s as well: the watchdog stops it.
            with pytest.raises(ControllerFailed, match=r"within 0.3 s"):
                async with open_controller(dev, command_timeout=0.3):
                    pytest.fail("the body must not run")
    assert t.leaks() == []


async def test_a_hung_io_command_times_out(make_target: MakeTarget) -> None:
    t = make_target(model=SlowIo(io_latency=60.0))
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        async with open_controller(dev, command_timeout=0.3) as ctrl:
            with anyio.fail_after(10), pytest.raises(ControllerFailed, match="queue 1"):
                await ctrl.namespace().read(0, 1)
        assert ctrl.shutdown_clean is False
    assert t.leaks() == []


async def _cancel_mid_transfer(dev: aiovfio.Device, ctrl: aiovfio.nvme.Controller) -> int:
    """Readers into their own DMA buffers, cancelled while their commands are in flight."""
    ns = ctrl.namespace()
    started = 0

    async def reader(i: int) -> None:
        nonlocal started
        async with dev.dma_buffer(64 * 1024) as buf:
            while True:
                started += 1
                await ns.read_into(i * 128, buf)  # leaving unmaps buf: after the completion

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(reader, i)
            # Cancel once every reader is in a transfer, however slow the machine.
            await _cancel_when(scope, lambda: started >= 8 and _inflight(ctrl) > 0)
    # Every cancelled command completed before its task let go of the buffer.
    assert sum(q.inflight for q in ctrl.queues) == 0
    return started


async def test_cancel_in_the_middle_of_transfers(make_target: MakeTarget) -> None:
    model = SlowIo(io_latency=0.05)
    t = make_target(model=model)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        async with open_controller(dev, io_queues=2, queue_depth=4) as ctrl:
            assert await _cancel_mid_transfer(dev, ctrl) >= 8
            await ctrl.namespace().write(0, b"\x42" * 512)  # still works
            assert await ctrl.namespace().read(0, 1) == b"\x42" * 512
        assert ctrl.shutdown_clean is True
        assert model._sqs == {}
    assert t.leaks() == []


async def test_cancel_the_whole_controller_block_mid_transfer(make_target: MakeTarget) -> None:
    model = SlowIo(io_latency=0.05)
    t = make_target(model=model)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        with anyio.CancelScope() as scope:
            async with open_controller(dev, io_queues=2, queue_depth=4) as ctrl:
                ns = ctrl.namespace()
                async with anyio.create_task_group() as tg:
                    for i in range(8):
                        tg.start_soon(_read_forever, ns, i)
                    await _cancel_when(scope, lambda: _inflight(ctrl) > 0)
        assert ctrl.shutdown_clean is True
        assert model._sqs == {}
    assert t.leaks() == []


def _inflight(ctrl: aiovfio.nvme.Controller) -> int:
    return sum(q.inflight for q in ctrl.queues)


async def _cancel_when(scope: anyio.CancelScope, ready: Callable[[], bool]) -> None:
    """Cancel `scope` once `ready()` holds (checked every millisecond, for at most 10 s)."""
    with anyio.fail_after(10):
        while not ready():  # noqa: ASYNC110 - driver state, no event to wait on
            await anyio.sleep(0.001)
    await anyio.sleep(0.01)  # let the transfers run a little
    scope.cancel()


async def _read_forever(ns: aiovfio.nvme.Namespace, i: int) -> None:
    while True:
        await ns.read(i, 16)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_task_cancel_mid_transfer(make_target: MakeTarget) -> None:
    t = make_target(model=SlowIo(io_latency=0.05))
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        async with open_controller(dev) as ctrl:
            ns = ctrl.namespace()
            async with dev.dma_buffer(4096) as buf:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(ns.read_into(0, buf), 0.01)
                assert ctrl.queues[0].inflight == 0  # it waited for the device
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.01):
                        await ns.read(0, 8)
                assert ctrl.queues[0].inflight == 0
            await ns.read(0, 8)
    assert t.leaks() == []


@define(eq=False, kw_only=True)
class HangsUntilAborted(Nvme):
    """Never completes a read of LBA `hang_lba` by itself; an NVMe Abort ends it (or, with
    `abortable=False`, is refused with "not aborted")."""

    hang_lba: int = 77
    abortable: bool = True
    hung: set[tuple[int, int]] = field(factory=set)

    def _process_sq(self, sq: Any) -> None:
        if sq.qid and sq.head != sq.tail:
            raw = self._context.dma_read(sq.base + sq.head * 64, 64)
            command = Command.decode(raw)
            if command.opcode == 0x02 and command.cdw10 == self.hang_lba:
                sq.head = (sq.head + 1) % sq.size
                sq.outstanding += 1
                self.hung.add((sq.qid, command.cid))
        super()._process_sq(sq)

    def _abort(self, command: Any) -> Any:
        key = (command.cdw10 & 0xFFFF, command.cdw10 >> 16)
        if key not in self.hung:
            return super()._abort(command)
        if not self.abortable:
            return _Result(result=1)  # DW0 bit 0: not aborted
        self.hung.discard(key)
        sq = self._sqs[key[0]]
        cq = self._cqs[sq.cqid]
        cq.held.append(_Completion(sq, key[1], int(Status.ABORT_REQUESTED), 0))
        self._post(cq)
        return _Result(result=0)


async def test_a_late_command_is_aborted_and_fails_alone(make_target: MakeTarget) -> None:
    model = HangsUntilAborted()
    t = make_target(model=model)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        async with open_controller(dev, command_timeout=0.3) as ctrl:
            ns = ctrl.namespace()
            async with dev.dma_buffer(4096) as buf:
                with anyio.fail_after(10), pytest.raises(CommandTimeout, match="aborted"):
                    await ns.read_into(model.hang_lba, buf)
                assert ctrl.failure is None  # the controller goes on
                assert ctrl.queues[0].inflight == 0 and ctrl.queues[0].expired == {}
                await ns.read_into(0, buf)
                async with ns.batch(depth=2) as batch:  # a batch command: the same, with its tag
                    batch.read_into(model.hang_lba, buf, tag="hung")
                    with anyio.fail_after(10), pytest.raises(CommandTimeout) as caught:
                        while batch.inflight:
                            await batch.completions()
                    assert caught.value.tag == "hung"
            assert await ns.read(1, 1) == bytes(512)
        assert ctrl.shutdown_clean is True
    assert t.leaks() == []


async def test_a_late_command_the_abort_cannot_end_fails_the_controller(
    make_target: MakeTarget,
) -> None:
    t = make_target(model=HangsUntilAborted(abortable=False))
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        async with open_controller(dev, command_timeout=0.3) as ctrl:
            with anyio.fail_after(10), pytest.raises(ControllerFailed, match="after an NVMe Abort"):
                await ctrl.namespace().read(77, 1)
        assert ctrl.shutdown_clean is False
    assert t.leaks() == []
