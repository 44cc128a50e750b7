"""Container ioctls: /dev/vfio/vfio and the type1 IOMMU behind it.

As drivers/vfio/container.c and vfio_iommu_type1.c: GET_API_VERSION,
CHECK_EXTENSION, SET_IOMMU, then (with an IOMMU) GET_INFO, MAP_DMA and
UNMAP_DMA. The IOMMU's own rules (alignment, overlap, budget, pinning) are
in `aiovfio.sim.iommu`.
"""

from __future__ import annotations

import ctypes
import struct

from ..._uapi import vfio as uapi
from ..._uapi.vfio import DmaMapFlag, DmaUnmapFlag, Extension, IommuInfoCap, IommuInfoFlag
from .. import rules
from ..iommu import Type1Iommu
from ..topology import SimContainer
from .files import Arg, FileTable, UserBuffer, offsetofend

__all__ = ["chain", "container_ioctl", "put_caps"]

#: vfio_iommu_type1.c DIRTY_BITMAP_SIZE_MAX: ALIGN(INT_MAX, 64) / 8
_DIRTY_BITMAP_SIZE_MAX = 0x1000_0000


def buf_arg(arg: Arg) -> UserBuffer:
    if not isinstance(arg, UserBuffer):
        raise rules.USER_MEMORY.error(f"the argument {arg!r} is not a pointer")
    return arg


def int_arg(arg: Arg) -> int:
    return arg if isinstance(arg, int) else -1


def container_ioctl(files: FileTable, c: SimContainer, nr: int, arg: Arg) -> int:
    if nr == uapi.Ioctl.GET_API_VERSION:
        return uapi.VFIO_API_VERSION
    if nr == uapi.Ioctl.CHECK_EXTENSION:
        return check_extension(files, c, int_arg(arg))
    if nr == uapi.Ioctl.SET_IOMMU:
        return set_iommu(files, c, int_arg(arg))
    iommu = c.iommu
    if c.noiommu:
        raise rules.NOIOMMU_NO_MAPPINGS.error(f"ioctl {nr:#x} on {c.label()}")
    if iommu is None:
        raise rules.CONTAINER_NO_IOMMU.error(f"ioctl {nr:#x} on {c.label()}")
    if nr == uapi.Ioctl.IOMMU_GET_INFO:
        return iommu_get_info(files, iommu, buf_arg(arg))
    if nr == uapi.Ioctl.IOMMU_MAP_DMA:
        return map_dma(iommu, buf_arg(arg))
    if nr == uapi.Ioctl.IOMMU_UNMAP_DMA:
        return unmap_dma(iommu, buf_arg(arg))
    if nr == uapi.Ioctl.IOMMU_DIRTY_PAGES:
        raise rules.NOT_SIMULATED.error("VFIO_IOMMU_DIRTY_PAGES")
    raise rules.NOT_SUPPORTED.error(f"ioctl {nr:#x} on {c.label()} (type1)")


def check_extension(files: FileTable, c: SimContainer, ext: int) -> int:
    """vfio_iommu_type1_check_extension (the only IOMMU driver of the sim).

    Before SET_IOMMU the container asks the driver with no IOMMU (iommu NULL),
    and type1 then answers the IOMMU-dependent extensions with 0.
    """
    p = files.topology.personality
    iommu = c.iommu
    if ext == Extension.NOIOMMU_IOMMU:  # vfio_noiommu_ops, registered in noiommu mode
        return 1 if files.topology.noiommu else 0
    if ext in (Extension.TYPE1_IOMMU, Extension.TYPE1v2_IOMMU, Extension.UNMAP_ALL):
        return 1
    if ext == Extension.TYPE1_NESTING_IOMMU:
        return p.type1_nesting
    if ext == Extension.UPDATE_VADDR:
        return 1 if iommu is not None else p.update_vaddr_before_set_iommu
    if ext == Extension.DMA_CC_IOMMU:
        return 1 if iommu is not None else 0
    return 0


def set_iommu(files: FileTable, c: SimContainer, iommu_type: int) -> int:
    if not c.groups:
        raise rules.SET_IOMMU_WITHOUT_GROUP.error(c.label())
    if c.iommu is not None or c.noiommu:
        raise rules.SET_IOMMU_TWICE.error(c.label())
    noiommu_groups = files.topology.noiommu
    if iommu_type == Extension.NOIOMMU_IOMMU and noiommu_groups:
        c.noiommu = True
        return 0
    if noiommu_groups:  # a noiommu group has no IOMMU behind it for type1 to drive
        raise rules.SET_IOMMU_UNSUPPORTED.error(f"type {iommu_type} for noiommu groups")
    if iommu_type not in (Extension.TYPE1_IOMMU, Extension.TYPE1v2_IOMMU):
        raise rules.SET_IOMMU_UNSUPPORTED.error(f"type {iommu_type}")
    c.iommu = files.topology.new_iommu(v2=iommu_type == Extension.TYPE1v2_IOMMU)
    return 0


def iommu_get_info(files: FileTable, iommu: Type1Iommu, buf: UserBuffer) -> int:
    """vfio_iommu_type1_get_info: migration, DMA-available and IOVA-range capabilities."""
    cls = uapi.vfio_iommu_type1_info
    minsz = offsetofend(cls, "iova_pgsizes")
    capsz = offsetofend(cls, "cap_offset")
    info = buf.get(cls, minsz)
    if info.argsz < minsz:
        raise rules.IOMMU_INFO_ARGSZ.error(f"argsz {info.argsz}, needs {minsz}")
    if info.argsz >= capsz:
        minsz = capsz
        info.cap_offset = 0
    info.flags = IommuInfoFlag.PGSIZES
    info.iova_pgsizes = iommu.pgsize_bitmap
    mig = uapi.vfio_iommu_type1_info_cap_migration()
    mig.header.id, mig.header.version = IommuInfoCap.MIGRATION, 1
    mig.pgsize_bitmap = iommu.page_size
    mig.max_dirty_bitmap_size = _DIRTY_BITMAP_SIZE_MAX
    avail = uapi.vfio_iommu_type1_info_dma_avail()
    avail.header.id, avail.header.version = IommuInfoCap.DMA_AVAIL, 1
    avail.avail = iommu.dma_avail
    caps = [bytes(mig), bytes(avail)]
    if iommu.iova_ranges:
        head = uapi.vfio_iommu_type1_info_cap_iova_range()
        head.header.id, head.header.version = IommuInfoCap.IOVA_RANGE, 1
        head.nr_iovas = len(iommu.iova_ranges)
        ranges = b"".join(bytes(uapi.vfio_iova_range(lo, hi)) for lo, hi in iommu.iova_ranges)
        caps.append(bytes(head) + ranges)
    info.flags |= IommuInfoFlag.CAPS
    put_caps(buf, info, caps, minsz, align=files.topology.personality.iommu_info_cap_align)
    return 0


def put_caps(
    buf: UserBuffer,
    info: uapi.vfio_iommu_type1_info | uapi.vfio_region_info,
    caps: list[bytes],
    minsz: int,
    *,
    align: int = 1,
) -> None:
    """The capability-chain dance: the chain if argsz fits it, else the argsz it needs."""
    fixed = ctypes.sizeof(info)
    data = chain(caps, base=fixed, align=align)
    if info.argsz < fixed + len(data):
        info.argsz = fixed + len(data)
        info.cap_offset = 0
    else:
        buf.write(fixed, data)
        info.cap_offset = fixed
    buf.put(info, minsz)


def chain(caps: list[bytes], *, base: int, align: int = 1) -> bytes:
    """Concatenate capabilities (each starting with a vfio_info_cap_header), linking `next`.

    vfio_info_cap_add pads each capability to `align` bytes (8 on newer
    kernels, unpadded on older ones).
    """
    out = bytearray()
    offsets = []
    for cap in caps:
        offsets.append(len(out))
        out += cap
        out += bytes(-len(out) % align)
    for i, off in enumerate(offsets):
        nxt = base + offsets[i + 1] if i + 1 < len(offsets) else 0
        struct.pack_into("<I", out, off + 4, nxt)
    return bytes(out)


def map_dma(iommu: Type1Iommu, buf: UserBuffer) -> int:
    cls = uapi.vfio_iommu_type1_dma_map
    minsz = offsetofend(cls, "size")
    arg = buf.get(cls, minsz)
    if arg.argsz < minsz:
        raise rules.MAP_ARGSZ.error(f"argsz {arg.argsz}, needs {minsz}")
    if arg.flags & ~int(DmaMapFlag.READ | DmaMapFlag.WRITE | DmaMapFlag.VADDR):
        raise rules.MAP_FLAGS.error(f"flags {arg.flags:#x}")
    iommu.map(arg.flags, arg.vaddr, arg.iova, arg.size)
    return 0


def unmap_dma(iommu: Type1Iommu, buf: UserBuffer) -> int:
    cls = uapi.vfio_iommu_type1_dma_unmap
    minsz = offsetofend(cls, "size")
    arg = buf.get(cls, minsz)
    if arg.argsz < minsz:
        raise rules.UNMAP_ARGSZ.error(f"argsz {arg.argsz}, needs {minsz}")
    known = DmaUnmapFlag.GET_DIRTY_BITMAP | DmaUnmapFlag.ALL | DmaUnmapFlag.VADDR
    if arg.flags & ~int(known):
        raise rules.UNMAP_FLAGS.error(f"flags {arg.flags:#x}")
    if arg.flags & DmaUnmapFlag.GET_DIRTY_BITMAP and arg.flags & (
        DmaUnmapFlag.ALL | DmaUnmapFlag.VADDR
    ):
        raise rules.UNMAP_FLAGS.error("GET_DIRTY_BITMAP with ALL or VADDR")
    arg.size = iommu.unmap(arg.flags, arg.iova, arg.size)
    buf.put(arg, minsz)
    return 0
