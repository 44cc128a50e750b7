"""iommufd ioctls: /dev/iommu with its IOAS objects, and the VFIO device cdev.

As drivers/iommu/iommufd/main.c and ioas.c (IOAS_ALLOC, IOAS_IOVA_RANGES,
IOAS_MAP, IOAS_UNMAP, DESTROY on an iommufd) and drivers/vfio/device_cdev.c
(BIND_IOMMUFD, ATTACH_IOMMUFD_PT, DETACH_IOMMUFD_PT on a device cdev). The
IOAS's own rules (alignment, overlap, ranges, pinning) are in
`aiovfio.sim.ioas`. A cdev answers nothing before BIND_IOMMUFD; binding
blocks the device's group path (and an open group blocks binding); one bind
per device.
"""

from __future__ import annotations

import ctypes
from typing import TypeVar

from ..._uapi import iommufd as iuapi
from ..._uapi import vfio as uapi
from ..._uapi.iommufd import IoasMapFlag, IommufdIoctl
from .. import rules
from ..ioas import Ioas
from .container import buf_arg
from .device import device_ioctl
from .files import Arg, CdevFile, FileTable, IommufdFile, UserBuffer, offsetofend

__all__ = ["cdev_ioctl", "iommufd_ioctl"]


S = TypeVar("S", bound=ctypes.Structure)


def _cmd(buf: UserBuffer, cls: type[S], last: str) -> S:
    """iommufd_fops_ioctl: `size` first, at least the structure up to `last`."""
    minsz = offsetofend(cls, last)
    size = int.from_bytes(buf.read(0, 4), "little")
    if size < minsz:
        raise rules.IOMMUFD_CMD_SIZE.error(f"{cls.__name__}.size {size}, needs {minsz}")
    return buf.get(cls, minsz)


def iommufd_ioctl(files: FileTable, f: IommufdFile, nr: int, arg: Arg) -> int:
    buf = buf_arg(arg)
    if nr == IommufdIoctl.IOAS_ALLOC:
        alloc = _cmd(buf, iuapi.iommu_ioas_alloc, "out_ioas_id")
        if alloc.flags:
            raise rules.IOMMUFD_FLAGS.error(f"IOAS_ALLOC flags {alloc.flags:#x}")
        ioas = files.topology.new_ioas()
        f.objects[ioas.id] = ioas
        alloc.out_ioas_id = ioas.id
        buf.put(alloc, offsetofend(iuapi.iommu_ioas_alloc, "out_ioas_id"))
        return 0
    if nr == IommufdIoctl.IOAS_IOVA_RANGES:
        cls = iuapi.iommu_ioas_iova_ranges
        ranges_cmd = _cmd(buf, cls, "out_iova_alignment")
        ioas = _ioas(f, ranges_cmd.ioas_id)
        ranges = ioas.ranges()
        room = ranges_cmd.num_iovas
        if ranges_cmd.allowed_iovas and room:
            table = (iuapi.iommu_iova_range * min(room, len(ranges)))(*ranges[:room])
            ctypes.memmove(ranges_cmd.allowed_iovas, table, ctypes.sizeof(table))
        ranges_cmd.num_iovas = len(ranges)
        ranges_cmd.out_iova_alignment = ioas.page_size
        buf.put(ranges_cmd, offsetofend(cls, "out_iova_alignment"))
        if len(ranges) > room:
            raise rules.IOAS_RANGES_SPACE.error(f"{len(ranges)} ranges, room for {room}")
        return 0
    if nr == IommufdIoctl.IOAS_MAP:
        cls_map = iuapi.iommu_ioas_map
        map_cmd = _cmd(buf, cls_map, "iova")
        known = IoasMapFlag.FIXED_IOVA | IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE
        if map_cmd.flags & ~int(known) or getattr(map_cmd, "__reserved"):
            raise rules.IOMMUFD_FLAGS.error(f"IOAS_MAP flags {map_cmd.flags:#x}")
        ioas = _ioas(f, map_cmd.ioas_id)
        map_cmd.iova = ioas.map(map_cmd.flags, map_cmd.user_va, map_cmd.length, map_cmd.iova)
        buf.put(map_cmd, offsetofend(cls_map, "iova"))
        return 0
    if nr == IommufdIoctl.IOAS_UNMAP:
        cls_unmap = iuapi.iommu_ioas_unmap
        unmap_cmd = _cmd(buf, cls_unmap, "length")
        ioas = _ioas(f, unmap_cmd.ioas_id)
        unmap_cmd.length = ioas.unmap(unmap_cmd.iova, unmap_cmd.length)
        buf.put(unmap_cmd, offsetofend(cls_unmap, "length"))
        return 0
    if nr == IommufdIoctl.DESTROY:
        destroy = _cmd(buf, iuapi.iommu_destroy, "id")
        ioas = _ioas(f, destroy.id)
        if ioas.devices:
            raise rules.IOMMUFD_OBJECT_BUSY.error(
                f"{ioas.label()}: attached {', '.join(ioas.devices)}"
            )
        ioas.release()
        del f.objects[ioas.id]
        return 0
    raise rules.NOT_SUPPORTED.error(f"ioctl {nr:#x} on iommufd fd {f.fd}")


def _ioas(f: IommufdFile, ioas_id: int) -> Ioas:
    ioas = f.objects.get(int(ioas_id))
    if ioas is None:
        raise rules.IOMMUFD_NO_OBJECT.error(f"id {ioas_id} in iommufd fd {f.fd}")
    return ioas


def cdev_ioctl(files: FileTable, f: CdevFile, nr: int, arg: Arg) -> int:
    if nr == uapi.Ioctl.DEVICE_BIND_IOMMUFD:
        return bind(files, f, buf_arg(arg))
    if f.bound is None:
        raise rules.CDEV_NOT_BOUND.error(f"ioctl {nr:#x} on /dev/vfio/devices/vfio{f.device.cdev}")
    if nr == uapi.Ioctl.DEVICE_ATTACH_IOMMUFD_PT:
        cls = uapi.vfio_device_attach_iommufd_pt
        attach = buf_arg(arg).get(cls, offsetofend(cls, "pt_id"))
        if attach.argsz < offsetofend(cls, "pt_id") or attach.flags:
            raise rules.BIND_BAD_ARGS.error(f"attach argsz {attach.argsz}, flags {attach.flags}")
        ioas = f.bound.objects.get(int(attach.pt_id))
        if ioas is None:
            raise rules.ATTACH_NOT_IOAS.error(f"pt_id {attach.pt_id}")
        device = f.device
        if device.ioas is ioas:
            return 0
        why = ioas.can_attach()
        if why is not None:
            raise rules.ATTACH_RESERVED_OVERLAP.error(why)
        if device.ioas is not None:  # a replace (6.6 and later)
            device.ioas.devices.remove(device.name)
        ioas.devices.append(device.name)
        device.ioas = ioas
        return 0
    if nr == uapi.Ioctl.DEVICE_DETACH_IOMMUFD_PT:
        cls_d = uapi.vfio_device_detach_iommufd_pt
        detach = buf_arg(arg).get(cls_d, offsetofend(cls_d, "flags"))
        if detach.argsz < offsetofend(cls_d, "flags") or detach.flags:
            raise rules.BIND_BAD_ARGS.error(f"detach argsz {detach.argsz}, flags {detach.flags}")
        if f.device.ioas is not None:
            f.device.ioas.devices.remove(f.device.name)
            f.device.ioas = None
        return 0
    return device_ioctl(files, f.device, nr, arg)


def bind(files: FileTable, f: CdevFile, buf: UserBuffer) -> int:
    """vfio_df_ioctl_bind_iommufd."""
    cls = uapi.vfio_device_bind_iommufd
    minsz = offsetofend(cls, "out_devid")
    arg = buf.get(cls, minsz)
    if arg.argsz < minsz or arg.flags or arg.iommufd < 0:
        raise rules.BIND_BAD_ARGS.error(
            f"argsz {arg.argsz}, flags {arg.flags:#x}, iommufd {arg.iommufd}"
        )
    device = f.device
    group = device.group
    if group.opened:
        raise rules.BIND_GROUP_OPEN.error(f"{device.name}: group {group.number} is open")
    if f.bound is not None or device.open_count:
        raise rules.BIND_TWICE.error(f"{device.name} is already open")
    try:
        ctx = files.lookup(int(arg.iommufd))
    except OSError:
        raise rules.BAD_FD.error(f"iommufd {arg.iommufd}") from None
    if not isinstance(ctx, IommufdFile):
        raise rules.BIND_NOT_IOMMUFD.error(f"fd {arg.iommufd}")
    group.cdev_binds += 1
    files.topology.device_open(device)
    f.bound = ctx
    f.devid = ctx.next_devid
    ctx.next_devid += 1
    ctx.devices[f.devid] = f
    arg.out_devid = f.devid
    buf.put(arg, minsz)
    return 0
