"""The iommufd backend behind the same public objects, on the simulated machine.

`open_device` picks iommufd where the kernel offers it for the device (a
device cdev and /dev/iommu), the legacy container otherwise; `backend=` and
$AIOVFIO_BACKEND force either. The choice shows in the log and in the reprs.
Bad input is a VfioError that says what to do and leaks nothing.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import anyio
import pytest
import structlog

import aiovfio
from aiovfio import errors
from aiovfio.sim import Machine
from aiovfio.sim.models import Edu, Nvme

pytestmark = pytest.mark.anyio

EDU = "0000:00:04.0"
NVME = "0000:00:05.0"
EDU_MASK = (1 << 28) - 1
SRC, DST, CNT, CMD, IRQ_STATUS, IRQ_ACK = 0x80, 0x88, 0x90, 0x98, 0x24, 0x64


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Iterator[Machine]:
    monkeypatch.delenv("AIOVFIO_BACKEND", raising=False)
    m = Machine(iommufd=True)
    m.add_device(Edu(), name=EDU)
    m.add_device(Nvme(), name=NVME)
    try:
        yield m
        assert m.leaks() == []
    finally:
        m.close()


async def _edu_dma(bar: aiovfio.Region, irq: aiovfio.InterruptStream, src: int, dst: int) -> None:
    bar.write64(SRC, src)
    bar.write64(DST, dst)
    bar.write64(CNT, 2048)
    bar.write64(CMD, 0x1 | 0x4 | (0x2 if dst != 0x40000 else 0))
    with anyio.fail_after(20):
        await irq.receive()
    bar.write32(IRQ_ACK, bar.read32(IRQ_STATUS))


async def test_open_device_picks_iommufd_and_says_so(machine: Machine) -> None:
    with structlog.testing.capture_logs() as logs:
        async with aiovfio.open_device(EDU, kernel=machine.kernel, dma_mask=EDU_MASK) as dev:
            assert "backend=iommufd" in repr(dev)
            assert "cdev=vfio0" in repr(dev)
            assert "IOAS" in repr(dev.dma_space)
            assert dev.dma_space.backend == "iommufd"
            dev.config.enable()
            bar = dev.bar(0)
            async with dev.interrupts("msi") as (irq,), dev.dma_buffer(8192) as buf:
                assert buf.iova + buf.size - 1 <= EDU_MASK
                buf.view[:2048] = bytes(range(256)) * 8
                await _edu_dma(bar, irq, buf.iova, 0x40000)
                await _edu_dma(bar, irq, 0x40000, buf.iova + 4096)
                assert bytes(buf.view[4096:6144]) == bytes(range(256)) * 8
    chosen = [e for e in logs if e["event"] == "device.backend"]
    assert chosen and chosen[0]["backend"] == "iommufd"
    assert machine.faults.count() == 0


async def test_the_backend_can_be_forced(machine: Machine, monkeypatch: pytest.MonkeyPatch) -> None:
    async with aiovfio.open_device(EDU, kernel=machine.kernel, backend="container") as dev:
        assert "backend=container" in repr(dev)
        async with dev.dma_buffer(4096) as buf:
            assert buf.iova
    monkeypatch.setenv("AIOVFIO_BACKEND", "container")
    async with aiovfio.open_device(EDU, kernel=machine.kernel) as dev:
        assert "backend=container" in repr(dev)
    monkeypatch.setenv("AIOVFIO_BACKEND", "iommufd")
    async with aiovfio.open_device(EDU, kernel=machine.kernel) as dev:
        assert "backend=iommufd" in repr(dev)
    monkeypatch.setenv("AIOVFIO_BACKEND", "fast")
    with pytest.raises(errors.InvalidArgument, match="AIOVFIO_BACKEND"):
        async with aiovfio.open_device(EDU, kernel=machine.kernel):
            pass
    with pytest.raises(errors.InvalidArgument, match="backend"):
        async with aiovfio.open_device(EDU, kernel=machine.kernel, backend="nope"):
            pass


async def test_without_iommufd_the_container_is_used_and_forcing_iommufd_is_refused() -> None:
    with Machine() as m:
        m.add_device(Edu(), name=EDU)
        async with aiovfio.open_device(EDU, kernel=m.kernel) as dev:
            assert "backend=container" in repr(dev)
        with pytest.raises(errors.IommufdUnavailable, match="/dev/iommu is missing"):
            async with aiovfio.open_device(EDU, kernel=m.kernel, backend="iommufd"):
                pass
        assert m.leaks() == []


async def test_overlap_and_out_of_range_iovas_are_refused_before_the_kernel(
    machine: Machine,
) -> None:
    async with aiovfio.open_device(NVME, kernel=machine.kernel) as dev:
        one, two = mmap.mmap(-1, 8192), mmap.mmap(-1, 4096)
        try:
            async with dev.map_dma(one, iova=0x100000):
                maps = machine.kernel_calls["ioas_map"]
                with pytest.raises(errors.InvalidArgument, match="overlaps"):
                    async with dev.map_dma(two, iova=0x101000):
                        pass
                with pytest.raises(errors.InvalidArgument, match="outside"):
                    async with dev.map_dma(two, iova=0xFEE0_0000):  # the MSI window
                        pass
                assert machine.kernel_calls["ioas_map"] == maps
        finally:
            one.close()
            two.close()


async def test_a_cdev_and_the_group_exclude_each_other(machine: Machine) -> None:
    async with aiovfio.open_device(EDU, kernel=machine.kernel, backend="container"):
        with pytest.raises(errors.KernelBusy, match="exclude each other"):
            async with aiovfio.open_device(EDU, kernel=machine.kernel, backend="iommufd"):
                pass
    async with aiovfio.open_device(EDU, kernel=machine.kernel, backend="iommufd"):
        with pytest.raises(errors.KernelBusy, match="cdev"):
            async with aiovfio.open_device(EDU, kernel=machine.kernel, backend="container"):
                pass


async def test_a_device_without_a_cdev_is_refused(machine: Machine) -> None:
    machine.set_driver(EDU, None)
    with pytest.raises(errors.NoDeviceCdev, match="aiovfio bind"):
        async with aiovfio.open_device(EDU, kernel=machine.kernel, backend="iommufd"):
            pass


async def test_a_group_that_is_not_viable_names_its_offenders() -> None:
    with Machine(iommufd=True) as m:
        m.add_device(Edu(), name=EDU, group=9)
        m.add_device(Edu(), name="0000:00:04.1", group=9, driver="snd_hda_intel")
        with pytest.raises(errors.GroupNotViable, match=r"0000:00:04\.1 is bound to snd_hda_intel"):
            async with aiovfio.open_device(EDU, kernel=m.kernel):
                pass
        assert m.leaks() == []


async def test_teardown_on_cancellation_leaves_nothing(machine: Machine) -> None:
    with anyio.move_on_after(0.05):
        async with aiovfio.open_device(EDU, kernel=machine.kernel) as dev:
            async with dev.dma_buffer(4096), dev.interrupts("msi"):
                await anyio.sleep_forever()
    assert machine.leaks() == []
