"""Device file operations: ioctls, read/write and mmap of a vfio-pci device fd.

As drivers/vfio/pci/vfio_pci_core.c, vfio_pci_rdwr.c and vfio_pci_config.c:
GET_INFO, GET_REGION_INFO (with the sparse-mmap capability), GET_IRQ_INFO,
SET_IRQS (the interrupt state machine is `aiovfio.sim.irqs`), RESET, the hot
reset pair and DEVICE_FEATURE; pread/pwrite of BARs at the widths vfio-pci
uses and of the emulated config space; mmap of the mmap areas.

Memory Space off in COMMAND behaves as vfio-pci: trapped BAR accesses are
EIO (`__vfio_pci_memory_enabled`), and every mmap of the device's BARs is
zapped (`vfio_pci_zap_and_down_write_memory_lock`): a touch faults with
SIGBUS, as `vfio_pci_mmap_fault` answers, until Memory Space is on again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import struct
import weakref
from collections.abc import Callable

from ..._uapi import vfio as uapi
from ..._uapi.pci import Command
from ..._uapi.vfio import (
    DeviceFeature,
    DeviceFeatureFlag,
    DeviceFlag,
    IrqInfoFlag,
    PciIrq,
    PciRegion,
    RegionCap,
    RegionFlag,
)
from .. import rules
from ..irqs import validate_irq_set
from ..topology import SimDevice, SimGroup
from .container import buf_arg, put_caps
from .files import Arg, FileTable, GroupFile, UserBuffer, UserMapping, offsetofend

__all__ = [
    "COMMAND",
    "MASKS",
    "MEMORY_SPACE",
    "OFFSET_MASK",
    "VFIO_PCI_OFFSET_SHIFT",
    "WIDTHS",
    "device_ioctl",
    "device_mmap",
    "device_rw",
]

VFIO_PCI_OFFSET_SHIFT = 40
OFFSET_MASK = (1 << VFIO_PCI_OFFSET_SHIFT) - 1
_PAGE = mmap.PAGESIZE
#: the widths vfio-pci's do_io_rw makes at once, and their masks (the register fast path's,
#: shared with SimKernel.pread/pwrite, which repeat device_rw's fast path inline)
WIDTHS = frozenset((1, 2, 4, 8))
# plain ints on the register-access path (enum comparisons cost more than the access)
_NUM_REGIONS = int(PciRegion.NUM_REGIONS)
_CONFIG = int(PciRegion.CONFIG)
_VGA = int(PciRegion.VGA)
_ROM = int(PciRegion.ROM)
_WRITE = int(RegionFlag.WRITE)
MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: (1 << 64) - 1}
COMMAND = 0x04  # the COMMAND register's offset in config space
MEMORY_SPACE = int(Command.MEMORY)


def device_ioctl(files: FileTable, d: SimDevice, nr: int, arg: Arg) -> int:
    if nr == uapi.Ioctl.DEVICE_FEATURE:
        return device_feature(d, buf_arg(arg))
    if nr == uapi.Ioctl.DEVICE_BIND_IOMMUFD:
        return bind_iommufd(buf_arg(arg))
    if nr == uapi.Ioctl.DEVICE_RESET:
        return reset(d)
    handlers: dict[int, Callable[[FileTable, SimDevice, UserBuffer], int]] = {
        uapi.Ioctl.DEVICE_GET_INFO: device_info,
        uapi.Ioctl.DEVICE_GET_IRQ_INFO: irq_info,
        uapi.Ioctl.DEVICE_GET_PCI_HOT_RESET_INFO: hot_reset_info,
        uapi.Ioctl.DEVICE_GET_REGION_INFO: region_info,
        uapi.Ioctl.DEVICE_PCI_HOT_RESET: hot_reset,
        uapi.Ioctl.DEVICE_SET_IRQS: set_irqs,
    }
    handler = handlers.get(nr)
    if handler is None:
        if nr == uapi.Ioctl.DEVICE_IOEVENTFD:
            raise rules.NOT_SIMULATED.error("VFIO_DEVICE_IOEVENTFD")
        raise rules.NOT_SUPPORTED.error(f"ioctl {nr:#x} on device {d.name}")
    return handler(files, d, buf_arg(arg))


def bind_iommufd(buf: UserBuffer) -> int:
    cls = uapi.vfio_device_bind_iommufd
    minsz = offsetofend(cls, "out_devid")
    arg = buf.get(cls, minsz)
    if arg.argsz < minsz or arg.flags or arg.iommufd < 0:
        raise rules.BIND_IOMMUFD_GROUP_DEVICE.error(
            f"argsz {arg.argsz}, flags {arg.flags:#x}, iommufd {arg.iommufd}"
        )
    raise rules.BIND_IOMMUFD_GROUP_DEVICE.error("this device fd came from a group")


def device_info(files: FileTable, d: SimDevice, buf: UserBuffer) -> int:
    cls = uapi.vfio_device_info
    minsz = offsetofend(cls, "num_irqs")
    capsz = offsetofend(cls, "cap_offset")
    info = buf.get(cls, minsz)
    if info.argsz < minsz:
        raise rules.DEVICE_INFO_ARGSZ.error(f"argsz {info.argsz}, needs {minsz}")
    if info.argsz >= capsz:
        minsz = capsz
        info.cap_offset = 0
    info.flags = DeviceFlag.PCI | (DeviceFlag.RESET if d.model.supports_reset else 0)
    info.num_regions = PciRegion.NUM_REGIONS
    info.num_irqs = PciIrq.NUM_IRQS
    buf.put(info, minsz)
    return 0


def region_info(files: FileTable, d: SimDevice, buf: UserBuffer) -> int:
    """vfio_pci_ioctl_get_region_info, with a sparse-mmap capability for mmap areas."""
    cls = uapi.vfio_region_info
    minsz = offsetofend(cls, "offset")
    info = buf.get(cls, minsz)
    if info.argsz < minsz:
        raise rules.REGION_INFO_ARGSZ.error(f"argsz {info.argsz}, needs {minsz}")
    index = info.index
    if index >= PciRegion.NUM_REGIONS or index == PciRegion.VGA:
        raise rules.REGION_INFO_INDEX.error(f"index {index} of {d.name}")
    info.offset = index << VFIO_PCI_OFFSET_SHIFT
    caps: list[bytes] = []
    if index == PciRegion.CONFIG:
        info.size = d.config.size
        info.flags = RegionFlag.READ | RegionFlag.WRITE
    else:
        spec = d.regions.get(index)
        if spec is None:
            info.size, info.flags = 0, 0
        elif index == PciRegion.ROM:
            info.size, info.flags = spec.size, RegionFlag.READ
        else:
            info.size = spec.size
            info.flags = int(spec.flags & (RegionFlag.READ | RegionFlag.WRITE))
            if spec.mmap_areas:
                info.flags |= RegionFlag.MMAP | RegionFlag.CAPS
                head = uapi.vfio_region_info_cap_sparse_mmap()
                head.header.id, head.header.version = RegionCap.SPARSE_MMAP, 1
                head.nr_areas = len(spec.mmap_areas)
                areas = b"".join(
                    bytes(uapi.vfio_region_sparse_mmap_area(off, size))
                    for off, size in spec.mmap_areas
                )
                caps.append(bytes(head) + areas)
    if caps:
        put_caps(buf, info, caps, minsz)
    else:
        buf.put(info, minsz)
    return 0


def irq_info(files: FileTable, d: SimDevice, buf: UserBuffer) -> int:
    """vfio_pci_ioctl_get_irq_info: NORESIZE on MSI-X only without dynamic MSI-X."""
    cls = uapi.vfio_irq_info
    minsz = offsetofend(cls, "count")
    info = buf.get(cls, minsz)
    if info.argsz < minsz:
        raise rules.IRQ_INFO_ARGSZ.error(f"argsz {info.argsz}, needs {minsz}")
    if info.index >= PciIrq.NUM_IRQS or (info.index == PciIrq.ERR and not d.config.is_pcie):
        raise rules.IRQ_INFO_INDEX.error(f"index {info.index} of {d.name}")
    info.flags = IrqInfoFlag.EVENTFD
    if info.index == PciIrq.INTX:
        info.flags |= IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED
    elif info.index != PciIrq.MSIX or files.topology.personality.msix_noresize:
        info.flags |= IrqInfoFlag.NORESIZE
    info.count = d.irqs.count(info.index)
    buf.put(info, minsz)
    return 0


def set_irqs(files: FileTable, d: SimDevice, buf: UserBuffer) -> int:
    cls = uapi.vfio_irq_set
    minsz = offsetofend(cls, "count")
    hdr = buf.get(cls, minsz)
    max_irqs = d.irqs.count(hdr.index) if hdr.index < PciIrq.NUM_IRQS else 0
    size = validate_irq_set(hdr.flags, hdr.index, hdr.start, hdr.count, hdr.argsz, minsz, max_irqs)
    data = buf.read(minsz, size) if size else b""
    d.irqs.set_irqs(hdr.flags, hdr.index, hdr.start, hdr.count, data)
    return 0


def reset(d: SimDevice) -> int:
    if not d.model.supports_reset:
        raise rules.RESET_NOT_SUPPORTED.error(d.name)
    d.low_power = False
    d.model.reset()
    return 0


def _bus_devices(files: FileTable, d: SimDevice) -> list[SimDevice]:
    if d.bus == 0:
        raise rules.HOT_RESET_NO_BUS_RESET.error(f"{d.name} is on the root bus")
    return [o for o in files.topology.iter_devices() if o.domain == d.domain and o.bus == d.bus]


def hot_reset_info(files: FileTable, d: SimDevice, buf: UserBuffer) -> int:
    cls = uapi.vfio_pci_hot_reset_info
    minsz = offsetofend(cls, "count")
    hdr = buf.get(cls, minsz)
    if hdr.argsz < minsz:
        raise rules.HOT_RESET_INFO_ARGSZ.error(f"argsz {hdr.argsz}, needs {minsz}")
    hdr.flags = 0
    devices = _bus_devices(files, d)
    item = ctypes.sizeof(uapi.vfio_pci_dependent_device)
    if hdr.argsz < ctypes.sizeof(cls) + len(devices) * item:
        hdr.count = len(devices)
        buf.put(hdr, minsz)
        raise rules.HOT_RESET_INFO_SPACE.error(f"{len(devices)} devices affected")
    hdr.count = len(devices)
    buf.put(hdr, minsz)
    for i, o in enumerate(devices):
        dep = uapi.vfio_pci_dependent_device(o.group.number, o.domain, o.bus, o.devfn)
        buf.write(ctypes.sizeof(cls) + i * item, bytes(dep))
    return 0


def hot_reset(files: FileTable, d: SimDevice, buf: UserBuffer) -> int:
    cls = uapi.vfio_pci_hot_reset
    minsz = offsetofend(cls, "count")
    hdr = buf.get(cls, minsz)
    if hdr.argsz < minsz or hdr.flags:
        raise rules.HOT_RESET_HEADER.error(f"argsz {hdr.argsz}, flags {hdr.flags:#x}")
    devices = _bus_devices(files, d)
    if not hdr.count or hdr.count > len(devices):
        raise rules.HOT_RESET_HEADER.error(f"count {hdr.count}; {len(devices)} affected")
    raw = buf.read(ctypes.sizeof(cls), 4 * hdr.count)
    groups: list[SimGroup] = []
    for fd in struct.unpack(f"<{hdr.count}i", raw):
        try:
            f = files.lookup(fd)
        except OSError:
            raise rules.HOT_RESET_BAD_GROUP_FD.error(f"fd {fd}") from None
        if not isinstance(f, GroupFile):
            raise rules.HOT_RESET_NOT_GROUP.error(f"fd {fd}")
        groups.append(f.group)
    for o in devices:
        if not o.vfio:
            raise rules.HOT_RESET_NOT_OWNED.error(f"{o.name} is bound to {o.driver}")
        if o.group not in groups:
            raise rules.HOT_RESET_NOT_OWNED.error(
                f"{o.name}: group {o.group.number} is not in the list"
            )
    for o in devices:
        o.model.reset()
    return 0


def _check_feature(flags: int, argsz: int, supported: int, minsz: int) -> int:
    """vfio_check_feature: 1 to go on, 0 for a successful PROBE, else EINVAL."""
    ops = flags & (DeviceFeatureFlag.GET | DeviceFeatureFlag.SET)
    if ops & ~int(supported):
        raise rules.FEATURE_OPS.error(f"flags {flags:#x}")
    if flags & DeviceFeatureFlag.PROBE:
        return 0
    if not ops:
        raise rules.FEATURE_OPS.error("neither GET nor SET")
    if argsz < minsz:
        raise rules.FEATURE_OPS.error(f"argsz {argsz}, needs {minsz}")
    return 1


def device_feature(d: SimDevice, buf: UserBuffer) -> int:
    cls = uapi.vfio_device_feature
    minsz = offsetofend(cls, "flags")
    feature = buf.get(cls, minsz)
    if feature.argsz < minsz:
        raise rules.FEATURE_HEADER.error(f"argsz {feature.argsz}, needs {minsz}")
    flags = feature.flags
    get, set_, probe = DeviceFeatureFlag.GET, DeviceFeatureFlag.SET, DeviceFeatureFlag.PROBE
    if flags & ~int(DeviceFeatureFlag.MASK | get | set_ | probe):
        raise rules.FEATURE_HEADER.error(f"flags {flags:#x}")
    if not flags & probe and flags & set_ and flags & get:
        raise rules.FEATURE_HEADER.error("GET and SET without PROBE")
    which = flags & DeviceFeatureFlag.MASK
    argsz = feature.argsz - minsz
    if which in (DeviceFeature.LOW_POWER_ENTRY, DeviceFeature.LOW_POWER_EXIT):
        if _check_feature(flags, argsz, set_, 0) != 1:
            return 0
        d.low_power = which == DeviceFeature.LOW_POWER_ENTRY
        return 0
    if which == DeviceFeature.LOW_POWER_ENTRY_WITH_WAKEUP:
        raise rules.NOT_SIMULATED.error("LOW_POWER_ENTRY_WITH_WAKEUP")
    raise rules.FEATURE_UNSUPPORTED.error(f"feature {which} on {d.name}")


# --- read / write ------------------------------------------------------------------------


def device_rw(files: FileTable, d: SimDevice, offset: int, size: int, data: bytes | None) -> bytes:
    """vfio_pci_rw: pread (data None) or pwrite of `size` bytes at `offset`."""
    index = offset >> VFIO_PCI_OFFSET_SHIFT
    pos = offset & OFFSET_MASK
    bar = d.trapped_bars.get(index)
    if bar is not None:
        # The register-access fast path: one naturally aligned access of a width
        # vfio-pci makes at once, inside a trapped BAR without mmap areas, outside
        # the MSI-X table, with Memory Space on, reaches the model directly. The
        # rules it passes are the ones the general path below checks; anything
        # else takes that path and its errors.
        bar_size, writable, table_start, table_end = bar
        if (
            size in files.topology.io_widths
            and not pos % size
            and pos + size <= bar_size
            and (writable or data is None)
            and not table_start <= pos < table_end
            and d.config.phys[COMMAND] & MEMORY_SPACE
        ):
            if data is None:
                value = d.model.read(index, pos, size)
                return (int(value) & MASKS[size]).to_bytes(size, "little")
            d.model.write(index, pos, size, int.from_bytes(data[:size], "little"))
            return b""
    if index >= _NUM_REGIONS:
        raise rules.IO_BAD_REGION.error(f"offset {offset:#x} (index {index}) of {d.name}")
    if not size:
        return b""
    if index == _CONFIG:
        return _config_rw(files, d, pos, size, data)
    if index == _VGA:
        raise rules.IO_BAD_REGION.error(f"{d.name} has no VGA region")
    spec = d.regions.get(index)
    if spec is None:
        raise rules.IO_BAD_REGION.error(f"{d.name} has no region {index}")
    if data is not None and (index == _ROM or not spec.flags & _WRITE):
        raise rules.IO_READ_ONLY.error(f"{d.name} region {index}")
    if pos >= spec.size:
        raise rules.IO_PAST_END.error(f"{pos:#x} in {d.name} region {index} of {spec.size:#x}")
    count = min(size, spec.size - pos)
    out = _bar_rw(files, d, index, pos, count, data)
    if count < size:
        raise rules.IO_SHORT.error(
            f"{size} bytes at {pos:#x} of {d.name} region {index}: only {count} transferred"
        )
    return out


def _bar_rw(
    files: FileTable, d: SimDevice, index: int, pos: int, count: int, data: bytes | None
) -> bytes:
    """vfio_pci_core_do_io_rw: naturally aligned chunks; the MSI-X table is excluded.

    Chunks in the MSI-X table read as all ones and drop writes without a
    Memory Space test; any other chunk is EIO while Memory Space is off.
    """
    width = files.topology.io_width
    areas = d.regions[index].mmap_areas
    table = d.config.msix_table
    if (
        count in WIDTHS
        and count <= width
        and not pos % count
        and not areas
        and (
            table is None
            or table.bar != index
            or not table.offset <= pos < table.offset + table.size
        )
    ):
        # One naturally aligned register access: straight to the model.
        if not d.config.memory_enabled:
            raise rules.IO_MEMORY_DISABLED.error(f"{d.name} region {index} at {pos:#x}")
        if data is None:
            value = d.model.read(index, pos, count)
            return (int(value) & MASKS[count]).to_bytes(count, "little")
        d.model.write(index, pos, count, int.from_bytes(data[:count], "little"))
        return b""
    x_start = x_end = 0
    if table is not None and table.bar == index:
        x_start, x_end = table.offset, table.offset + table.size
    ram = d.ram[index]
    memory_enabled = d.config.memory_enabled
    out = bytearray()
    done = 0
    while done < count:
        off = pos + done
        left = count - done
        if off < x_start:
            fillable = min(left, x_start - off)
        elif off >= x_end:
            fillable = left
        else:
            fillable = 0
        if fillable == 0:
            n = min(left, x_end - off)
            if data is None:
                out += b"\xff" * n  # reads of the MSI-X table give all ones
            done += n
            continue
        if not memory_enabled:
            raise rules.IO_MEMORY_DISABLED.error(f"{d.name} region {index} at {off:#x}")
        n = 1
        for w in (8, 4, 2):
            if w <= width and fillable >= w and off % w == 0:
                n = w
                break
        in_ram = any(a <= off and off + n <= a + s for a, s in areas)
        if data is None:
            if in_ram:
                out += ram.map[off : off + n]
            else:
                value = d.model.read(index, off, n)
                out += (int(value) & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
        else:
            chunk = data[done : done + n]
            if in_ram:
                ram.map[off : off + n] = chunk
            else:
                d.model.write(index, off, n, int.from_bytes(chunk, "little"))
        done += n
    return bytes(out)


def _config_rw(files: FileTable, d: SimDevice, pos: int, size: int, data: bytes | None) -> bytes:
    """vfio_pci_config_rw: dword-bounded chunks through vfio's emulation."""
    cfg = d.config
    if pos >= cfg.size or pos + size > cfg.size:
        raise rules.IO_CONFIG_RANGE.error(f"{size} bytes at {pos:#x}; size {cfg.size:#x}")
    out = bytearray()
    done = 0
    while done < size:
        off = pos + done
        left = size - done
        room = 4 - off % 4
        n = 4 if left >= 4 and off % 4 == 0 else 2 if left >= 2 and off % 2 == 0 else 1
        n = min(n, room)
        if data is None:
            out += cfg.user_read(off, n).to_bytes(n, "little")
        else:
            before = cfg.command
            cfg.user_write(off, n, int.from_bytes(data[done : done + n], "little"))
            command_changed(files, d, before, cfg.command)
        done += n
    return bytes(out)


def command_changed(files: FileTable, d: SimDevice, before: int, after: int) -> None:
    """vfio_basic_config_write: INTx Disable masks INTx; Memory off zaps the BAR mmaps."""
    flipped = before ^ after
    if flipped & Command.INTX_DISABLE:
        if after & Command.INTX_DISABLE:
            d.irqs.intx_mask()
        else:
            d.irqs.intx_unmask()
    if flipped & Command.MEMORY:
        _zap(files, d, zapped=not after & Command.MEMORY)


# --- mmap --------------------------------------------------------------------------------


def device_mmap(
    files: FileTable, d: SimDevice, length: int, offset: int, writable: bool
) -> mmap.mmap:
    """vfio_pci_core_mmap of an mmap area (a memfd the model shares)."""
    if length <= 0 or offset < 0 or offset % _PAGE:
        raise rules.MMAP_BAD_RANGE.error(f"length {length:#x} at offset {offset:#x}")
    index = offset >> VFIO_PCI_OFFSET_SHIFT
    pos = offset & OFFSET_MASK
    spec = d.regions.get(index) if index < PciRegion.ROM else None
    if spec is None or not spec.mmap_areas:
        raise rules.MMAP_NOT_MAPPABLE.error(f"{d.name} region {index}")
    end = pos + (length + _PAGE - 1) // _PAGE * _PAGE
    covered = pos
    for a, s in sorted(spec.mmap_areas):
        if a <= covered < a + s:
            covered = a + s
    if covered < end:
        raise rules.MMAP_NOT_MAPPABLE.error(
            f"{d.name} region {index} {pos:#x}..{end:#x}: {covered:#x} is trapped"
        )
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    before = _maps_lines() if not writable else None
    m = mmap.mmap(d.ram[index].fd, length, mmap.MAP_SHARED, prot, offset=pos)
    mapping = UserMapping(
        weakref.ref(m),
        f"{d.name} region {index} {pos:#x}+{length:#x}",
        device=d,
        index=index,
        pos=pos,
        length=length,
        writable=writable,
        address=_address(m, before),
    )
    files.mmaps.append(mapping)
    if not d.config.memory_enabled:
        _remap(files, mapping, zapped=True)
    return m


_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        _libc = lib
    return _libc


def _maps_lines() -> set[str]:
    with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
        return set(f)


def _address(m: mmap.mmap, before: set[str] | None) -> int:
    """Where `m` is mapped: from its buffer when writable, else the new /proc/self/maps line."""
    if before is None:
        anchor = ctypes.c_char.from_buffer(m)
        try:
            return ctypes.addressof(anchor)
        finally:
            del anchor
    new = sorted(_maps_lines() - before)
    for line in new:
        low, high = (int(x, 16) for x in line.split()[0].split("-"))
        if high - low >= len(m):
            return low
    return 0


def _zap(files: FileTable, d: SimDevice, *, zapped: bool) -> None:
    for mapping in files.live_mmaps():
        if mapping.device is d and mapping.zapped != zapped:
            _remap(files, mapping, zapped=zapped)


def _remap(files: FileTable, mapping: UserMapping, *, zapped: bool) -> None:
    """Replace the pages under a user mapping: an empty file (SIGBUS) or the region again."""
    if not mapping.address or not mapping.live:
        return
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if mapping.writable else 0)
    if zapped:
        fd, offset = files.hole_fd(), 0
    else:
        fd, offset = mapping.device.ram[mapping.index].fd, mapping.pos
    flags = mmap.MAP_SHARED | 0x10  # MAP_FIXED
    size = (mapping.length + _PAGE - 1) // _PAGE * _PAGE
    got = _lib().mmap(mapping.address, size, prot, flags, fd, offset)
    if got != mapping.address:
        err = ctypes.get_errno()
        raise OSError(err, f"sim: cannot {'zap' if zapped else 'restore'} {mapping.what}")
    mapping.zapped = zapped
