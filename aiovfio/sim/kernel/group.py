"""Group ioctls: /dev/vfio/<group>, as drivers/vfio/group.c.

GET_STATUS (VIABLE, CONTAINER_SET), SET_CONTAINER / UNSET_CONTAINER and
GET_DEVICE_FD, which opens a device and installs its device file.
"""

from __future__ import annotations

import os
import struct

from ..._uapi import vfio as uapi
from ..._uapi.vfio import GroupFlag
from .. import rules
from .container import buf_arg
from .files import Arg, ContainerFile, DeviceFile, FileTable, GroupFile, UserBuffer, offsetofend

__all__ = ["group_ioctl"]

_STRNDUP_MAX = 4096


def group_ioctl(files: FileTable, f: GroupFile, nr: int, arg: Arg) -> int:
    if nr == uapi.Ioctl.GROUP_GET_DEVICE_FD:
        return get_device_fd(files, f, buf_arg(arg))
    if nr == uapi.Ioctl.GROUP_GET_STATUS:
        return group_status(f, buf_arg(arg))
    if nr == uapi.Ioctl.GROUP_SET_CONTAINER:
        return set_container(files, f, buf_arg(arg))
    if nr == uapi.Ioctl.GROUP_UNSET_CONTAINER:
        return unset_container(files, f)
    raise rules.NOT_SUPPORTED.error(f"ioctl {nr:#x} on group {f.group.number}")


def group_status(f: GroupFile, buf: UserBuffer) -> int:
    cls = uapi.vfio_group_status
    minsz = offsetofend(cls, "flags")
    status = buf.get(cls, minsz)
    if status.argsz < minsz:
        raise rules.GROUP_STATUS_ARGSZ.error(f"argsz {status.argsz}, needs {minsz}")
    if f.stale:
        raise rules.GROUP_GONE.error(f"group {f.group.number}")
    group = f.group
    status.flags = 0
    if group.container is not None:
        status.flags = GroupFlag.CONTAINER_SET | GroupFlag.VIABLE
    elif group.viable:
        status.flags = GroupFlag.VIABLE
    buf.put(status, minsz)
    return 0


def set_container(files: FileTable, f: GroupFile, buf: UserBuffer) -> int:
    (fd,) = struct.unpack("<i", buf.read(0, 4))
    try:
        target = files.lookup(fd)
    except OSError:
        raise rules.SET_CONTAINER_BAD_FD.error(f"fd {fd}") from None
    group = f.group
    if not f.stale and group.container is not None:
        raise rules.SET_CONTAINER_ALREADY_SET.error(
            f"group {group.number} is in {group.container.label()}"
        )
    if f.stale:
        raise rules.GROUP_GONE.error(f"group {group.number}")
    if not isinstance(target, ContainerFile):
        kind = target.kind() if target is not None else "not a VFIO file"
        raise rules.SET_CONTAINER_NOT_CONTAINER.error(f"fd {fd} ({kind})")
    if not group.viable:
        who = ", ".join(f"{d.name} is bound to {d.driver}" for d in group.offenders())
        raise rules.SET_CONTAINER_NOT_VIABLE.error(f"group {group.number}: {who}")
    files.topology.attach(group, target.container)
    return 0


def unset_container(files: FileTable, f: GroupFile) -> int:
    group = f.group
    if f.stale or group.container is None:
        raise rules.UNSET_CONTAINER_NOT_SET.error(f"group {group.number}")
    if group.devices_in_use:
        raise rules.UNSET_CONTAINER_BUSY.error(
            f"group {group.number}: {group.devices_in_use} device(s) open"
        )
    files.topology.detach(group)
    return 0


def get_device_fd(files: FileTable, f: GroupFile, buf: UserBuffer) -> int:
    raw = buf.read(0, min(buf.size, _STRNDUP_MAX))
    end = raw.find(b"\0")
    if end < 0:
        if buf.size < _STRNDUP_MAX:
            buf.read(0, buf.size + 1)  # strndup_user runs off the buffer: EFAULT
        raise rules.DEVICE_NAME_MALFORMED.error("no NUL within a page")
    name = raw[:end].decode("utf-8", "replace")
    group = f.group
    devices = [] if f.stale else [d for d in group.devices if d.vfio]
    device = None
    for d in devices:
        if name == d.name:
            device = d
            break
        if name.startswith(d.name) and name[len(d.name)] == " ":
            raise rules.DEVICE_NAME_MALFORMED.error(f"{name!r}: no vf_token here")
    if device is None:
        have = ", ".join(d.name for d in devices) or "none bound to vfio-pci"
        raise rules.DEVICE_NAME_UNKNOWN.error(
            f"{name!r} in group {group.number} (its VFIO devices: {have})"
        )
    container = group.container
    if container is None or (container.iommu is None and not container.noiommu):
        why = "no container" if container is None else f"{container.label()} has no IOMMU"
        raise rules.DEVICE_FD_NO_IOMMU.error(f"group {group.number}: {why}")
    fd, ino = files.new_fd(f"device:{device.name}")
    try:
        files.topology.device_open(device)
    except BaseException:
        os.close(fd)
        raise
    files.install(DeviceFile(fd, ino, device=device))
    return fd
