"""aiovfio.nvme on the simulated controller: bring-up, I/O of every size, queues, modes."""

from __future__ import annotations

import os

import anyio
import pytest

import aiovfio
from aiovfio.nvme import (
    NvmeStatusError,
    QueueLimitExceeded,
    TransferOutOfRange,
    open_controller,
)
from aiovfio.nvme.spec import IoOpcode
from aiovfio.sim.models import Nvme

from .conftest import MakeTarget

pytestmark = pytest.mark.anyio


async def test_bring_up_identifies_the_controller_and_namespace(make_target: MakeTarget) -> None:
    t = make_target(serial="deadbeef", size=64 << 20)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        async with open_controller(dev) as ctrl:
            assert ctrl.identify.model == "QEMU NVMe Ctrl"
            assert ctrl.identify.serial == "deadbeef"
            assert ctrl.identify.firmware == "7.2.0"
            assert ctrl.namespaces == (1,)
            ns = ctrl.namespace()
            assert (ns.block_size, ns.blocks) == (512, (64 << 20) // 512)
            assert ctrl.max_transfer == 512 * 1024  # MDTS 7 with 4 KiB pages
            assert ctrl.cap.mqes == 0x7FF
            with pytest.raises(aiovfio.DeviceNotFound, match="active: 1"):
                ctrl.namespace(2)
        assert ctrl.shutdown_clean is True
        with pytest.raises(aiovfio.ClosedResourceError):
            await ns.read(0, 1)


@pytest.mark.parametrize("blocks", [1, 8, 9, 128, 1024, 1025, 3000])
async def test_patterns_of_every_size_read_back(make_target: MakeTarget, blocks: int) -> None:
    t = make_target()
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev, open_controller(dev) as ctrl:
        ns = ctrl.namespace()
        data = os.urandom(blocks * ns.block_size)
        lba = ns.blocks - blocks - 3
        await ns.write(lba, data)
        assert await ns.read(lba, blocks) == data
        async with dev.dma_buffer(len(data) + 4096) as buf:
            await ns.read_into(lba, buf.view[: len(data)])
            assert bytes(buf.view[: len(data)]) == data
            # PRP1 with an offset, and zero-copy writes
            buf.view[8 : 8 + len(data)] = data[::-1]
            await ns.write_from(lba, buf.view[8 : 8 + len(data)])
            assert await ns.read(lba, blocks) == data[::-1]


async def test_a_chained_prp_list_for_a_long_unaligned_transfer(make_target: MakeTarget) -> None:
    t = make_target(mdts=9, size=16 << 20)  # 2 MiB per command: 513 pages from an offset
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev, open_controller(dev) as ctrl:
        ns = ctrl.namespace()
        assert ctrl.max_transfer == 2 << 20
        data = os.urandom(2 << 20)
        async with dev.dma_buffer((2 << 20) + 8192) as buf:
            buf.view[512 : 512 + len(data)] = data
            await ns.write_from(7, buf.view[512 : 512 + len(data)])
            assert await ns.read(7, len(data) // 512) == data
            buf.view[:] = bytes(len(buf.view))
            await ns.read_into(7, buf.view[4100 : 4100 + len(data)])
            assert bytes(buf.view[4100 : 4100 + len(data)]) == data


async def test_bad_buffers_and_ranges_are_refused_before_the_device(
    make_target: MakeTarget,
) -> None:
    t = make_target(size=1 << 20)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev, open_controller(dev) as ctrl:
        ns = ctrl.namespace()
        with pytest.raises(TransferOutOfRange, match="past the end"):
            await ns.read(ns.blocks - 1, 2)
        with pytest.raises(TransferOutOfRange):
            await ns.write(ns.blocks, bytes(512))
        with pytest.raises(TransferOutOfRange):
            await ns.read(0, 0)
        with pytest.raises(aiovfio.InvalidArgument, match="whole number"):
            await ns.write(0, bytes(100))
        with pytest.raises(aiovfio.InvalidArgument, match="bytearray"):
            await ns.read_into(0, bytearray(512))  # type: ignore[arg-type]
        with pytest.raises(aiovfio.InvalidArgument, match="not DMA-able"):
            await ns.read_into(0, memoryview(bytearray(512)))
        async with dev.dma_buffer(8192) as buf:
            with pytest.raises(aiovfio.AlignmentError, match="dword"):
                await ns.read_into(0, buf.view[2:514])
            with pytest.raises(aiovfio.InvalidArgument, match="whole number"):
                await ns.read_into(0, buf.view[:100])
        async with dev.dma_buffer(4096, readonly=True) as ro:
            with pytest.raises(aiovfio.InvalidArgument, match="read-only"):
                await ns.read_into(0, ro)
            await ns.write_from(0, ro)  # the device may read it
        # The controller's own answer for an LBA past the end: LBA Out of Range, DNR.
        async with dev.dma_buffer(4096) as buf:
            part = buf.view[:512]  # the traceback in `info` keeps it: release it before leaving
            with pytest.raises(NvmeStatusError) as info:
                await ns.command(IoOpcode.READ, buffer=part, cdw10=ns.blocks)
            part.release()
        err = info.value
        assert (err.sct, err.sc, err.dnr) == (0, 0x80, True)
        assert err.name == "LBA Out of Range"
        assert "LBA Out of Range" in str(err)
        assert isinstance(err, aiovfio.VfioError)
        # ... and the controller still works.
        await ns.write(0, b"\x5a" * 512)
        assert await ns.read(0, 1) == b"\x5a" * 512


async def test_many_tasks_spread_over_queues(make_target: MakeTarget) -> None:
    t = make_target()
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        async with open_controller(dev, io_queues=4, queue_depth=4) as ctrl:
            ns = ctrl.namespace()
            blocks = [os.urandom(4096) for _ in range(64)]

            async def worker(i: int) -> None:
                await ns.write(i * 8, blocks[i])
                assert await ns.read(i * 8, 8) == blocks[i]

            async with anyio.create_task_group() as tg:
                for i in range(64):
                    tg.start_soon(worker, i)
            assert all(q.submitted >= 8 for q in ctrl.queues), ctrl.queues
            assert sum(q.submitted for q in ctrl.queues) == 128
            await ns.flush()


@pytest.mark.parametrize("poll", [True, 0.0005])
async def test_polled_and_hybrid_modes(make_target: MakeTarget, poll: bool | float) -> None:
    t = make_target()
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        async with open_controller(dev, io_queues=2, queue_depth=8, poll=poll) as ctrl:
            ns = ctrl.namespace()
            await ns.write(10, b"\x11" * 4096)

            async def reader() -> None:
                for _ in range(10):
                    assert await ns.read(10, 8) == b"\x11" * 4096
                    await anyio.sleep(0.001)  # idle gaps: polling parks, hybrid sleeps

            async with anyio.create_task_group() as tg:
                for _ in range(12):
                    tg.start_soon(reader)


async def test_a_small_queue_wraps_its_phase_many_times(make_target: MakeTarget) -> None:
    t = make_target()
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        async with open_controller(dev, queue_depth=3) as ctrl:  # 4-entry rings
            ns = ctrl.namespace()
            for i in range(40):
                await ns.write(i, bytes([i]) * 512)
            async with anyio.create_task_group() as tg:
                for i in range(40):
                    tg.start_soon(_check_block, ns, i)


async def _check_block(ns: aiovfio.nvme.Namespace, i: int) -> None:
    assert await ns.read(i, 1) == bytes([i]) * 512


async def test_queue_limits_are_refused_and_nothing_leaks(make_target: MakeTarget) -> None:
    t = make_target(mqes=15, max_ioqpairs=2)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        with pytest.raises(QueueLimitExceeded, match="MQES"):
            async with open_controller(dev, queue_depth=16):
                pass
        with pytest.raises(QueueLimitExceeded, match="granted 2"):
            async with open_controller(dev, io_queues=3):
                pass
        with pytest.raises(QueueLimitExceeded, match="MSI-X"):
            async with open_controller(dev, io_queues=100):
                pass
        async with open_controller(dev, io_queues=2, queue_depth=15) as ctrl:
            await ctrl.namespace().write(0, bytes(512))


@pytest.mark.parametrize(
    "kwargs",
    [{"io_queues": 0}, {"queue_depth": 0}, {"poll": -1.0}, {"command_timeout": 0}],
)
async def test_bad_arguments(make_target: MakeTarget, kwargs: dict[str, object]) -> None:
    t = make_target()
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        with pytest.raises(aiovfio.InvalidArgument):
            async with open_controller(dev, **kwargs):  # type: ignore[arg-type]
                pass


async def test_shutdown_deletes_the_queues_and_disables(make_target: MakeTarget) -> None:
    model = Nvme()
    t = make_target(model=model)
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        async with open_controller(dev, io_queues=3) as ctrl:
            assert sorted(model._sqs) == [0, 1, 2, 3]
        assert ctrl.shutdown_clean is True
        assert model._sqs == {} and model._cqs == {}
        assert dev.bar(0).read32(0x14) == 0  # CC
        assert dev.bar(0).read32(0x1C) & 1 == 0  # CSTS.RDY
        async with open_controller(dev) as again:  # and it comes up again at once
            await again.namespace().write(0, bytes(512))


async def test_the_bodys_exception_propagates_as_is(make_target: MakeTarget) -> None:
    t = make_target()
    async with aiovfio.open_device(t.nvme, kernel=t.kernel) as dev:
        with pytest.raises(KeyError, match="mine"):
            async with open_controller(dev):
                raise KeyError("mine")
