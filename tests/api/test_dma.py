"""Scoped DMA: buffers, mappings, IOVA allocation, the entry budget (sim and real)."""

from __future__ import annotations

import mmap
from pathlib import Path

import anyio
import pytest

import aiovfio
from aiovfio.testing.target import Target

pytestmark = pytest.mark.anyio

SRC, DST, CNT, CMD, IRQ_STATUS, IRQ_ACK = 0x80, 0x88, 0x90, 0x98, 0x24, 0x64
EDU_BUF = 0x40000
EDU_MASK = (1 << 28) - 1


async def _edu_dma(
    bar: aiovfio.Region, irq: aiovfio.InterruptStream, src: int, dst: int, n: int, to_ram: bool
) -> None:
    bar.write64(SRC, src)
    bar.write64(DST, dst)
    bar.write64(CNT, n)
    bar.write64(CMD, 0x1 | 0x4 | (0x2 if to_ram else 0))
    with anyio.fail_after(20):
        await irq.receive()
    bar.write32(IRQ_ACK, bar.read32(IRQ_STATUS))


@pytest.mark.kernel
@pytest.mark.needs_iommu("the device blocked at an unmapped IOVA: that takes an IOMMU")
async def test_dma_round_trip_and_blocked_after_unmap(vfio_target: Target) -> None:
    async with aiovfio.open_device(
        vfio_target.edu, kernel=vfio_target.kernel, dma_mask=EDU_MASK
    ) as dev:
        dev.config.enable()
        bar = dev.bar(0)
        async with dev.interrupts("msi") as (irq,):
            async with dev.dma_buffer(8192) as buf:
                assert buf.iova + buf.size - 1 <= EDU_MASK
                assert buf.iova % 4096 == 0
                buf.view[:2048] = bytes(range(256)) * 8
                await _edu_dma(bar, irq, buf.iova, EDU_BUF, 2048, to_ram=False)
                await _edu_dma(bar, irq, EDU_BUF, buf.iova + 4096, 2048, to_ram=True)
                assert bytes(buf.view[4096:6144]) == bytes(range(256)) * 8
            # Memory we keep, mapped then unmapped: a device write to its old
            # IOVA must not reach it.
            mem = mmap.mmap(-1, 4096)
            try:
                mem[:16] = b"\xaa" * 16
                async with dev.map_dma(mem) as m:
                    stale = m.iova
                faults = vfio_target.machine.faults.count("iommu") if vfio_target.machine else 0
                with vfio_target.expect_faults("iommu"):  # on purpose: the IOVA is unmapped
                    await _edu_dma(bar, irq, EDU_BUF, stale, 16, to_ram=True)
                assert mem[:16] == b"\xaa" * 16
                if vfio_target.machine is not None:
                    assert vfio_target.machine.faults.count("iommu") == faults + 1
            finally:
                mem.close()
    assert vfio_target.leaks() == []


@pytest.mark.kernel
@pytest.mark.needs_iommu(
    "caller-chosen IOVAs: without an IOMMU a DMA address is the memory's physical address"
)
async def test_map_dma_of_own_buffer(vfio_target: Target) -> None:
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        mem = mmap.mmap(-1, 3 * 4096)
        try:
            async with dev.map_dma(mem, iova=0x200000) as m:
                assert (m.iova, m.size, m.readonly) == (0x200000, 3 * 4096, False)
                with pytest.raises(BufferError):
                    mem.close()  # pinned while mapped
                with pytest.raises(aiovfio.InvalidArgument, match="overlaps"):
                    async with dev.map_dma(mem, iova=0x201000):
                        pass
            async with dev.map_dma(mem, readonly=True) as ro:
                assert ro.readonly and "ro" in repr(ro)
        finally:
            mem.close()
    assert vfio_target.leaks() == []


@pytest.mark.kernel
@pytest.mark.needs_iommu(
    "caller-chosen IOVAs: without an IOMMU a DMA address is the memory's physical address"
)
async def test_bad_dma_arguments(vfio_target: Target) -> None:
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        mem = mmap.mmap(-1, 8192)
        try:
            with pytest.raises(aiovfio.AlignmentError, match="not aligned"):
                dev.map_dma(memoryview(mem)[8:4104])
            with pytest.raises(aiovfio.AlignmentError, match="multiple"):
                dev.map_dma(memoryview(mem)[:100])
            with pytest.raises(aiovfio.InvalidArgument, match="read-only"):
                dev.map_dma(b"\0" * 4096)
            with pytest.raises(aiovfio.AlignmentError):
                async with dev.map_dma(mem, iova=0x1001):
                    pass
            with pytest.raises(aiovfio.InvalidArgument, match="IOVA"):
                async with dev.map_dma(mem, iova=1 << 62):
                    pass
            with pytest.raises(aiovfio.InvalidArgument):
                dev.dma_buffer(0)
            with pytest.raises(aiovfio.InvalidArgument):
                dev.dma_buffer(-5)
            with pytest.raises(aiovfio.DmaSpaceExhausted, match="DMA mask"):
                async with dev.dma_buffer(1 << 20, dma_mask=0xFFFF):
                    pass
        finally:
            mem.close()
        async with dev.dma_buffer(4096) as ok:  # still usable afterwards
            assert ok.size == 4096
    assert vfio_target.leaks() == []


async def test_dma_entry_budget_is_tracked_locally() -> None:
    from aiovfio.sim import Machine
    from aiovfio.sim.models import Edu

    with Machine(dma_entry_limit=3) as machine:
        machine.add_device(Edu(), name="0000:00:04.0")
        async with aiovfio.open_device("0000:00:04.0", kernel=machine.kernel) as dev:
            assert dev.iommu_info.dma_avail == 3
            async with dev.dma_buffer(4096), dev.dma_buffer(4096), dev.dma_buffer(4096):
                assert dev.iommu_info.dma_avail == 0
                calls = machine.kernel_calls["map_dma"]
                with pytest.raises(aiovfio.DmaSpaceExhausted, match="0 left"):
                    async with dev.dma_buffer(4096):
                        pass
                assert machine.kernel_calls["map_dma"] == calls  # refused before the kernel
            assert dev.iommu_info.dma_avail == 3
        assert machine.leaks() == []


async def test_dma_buffer_repr_and_lifetime(sim_machine: Target) -> None:
    async with aiovfio.open_device(sim_machine.edu, kernel=sim_machine.kernel) as dev:
        buf = dev.dma_buffer(100)
        assert "not mapped yet" in repr(buf)
        with pytest.raises(aiovfio.UsageError):
            _ = buf.view
        async with buf:
            assert buf.size == 4096
            assert len(buf.view) == 4096
            assert "iova=" in repr(buf)
        with pytest.raises(aiovfio.ClosedResourceError):
            _ = buf.view
        await buf.aclose()


@pytest.mark.kernel
@pytest.mark.needs_iommu(
    "caller-chosen IOVAs: without an IOMMU a DMA address is the memory's physical address"
)
async def test_cancel_in_the_middle_of_a_map_leaves_no_stale_mapping(
    vfio_target: Target,
) -> None:
    size = 32 * 1024 * 1024  # pinning 8192 pages keeps the worker thread busy a while
    iova = 0x4000000
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        mem = mmap.mmap(-1, size)
        try:
            entered: list[aiovfio.DmaMapping] = []

            async def map_and_hold() -> None:
                async with dev.map_dma(mem, iova=iova) as m:
                    entered.append(m)
                    await anyio.sleep_forever()

            async with anyio.create_task_group() as tg:
                tg.start_soon(map_and_hold)
                await anyio.wait_all_tasks_blocked()  # the map is in its worker thread
                tg.cancel_scope.cancel()
            assert dev.dma_space.mapping_count == 0
            # No stale mapping: the same IOVA maps again at once.
            async with dev.map_dma(mem, iova=iova) as again:
                assert again.iova == iova
        finally:
            mem.close()
    # ...and the device opens again at once, with nothing left behind.
    assert vfio_target.leaks() == []
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        assert dev.bar(0).read32(0) == 0x010000ED


def _reserved_hugepages() -> int:
    return int(Path("/proc/sys/vm/nr_hugepages").read_text())


async def test_hugepage_buffer_or_a_clear_error(sim_machine: Target) -> None:
    reserved = _reserved_hugepages()
    async with aiovfio.open_device(sim_machine.edu, kernel=sim_machine.kernel) as dev:
        if reserved:
            async with dev.dma_buffer(4096, hugepages=True) as buf:
                assert buf.size == 2 * 1024 * 1024
        else:
            with pytest.raises(aiovfio.KernelError, match="hugepages") as info:
                async with dev.dma_buffer(4096, hugepages=True):
                    pass
            assert info.value.errno == 12  # ENOMEM: no huge page to give
    assert sim_machine.leaks() == []
