"""One test per row of aiovfio.sim.rules, named after it: each asserts Linux's errno.

`test_every_rule_has_a_test` keeps the table and this file aligned.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import sys
from collections.abc import Iterator

import pytest

from aiovfio._uapi import iommufd as iuapi
from aiovfio._uapi import vfio as uapi
from aiovfio._uapi.vfio import DeviceFeature, DeviceFeatureFlag, IrqSetFlag
from aiovfio.sim import RULES, IommuFault, Machine
from aiovfio.sim import rules as R  # noqa: N812 - R.RULE_NAME reads as the table

from .rig import CONFIG, GROUP, NAME, PAGE, Rig, Toy, buffer, protect, refused

TRIGGER_EVENTFD = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER
TRIGGER_NONE = IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER


def test_every_rule_has_a_test() -> None:
    module = sys.modules[__name__]
    missing = [r.name for r in RULES if not hasattr(module, f"test_{r.name}")]
    assert missing == []


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_rule_rows_are_well_formed(rule: R.Rule) -> None:
    assert getattr(R, rule.name.upper()) is rule
    assert rule.errno in errno.errorcode
    assert rule.description and rule.enforced_by
    err = rule.error("detail")
    assert err.errno == rule.errno
    assert f"sim rule {rule.name};" in str(err) and "detail" in str(err)


# --- files ------------------------------------------------------------------------------


def test_bad_fd(rig: Rig) -> None:
    fd = rig.k.open_container()
    os.close(fd)  # behind the kernel's back: the number is not open any more
    refused(R.BAD_FD, rig.k.get_api_version, fd)
    refused(R.BAD_FD, rig.k.pread, fd, 4, 0)


def test_user_memory(rig: Rig) -> None:
    c, _, d = rig.device()
    refused(R.USER_MEMORY, rig.k.iommu_get_info, c, bytearray(8))  # shorter than minsz
    info = bytearray(24)
    struct.pack_into("<I", info, 0, 200)  # claims room for the capabilities it lacks
    refused(R.USER_MEMORY, rig.k.iommu_get_info, c, info)
    refused(R.USER_MEMORY, rig.k.device_set_irqs, d, bytearray(12))


def test_not_supported(rig: Rig) -> None:
    c, g, d = rig.device()
    e = rig.k.eventfd()
    refused(R.NOT_SUPPORTED, rig.k.get_api_version, e)
    refused(R.NOT_SUPPORTED, rig.k.get_api_version, g)
    refused(R.NOT_SUPPORTED, rig.k.set_iommu, d, 3)
    refused(R.NOT_SUPPORTED, rig.k.group_unset_container, c)  # a type1 container
    arg = uapi.vfio_device_attach_iommufd_pt(argsz=12)
    refused(R.NOT_SUPPORTED, rig.k.device_attach_iommufd_pt, d, arg)


def test_not_simulated(rig: Rig) -> None:
    _, _, d = rig.device()
    e = rig.k.eventfd()
    rig.eventfds(d, 0, [e])
    flags = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_UNMASK
    refused(R.NOT_SIMULATED, rig.irq_set, d, flags, 0, 0, 1, struct.pack("<i", e))


def test_no_such_group(rig: Rig) -> None:
    refused(R.NO_SUCH_GROUP, rig.k.open_group, 99)
    rig.machine.set_driver(NAME, None)  # no VFIO device left: no /dev/vfio/10
    refused(R.NO_SUCH_GROUP, rig.k.open_group, GROUP)


def test_no_iommufd(rig: Rig) -> None:
    assert rig.k.iommufd_available() is False
    refused(R.NO_IOMMUFD, rig.k.open_iommufd)
    refused(R.NO_IOMMUFD, rig.k.open_device_cdev, "vfio0")


def test_no_read_write(rig: Rig) -> None:
    c, g = rig.attached()
    refused(R.NO_READ_WRITE, rig.k.pread, c, 4, 0)
    refused(R.NO_READ_WRITE, rig.k.pwrite, g, b"x", 0)


def test_no_mmap(rig: Rig) -> None:
    c, g = rig.attached()
    refused(R.NO_MMAP, rig.k.mmap, c, PAGE, 0, writable=True)
    refused(R.NO_MMAP, rig.k.mmap, g, PAGE, 0, writable=False)


# --- container and type1 IOMMU ---------------------------------------------------------


def test_container_no_iommu(rig: Rig) -> None:
    c, _ = rig.attached(iommu=None)
    refused(R.CONTAINER_NO_IOMMU, rig.map, c, 0, 0, PAGE)
    refused(R.CONTAINER_NO_IOMMU, rig.unmap, c, 0, PAGE)
    refused(R.CONTAINER_NO_IOMMU, rig.k.iommu_get_info, c, bytearray(24))


def test_set_iommu_without_group(rig: Rig) -> None:
    c = rig.container()
    refused(R.SET_IOMMU_WITHOUT_GROUP, rig.k.set_iommu, c, uapi.Extension.TYPE1v2_IOMMU)


def test_set_iommu_twice(rig: Rig) -> None:
    c, _ = rig.attached()
    refused(R.SET_IOMMU_TWICE, rig.k.set_iommu, c, uapi.Extension.TYPE1v2_IOMMU)


@pytest.mark.parametrize("kind", [0, 2, 4, 6, 7, 8, 99])
def test_set_iommu_unsupported(rig: Rig, kind: int) -> None:
    c, _ = rig.attached(iommu=None)
    refused(R.SET_IOMMU_UNSUPPORTED, rig.k.set_iommu, c, kind)


def test_iommu_info_argsz(rig: Rig) -> None:
    c, _ = rig.attached()
    buf = bytearray(24)
    struct.pack_into("<I", buf, 0, 15)
    refused(R.IOMMU_INFO_ARGSZ, rig.k.iommu_get_info, c, buf)


def _map_arg(**fields: int) -> uapi.vfio_iommu_type1_dma_map:
    values = {"argsz": 32, "flags": 3, "vaddr": 0, "iova": 0, "size": PAGE} | fields
    return uapi.vfio_iommu_type1_dma_map(**values)


def test_map_argsz(rig: Rig) -> None:
    c, _ = rig.attached()
    _buf, addr = buffer()
    refused(R.MAP_ARGSZ, rig.k.map_dma, c, _map_arg(argsz=31, vaddr=addr))


def test_map_flags(rig: Rig) -> None:
    c, _ = rig.attached()
    _buf, addr = buffer()
    refused(R.MAP_FLAGS, rig.k.map_dma, c, _map_arg(flags=0x8 | 3, vaddr=addr))


@pytest.mark.parametrize("flags", [0, 4 | 1, 4 | 2])
def test_map_no_permission(rig: Rig, flags: int) -> None:
    c, _ = rig.attached()
    _buf, addr = buffer()
    refused(R.MAP_NO_PERMISSION, rig.map, c, addr, 0, PAGE, flags)


@pytest.mark.parametrize(
    ("dv", "iova", "size"),
    [(0, 0, 0), (0, 0, 100), (0, 0x10, PAGE), (8, 0, PAGE)],
    ids=["size0", "size", "iova", "vaddr"],
)
def test_map_unaligned(rig: Rig, dv: int, iova: int, size: int) -> None:
    c, _ = rig.attached()
    _buf, addr = buffer()
    refused(R.MAP_UNALIGNED, rig.map, c, addr + dv, iova, size)


def test_map_wraps(rig: Rig) -> None:
    c, _ = rig.attached()
    _buf, addr = buffer()
    refused(R.MAP_WRAPS, rig.map, c, addr, (1 << 64) - PAGE, 2 * PAGE)


def test_map_overlap(rig: Rig) -> None:
    c, _ = rig.attached()
    _buf, addr = buffer(2)
    rig.map(c, addr, 0x10000, 2 * PAGE)
    refused(R.MAP_OVERLAP, rig.map, c, addr, 0x10000 + PAGE, PAGE)
    refused(R.MAP_OVERLAP, rig.map, c, addr, 0x10000 - PAGE, 2 * PAGE)


def test_map_vaddr_not_found(rig: Rig) -> None:
    c, _ = rig.attached()
    _buf, addr = buffer()
    refused(R.MAP_VADDR_NOT_FOUND, rig.map, c, addr, 0x10000, PAGE, uapi.DmaMapFlag.VADDR)


def test_map_vaddr_mismatch(rig: Rig) -> None:
    c, _ = rig.attached()
    _buf, addr = buffer(2)
    rig.map(c, addr, 0x10000, 2 * PAGE)
    # The vaddr is still valid: nothing to update.
    refused(R.MAP_VADDR_MISMATCH, rig.map, c, addr, 0x10000, 2 * PAGE, uapi.DmaMapFlag.VADDR)
    assert rig.unmap(c, 0x10000, 2 * PAGE, uapi.DmaUnmapFlag.VADDR) == 2 * PAGE
    # Invalidated, but the range must be exactly the mapping.
    refused(R.MAP_VADDR_MISMATCH, rig.map, c, addr, 0x10000, PAGE, uapi.DmaMapFlag.VADDR)


def test_map_entry_limit(toy: Toy) -> None:
    with Machine(clock="manual", dma_entry_limit=2) as m:
        m.add_device(toy, name=NAME, group=GROUP)
        rig = Rig(m, toy)
        c, _ = rig.attached()
        _buf, addr = buffer(3)
        rig.map(c, addr, 0, PAGE)
        rig.map(c, addr + PAGE, PAGE, PAGE)
        refused(R.MAP_ENTRY_LIMIT, rig.map, c, addr + 2 * PAGE, 2 * PAGE, PAGE)
        rig.unmap(c, 0, PAGE)
        rig.map(c, addr + 2 * PAGE, 2 * PAGE, PAGE)


def test_map_outside_iova_ranges(rig: Rig) -> None:
    c, _ = rig.attached()
    _buf, addr = buffer()
    refused(R.MAP_OUTSIDE_IOVA_RANGES, rig.map, c, addr, 0xFEE0_0000, PAGE)  # the MSI window
    refused(R.MAP_OUTSIDE_IOVA_RANGES, rig.map, c, addr, 0x80_0000_0000, PAGE)  # past 39 bits


def test_map_bad_vaddr(rig: Rig) -> None:
    c, _ = rig.attached()
    m, addr = buffer(2)
    protect(addr + PAGE, PAGE, mmap.PROT_READ)
    rig.map(c, addr + PAGE, 0, PAGE, uapi.DmaMapFlag.READ)  # device reads: fine
    refused(R.MAP_BAD_VADDR, rig.map, c, addr, PAGE, 2 * PAGE)  # device writes: no
    protect(addr, PAGE, 0)  # PROT_NONE
    refused(R.MAP_BAD_VADDR, rig.map, c, addr, 0x10000, PAGE, uapi.DmaMapFlag.READ)
    refused(R.MAP_BAD_VADDR, rig.map, c, PAGE, 0x20000, PAGE)  # page 1 is never mapped
    protect(addr, 2 * PAGE, mmap.PROT_READ | mmap.PROT_WRITE)
    mappings = [line for line in rig.machine.leaks() if line.startswith("DMA mapping")]
    assert len(mappings) == 1  # only the read-only one
    m.close()


def test_map_memlock(toy: Toy) -> None:
    with Machine(clock="manual", memlock_limit=2 * PAGE) as m:
        m.add_device(toy, name=NAME, group=GROUP)
        rig = Rig(m, toy)
        c, _ = rig.attached()
        _buf, addr = buffer(3)
        rig.map(c, addr, 0, 2 * PAGE)
        refused(R.MAP_MEMLOCK, rig.map, c, addr + 2 * PAGE, 2 * PAGE, PAGE)
        rig.unmap(c, 0, 2 * PAGE)
        rig.map(c, addr, 0, 2 * PAGE)


def test_unmap_argsz(rig: Rig) -> None:
    c, _ = rig.attached()
    arg = uapi.vfio_iommu_type1_dma_unmap(argsz=23, iova=0, size=PAGE)
    refused(R.UNMAP_ARGSZ, rig.k.unmap_dma, c, arg)


@pytest.mark.parametrize("flags", [0x8, 0x1, 0x1 | 0x2, 0x1 | 0x4])
def test_unmap_flags(rig: Rig, flags: int) -> None:
    c, _ = rig.attached()
    refused(R.UNMAP_FLAGS, rig.unmap, c, 0, PAGE, flags)


@pytest.mark.parametrize(
    ("iova", "size"),
    [(0x10, PAGE), (0, 0), (0, 100), (2 * PAGE, (1 << 64) - PAGE)],
    ids=["iova", "size0", "size", "wraps"],
)
def test_unmap_unaligned(rig: Rig, iova: int, size: int) -> None:
    c, _ = rig.attached()
    refused(R.UNMAP_UNALIGNED, rig.unmap, c, iova, size)


def test_unmap_all_with_range(rig: Rig) -> None:
    c, _ = rig.attached()
    refused(R.UNMAP_ALL_WITH_RANGE, rig.unmap, c, 0, PAGE, uapi.DmaUnmapFlag.ALL)
    refused(R.UNMAP_ALL_WITH_RANGE, rig.unmap, c, PAGE, 0, uapi.DmaUnmapFlag.ALL)


def test_unmap_splits_mapping(rig: Rig) -> None:
    c, _ = rig.attached()
    _buf, addr = buffer(4)
    rig.map(c, addr, 0x10000, 4 * PAGE)
    refused(R.UNMAP_SPLITS_MAPPING, rig.unmap, c, 0x10000 + PAGE, PAGE)  # starts inside
    refused(R.UNMAP_SPLITS_MAPPING, rig.unmap, c, 0x10000, PAGE)  # ends inside
    assert rig.unmap(c, 0, 0x100000) == 4 * PAGE  # covering it whole is fine


def test_unmap_vaddr_twice(rig: Rig) -> None:
    c, _ = rig.attached()
    _buf, addr = buffer()
    rig.map(c, addr, 0, PAGE)
    rig.unmap(c, 0, PAGE, uapi.DmaUnmapFlag.VADDR)
    refused(R.UNMAP_VADDR_TWICE, rig.unmap, c, 0, PAGE, uapi.DmaUnmapFlag.VADDR)


# --- group --------------------------------------------------------------------------------


def test_group_busy(rig: Rig) -> None:
    _, g, _ = rig.device()
    refused(R.GROUP_BUSY, rig.k.open_group, GROUP)
    rig.k.close(g)  # the device fd still holds the group
    refused(R.GROUP_BUSY, rig.k.open_group, GROUP)


def test_group_gone(rig: Rig) -> None:
    g = rig.k.open_group(GROUP)
    rig.machine.set_driver(NAME, None)
    refused(R.GROUP_GONE, rig.k.group_get_status, g, rig.status())
    refused(R.GROUP_GONE, rig.k.group_set_container, g, rig.container())


def test_group_status_argsz(rig: Rig) -> None:
    g = rig.k.open_group(GROUP)
    refused(R.GROUP_STATUS_ARGSZ, rig.k.group_get_status, g, uapi.vfio_group_status(argsz=7))


def test_set_container_bad_fd(rig: Rig) -> None:
    g = rig.k.open_group(GROUP)
    c = rig.container()
    rig.k.close(c)
    refused(R.SET_CONTAINER_BAD_FD, rig.k.group_set_container, g, c)


def test_set_container_already_set(rig: Rig) -> None:
    c, g = rig.attached()
    refused(R.SET_CONTAINER_ALREADY_SET, rig.k.group_set_container, g, c)
    refused(R.SET_CONTAINER_ALREADY_SET, rig.k.group_set_container, g, rig.container())


def test_set_container_not_container(rig: Rig) -> None:
    g = rig.k.open_group(GROUP)
    for fd in (g, rig.k.eventfd(), 0):
        refused(R.SET_CONTAINER_NOT_CONTAINER, rig.k.group_set_container, g, fd)


def test_set_container_not_viable(rig: Rig) -> None:
    rig.machine.add_device(Toy(), name="0000:00:04.1", group=GROUP, driver="e1000e")
    g = rig.k.open_group(GROUP)
    assert rig.group_flags(g) == 0
    err = refused(R.SET_CONTAINER_NOT_VIABLE, rig.k.group_set_container, g, rig.container())
    assert "0000:00:04.1 is bound to e1000e" in str(err)


def test_unset_container_not_set(rig: Rig) -> None:
    g = rig.k.open_group(GROUP)
    refused(R.UNSET_CONTAINER_NOT_SET, rig.k.group_unset_container, g)


def test_unset_container_busy(rig: Rig) -> None:
    _, g, d = rig.device()
    refused(R.UNSET_CONTAINER_BUSY, rig.k.group_unset_container, g)
    rig.k.close(d)
    rig.k.group_unset_container(g)


def test_device_name_unknown(rig: Rig) -> None:
    rig.machine.add_device(Toy(), name="0000:00:04.1", group=GROUP, driver=None)
    _, g = rig.attached()
    refused(R.DEVICE_NAME_UNKNOWN, rig.k.group_get_device_fd, g, "0000:00:05.0")
    refused(R.DEVICE_NAME_UNKNOWN, rig.k.group_get_device_fd, g, "0000:00:04.1")  # not VFIO's
    refused(R.DEVICE_NAME_UNKNOWN, rig.k.group_get_device_fd, g, "0000:00:04")


def test_device_name_malformed(rig: Rig) -> None:
    _, g = rig.attached()
    refused(R.DEVICE_NAME_MALFORMED, rig.k.group_get_device_fd, g, NAME + " junk")


def test_device_fd_no_iommu(rig: Rig) -> None:
    g = rig.k.open_group(GROUP)
    refused(R.DEVICE_FD_NO_IOMMU, rig.k.group_get_device_fd, g, NAME)
    rig.k.group_set_container(g, rig.container())
    refused(R.DEVICE_FD_NO_IOMMU, rig.k.group_get_device_fd, g, NAME)


# --- vfio-pci device ---------------------------------------------------------------------


def test_device_info_argsz(rig: Rig) -> None:
    _, _, d = rig.device()
    buf = bytearray(24)
    struct.pack_into("<I", buf, 0, 15)
    refused(R.DEVICE_INFO_ARGSZ, rig.k.device_get_info, d, buf)


def test_region_info_argsz(rig: Rig) -> None:
    _, _, d = rig.device()
    refused(R.REGION_INFO_ARGSZ, rig.region_info, d, 0, 31)


@pytest.mark.parametrize("index", [8, 9, 100])
def test_region_info_index(rig: Rig, index: int) -> None:
    _, _, d = rig.device()
    refused(R.REGION_INFO_INDEX, rig.region_info, d, index)


def test_irq_info_argsz(rig: Rig) -> None:
    _, _, d = rig.device()
    refused(R.IRQ_INFO_ARGSZ, rig.k.device_get_irq_info, d, uapi.vfio_irq_info(argsz=15))


@pytest.mark.parametrize("index", [3, 5, 1000])
def test_irq_info_index(rig: Rig, index: int) -> None:
    _, _, d = rig.device()  # not PCI Express: no ERR index
    refused(R.IRQ_INFO_INDEX, rig.irq_info, d, index)


@pytest.mark.parametrize(
    ("flags", "index", "start", "count", "argsz"),
    [
        (TRIGGER_NONE, 0, 0, 1, 19),
        (TRIGGER_NONE, 5, 0, 0, 20),
        (TRIGGER_NONE | 0x40, 1, 0, 1, 20),
        (TRIGGER_NONE, 1, 1, 0xFFFF_FFFF, 20),
    ],
    ids=["argsz", "index", "flags", "overflow"],
)
def test_set_irqs_header(
    rig: Rig, flags: int, index: int, start: int, count: int, argsz: int
) -> None:
    _, _, d = rig.device()
    refused(R.SET_IRQS_HEADER, rig.irq_set, d, flags, index, start, count, b"", argsz)


def test_set_irqs_range(rig: Rig) -> None:
    _, _, d = rig.device()
    e = struct.pack("<i", rig.k.eventfd())
    refused(R.SET_IRQS_RANGE, rig.irq_set, d, TRIGGER_EVENTFD, 1, 4, 1, e)  # 4 MSI vectors
    refused(R.SET_IRQS_RANGE, rig.irq_set, d, TRIGGER_EVENTFD, 1, 3, 2, e + e)
    refused(R.SET_IRQS_RANGE, rig.irq_set, d, TRIGGER_NONE, 3, 0, 0)  # no ERR vectors


def test_set_irqs_data_type(rig: Rig) -> None:
    _, _, d = rig.device()
    both = IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_TRIGGER
    refused(R.SET_IRQS_DATA_TYPE, rig.irq_set, d, both, 1, 0, 1, b"\1")
    refused(R.SET_IRQS_DATA_TYPE, rig.irq_set, d, IrqSetFlag.ACTION_TRIGGER, 1, 0, 1)


def test_set_irqs_data_size(rig: Rig) -> None:
    _, _, d = rig.device()
    e = struct.pack("<i", rig.k.eventfd())
    refused(R.SET_IRQS_DATA_SIZE, rig.irq_set, d, TRIGGER_EVENTFD, 1, 0, 2, e + e, 24)


def test_set_irqs_action(rig: Rig) -> None:
    _, _, d = rig.device()
    refused(
        R.SET_IRQS_ACTION, rig.irq_set, d, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_MASK, 1, 0, 1
    )
    both = IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER | IrqSetFlag.ACTION_UNMASK
    refused(R.SET_IRQS_ACTION, rig.irq_set, d, both, 0, 0, 1)
    refused(R.SET_IRQS_ACTION, rig.irq_set, d, IrqSetFlag.DATA_NONE, 0, 0, 1)


def test_set_irqs_bad_eventfd(rig: Rig) -> None:
    _, _, d = rig.device()
    e = rig.k.eventfd()
    rig.k.close(e)
    refused(R.SET_IRQS_BAD_EVENTFD, rig.eventfds, d, 1, [e])
    assert not any("MSI" in line for line in rig.machine.leaks())


def test_set_irqs_not_eventfd(rig: Rig) -> None:
    c, _, d = rig.device()
    good = rig.k.eventfd()
    refused(R.SET_IRQS_NOT_EVENTFD, rig.eventfds, d, 1, [good, c])
    # Nothing was enabled by the failing call, and the good eventfd was let go.
    assert not any("MSI" in line for line in rig.machine.leaks())


def test_set_irqs_other_type_enabled(rig: Rig) -> None:
    _, _, d = rig.device()
    e = rig.k.eventfd()
    rig.eventfds(d, 0, [e])  # INTx
    refused(R.SET_IRQS_OTHER_TYPE_ENABLED, rig.eventfds, d, 1, [e])
    rig.disable(d, 0)
    rig.eventfds(d, 1, [e])  # MSI
    refused(R.SET_IRQS_OTHER_TYPE_ENABLED, rig.eventfds, d, 2, [e])  # MSI-X
    refused(R.SET_IRQS_OTHER_TYPE_ENABLED, rig.eventfds, d, 0, [e])


def test_set_irqs_not_enabled(rig: Rig) -> None:
    _, _, d = rig.device()
    refused(R.SET_IRQS_NOT_ENABLED, rig.unmask, d)
    refused(R.SET_IRQS_NOT_ENABLED, rig.irq_set, d, TRIGGER_NONE, 1, 0, 1)  # MSI loopback
    refused(R.SET_IRQS_NOT_ENABLED, rig.irq_set, d, TRIGGER_NONE, 4, 0, 1)  # REQ without eventfd


def test_set_irqs_intx_range(rig: Rig) -> None:
    _, _, d = rig.device()
    refused(R.SET_IRQS_INTX_RANGE, rig.irq_set, d, TRIGGER_EVENTFD, 0, 0, 0)
    bools = IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_TRIGGER
    refused(R.SET_IRQS_INTX_RANGE, rig.irq_set, d, bools, 4, 0, 0)  # REQ


def test_set_irqs_vector_not_allocated(machine: Machine) -> None:
    """6.1 (no dynamic MSI-X): vectors past those allocated need a disable and re-enable."""
    machine.close()
    machine = Machine(clock="manual", linux="6.1")
    toy = Toy()
    machine.add_device(toy, name=NAME, group=GROUP)
    rig = Rig(machine, toy)
    _, _, d = rig.device()
    e = rig.k.eventfd()
    rig.eventfds(d, 2, [e])  # MSI-X with one vector allocated
    refused(R.SET_IRQS_VECTOR_NOT_ALLOCATED, rig.eventfds, d, 2, [e], start=1)
    rig.disable(d, 2)
    rig.eventfds(d, 2, [e, -1])  # allocate two, the second without an eventfd
    rig.eventfds(d, 2, [e], start=1)
    machine.close()


def test_dynamic_msix_adds_vectors_while_enabled(rig: Rig) -> None:
    """6.12 (dynamic MSI-X): a vector past those allocated is hooked while enabled."""
    _, _, d = rig.device()
    e = rig.k.eventfd()
    rig.eventfds(d, 2, [e])
    rig.eventfds(d, 2, [e], start=3)
    assert "MSIX vector 3 enabled" in " ".join(rig.machine.leaks())
    rig.disable(d, 2)


def test_set_irqs_mask_eventfd(rig: Rig) -> None:
    _, _, d = rig.device()
    e = rig.k.eventfd()
    rig.eventfds(d, 0, [e])
    flags = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_MASK
    refused(R.SET_IRQS_MASK_EVENTFD, rig.irq_set, d, flags, 0, 0, 1, struct.pack("<i", e))


def test_reset_not_supported(machine: Machine) -> None:
    toy = Toy(reset=False)
    machine.add_device(toy, name=NAME, group=GROUP)
    rig = Rig(machine, toy)
    _, _, d = rig.device()
    refused(R.RESET_NOT_SUPPORTED, rig.k.device_reset, d)


def _hot_reset_info(rig: Rig, d: int, argsz: int) -> bytearray:
    buf = bytearray(max(argsz, 12))
    struct.pack_into("<I", buf, 0, argsz)
    rig.k.device_get_pci_hot_reset_info(d, buf)
    return buf


def _on_bus_1(machine: Machine) -> Rig:
    toy = Toy()
    machine.add_device(toy, name="0000:01:00.0", group=20)
    machine.add_device(Toy(), name="0000:01:00.1", group=21)
    return Rig(machine, toy)


def test_hot_reset_info_argsz(rig: Rig) -> None:
    _, _, d = rig.device()
    refused(R.HOT_RESET_INFO_ARGSZ, _hot_reset_info, rig, d, 11)


def test_hot_reset_no_bus_reset(rig: Rig) -> None:
    _, _, d = rig.device()  # 0000:00:04.0 sits on the root bus
    refused(R.HOT_RESET_NO_BUS_RESET, _hot_reset_info, rig, d, 64)


def test_hot_reset_info_space(machine: Machine) -> None:
    rig = _on_bus_1(machine)
    _, _, d = rig.device("0000:01:00.0", 20)
    buf = bytearray(12)
    struct.pack_into("<I", buf, 0, 12)
    refused(R.HOT_RESET_INFO_SPACE, rig.k.device_get_pci_hot_reset_info, d, buf)
    assert struct.unpack_from("<III", buf) == (12, 0, 2)  # count says how many


def _hot_reset(
    rig: Rig, d: int, fds: list[int], *, flags: int = 0, count: int | None = None
) -> None:
    n = len(fds) if count is None else count
    buf = bytearray(12 + 4 * len(fds))
    struct.pack_into(f"<III{len(fds)}i", buf, 0, len(buf), flags, n, *fds)
    rig.k.device_pci_hot_reset(d, buf)


def test_hot_reset_header(machine: Machine) -> None:
    rig = _on_bus_1(machine)
    _, g, d = rig.device("0000:01:00.0", 20)
    refused(R.HOT_RESET_HEADER, _hot_reset, rig, d, [g], flags=1)
    refused(R.HOT_RESET_HEADER, _hot_reset, rig, d, [g], count=0)
    refused(R.HOT_RESET_HEADER, _hot_reset, rig, d, [g, g, g], count=3)


def test_hot_reset_bad_group_fd(machine: Machine) -> None:
    rig = _on_bus_1(machine)
    _, g, d = rig.device("0000:01:00.0", 20)
    closed = rig.k.eventfd()
    rig.k.close(closed)
    refused(R.HOT_RESET_BAD_GROUP_FD, _hot_reset, rig, d, [g, closed])


def test_hot_reset_not_group(machine: Machine) -> None:
    rig = _on_bus_1(machine)
    c, g, d = rig.device("0000:01:00.0", 20)
    refused(R.HOT_RESET_NOT_GROUP, _hot_reset, rig, d, [g, c])


def test_hot_reset_not_owned(machine: Machine) -> None:
    rig = _on_bus_1(machine)
    _, g, d = rig.device("0000:01:00.0", 20)
    refused(R.HOT_RESET_NOT_OWNED, _hot_reset, rig, d, [g])  # 01:00.1's group is missing
    g21 = rig.k.open_group(21)
    machine.set_driver("0000:01:00.1", "e1000e")
    refused(R.HOT_RESET_NOT_OWNED, _hot_reset, rig, d, [g, g21])


def _feature(rig: Rig, d: int, flags: int, argsz: int = 8) -> int:
    buf = bytearray(max(argsz, 8))
    struct.pack_into("<II", buf, 0, argsz, flags)
    return rig.k.device_feature(d, buf)


def test_feature_header(rig: Rig) -> None:
    _, _, d = rig.device()
    get, set_ = DeviceFeatureFlag.GET, DeviceFeatureFlag.SET
    refused(R.FEATURE_HEADER, _feature, rig, d, get | DeviceFeature.LOW_POWER_ENTRY, 7)
    refused(R.FEATURE_HEADER, _feature, rig, d, 1 << 19 | DeviceFeature.LOW_POWER_ENTRY)
    refused(R.FEATURE_HEADER, _feature, rig, d, get | set_ | DeviceFeature.LOW_POWER_ENTRY)


@pytest.mark.parametrize(
    "feature",
    [DeviceFeature.PCI_VF_TOKEN, DeviceFeature.MIGRATION, DeviceFeature.DMA_LOGGING_START, 200],
)
def test_feature_unsupported(rig: Rig, feature: int) -> None:
    _, _, d = rig.device()
    refused(R.FEATURE_UNSUPPORTED, _feature, rig, d, DeviceFeatureFlag.SET | feature, 64)


def test_feature_ops(rig: Rig) -> None:
    _, _, d = rig.device()
    refused(R.FEATURE_OPS, _feature, rig, d, DeviceFeatureFlag.GET | DeviceFeature.LOW_POWER_ENTRY)
    refused(R.FEATURE_OPS, _feature, rig, d, DeviceFeature.LOW_POWER_EXIT)


def test_bind_iommufd_group_device(rig: Rig) -> None:
    _, _, d = rig.device()
    arg = uapi.vfio_device_bind_iommufd(argsz=16, flags=0, iommufd=3)
    refused(R.BIND_IOMMUFD_GROUP_DEVICE, rig.k.device_bind_iommufd, d, arg)
    arg.flags = 1
    refused(R.BIND_IOMMUFD_GROUP_DEVICE, rig.k.device_bind_iommufd, d, arg)


# --- device I/O --------------------------------------------------------------------------


@pytest.mark.parametrize("index", [1, 3, 4, 5, 8, 9, 200])
def test_io_bad_region(rig: Rig, index: int) -> None:
    _, _, d = rig.device()
    refused(R.IO_BAD_REGION, rig.k.pread, d, 4, index << 40)


def test_io_past_end(rig: Rig) -> None:
    _, _, d = rig.device()
    refused(R.IO_PAST_END, rig.k.pread, d, 4, 0x1000)
    refused(R.IO_PAST_END, rig.k.pwrite, d, b"\0" * 4, (2 << 40) + 4 * PAGE)


def test_io_short(rig: Rig) -> None:
    _, _, d = rig.device()
    refused(R.IO_SHORT, rig.k.pwrite, d, b"\1" * 8, 0xFFC)
    # Linux transferred the part that fits before reporting the short write.
    assert rig.toy.regs[(0, 0xFFC)] == 0x01010101


def test_io_read_only(rig: Rig) -> None:
    _, _, d = rig.device()
    assert rig.k.pread(d, 4, 6 << 40) == b"\0" * 4
    refused(R.IO_READ_ONLY, rig.k.pwrite, d, b"\0" * 4, 6 << 40)


def test_io_config_range(rig: Rig) -> None:
    _, _, d = rig.device()
    refused(R.IO_CONFIG_RANGE, rig.k.pread, d, 4, CONFIG + 0x100)
    refused(R.IO_CONFIG_RANGE, rig.k.pread, d, 8, CONFIG + 0xFC)


def test_io_memory_disabled(rig: Rig) -> None:
    _, _, d = rig.device()
    command = rig.cfg_read(d, 4, 2)
    assert command & 0x2  # vfio-pci enables Memory on open
    rig.cfg_write(d, 4, 2, command & ~0x2)
    refused(R.IO_MEMORY_DISABLED, rig.k.pread, d, 4, 0)
    refused(R.IO_MEMORY_DISABLED, rig.k.pwrite, d, b"\0" * 4, 0)
    rig.cfg_write(d, 4, 2, command)
    rig.k.pread(d, 4, 0)


def test_mmap_not_mappable(rig: Rig) -> None:
    _, _, d = rig.device()
    refused(R.MMAP_NOT_MAPPABLE, rig.k.mmap, d, PAGE, 0, writable=True)  # BAR0 is trapped
    refused(R.MMAP_NOT_MAPPABLE, rig.k.mmap, d, PAGE, 2 << 40, writable=True)  # before the area
    refused(R.MMAP_NOT_MAPPABLE, rig.k.mmap, d, 3 * PAGE, (2 << 40) + PAGE, writable=True)
    refused(R.MMAP_NOT_MAPPABLE, rig.k.mmap, d, PAGE, 6 << 40, writable=False)  # the ROM
    refused(R.MMAP_NOT_MAPPABLE, rig.k.mmap, d, PAGE, CONFIG, writable=False)


def test_mmap_bad_range(rig: Rig) -> None:
    _, _, d = rig.device()
    refused(R.MMAP_BAD_RANGE, rig.k.mmap, d, 0, (2 << 40) + PAGE, writable=True)
    refused(R.MMAP_BAD_RANGE, rig.k.mmap, d, PAGE, (2 << 40) + PAGE + 8, writable=True)


# --- driver binding ----------------------------------------------------------------------


def test_bind_dma_owned(rig: Rig) -> None:
    rig.machine.add_device(Toy(), name="0000:00:04.1", group=GROUP, driver=None)
    rig.attached()
    refused(R.BIND_DMA_OWNED, rig.machine.set_driver, "0000:00:04.1", "e1000e")
    refused(
        R.BIND_DMA_OWNED,
        rig.machine.add_device,
        Toy(),
        name="0000:00:04.2",
        group=GROUP,
        driver="e1000e",
    )
    rig.machine.set_driver("0000:00:04.1", "pci-stub")  # no DMA: allowed


def test_unbind_device_open(rig: Rig) -> None:
    _, _, d = rig.device()
    req = rig.k.eventfd()
    rig.eventfds(d, 4, [req])
    refused(R.UNBIND_DEVICE_OPEN, rig.machine.set_driver, NAME, None)
    assert rig.k.eventfd_read(req) == 1  # the driver was asked to let go
    rig.k.close(d)
    rig.machine.set_driver(NAME, None)


def test_struct_sizes_are_the_kernels() -> None:
    assert ctypes.sizeof(uapi.vfio_iommu_type1_dma_map) == 32
    assert ctypes.sizeof(uapi.vfio_irq_set) == 20


# --- iommufd: /dev/iommu, IOAS objects, the VFIO device cdev (Machine(iommufd=True)) ----


class Fd:
    """An iommufd machine's kernel with a Toy: iommufd, IOAS and cdev shortcuts."""

    def __init__(self) -> None:
        self.machine = Machine(iommufd=True)
        self.toy = Toy()
        self.machine.add_device(self.toy, name=NAME, group=GROUP)
        self.k = self.machine.kernel

    def close(self) -> None:
        self.machine.close()

    def ioas(self) -> tuple[int, int]:
        fd = self.k.open_iommufd()
        arg = iuapi.iommu_ioas_alloc(size=ctypes.sizeof(iuapi.iommu_ioas_alloc))
        self.k.ioas_alloc(fd, arg)
        return fd, int(arg.out_ioas_id)

    def cdev(self) -> int:
        name = self.k.device_cdev(NAME)
        assert name is not None
        return self.k.open_device_cdev(name)

    def bind(self, cdev: int, iommufd: int) -> int:
        arg = uapi.vfio_device_bind_iommufd(argsz=16, iommufd=iommufd)
        self.k.device_bind_iommufd(cdev, arg)
        return int(arg.out_devid)

    def attach(self, cdev: int, pt_id: int) -> None:
        self.k.device_attach_iommufd_pt(cdev, uapi.vfio_device_attach_iommufd_pt(12, 0, pt_id))

    def ready(self) -> tuple[int, int, int]:
        """iommufd, IOAS id and a bound, attached cdev."""
        fd, ioas = self.ioas()
        d = self.cdev()
        self.bind(d, fd)
        self.attach(d, ioas)
        return fd, ioas, d

    def map(
        self, fd: int, ioas: int, vaddr: int, size: int, iova: int | None = None, flags: int = 6
    ) -> int:
        fixed = iuapi.IoasMapFlag.FIXED_IOVA if iova is not None else 0
        arg = iuapi.iommu_ioas_map(
            size=ctypes.sizeof(iuapi.iommu_ioas_map),
            flags=flags | fixed,
            ioas_id=ioas,
            user_va=vaddr,
            length=size,
            iova=iova or 0,
        )
        self.k.ioas_map(fd, arg)
        return int(arg.iova)

    def unmap(self, fd: int, ioas: int, iova: int, size: int) -> int:
        arg = iuapi.iommu_ioas_unmap(size=24, ioas_id=ioas, iova=iova, length=size)
        self.k.ioas_unmap(fd, arg)
        return int(arg.length)


@pytest.fixture
def fdm() -> Iterator[Fd]:
    rig = Fd()
    try:
        yield rig
    finally:
        rig.close()


def test_iommufd_cmd_size(fdm: Fd) -> None:
    fd = fdm.k.open_iommufd()
    refused(R.IOMMUFD_CMD_SIZE, fdm.k.ioas_alloc, fd, iuapi.iommu_ioas_alloc(size=8))


def test_iommufd_flags(fdm: Fd) -> None:
    fd, ioas = fdm.ioas()
    refused(R.IOMMUFD_FLAGS, fdm.k.ioas_alloc, fd, iuapi.iommu_ioas_alloc(size=12, flags=1))
    _m, addr = buffer()
    refused(R.IOMMUFD_FLAGS, fdm.map, fd, ioas, addr, PAGE, 0, flags=6 | 8)
    assert fdm.machine.leaks() == [f"iommufd fd {fd} is open"]


def test_iommufd_no_object(fdm: Fd) -> None:
    fd, ioas = fdm.ioas()
    _m, addr = buffer()
    refused(R.IOMMUFD_NO_OBJECT, fdm.map, fd, ioas + 7, addr, PAGE, 0)
    d = fdm.cdev()
    fdm.bind(d, fd)
    refused(R.ATTACH_NOT_IOAS, fdm.attach, d, ioas + 7)


def test_iommufd_object_busy(fdm: Fd) -> None:
    fd, ioas, d = fdm.ready()
    refused(R.IOMMUFD_OBJECT_BUSY, fdm.k.iommufd_destroy, fd, iuapi.iommu_destroy(8, ioas))
    fdm.k.device_detach_iommufd_pt(d, uapi.vfio_device_detach_iommufd_pt(8, 0))
    fdm.k.iommufd_destroy(fd, iuapi.iommu_destroy(8, ioas))
    refused(R.IOMMUFD_NO_OBJECT, fdm.k.iommufd_destroy, fd, iuapi.iommu_destroy(8, ioas))


def test_ioas_ranges_space(fdm: Fd) -> None:
    fd, ioas, _ = fdm.ready()
    arg = iuapi.iommu_ioas_iova_ranges(size=ctypes.sizeof(iuapi.iommu_ioas_iova_ranges))
    arg.ioas_id = ioas
    refused(R.IOAS_RANGES_SPACE, fdm.k.ioas_iova_ranges, fd, arg)
    assert arg.num_iovas == len(fdm.machine.iova_ranges)  # the count is written back
    table = (iuapi.iommu_iova_range * arg.num_iovas)()
    arg.allowed_iovas = ctypes.addressof(table)
    fdm.k.ioas_iova_ranges(fd, arg)
    assert [(r.start, r.last) for r in table] == list(fdm.machine.iova_ranges)
    assert arg.out_iova_alignment == PAGE


def test_ioas_map_no_permission(fdm: Fd) -> None:
    fd, ioas = fdm.ioas()
    _m, addr = buffer()
    refused(R.IOAS_MAP_NO_PERMISSION, fdm.map, fd, ioas, addr, PAGE, 0, flags=0)


def test_ioas_map_overflow(fdm: Fd) -> None:
    fd, ioas = fdm.ioas()
    _m, addr = buffer(2)
    refused(R.IOAS_MAP_OVERFLOW, fdm.map, fd, ioas, addr, 2 * PAGE, (1 << 64) - PAGE)


def test_ioas_map_unaligned(fdm: Fd) -> None:
    fd, ioas = fdm.ioas()
    _m, addr = buffer(2)
    refused(R.IOAS_MAP_UNALIGNED, fdm.map, fd, ioas, addr, PAGE, 0x100001)
    refused(R.IOAS_MAP_UNALIGNED, fdm.map, fd, ioas, addr, 100, 0x100000)
    refused(R.IOAS_MAP_UNALIGNED, fdm.map, fd, ioas, addr, 0, 0x100000)


def test_ioas_map_reserved(fdm: Fd) -> None:
    fd, ioas = fdm.ioas()
    _m, addr = buffer()
    fdm.map(fd, ioas, addr, PAGE, 0xFEE0_0000)  # nothing attached: every IOVA is allowed
    fdm.unmap(fd, ioas, 0xFEE0_0000, PAGE)
    d = fdm.cdev()
    fdm.bind(d, fd)
    fdm.attach(d, ioas)  # now the domain reserves the MSI window
    refused(R.IOAS_MAP_RESERVED, fdm.map, fd, ioas, addr, PAGE, 0xFEE0_0000)


def test_ioas_map_overlap(fdm: Fd) -> None:
    fd, ioas, _ = fdm.ready()
    _m, addr = buffer(2)
    fdm.map(fd, ioas, addr, 2 * PAGE, 0x100000)
    refused(R.IOAS_MAP_OVERLAP, fdm.map, fd, ioas, addr, PAGE, 0x101000)
    assert fdm.unmap(fd, ioas, 0x100000, 2 * PAGE) == 2 * PAGE


def test_ioas_map_no_space() -> None:
    with Machine(iommufd=True, iova_ranges=((0, 0xFFFF),)) as machine:
        machine.add_device(Toy(), name=NAME, group=GROUP)
        k = machine.kernel
        fd = k.open_iommufd()
        alloc = iuapi.iommu_ioas_alloc(size=12)
        k.ioas_alloc(fd, alloc)
        name = k.device_cdev(NAME)
        assert name is not None
        d = k.open_device_cdev(name)
        k.device_bind_iommufd(d, uapi.vfio_device_bind_iommufd(argsz=16, iommufd=fd))
        k.device_attach_iommufd_pt(d, uapi.vfio_device_attach_iommufd_pt(12, 0, alloc.out_ioas_id))
        _m, addr = buffer(32)
        arg = iuapi.iommu_ioas_map(
            size=40, flags=6, ioas_id=alloc.out_ioas_id, user_va=addr, length=32 * PAGE
        )
        refused(R.IOAS_MAP_NO_SPACE, k.ioas_map, fd, arg)


def test_ioas_map_bad_vaddr(fdm: Fd) -> None:
    fd, ioas = fdm.ioas()
    _m, addr = buffer()
    protect(addr, PAGE, mmap.PROT_READ)
    refused(R.IOAS_MAP_BAD_VADDR, fdm.map, fd, ioas, addr, PAGE, 0x100000)  # device writes
    fdm.map(fd, ioas, addr, PAGE, 0x100000, flags=iuapi.IoasMapFlag.READABLE)


def test_ioas_map_memlock() -> None:
    with Machine(iommufd=True, memlock_limit=PAGE) as machine:
        k = machine.kernel
        fd = k.open_iommufd()
        alloc = iuapi.iommu_ioas_alloc(size=12)
        k.ioas_alloc(fd, alloc)
        _m, addr = buffer(2)
        arg = iuapi.iommu_ioas_map(
            size=40, flags=7, ioas_id=alloc.out_ioas_id, user_va=addr, length=2 * PAGE, iova=0
        )
        refused(R.IOAS_MAP_MEMLOCK, k.ioas_map, fd, arg)


def test_ioas_unmap_empty(fdm: Fd) -> None:
    fd, ioas = fdm.ioas()
    refused(R.IOAS_UNMAP_EMPTY, fdm.unmap, fd, ioas, 0x100000, 0)


def test_ioas_unmap_splits(fdm: Fd) -> None:
    fd, ioas = fdm.ioas()
    _m, addr = buffer(2)
    fdm.map(fd, ioas, addr, 2 * PAGE, 0x100000)
    refused(R.IOAS_UNMAP_SPLITS, fdm.unmap, fd, ioas, 0x100000, PAGE)
    assert fdm.unmap(fd, ioas, 0, (1 << 64) - 1) == 2 * PAGE  # iova 0, U64_MAX: all


def test_ioas_unmap_nothing(fdm: Fd) -> None:
    fd, ioas = fdm.ioas()
    refused(R.IOAS_UNMAP_NOTHING, fdm.unmap, fd, ioas, 0x100000, PAGE)


def test_cdev_none(fdm: Fd) -> None:
    refused(R.CDEV_NONE, fdm.k.open_device_cdev, "vfio9")
    fdm.machine.set_driver(NAME, None)
    assert fdm.k.device_cdev(NAME) is None


def test_cdev_not_bound(fdm: Fd) -> None:
    d = fdm.cdev()
    refused(R.CDEV_NOT_BOUND, fdm.k.device_get_info, d, bytearray(16))
    refused(R.CDEV_NOT_BOUND, fdm.k.pread, d, 4, CONFIG)
    refused(R.CDEV_NOT_BOUND, fdm.attach, d, 1)
    fdm.k.close(d)
    assert fdm.machine.leaks() == []


def test_bind_bad_args(fdm: Fd) -> None:
    fd = fdm.k.open_iommufd()
    d = fdm.cdev()
    arg = uapi.vfio_device_bind_iommufd(argsz=16, flags=1, iommufd=fd)
    refused(R.BIND_BAD_ARGS, fdm.k.device_bind_iommufd, d, arg)
    refused(R.BIND_BAD_ARGS, fdm.bind, d, -1)


def test_bind_not_iommufd(fdm: Fd) -> None:
    d = fdm.cdev()
    refused(R.BIND_NOT_IOMMUFD, fdm.bind, d, fdm.k.eventfd())


def test_bind_twice(fdm: Fd) -> None:
    fd, _, d = fdm.ready()
    refused(R.BIND_TWICE, fdm.bind, d, fd)
    other = fdm.cdev()  # a second open is allowed, a second bind is not
    refused(R.BIND_TWICE, fdm.bind, other, fd)


def test_bind_group_open(fdm: Fd) -> None:
    fd = fdm.k.open_iommufd()
    d = fdm.cdev()
    g = fdm.k.open_group(GROUP)
    refused(R.BIND_GROUP_OPEN, fdm.bind, d, fd)
    fdm.k.close(g)
    fdm.bind(d, fd)


def test_group_cdev_bound(fdm: Fd) -> None:
    _fd, _ioas, d = fdm.ready()
    refused(R.GROUP_CDEV_BOUND, fdm.k.open_group, GROUP)
    fdm.k.close(d)
    fdm.k.close(fdm.k.open_group(GROUP))  # the cdev's last close unblocks the group


def test_attach_not_ioas(fdm: Fd) -> None:
    fd = fdm.k.open_iommufd()
    d = fdm.cdev()
    fdm.bind(d, fd)
    refused(R.ATTACH_NOT_IOAS, fdm.attach, d, 99)


def test_attach_reserved_overlap(fdm: Fd) -> None:
    fd, ioas = fdm.ioas()
    _m, addr = buffer()
    fdm.map(fd, ioas, addr, PAGE, 0xFEE0_0000)  # fine while nothing is attached
    d = fdm.cdev()
    fdm.bind(d, fd)
    refused(R.ATTACH_RESERVED_OVERLAP, fdm.attach, d, ioas)


@pytest.mark.filterwarnings("ignore::aiovfio.sim.IommuTranslationFault")  # on purpose
def test_iommufd_device_dma_goes_through_the_ioas(fdm: Fd) -> None:
    fd, ioas, d = fdm.ready()
    m, addr = buffer()
    m[:4] = b"ping"
    iova = fdm.map(fd, ioas, addr, PAGE)  # the kernel picks the IOVA
    assert iova % PAGE == 0
    ctx = fdm.toy.ctx
    assert ctx is not None
    fdm.k.pwrite(d, (0x0106).to_bytes(2, "little"), CONFIG + 4)  # Memory Space, Bus Master
    assert ctx.dma_read(iova, 4) == b"ping"
    fdm.unmap(fd, ioas, iova, PAGE)
    with pytest.raises(IommuFault, match="not mapped in IOAS"):
        ctx.dma_read(iova, 4)
    assert fdm.machine.faults.count("iommu") == 1


def test_iommufd_close_releases_everything(fdm: Fd) -> None:
    fd, ioas, d = fdm.ready()
    _m, addr = buffer()
    fdm.map(fd, ioas, addr, PAGE, 0x100000)
    fdm.k.close(fd)  # the bound device still holds the context and its IOAS
    leaks = fdm.machine.leaks()
    assert leaks[0] == f"device fd {d} ({NAME}) is open"
    assert "DMA mapping IOVA 0x100000+0x1000" in leaks[1]
    fdm.k.close(d)
    assert fdm.machine.leaks() == []
    assert fdm.machine.kernel.files.topology.memlock.locked == 0


# --- noiommu (Machine(noiommu=True)) ------------------------------------------------------


@pytest.fixture
def noiommu() -> Iterator[Rig]:
    machine = Machine(noiommu=True, iommufd=True)
    toy = Toy()
    machine.add_device(toy, name=NAME, group=GROUP)
    try:
        yield Rig(machine, toy)
    finally:
        machine.close()


def _noiommu_device(rig: Rig) -> tuple[int, int, int]:
    c = rig.k.open_container()
    assert rig.k.check_extension(c, uapi.Extension.NOIOMMU_IOMMU) == 1
    g = rig.k.open_noiommu_group(GROUP)
    rig.k.group_set_container(g, c)
    rig.k.set_iommu(c, uapi.Extension.NOIOMMU_IOMMU)
    return c, g, rig.k.group_get_device_fd(g, NAME)


def test_noiommu_no_mappings(noiommu: Rig) -> None:
    c, _, _ = _noiommu_device(noiommu)
    _m, addr = buffer()
    refused(R.NOIOMMU_NO_MAPPINGS, noiommu.map, c, addr, 0x100000, PAGE)
    refused(R.NOIOMMU_NO_MAPPINGS, noiommu.k.iommu_get_info, c, bytearray(24))


def test_noiommu_group_node(noiommu: Rig, rig: Rig) -> None:
    assert noiommu.k.noiommu_group(GROUP) and not rig.k.noiommu_group(GROUP)
    refused(R.NOIOMMU_GROUP_NODE, noiommu.k.open_group, GROUP)
    refused(R.NOIOMMU_GROUP_NODE, rig.k.open_noiommu_group, GROUP)
    assert noiommu.k.device_cdev(NAME) is None  # noiommu devices have no cdev
    c = noiommu.k.open_container()
    g = noiommu.k.open_noiommu_group(GROUP)
    noiommu.k.group_set_container(g, c)
    refused(R.SET_IOMMU_UNSUPPORTED, noiommu.k.set_iommu, c, uapi.Extension.TYPE1v2_IOMMU)


@pytest.mark.filterwarnings("ignore::aiovfio.sim.IommuTranslationFault")  # on purpose
def test_noiommu_dma_reaches_mlocked_physical_pages(noiommu: Rig) -> None:
    _, _, d = _noiommu_device(noiommu)
    noiommu.bus_master(d)
    m, addr = buffer(2)
    m[PAGE : PAGE + 4] = b"phys"
    phys = noiommu.k.physical_pages(addr, 2 * PAGE)
    assert phys[1] == phys[0] + PAGE  # contiguous per call, as the sim hands them out
    ctx = noiommu.toy.ctx
    assert ctx is not None
    with pytest.raises(IommuFault, match="not mlocked"):
        ctx.dma_read(phys[1], 4)
    noiommu.k.mlock(addr, 2 * PAGE)
    assert "2 page(s) still mlocked for noiommu DMA" in noiommu.machine.leaks()
    assert ctx.dma_read(phys[1], 4) == b"phys"
    ctx.dma_write(phys[0], b"back")
    assert m[:4] == b"back"
    noiommu.k.munlock(addr, 2 * PAGE)
    with pytest.raises(IommuFault, match="no page this process asked for"):
        ctx.dma_read(phys[0], 4)
    assert noiommu.machine.faults.count("iommu") == 2
