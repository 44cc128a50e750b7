"""The simulated kernel's file table: what each fd it handed out is, and user memory.

Files are real fds (a memfd each), so numbers never collide with the
process's other files; an fd the machine did not hand out is a *foreign*
file (Linux gives it ENOTTY, or the real pread/pwrite/mmap). A file the user
closed with `os.close` instead of `Kernel.close` is noticed by its inode
(`sweep`) and released as the kernel releases a file whose last reference
went.

`UserBuffer` is the memory an ioctl argument points to: reads and writes
past its end are EFAULT, as copy_from_user / copy_to_user give.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from typing import TypeVar

from attrs import define, field

from .. import rules
from ..ioas import Ioas
from ..topology import SimContainer, SimDevice, SimGroup, Topology

__all__ = [
    "Arg",
    "CdevFile",
    "ContainerFile",
    "DeviceFile",
    "EventFile",
    "File",
    "FileTable",
    "IommufdFile",
    "UserBuffer",
    "UserMapping",
    "cdev_unbind",
    "offsetofend",
]

S = TypeVar("S", bound=ctypes.Structure)


def offsetofend(cls: type[ctypes.Structure], name: str) -> int:
    f = getattr(cls, name)
    return int(f.offset + f.size)


class UserBuffer:
    """User memory an ioctl argument points to: reads and writes are bounds checked."""

    def __init__(self, target: bytearray | bytes | ctypes.Structure) -> None:
        if isinstance(target, ctypes.Structure):
            self._view = memoryview(target).cast("B")
        else:
            self._view = memoryview(target)
        self.size = len(self._view)

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise rules.USER_MEMORY.error(
                f"the argument is {self.size} bytes; the kernel needs {size} at offset {offset}"
            )

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        return bytes(self._view[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        if self._view.readonly:
            raise rules.USER_MEMORY.error("the argument is read-only memory")
        self._view[offset : offset + len(data)] = data

    def get(self, cls: type[S], minsz: int) -> S:
        """copy_from_user of `minsz` bytes into a zeroed `cls`."""
        self._check(0, minsz)
        size = ctypes.sizeof(cls)
        n = min(self.size, size)
        return cls.from_buffer_copy(self.read(0, n) + bytes(size - n))

    def put(self, obj: ctypes.Structure, nbytes: int, offset: int = 0) -> None:
        """copy_to_user of the first `nbytes` of `obj`."""
        self.write(offset, bytes(obj)[:nbytes])


#: An ioctl argument: a pointer (UserBuffer), an integer, or nothing.
Arg = UserBuffer | int | None


@define(eq=False)
class File:
    fd: int
    ino: int

    def kind(self) -> str:
        raise NotImplementedError


@define(eq=False)
class ContainerFile(File):
    container: SimContainer = field(kw_only=True)

    def kind(self) -> str:
        return "container"


@define(eq=False)
class GroupFile(File):
    group: SimGroup = field(kw_only=True)
    generation: int = field(kw_only=True)

    def kind(self) -> str:
        return "group"

    @property
    def stale(self) -> bool:
        return self.generation != self.group.generation


@define(eq=False)
class DeviceFile(File):
    device: SimDevice = field(kw_only=True)

    def kind(self) -> str:
        return "device"


@define(eq=False)
class CdevFile(DeviceFile):
    """/dev/vfio/devices/vfioN: a device fd that needs BIND_IOMMUFD before use."""

    #: the iommufd it is bound to (None until VFIO_DEVICE_BIND_IOMMUFD)
    bound: IommufdFile | None = field(default=None, kw_only=True)
    devid: int = field(default=0, kw_only=True)

    def kind(self) -> str:
        return "device cdev" if self.bound is not None else "device cdev (not bound)"


@define(eq=False)
class IommufdFile(File):
    """/dev/iommu: an iommufd context and its objects (IOAS ids)."""

    objects: dict[int, Ioas] = field(factory=dict, kw_only=True)
    #: devices bound to this context: devid -> cdev file
    devices: dict[int, CdevFile] = field(factory=dict, kw_only=True)
    next_devid: int = field(default=1, kw_only=True)
    #: the user closed the fd; bound devices still hold the context
    closed: bool = field(default=False, kw_only=True)

    def kind(self) -> str:
        return "iommufd"

    def drop_objects(self) -> None:
        for ioas in self.objects.values():
            ioas.release()
        self.objects.clear()


@define(eq=False)
class EventFile(File):
    def kind(self) -> str:
        return "eventfd"


@define(eq=False)
class UserMapping:
    """A user mmap of a device region: tracked for leaks() and for Memory Space zaps."""

    ref: weakref.ref[mmap.mmap]
    what: str
    device: SimDevice
    index: int
    #: offset of the mapping inside the region, and its length
    pos: int
    length: int
    writable: bool
    #: the mapping's address in the process (for zapping it while Memory Space is off)
    address: int = 0
    zapped: bool = False

    @property
    def live(self) -> bool:
        mm = self.ref()
        return mm is not None and not mm.closed


class FileTable:
    """The fds the simulated kernel handed out, by number."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.files: dict[int, File] = {}
        self.mmaps: list[UserMapping] = []
        self._hole = -1

    def hole_fd(self) -> int:
        """An empty memfd: a mapping of it faults with SIGBUS (a zapped BAR mmap)."""
        if self._hole < 0:
            self._hole = os.memfd_create("aiovfio-sim:memory-space-off", os.MFD_CLOEXEC)
        return self._hole

    def __len__(self) -> int:
        return len(self.files)

    def new_fd(self, label: str) -> tuple[int, int]:
        fd = os.memfd_create(f"aiovfio-sim:{label}", os.MFD_CLOEXEC)
        return fd, os.fstat(fd).st_ino

    def install(self, f: File) -> None:
        """Enter a new file; an old entry with its number was closed behind our back."""
        old = self.files.get(f.fd)
        if old is not None:
            self.forget(old)
        self.files[f.fd] = f

    def lookup(self, fd: int) -> File | None:
        """The sim file behind `fd`, None for a foreign open file; EBADF if not open."""
        f = self.files.get(fd)
        try:
            st = os.fstat(fd)
        except (OSError, OverflowError, TypeError):
            if f is not None:
                self.forget(f)
            raise rules.BAD_FD.error(f"fd {fd}") from None
        if f is not None and st.st_ino != f.ino:
            self.forget(f)  # closed with os.close and the number reused
            return None
        return f

    def sweep(self) -> None:
        """Release files the user closed with os.close instead of Kernel.close."""
        for f in list(self.files.values()):
            try:
                gone = os.fstat(f.fd).st_ino != f.ino
            except OSError:
                gone = True
            if gone:
                self.forget(f)

    def forget(self, f: File) -> None:
        if self.files.get(f.fd) is f:
            del self.files[f.fd]
            self.release(f)

    def release(self, f: File) -> None:
        """What the kernel does when the last reference to a file goes."""
        topo = self.topology
        if isinstance(f, ContainerFile):
            f.container.fd = None
            topo.drop_container_if_unused(f.container)
        elif isinstance(f, GroupFile):
            if f.stale:
                return
            group = f.group
            if group.devices_in_use:
                group.file_closed = True  # device fds hold the group file
            else:
                topo.group_release(group)
        elif isinstance(f, CdevFile):
            if f.bound is not None:
                cdev_unbind(topo, f)
        elif isinstance(f, DeviceFile):
            topo.device_close(f.device)
        elif isinstance(f, IommufdFile):
            # bound devices hold the context (vfio_df_iommufd_unbind drops the reference);
            # the IOAS objects go when the last of them does
            f.closed = True
            if not f.devices:
                f.drop_objects()

    def shutdown(self) -> None:
        """Machine.close: close every fd the machine handed out."""
        for f in list(self.files.values()):
            del self.files[f.fd]
            try:
                os.close(f.fd)
            except OSError:
                continue
            self.release(f)
        self.topology.shutdown_containers()
        if self._hole >= 0:
            os.close(self._hole)  # zapped mappings keep the file itself
            self._hole = -1

    def live_mmaps(self) -> list[UserMapping]:
        self.mmaps = [u for u in self.mmaps if u.live]
        return self.mmaps

    def leaks(self) -> list[str]:
        self.sweep()
        out: list[str] = []
        for fd in sorted(self.files):
            f = self.files[fd]
            if isinstance(f, ContainerFile):
                out.append(f"container fd {fd} is open")
            elif isinstance(f, GroupFile):
                state = " (stale)" if f.stale else ""
                out.append(f"group fd {fd} (group {f.group.number}){state} is open")
            elif isinstance(f, DeviceFile):
                out.append(f"device fd {fd} ({f.device.name}) is open")
                held = f.bound if isinstance(f, CdevFile) else None
                if held is not None and held.closed:  # it keeps the closed iommufd alive
                    for ioas in held.objects.values():
                        out.extend(f"DMA mapping {m} in {ioas.label()}" for m in ioas.mappings)
            elif isinstance(f, IommufdFile):
                out.append(f"iommufd fd {fd} is open")
                for ioas in f.objects.values():
                    out.extend(f"DMA mapping {m} in {ioas.label()}" for m in ioas.mappings)
            else:
                out.append(f"eventfd {fd} is open")
        out.extend(self.topology.describe_groups())
        for d in self.topology.iter_devices():
            out.extend(f"{d.name}: {line}" for line in d.irqs.describe())
        out.extend(f"mmap of {u.what} is still mapped" for u in self.live_mmaps())
        return out


def cdev_unbind(topo: Topology, f: CdevFile) -> None:
    """The last close of a bound cdev: detach, close the device, unblock the group."""
    ctx = f.bound
    assert ctx is not None
    device = f.device
    if device.ioas is not None:
        device.ioas.devices.remove(device.name)
        device.ioas = None
    ctx.devices.pop(f.devid, None)
    f.bound = None
    topo.device_close(device)
    device.group.cdev_binds -= 1
    if ctx.closed and not ctx.devices:
        ctx.drop_objects()
