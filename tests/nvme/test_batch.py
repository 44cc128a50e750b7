"""Namespace.batch: many commands from one task, errors, refusals, cancellation mid-flight."""

from __future__ import annotations

import asyncio
import os

import anyio
import pytest
from attrs import define

import aiovfio
from aiovfio.nvme import ControllerFailed, NvmeStatusError, TransferOutOfRange, open_controller

from .conftest import MakeTarget
from .test_failures import _CSTS_CFS, SlowIo

pytestmark = pytest.mark.anyio


async def test_a_batch_keeps_its_depth_in_flight_and_reads_back(make_target: MakeTarget) -> None:
    t = make_target(size=8 << 20)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev, open_controller(dev) as ctrl:
        ns = ctrl.namespace()
        data = os.urandom(64 * 4096)
        await ns.write(0, data)
        async with dev.dma_buffer(16 * 4096) as big:
            views = [big.view[i * 4096 : (i + 1) * 4096] for i in range(16)]
            read: dict[int, bytes] = {}
            async with ns.batch(depth=16) as batch:
                assert batch.depth == 16
                todo = list(range(64))
                for i, view in enumerate(views):
                    batch.read_into(todo.pop() * 8, view, tag=(i, 63 - i))
                assert batch.inflight == 16
                while batch.inflight:
                    for i, block in await batch.completions():
                        read[block] = bytes(views[i])
                        if todo:
                            block = todo.pop()
                            batch.read_into(block * 8, views[i], tag=(i, block))
                assert await batch.completions() == []  # nothing in flight: at once
            for view in views:
                view.release()
        assert sorted(read) == list(range(64))
        assert b"".join(read[b] for b in range(64)) == data
        assert ctrl.queues[0].free == ctrl.queue_depth  # every CID given back


async def test_batch_writes_from_dma_buffers(make_target: MakeTarget) -> None:
    t = make_target(size=4 << 20)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev, open_controller(dev) as ctrl:
        ns = ctrl.namespace()
        async with dev.dma_buffer(4096) as a, dev.dma_buffer(4096) as b:
            a.view[:] = b"a" * 4096
            b.view[:] = b"b" * 4096
            async with ns.batch(depth=2) as batch:
                batch.write_from(8, a)
                batch.write_from(16, b)
                got: list[object] = []
                while batch.inflight:
                    got += await batch.completions()
            assert sorted(id(x) for x in got) == sorted([id(a), id(b)])  # the buffers by default
        assert await ns.read(8, 16) == b"a" * 4096 + b"b" * 4096


async def test_batch_refusals(make_target: MakeTarget) -> None:
    t = make_target(size=1 << 20)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev, open_controller(dev) as ctrl:
        ns = ctrl.namespace()
        with pytest.raises(aiovfio.InvalidArgument, match="depth"):
            async with ns.batch(depth=ctrl.queue_depth + 1):
                pytest.fail("entered")
        async with dev.dma_buffer(2 << 20) as big, ns.batch(depth=2) as batch:
            with pytest.raises(TransferOutOfRange):
                batch.read_into(ns.blocks - 1, big.view[:4096])
            with pytest.raises(aiovfio.InvalidArgument, match="MDTS"):
                batch.read_into(0, big.view[: ctrl.max_transfer + 4096])
            with pytest.raises(aiovfio.AlignmentError):
                batch.read_into(0, big.view[2 : 2 + 512])
            with pytest.raises(aiovfio.InvalidArgument, match="whole number"):
                batch.read_into(0, big.view[:100])
            with pytest.raises(aiovfio.InvalidArgument, match="DMA"):
                batch.read_into(0, bytearray(512))  # type: ignore[arg-type]
            batch.read_into(0, big.view[:512])
            batch.read_into(1, big.view[512:1024])
            with pytest.raises(aiovfio.BusyResourceError, match="completions"):
                batch.read_into(2, big.view[1024:1536])
            assert batch.inflight == 2
        with pytest.raises(aiovfio.ClosedResourceError):
            batch.read_into(0, big)
        assert ctrl.queues[0].inflight == 0


async def test_an_error_status_names_its_tag_and_keeps_the_others(
    make_target: MakeTarget,
) -> None:
    t = make_target(size=1 << 20)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev, open_controller(dev) as ctrl:
        ns = ctrl.namespace()
        async with dev.dma_buffer(4 * 4096) as buf, ns.batch(depth=4) as batch:
            batch.read_into(0, buf.view[:4096], tag="first")
            # An LBA past the end gets through only with the checks bypassed: the
            # controller's own status must come back as an error with its tag.
            batch._blocks = 1 << 40
            batch.read_into(ns.blocks, buf.view[4096:8192], tag="bad")
            batch._blocks = ns.blocks
            batch.read_into(8, buf.view[8192:12288], tag="third")
            got: list[object] = []
            errors: list[NvmeStatusError] = []
            while batch.inflight:
                try:
                    got += await batch.completions()
                except NvmeStatusError as exc:  # noqa: PERF203
                    errors.append(exc)
            assert sorted(got) == ["first", "third"]  # type: ignore[type-var]
            assert [e.tag for e in errors] == ["bad"]
            assert errors[0].name == "LBA Out of Range"
    assert t.leaks() == []


async def test_cancelling_a_batch_waits_for_its_commands(make_target: MakeTarget) -> None:
    model = SlowIo(io_latency=0.05)
    t = make_target(model=model)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        async with open_controller(dev, queue_depth=8) as ctrl:
            ns = ctrl.namespace()
            async with dev.dma_buffer(8 * 4096) as buf:
                with anyio.move_on_after(0.01) as scope:
                    async with ns.batch() as batch:
                        for i in range(7):
                            batch.read_into(i * 8, buf.view[i * 4096 : (i + 1) * 4096])
                        await batch.completions()  # cancelled here
                        pytest.fail("the commands take 50 ms")
                assert scope.cancelled_caught
                assert ctrl.queues[0].inflight == 0  # it waited for the device
                assert ctrl.queues[0].free == 8
            await ns.write(0, b"\x42" * 512)  # the controller still works
            assert await ns.read(0, 1) == b"\x42" * 512
        assert ctrl.shutdown_clean is True
    assert t.leaks() == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_task_cancel_of_a_batch(make_target: MakeTarget) -> None:
    t = make_target(model=SlowIo(io_latency=0.05))
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        async with open_controller(dev, queue_depth=4) as ctrl:
            ns = ctrl.namespace()
            async with dev.dma_buffer(4096) as buf:

                async def body() -> None:
                    async with ns.batch() as batch:
                        batch.read_into(0, buf)
                        await batch.completions()

                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(body(), 0.01)
                assert ctrl.queues[0].inflight == 0
    assert t.leaks() == []


async def test_a_controller_failure_fails_the_batch(make_target: MakeTarget) -> None:
    model = SlowIo(io_latency=30.0)
    t = make_target(model=model)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        async with open_controller(dev) as ctrl:
            ns = ctrl.namespace()
            async with dev.dma_buffer(4096) as buf, ns.batch(depth=2) as batch:
                batch.read_into(0, buf)
                batch.ring()
                model._csts |= _CSTS_CFS
                with anyio.fail_after(10), pytest.raises(ControllerFailed):
                    await batch.completions()
                with pytest.raises(ControllerFailed):
                    batch.read_into(0, buf)
        assert ctrl.shutdown_clean is False
    assert t.leaks() == []


async def test_batches_beside_single_commands_on_one_queue(make_target: MakeTarget) -> None:
    t = make_target(size=4 << 20)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        async with open_controller(dev, queue_depth=8, poll=True) as ctrl:
            ns = ctrl.namespace()
            await ns.write(0, b"z" * 4096)
            async with dev.dma_buffer(4 * 4096) as buf:

                async def singles() -> None:
                    for _ in range(20):
                        assert await ns.read(0, 8) == b"z" * 4096

                async def batched() -> None:
                    async with ns.batch(depth=4) as batch:
                        for _ in range(5):
                            for i in range(4):
                                batch.read_into(0, buf.view[i * 4096 : (i + 1) * 4096])
                            while batch.inflight:
                                await batch.completions()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(singles)
                    tg.start_soon(batched)
                assert bytes(buf.view[:4096]) == b"z" * 4096
            assert ctrl.queues[0].free == 8
    assert t.leaks() == []


@define(eq=False, kw_only=True)
class Counting(SlowIo):
    """SlowIo that records the most I/O commands it held at once, and fails one LBA."""

    most: int = 0
    bad_lba: int = -1

    def _process_sq(self, sq: object) -> None:
        if getattr(sq, "qid", 0):
            waiting = (sq.tail - sq.head) % sq.size  # type: ignore[attr-defined]
            self.most = max(self.most, waiting)
        super()._process_sq(sq)  # type: ignore[arg-type]

    def _read_write(self, command: object, *, write: bool) -> object:
        if self.bad_lba >= 0 and command.cdw10 == self.bad_lba:  # type: ignore[attr-defined]
            return self._fail_unrecovered()
        return super()._read_write(command, write=write)  # type: ignore[arg-type]

    def _fail_unrecovered(self) -> object:
        from aiovfio.sim.models._nvme_spec import Status
        from aiovfio.sim.models.nvme import _fail

        return _fail(Status.LBA_OUT_OF_RANGE)


@pytest.mark.parametrize("how", ["read_into", "write_from then read", "write then read_into"])
async def test_a_transfer_past_mdts_sends_its_pieces_together(
    make_target: MakeTarget, how: str
) -> None:
    model = Counting(io_latency=0.01, size=16 << 20)
    t = make_target(model=model)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev, open_controller(dev) as ctrl:
        ns = ctrl.namespace()
        data = os.urandom(4 * ctrl.max_transfer + 4096)  # 5 pieces
        blocks = len(data) // ns.block_size
        async with dev.dma_buffer(len(data)) as buf:
            if how == "read_into":
                await ns.write(3, data)
                await ns.read_into(3, buf)
                assert bytes(buf.view) == data
            elif how == "write_from then read":
                buf.view[:] = data
                await ns.write_from(3, buf)
                assert await ns.read(3, blocks) == data
            else:
                await ns.write(3, data)
                await ns.read_into(3, buf)
                assert bytes(buf.view) == data
        assert model.most >= 2  # more than one piece was in the SQ at once
        assert ctrl.queues[0].free == ctrl.queue_depth
    assert t.leaks() == []


@pytest.mark.parametrize("bounced", [False, True])
async def test_a_failed_piece_fails_the_transfer_after_the_others(
    make_target: MakeTarget, bounced: bool
) -> None:
    model = Counting(io_latency=0.01, size=16 << 20)
    t = make_target(model=model)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev, open_controller(dev) as ctrl:
        ns = ctrl.namespace()
        step = ctrl.max_transfer // ns.block_size
        model.bad_lba = 8 + 2 * step  # the third piece
        async with dev.dma_buffer(4 * ctrl.max_transfer) as buf:
            with pytest.raises(NvmeStatusError, match=f"at LBA {8 + 2 * step} on namespace 1"):
                if bounced:
                    await ns.read(8, 4 * step)
                else:
                    await ns.read_into(8, buf)
            assert ctrl.queues[0].inflight == 0  # every piece completed first
            assert ctrl.queues[0].free == ctrl.queue_depth
        model.bad_lba = -1
        assert await ns.read(0, 1) == bytes(512)  # still works
    assert t.leaks() == []


async def test_cancelling_a_split_transfer_waits_for_its_pieces(make_target: MakeTarget) -> None:
    model = Counting(io_latency=0.05, size=16 << 20)
    t = make_target(model=model)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev, open_controller(dev) as ctrl:
        ns = ctrl.namespace()
        async with dev.dma_buffer(4 * ctrl.max_transfer) as buf:
            for read in (ns.read_into(0, buf), ns.read(0, 4 * ctrl.max_transfer // 512)):
                with anyio.move_on_after(0.01) as scope:
                    await read
                assert scope.cancelled_caught
                assert ctrl.queues[0].inflight == 0  # the pieces in flight completed first
                assert ctrl.queues[0].free == ctrl.queue_depth
            assert ctrl._pool is not None and "0 in use" in repr(ctrl._pool)
    assert ctrl.shutdown_clean is True
    assert t.leaks() == []
