"""What the container, the group and the device fds do when Linux says yes."""

from __future__ import annotations

import ctypes
import os
import struct

import pytest

from aiovfio._uapi import caps
from aiovfio._uapi import vfio as uapi
from aiovfio._uapi.vfio import Extension, GroupFlag, IommuInfoCap
from aiovfio.kernel.protocol import Kernel
from aiovfio.sim import Machine

from .rig import GROUP, NAME, PAGE, Rig, Toy, buffer


def test_machine_kernel_is_a_kernel(machine: Machine) -> None:
    kernel: Kernel = machine.kernel
    assert isinstance(kernel, Kernel)
    assert kernel.name == "sim"
    assert kernel.vfio_available() is True


def test_api_version_is_0(rig: Rig) -> None:
    assert rig.k.get_api_version(rig.container()) == uapi.VFIO_API_VERSION == 0


@pytest.mark.parametrize(
    ("extension", "before", "after"),
    [
        (Extension.TYPE1_IOMMU, 1, 1),
        (Extension.TYPE1v2_IOMMU, 1, 1),
        (Extension.UNMAP_ALL, 1, 1),
        (Extension.UPDATE_VADDR, 0, 1),  # type1 answers it only with an IOMMU
        (Extension.DMA_CC_IOMMU, 0, 1),
        (Extension.SPAPR_TCE_IOMMU, 0, 0),
        (Extension.TYPE1_NESTING_IOMMU, 1, 1),  # 6.1 and 6.12; removed in 6.13
        (Extension.NOIOMMU_IOMMU, 0, 0),
        (Extension.EEH, 0, 0),
        (12345, 0, 0),
    ],
)
def test_check_extension(rig: Rig, extension: int, before: int, after: int) -> None:
    c = rig.container()
    assert rig.k.check_extension(c, extension) == before  # works before any group
    g = rig.k.open_group(GROUP)
    rig.k.group_set_container(g, c)
    rig.k.set_iommu(c, Extension.TYPE1v2_IOMMU)
    assert rig.k.check_extension(c, extension) == after


def test_group_status_flags(rig: Rig) -> None:
    g = rig.k.open_group(GROUP)
    assert rig.group_flags(g) == GroupFlag.VIABLE
    c = rig.container()
    rig.k.group_set_container(g, c)
    assert rig.group_flags(g) == GroupFlag.VIABLE | GroupFlag.CONTAINER_SET
    rig.k.group_unset_container(g)
    assert rig.group_flags(g) == GroupFlag.VIABLE


@pytest.mark.parametrize(
    ("driver", "viable"),
    [
        (None, True),
        ("pci-stub", True),
        ("pcieport", True),
        ("vfio-pci", True),
        ("mlx5_vfio_pci", True),
        ("e1000e", False),
        ("nvme", False),
    ],
)
def test_viability_follows_the_other_devices_driver(
    rig: Rig, driver: str | None, viable: bool
) -> None:
    rig.machine.add_device(Toy(), name="0000:00:04.1", group=GROUP, driver=driver)
    g = rig.k.open_group(GROUP)
    assert bool(rig.group_flags(g) & GroupFlag.VIABLE) is viable


def test_groups_share_a_container(rig: Rig) -> None:
    second = Toy()
    rig.machine.add_device(second, name="0000:00:05.0", group=11)
    c, g10 = rig.attached()
    g11 = rig.k.open_group(11)
    rig.k.group_set_container(g11, c)  # type1 attaches it to the IOMMU already set
    d = rig.k.group_get_device_fd(g11, "0000:00:05.0")
    buf, addr = buffer()
    buf[:4] = b"ping"
    rig.map(c, addr, 0x10000, PAGE)
    rig.bus_master(d)
    assert second.ctx is not None
    assert second.ctx.dma_read(0x10000, 4) == b"ping"
    rig.k.close(d)
    rig.k.group_unset_container(g11)
    assert rig.group_flags(g10) & GroupFlag.CONTAINER_SET  # the other group stays
    assert rig.unmap(c, 0x10000, PAGE) == PAGE


def test_last_group_out_takes_the_iommu_and_mappings(rig: Rig) -> None:
    c, g = rig.attached()
    _buf, addr = buffer()
    rig.map(c, addr, 0, PAGE)
    rig.k.group_unset_container(g)
    assert not any("DMA mapping" in line for line in rig.machine.leaks())
    rig.k.group_set_container(g, c)
    rig.k.set_iommu(c, Extension.TYPE1v2_IOMMU)  # the container is unset again: allowed


def test_container_lives_while_a_group_holds_it(rig: Rig) -> None:
    c, g = rig.attached()
    _buf, addr = buffer()
    rig.map(c, addr, 0, PAGE)
    rig.k.close(c)
    leaks = rig.machine.leaks()
    assert any(line.startswith("DMA mapping") for line in leaks)
    rig.k.close(g)
    assert rig.machine.leaks() == []


def test_a_device_can_be_opened_twice(rig: Rig) -> None:
    _, _, d1 = rig.device()
    g = next(fd for fd, f in rig.k.files.files.items() if f.kind() == "group")
    d2 = rig.k.group_get_device_fd(g, NAME)
    assert d1 != d2
    e = rig.k.eventfd()
    rig.eventfds(d1, 1, [e])
    rig.k.close(d1)  # interrupts belong to the device, not to the fd
    assert any("MSI vector 0 enabled" in line for line in rig.machine.leaks())
    rig.k.close(d2)
    assert not any("MSI" in line for line in rig.machine.leaks())


def test_group_close_with_open_device_keeps_the_group(rig: Rig) -> None:
    _, g, d = rig.device()
    rig.k.close(g)
    leaks = rig.machine.leaks()
    assert "group 10: its fd was closed but open device fds still hold it" in leaks
    assert f"device fd {d} ({NAME}) is open" in leaks
    rig.k.close(d)  # now the group is released and detached
    assert not any("group 10" in line for line in rig.machine.leaks())
    rig.k.open_group(GROUP)


def test_device_first_open_and_last_close_reset(rig: Rig) -> None:
    _, g, d = rig.device()
    assert rig.toy.resets == 1  # vfio_pci_core_enable tries a function reset
    d2 = rig.k.group_get_device_fd(g, NAME)
    assert rig.toy.resets == 1
    rig.k.close(d)
    rig.k.close(d2)
    assert rig.toy.resets == 2  # vfio_pci_core_disable resets again


def test_open_clears_bus_master_and_enables_memory(rig: Rig) -> None:
    _, _, d = rig.device()
    rig.bus_master(d)
    rig.k.close(d)
    g = next(fd for fd, f in rig.k.files.files.items() if f.kind() == "group")
    d = rig.k.group_get_device_fd(g, NAME)
    assert rig.cfg_read(d, 4, 2) == 0x0103  # I/O, Memory, SERR: as Linux (Bus Master clear)


def test_device_reset_keeps_interrupts(rig: Rig) -> None:
    _, _, d = rig.device()
    e = rig.k.eventfd()
    rig.eventfds(d, 1, [e])
    rig.toy.regs[(0, 0)] = 5
    rig.k.device_reset(d)
    assert rig.toy.regs == {}
    assert any("MSI vector 0" in line for line in rig.machine.leaks())


def test_set_driver_unbind_makes_the_group_stale(rig: Rig) -> None:
    c, g = rig.attached()
    rig.machine.set_driver(NAME, None)
    assert rig.machine.kernel.driver(NAME) is None
    assert not any("attached" in line for line in rig.machine.leaks())
    rig.machine.set_driver(NAME, "vfio-pci")
    g2 = rig.k.open_group(GROUP)  # a new vfio_group: the stale fd does not hold it
    rig.k.group_set_container(g2, c)
    assert rig.group_flags(g2) & GroupFlag.CONTAINER_SET
    rig.k.close(g)
    assert rig.group_flags(g2) & GroupFlag.CONTAINER_SET


@pytest.mark.parametrize(("linux", "dma_avail_size"), [("6.1", 12), ("6.12", 16)])
def test_iommu_get_info_two_calls(toy: Toy, linux: str, dma_avail_size: int) -> None:
    """6.12 pads each capability to 8 bytes (vfio_info_cap_add); 6.1 does not."""
    machine = Machine(clock="manual", linux=linux)
    machine.add_device(toy, name=NAME, group=GROUP)
    rig = Rig(machine, toy)
    c, _ = rig.attached()
    info = uapi.vfio_iommu_type1_info(argsz=ctypes.sizeof(uapi.vfio_iommu_type1_info))
    buf = bytearray(info)
    rig.k.iommu_get_info(c, buf)
    first = uapi.vfio_iommu_type1_info.from_buffer_copy(buf)
    assert first.flags == uapi.IommuInfoFlag.PGSIZES | uapi.IommuInfoFlag.CAPS
    assert first.iova_pgsizes & -first.iova_pgsizes == PAGE
    assert first.cap_offset == 0
    # migration (32) + DMA available (12, or 16 padded) + IOVA ranges (16 + 2 * 16)
    assert first.argsz == 24 + 32 + dma_avail_size + 48
    buf = bytearray(first.argsz)
    struct.pack_into("<I", buf, 0, first.argsz)
    rig.k.iommu_get_info(c, buf)
    info = uapi.vfio_iommu_type1_info.from_buffer_copy(buf)
    assert info.cap_offset == 24
    chain = caps.walk(buf, info.cap_offset, start=24)
    assert [(cap.id, cap.offset) for cap in chain] == [
        (IommuInfoCap.MIGRATION, 24),
        (IommuInfoCap.DMA_AVAIL, 56),
        (IommuInfoCap.IOVA_RANGE, 56 + dma_avail_size),
    ]
    assert caps.dma_avail(chain[1]) == 65535
    assert caps.iova_ranges(chain[2]) == [(0, 0xFEDF_FFFF), (0xFEF0_0000, 0x7F_FFFF_FFFF)]
    machine.close()


def test_iommu_get_info_minimal_argsz(rig: Rig) -> None:
    c, _ = rig.attached()
    buf = bytearray(24)
    struct.pack_into("<IIQI", buf, 0, 16, 0, 0, 0xDEAD)
    rig.k.iommu_get_info(c, buf)
    # Only the first 16 bytes are the kernel's to write: cap_offset is left alone.
    assert struct.unpack_from("<I", buf, 16)[0] == 0xDEAD
    assert struct.unpack_from("<I", buf, 0)[0] == 120  # 6.12: 116 on 6.1


def test_dma_avail_counts_down(toy: Toy) -> None:
    with Machine(clock="manual", dma_entry_limit=10) as m:
        m.add_device(toy, name=NAME, group=GROUP)
        rig = Rig(m, toy)
        c, _ = rig.attached()
        buf, addr = buffer(2)
        rig.map(c, addr, 0, PAGE)
        rig.map(c, addr + PAGE, PAGE, PAGE)
        info = bytearray(120)
        struct.pack_into("<I", info, 0, 120)
        rig.k.iommu_get_info(c, info)
        chain = caps.walk(info, 24, start=24)
        assert caps.dma_avail(chain[1]) == 8
        buf.close()


def test_device_info(rig: Rig) -> None:
    _, _, d = rig.device()
    buf = bytearray(24)
    struct.pack_into("<I", buf, 0, 24)
    rig.k.device_get_info(d, buf)
    info = uapi.vfio_device_info.from_buffer_copy(buf)
    assert info.flags == uapi.DeviceFlag.PCI | uapi.DeviceFlag.RESET
    assert (info.num_regions, info.num_irqs, info.cap_offset) == (9, 5, 0)


def test_device_info_without_reset(machine: Machine) -> None:
    machine.add_device(Toy(reset=False), name=NAME, group=GROUP)
    rig = Rig(machine, Toy())
    _, _, d = rig.device()
    buf = bytearray(16)
    struct.pack_into("<I", buf, 0, 16)
    rig.k.device_get_info(d, buf)
    assert uapi.vfio_device_info.from_buffer_copy(buf + bytes(8)).flags == uapi.DeviceFlag.PCI


def test_sim_fds_are_real_fds(rig: Rig) -> None:
    before = len(os.listdir("/proc/self/fd"))
    c, g, d = rig.device()
    e = rig.k.eventfd()
    assert len({c, g, d, e}) == 4
    assert len(os.listdir("/proc/self/fd")) == before + 4
    for fd in (c, g, d):
        assert "aiovfio-sim" in os.readlink(f"/proc/self/fd/{fd}")
    for fd in (e, d, g, c):
        rig.k.close(fd)
    assert len(os.listdir("/proc/self/fd")) == before
    assert rig.machine.leaks() == []


def test_os_close_behind_the_kernels_back_releases_like_linux(rig: Rig) -> None:
    _, g = rig.attached()
    os.close(g)
    rig.k.open_group(GROUP)  # Linux released the group when its file closed


def test_a_reused_fd_number_releases_the_old_file(rig: Rig) -> None:
    g = rig.k.open_group(GROUP)
    os.close(g)
    c = rig.k.open_container()  # the lowest free number: the group's old one
    assert c == g
    assert rig.machine.leaks() == [f"container fd {c} is open"]
    rig.k.close(rig.k.open_group(GROUP))


def test_aliased_numbers_mean_what_the_file_says(rig: Rig) -> None:
    """IOMMU_MAP_DMA is DEVICE_PCI_HOT_RESET's number: a device fd decodes a hot reset."""
    c, _, d = rig.device()
    arg = uapi.vfio_iommu_type1_dma_map(argsz=32, flags=3, vaddr=0, iova=0, size=PAGE)
    with pytest.raises(OSError, match="hot_reset_header"):
        rig.k.map_dma(d, arg)
    info = bytearray(16)
    struct.pack_into("<I", info, 0, 12)  # a hot reset info header, read as IOMMU_GET_INFO's
    with pytest.raises(OSError, match="iommu_info_argsz"):
        rig.k.device_get_pci_hot_reset_info(c, info)
