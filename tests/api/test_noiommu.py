"""noiommu behind the same public objects, on the simulated machine (Machine(noiommu=True)).

Only by explicit opt-in, loudly: a NoiommuWarning, a warning log, "UNSAFE" in
the reprs. DMA buffers are mlocked pages whose "IOVA" is their physical
address, refused when the device's DMA mask cannot reach them.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import structlog

import aiovfio
from aiovfio import errors
from aiovfio._uapi import vfio as uapi
from aiovfio.sim import Machine
from aiovfio.sim.models import Edu

pytestmark = pytest.mark.anyio

EDU = "0000:00:04.0"
EDU_MASK = (1 << 28) - 1
SRC, DST, CNT, CMD, IRQ_STATUS, IRQ_ACK = 0x80, 0x88, 0x90, 0x98, 0x24, 0x64


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Iterator[Machine]:
    monkeypatch.delenv("AIOVFIO_NOIOMMU", raising=False)
    monkeypatch.delenv("AIOVFIO_BACKEND", raising=False)
    m = Machine(noiommu=True, iommufd=True)
    m.add_device(Edu(), name=EDU)
    try:
        yield m
        assert m.leaks() == []
    finally:
        m.close()


async def test_noiommu_without_the_opt_in_is_refused_with_the_risk(machine: Machine) -> None:
    with pytest.raises(errors.NoiommuRefused) as caught:
        async with aiovfio.open_device(EDU, kernel=machine.kernel):
            pass
    text = str(caught.value)
    assert "noiommu=True" in text and "AIOVFIO_NOIOMMU=1" in text
    assert "all physical memory" in text
    assert machine.kernel_calls["open_container"] == 0  # refused before opening anything


def _noiommu_warnings(recwarn: pytest.WarningsRecorder) -> list[str]:
    return [str(w.message) for w in recwarn if issubclass(w.category, errors.NoiommuWarning)]


async def test_noiommu_with_the_opt_in_is_loud_and_dma_works(
    machine: Machine, recwarn: pytest.WarningsRecorder
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with aiovfio.open_device(EDU, kernel=machine.kernel, noiommu=True) as dev:
            assert "backend=noiommu UNSAFE" in repr(dev)
            assert "UNSAFE noiommu" in repr(dev.dma_space)
            dev.config.enable(bus_master=True)
            bar = dev.bar(0)
            async with (
                dev.interrupts("msi") as (irq,),
                dev.dma_buffer(8192, dma_mask=EDU_MASK) as buf,
            ):
                assert buf.iova + buf.size - 1 <= EDU_MASK
                buf.view[:64] = bytes(range(64))
                for src, dst, to_ram in ((buf.iova, 0x40000, 0), (0x40000, buf.iova + 4096, 2)):
                    bar.write64(SRC, src)
                    bar.write64(DST, dst)
                    bar.write64(CNT, 64)
                    bar.write64(CMD, 0x1 | 0x4 | to_ram)
                    with anyio.fail_after(20):
                        await irq.receive()
                    bar.write32(IRQ_ACK, bar.read32(IRQ_STATUS))
                assert bytes(buf.view[4096:4160]) == bytes(range(64))
    assert [e for e in logs if e["event"] == "device.noiommu" and e["log_level"] == "warning"]
    (warned,) = _noiommu_warnings(recwarn)
    assert "without an IOMMU" in warned
    assert machine.faults.count() == 0


async def test_the_environment_opts_in_too(
    machine: Machine, monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    monkeypatch.setenv("AIOVFIO_NOIOMMU", "1")
    async with aiovfio.open_device(EDU, kernel=machine.kernel) as dev:
        assert "noiommu" in repr(dev)
    assert len(_noiommu_warnings(recwarn)) == 1
    with pytest.raises(errors.NoDeviceCdev, match="noiommu device: it has no VFIO cdev"):
        async with aiovfio.open_device(EDU, kernel=machine.kernel, backend="iommufd"):
            pass


async def test_memory_above_the_dma_mask_is_refused(recwarn: pytest.WarningsRecorder) -> None:
    with Machine(noiommu=True, phys_base=0x4000_0000) as m:
        m.add_device(Edu(), name=EDU)
        async with aiovfio.open_device(EDU, kernel=m.kernel, noiommu=True) as dev:
            with pytest.raises(errors.NoiommuDmaError, match="DMA mask"):
                async with dev.dma_buffer(4096, dma_mask=EDU_MASK):
                    pass
            mem = mmap.mmap(-1, 4096)
            try:
                mem[0] = 1
                with pytest.raises(errors.InvalidArgument, match="physical address"):
                    async with dev.map_dma(mem, iova=0x100000):
                        pass
                async with dev.map_dma(mem) as mapping:  # no mask: any address will do
                    assert mapping.iova >= 0x4000_0000
                dev.dma_mask = EDU_MASK
                with pytest.raises(errors.NoiommuDmaError, match="above the device's DMA mask"):
                    async with dev.map_dma(mem):
                        pass
            finally:
                mem.close()
        assert m.leaks() == []
    assert len(_noiommu_warnings(recwarn)) == 1


async def test_a_default_container_takes_a_noiommu_group_by_the_opt_in(
    machine: Machine, monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    number = machine.kernel.iommu_group(EDU)
    assert number is not None
    async with aiovfio.Container(kernel=machine.kernel) as container:
        with pytest.raises(errors.NoiommuRefused, match=r"AIOVFIO_NOIOMMU=1.*physical memory"):
            container.group(number)
        assert container.groups == () and _noiommu_warnings(recwarn) == []
        monkeypatch.setenv("AIOVFIO_NOIOMMU", "1")
        async with container.group(number) as group, group.open_device(EDU) as dev:
            assert "UNSAFE noiommu" in repr(container.dma_space)
            async with dev.dma_buffer(4096, dma_mask=EDU_MASK) as buf:
                assert buf.iova + buf.size - 1 <= EDU_MASK  # a physical address
    (warned,) = _noiommu_warnings(recwarn)
    assert f"group {number}" in warned and "without an IOMMU" in warned


class _MixedKernel:
    """The sim's kernel, claiming noiommu mode is on and group `fake` is a noiommu group."""

    def __init__(self, inner: Any, fake: int) -> None:
        self._inner, self._fake = inner, fake

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def check_extension(self, fd: int, extension: int) -> int:
        if extension == uapi.Extension.NOIOMMU_IOMMU:
            return 1
        return int(self._inner.check_extension(fd, extension))

    def noiommu_group(self, group: int) -> bool:
        return group == self._fake


async def test_one_container_holds_one_kind_of_group(
    monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    monkeypatch.setenv("AIOVFIO_NOIOMMU", "1")
    with Machine() as m:
        m.add_device(Edu(), name=EDU)
        number = m.kernel.iommu_group(EDU)
        assert number is not None
        k = _MixedKernel(m.kernel, fake=number + 1)
        async with aiovfio.Container(kernel=k, noiommu=True) as container:
            with pytest.raises(errors.InvalidArgument, match="is an IOMMU group"):
                container.group(number)
        async with aiovfio.Container(kernel=k) as container:
            async with container.group(number):
                assert "noiommu" not in repr(container.dma_space)
                with pytest.raises(errors.InvalidArgument, match="holds IOMMU groups"):
                    container.group(number + 1)
        assert m.leaks() == []
    assert _noiommu_warnings(recwarn) == []


class _FragmentedKernel:
    """The sim's kernel, whose 4 KiB pages are never physically contiguous (pagemap)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.huge = False  # whether the memory just allocated is a hugetlb page

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def physical_pages(self, vaddr: int, size: int) -> tuple[int, ...]:
        real: tuple[int, ...] = self._inner.physical_pages(vaddr, size)
        if self.huge:
            return real
        return tuple(p + (i % 2) * (64 << 20) for i, p in enumerate(real))  # scattered


async def test_noiommu_falls_back_to_a_hugepage_when_pages_are_fragmented(
    machine: Machine, monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    import aiovfio.noiommu as noiommu_module
    from aiovfio.dma import allocate_memory

    k = _FragmentedKernel(machine.kernel)
    asked: list[bool] = []
    free_hugepages = [1]

    def allocate(size: int, *, hugepages: bool = False) -> mmap.mmap:
        asked.append(hugepages)
        if hugepages and not free_hugepages[0]:
            raise errors.OutOfMemory(12, "mmap of a hugetlb page failed: none free")
        mem = allocate_memory(size)  # the host reserves no hugepages: stand in for one
        k.huge = hugepages
        free_hugepages[0] -= hugepages
        return mem

    monkeypatch.setattr(noiommu_module, "allocate_memory", allocate)
    async with aiovfio.open_device(EDU, kernel=k, noiommu=True) as dev:
        async with dev.dma_buffer(8192, dma_mask=EDU_MASK) as buf:
            assert asked == [False, True]  # 4 KiB pages first, then the hugepage
            assert buf.iova + buf.size - 1 <= EDU_MASK
        asked.clear()
        with pytest.raises(errors.NoiommuDmaError, match="reserve hugepages"):
            async with dev.dma_buffer(8192, dma_mask=EDU_MASK):
                pass
        assert asked == [False, True]
    assert machine.leaks() == []
