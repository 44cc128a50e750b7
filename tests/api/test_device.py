"""Opening devices, their description, regions and config space (sim and real kernel)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

import aiovfio
from aiovfio._uapi.pci import CapId
from aiovfio.testing.target import Target

pytestmark = pytest.mark.anyio

EDU_IDENT = 0x010000ED


@pytest.mark.kernel
async def test_open_device_describes_edu(vfio_target: Target) -> None:
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        assert dev.name == vfio_target.edu
        assert dev.info.is_pci
        assert dev.info.num_regions >= 8
        assert dev.info.num_irqs >= 2
        bar0 = dev.region_info(0)
        assert bar0.size == 1 << 20
        assert bar0.readable and bar0.writable
        assert dev.regions[0].index == 0
        cfg = dev.config
        assert (cfg.vendor_id, cfg.device_id) == (0x1234, 0x11E8)
        assert cfg.revision == 0x10
        assert cfg.class_code == 0x00FF00
        assert CapId.MSI in [c.id for c in cfg.capabilities()]
        assert "Device" in repr(dev) and vfio_target.edu in repr(dev)
    assert vfio_target.leaks() == []


@pytest.mark.kernel
async def test_bar_register_access_exact_width(vfio_target: Target) -> None:
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        dev.config.enable()
        bar = dev.bar(0)
        assert bar.read32(0x00) == EDU_IDENT
        bar.write32(0x04, 0x12345678)
        assert bar.read32(0x04) == 0xEDCBA987
        # 64-bit DMA registers take 8-byte accesses
        bar.write64(0x80, 0x1234_5000)
        assert bar.read64(0x80) == 0x1234_5000
        assert dev.bar(0) is bar


@pytest.mark.kernel
async def test_bad_register_access_is_refused_before_any_syscall(vfio_target: Target) -> None:
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        bar = dev.bar(0)
        with pytest.raises(aiovfio.RegionAccessError, match="outside"):
            bar.read32(1 << 20)
        with pytest.raises(aiovfio.RegionAccessError):
            bar.read32(-4)
        with pytest.raises(aiovfio.AlignmentError, match="aligned"):
            bar.read32(2)
        with pytest.raises(aiovfio.AlignmentError):
            bar.write64(0x84, 0)
        with pytest.raises(aiovfio.InvalidArgument, match="value"):
            bar.write32(0x04, 1 << 32)
        with pytest.raises(aiovfio.InvalidArgument):
            bar.write8(0, -1)
        with pytest.raises(aiovfio.InvalidArgument):
            bar.read32("4")  # type: ignore[arg-type]
        with pytest.raises(aiovfio.RegionAccessError):
            bar.read(0xFFFFF, 2)
        with pytest.raises(aiovfio.InvalidArgument):
            dev.bar(6)
        with pytest.raises(aiovfio.NotOffered):
            dev.bar(1)  # edu has only BAR0
        with pytest.raises(aiovfio.NotOffered, match="ROM"):
            _ = dev.rom  # nor an option ROM
        # the device still works after every refusal
        assert bar.read32(0) == EDU_IDENT


@pytest.mark.kernel
async def test_a_register_writer_is_write32_at_one_offset(vfio_target: Target) -> None:
    """Region.writer32: the offset checked once, the value per call, as write32 checks."""
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        dev.config.enable()
        bar = dev.bar(0)
        liveness = bar.writer32(0x04)
        liveness(0x12345678)
        assert bar.read32(0x04) == 0xEDCBA987
        liveness(0)
        assert bar.read32(0x04) == 0xFFFFFFFF
        with pytest.raises(aiovfio.RegionAccessError, match="outside"):
            bar.writer32(1 << 20)
        with pytest.raises(aiovfio.AlignmentError, match="aligned"):
            bar.writer32(2)
        with pytest.raises(aiovfio.InvalidArgument):
            bar.writer32(True)
        for value in (1 << 32, -1, True, "1", 1.0):
            with pytest.raises(aiovfio.InvalidArgument, match="value"):
                liveness(value)  # type: ignore[arg-type]
        assert bar.read32(0x04) == 0xFFFFFFFF  # nothing was written
        # config space: a subclass's write32 (the COMMAND hook) still runs for its writer
        cfg = dev.config
        seen: list[int] = []
        hook = cfg.on_command_write

        def on_command_write() -> None:
            seen.append(cfg.read16(0x04))
            if hook is not None:
                hook()

        cfg.on_command_write = on_command_write
        command = cfg.writer32(0x04)
        command(cfg.read32(0x04) | 0x2)
        assert seen and seen[-1] & 0x2
    with pytest.raises(aiovfio.ClosedResourceError):
        liveness(1)
    with pytest.raises(aiovfio.ClosedResourceError):
        bar.writer32(0x04)
    assert vfio_target.leaks() == []


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_register_writer_is_ki_protected_as_write32_is(sim_machine: Target) -> None:
    import trio

    protected: list[bool] = []

    class Recording:
        def __init__(self, inner: object) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def pwrite(self, fd: int, data: bytes, offset: int) -> None:
            protected.append(trio.lowlevel.currently_ki_protected())
            self._inner.pwrite(fd, data, offset)  # type: ignore[attr-defined]

    kernel = Recording(sim_machine.kernel)
    async with aiovfio.open_device(sim_machine.edu, kernel=kernel) as dev:  # type: ignore[arg-type]
        bar = dev.bar(0)
        assert not bar.mapped  # the sim's edu BAR0 is trapped: the writer pwrites
        del protected[:]
        bar.write32(0x04, 1)
        bar.writer32(0x04)(2)
        assert protected == [True, True]
        assert bar.read32(0x04) == 0xFFFFFFFD


@pytest.mark.kernel
async def test_closed_objects_refuse_use(vfio_target: Target) -> None:
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        bar = dev.bar(0)
        cfg = dev.config
    with pytest.raises(aiovfio.ClosedResourceError):
        bar.read32(0)
    with pytest.raises(aiovfio.ClosedResourceError):
        bar.write32(4, 0)
    with pytest.raises(aiovfio.ClosedResourceError):
        cfg.read16(0)
    with pytest.raises(aiovfio.ClosedResourceError):
        dev.bar(0)
    with pytest.raises(aiovfio.ClosedResourceError):
        dev.interrupts("msi")
    await dev.aclose()  # closing twice is a no-op
    assert "closed" in repr(dev)


async def test_unknown_and_malformed_addresses(sim_machine: Target) -> None:
    with pytest.raises(aiovfio.DeviceNotFound, match=r"the simulated machine has 0000:00:04\.0"):
        async with aiovfio.open_device("0000:00:1f.7", kernel=sim_machine.kernel):
            pass
    with pytest.raises(aiovfio.InvalidArgument, match="not a PCI address"):
        async with aiovfio.open_device("edu", kernel=sim_machine.kernel):
            pass
    # short forms are accepted
    async with aiovfio.open_device("00:04.0", kernel=sim_machine.kernel) as dev:
        assert dev.name == "0000:00:04.0"


async def test_group_not_viable_names_the_offender() -> None:
    from aiovfio.sim import Machine
    from aiovfio.sim.models import Edu

    with Machine() as machine:
        machine.add_device(Edu(), name="0000:00:04.0", group=9)
        machine.add_device(Edu(), name="0000:00:04.1", group=9, driver="snd_hda_intel")
        with pytest.raises(aiovfio.GroupNotViable) as info:
            async with aiovfio.open_device("0000:00:04.0", kernel=machine.kernel):
                pass
        err = info.value
        assert err.group == 9
        assert [(o.name, o.driver) for o in err.offenders] == [("0000:00:04.1", "snd_hda_intel")]
        assert "aiovfio bind 0000:00:04.1" in str(err)
        assert machine.leaks() == []


async def test_group_opened_twice_is_busy(sim_machine: Target) -> None:
    async with aiovfio.open_device(sim_machine.edu, kernel=sim_machine.kernel):
        with pytest.raises(aiovfio.KernelError, match="already open") as info:
            async with aiovfio.open_device(sim_machine.edu, kernel=sim_machine.kernel):
                pass
        assert info.value.errno == 16  # EBUSY, kept from the kernel


@pytest.mark.kernel
async def test_two_groups_in_one_container(vfio_target: Target) -> None:
    if vfio_target.nvme is None:
        pytest.fail("the target has no nvme device")
    k = vfio_target.kernel
    g_edu = k.iommu_group(vfio_target.edu)
    g_nvme = k.iommu_group(vfio_target.nvme)
    assert g_edu is not None and g_nvme is not None and g_edu != g_nvme
    async with aiovfio.Container(kernel=k) as container:
        async with container.group(g_edu) as ge, container.group(g_nvme) as gn:
            assert ge.viable and gn.viable
            assert vfio_target.edu in ge.device_names
            async with (
                ge.open_device(vfio_target.edu) as edu,
                gn.open_device(vfio_target.nvme) as nvme,
            ):
                nvme.config.enable()
                cap = nvme.bar(0).read64(0)
                assert cap & 0xFFFF == 0x7FF  # MQES
                assert nvme.bar(0).read32(0x08) >= 0x10000  # VS
                assert edu.bar(0).read32(0) == EDU_IDENT
                info = container.iommu_info
                assert info.min_page_size == 4096
                assert info.iova_ranges
            assert "groups=" in repr(container)
    assert vfio_target.leaks() == []


async def test_container_must_be_entered(sim_machine: Target) -> None:
    c = aiovfio.Container(kernel=sim_machine.kernel)
    with pytest.raises(aiovfio.UsageError, match="async with"):
        c.group(4)
    async with c:
        with pytest.raises(aiovfio.UsageError, match="attach a group"):
            _ = c.iommu_info
        with pytest.raises(aiovfio.InvalidArgument):
            c.group(-1)
    with pytest.raises(aiovfio.ClosedResourceError):
        c.group(4)


@pytest.mark.kernel
async def test_nvme_msix_reset_and_bulk_config(vfio_target: Target) -> None:
    if vfio_target.nvme is None:
        pytest.fail("the target has no nvme device")
    async with aiovfio.open_device(
        vfio_target.nvme, kernel=vfio_target.kernel, on_release_request="ignore"
    ) as dev:
        cfg = dev.config
        assert cfg.read(0, 4) == bytes([0x36, 0x1B, 0x10, 0x00])  # 1b36:0010, bulk pread
        cfg.write(0x3C, b"\x0b")  # interrupt line: a plain, writable config byte
        assert cfg.read8(0x3C) == 0x0B
        express = cfg.find_capability(CapId.EXP)
        assert express is not None and express.name == "EXP"
        assert cfg.size == 4096  # PCI Express: extended config space
        assert cfg.extended_capabilities() == []  # QEMU's nvme lists none there
        assert cfg.find_capability(CapId.MSIX) is not None
        assert dev.info.can_reset
        info = dev.irq_info("msix")
        assert info.count == 65
        with pytest.raises(aiovfio.NotOffered):
            dev.interrupts("msi")  # nvme offers MSI-X only
        async with dev.interrupts("msix", 4) as vectors:
            assert [v.vector for v in vectors] == [0, 1, 2, 3]
            vectors[2].trigger()
            with anyio.fail_after(10):
                assert await vectors[2].receive() == 1
            # ERR (PCI Express) and REQ (the kernel asking for the device back)
            # are offered beside the interrupt mode.
            async with dev.interrupts("err") as (err,), dev.interrupts("req") as (req,):
                assert not err.closed and not req.closed
        await dev.reset()
        dev.config.enable()
        assert dev.bar(0).read32(0x1C) & 1 == 0  # CSTS.RDY clear after the reset
    assert vfio_target.leaks() == []


@pytest.mark.kernel
@pytest.mark.needs_iommu("noiommu has no DMA entry budget: iommu_info.dma_avail is None")
@pytest.mark.needs_container("an IOAS has no DMA entry budget: iommu_info.dma_avail is None")
async def test_dma_budget_counts_live_mappings(vfio_target: Target) -> None:
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        budget = dev.iommu_info.dma_avail
        assert budget is not None and budget > 0
        async with dev.dma_buffer(4096), dev.dma_buffer(4096):
            assert dev.iommu_info.dma_avail == budget - 2
        assert dev.iommu_info.dma_avail == budget
    assert vfio_target.leaks() == []
