"""`SimKernel`: the `Kernel` protocol, answered by the simulated machine.

Every method does what Linux does with the same arguments: it decodes the
same ioctl structures (argsz checks first), keeps the same state (groups,
containers, device open counts, interrupt contexts, DMA mappings) and says
no with the same errno. Each refusal comes from a row of `aiovfio.sim.rules`
and names it in its message.

Dispatch follows the kernel: a method is an ioctl number sent to an fd, and
the *kind* of file decides what the number means (container, group or
device; numbers 112-117 mean different things on a container and on a
device). Files are real fds (a memfd each), so numbers never collide with the
process's other files; an fd the machine did not hand out gets what Linux
gives a foreign file (ENOTTY, or the real pread/pwrite/mmap).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import struct
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

from attrs import define, field

from .. import _log
from .._uapi import iommufd as iommufd_uapi
from .._uapi import vfio as uapi
from .._uapi.iommufd import IommufdIoctl
from .._uapi.pci import Command
from .._uapi.vfio import (
    DeviceFeature,
    DeviceFeatureFlag,
    DeviceFlag,
    DmaMapFlag,
    DmaUnmapFlag,
    Extension,
    GroupFlag,
    IommuInfoCap,
    IommuInfoFlag,
    IrqInfoFlag,
    PciIrq,
    PciRegion,
    RegionCap,
    RegionFlag,
)
from ..kernel.protocol import PciIds
from . import rules
from .iommu import Type1Iommu
from .irqs import validate_irq_set

if TYPE_CHECKING:
    from .machine import Machine, SimDevice, SimGroup

__all__ = ["SimContainer", "SimKernel", "UserBuffer"]

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound=ctypes.Structure)

VFIO_PCI_OFFSET_SHIFT = 40
_OFFSET_MASK = (1 << VFIO_PCI_OFFSET_SHIFT) - 1
_PAGE = mmap.PAGESIZE
#: vfio_iommu_type1.c DIRTY_BITMAP_SIZE_MAX: ALIGN(INT_MAX, 64) / 8
_DIRTY_BITMAP_SIZE_MAX = 0x1000_0000
_STRNDUP_MAX = 4096


def _sizeof(cls: type[ctypes.Structure]) -> int:
    return ctypes.sizeof(cls)


def _offsetofend(cls: type[ctypes.Structure], name: str) -> int:
    f = getattr(cls, name)
    return int(f.offset + f.size)


class UserBuffer:
    """User memory an ioctl argument points to: reads and writes are bounds checked.

    A read or write past the caller's buffer is EFAULT, as copy_from_user and
    copy_to_user give for memory that is not there.
    """

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
        n = min(self.size, _sizeof(cls))
        return cls.from_buffer_copy(self.read(0, n) + bytes(_sizeof(cls) - n))

    def put(self, obj: ctypes.Structure, nbytes: int, offset: int = 0) -> None:
        """copy_to_user of the first `nbytes` of `obj`."""
        self.write(offset, bytes(obj)[:nbytes])


_Arg = UserBuffer | int | None


# --- the files ---------------------------------------------------------------------------


@define(eq=False)
class SimContainer:
    """An open /dev/vfio/vfio (struct vfio_container)."""

    number: int
    groups: list[SimGroup] = field(factory=list, repr=False)
    iommu: Type1Iommu | None = None
    #: the fd, None once the user closed it (groups keep the container alive)
    fd: int | None = None

    def label(self) -> str:
        return f"container fd {self.fd}" if self.fd is not None else f"container #{self.number}"


@define(eq=False)
class _File:
    fd: int
    ino: int

    def kind(self) -> str:
        raise NotImplementedError


@define(eq=False)
class _ContainerFile(_File):
    container: SimContainer = field(kw_only=True)

    def kind(self) -> str:
        return "container"


@define(eq=False)
class _GroupFile(_File):
    group: SimGroup = field(kw_only=True)
    generation: int = field(kw_only=True)

    def kind(self) -> str:
        return "group"

    @property
    def stale(self) -> bool:
        return self.generation != self.group.generation


@define(eq=False)
class _DeviceFile(_File):
    device: SimDevice = field(kw_only=True)

    def kind(self) -> str:
        return "device"


@define(eq=False)
class _EventFile(_File):
    def kind(self) -> str:
        return "eventfd"


@define(eq=False)
class _Mapping:
    """A user mmap of a device region, tracked for leaks()."""

    ref: weakref.ref[mmap.mmap]
    what: str


def _op(fn: Callable[Concatenate[SimKernel, P], R]) -> Callable[Concatenate[SimKernel, P], R]:
    """Count the call, fire injected faults first, serialise on the machine lock."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(self: SimKernel, /, *args: P.args, **kwargs: P.kwargs) -> R:
        machine = self._machine
        with machine._lock:
            if machine._closed:
                raise OSError(errno.ENODEV, f"{name}: the simulated machine is closed")
            injected = machine._injector.check(name)
            if injected is not None and name != "close":
                _log.debug("kernel.sim", op=name, injected=injected.errno)
                raise injected
            try:
                result = fn(self, *args, **kwargs)
            except OSError as exc:
                _log.debug("kernel.sim", op=name, errno=exc.errno, error=str(exc))
                raise
            if _log.enabled():
                _log.logger.debug("kernel.sim", op=name, args=_brief(args), result=_brief(result))
            if injected is not None:  # close: the fd is gone, and the error is reported
                raise injected
            return result

    return wrapper


class SimKernel:
    """The simulated machine's kernel. Make one with `aiovfio.sim.Machine().kernel`."""

    name = "sim"

    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self._files: dict[int, _File] = {}
        self._containers: list[SimContainer] = []
        self._container_numbers = 0
        self._mmaps: list[_Mapping] = []

    def __repr__(self) -> str:
        return f"<SimKernel files={len(self._files)} containers={len(self._containers)}>"

    # --- the fd table ------------------------------------------------------------------

    def _new_fd(self, label: str) -> tuple[int, int]:
        fd = os.memfd_create(f"aiovfio-sim:{label}", os.MFD_CLOEXEC)
        return fd, os.fstat(fd).st_ino

    def _install(self, f: _File) -> None:
        """Enter a new file; an old entry with its number was closed behind our back."""
        old = self._files.get(f.fd)
        if old is not None:
            self._forget(old)
        self._files[f.fd] = f

    def _lookup(self, fd: int) -> _File | None:
        """The sim file behind `fd`, None for a foreign open file; EBADF if not open."""
        f = self._files.get(fd)
        try:
            st = os.fstat(fd)
        except (OSError, OverflowError, TypeError):
            if f is not None:
                self._forget(f)
            raise rules.BAD_FD.error(f"fd {fd}") from None
        if f is not None and st.st_ino != f.ino:
            self._forget(f)  # closed with os.close and the number reused
            return None
        return f

    def _sweep(self) -> None:
        """Release files the user closed with os.close instead of Kernel.close."""
        for f in list(self._files.values()):
            try:
                gone = os.fstat(f.fd).st_ino != f.ino
            except OSError:
                gone = True
            if gone:
                self._forget(f)

    def _forget(self, f: _File) -> None:
        if self._files.get(f.fd) is f:
            del self._files[f.fd]
            self._release(f)

    def _release(self, f: _File) -> None:
        """What the kernel does when the last reference to a file goes."""
        if isinstance(f, _ContainerFile):
            f.container.fd = None
            self._drop_container_if_unused(f.container)
        elif isinstance(f, _GroupFile):
            if f.stale:
                return
            group = f.group
            if group.devices_in_use:
                group.file_closed = True  # device fds hold the group file
            else:
                self._group_release(group)
        elif isinstance(f, _DeviceFile):
            self._device_close(f.device)

    # --- object lifecycles ------------------------------------------------------------------

    def _group_release(self, group: SimGroup) -> None:
        """vfio_group_fops_release: detach the container, let the group be opened again."""
        if group.container is not None:
            self._detach(group)
        group.opened = False
        group.file_closed = False

    def _detach(self, group: SimGroup) -> None:
        """vfio_group_detach_container; the last group takes the IOMMU with it."""
        container = group.container
        assert container is not None
        container.groups.remove(group)
        group.container = None
        if not container.groups and container.iommu is not None:
            container.iommu.release()
            container.iommu = None
        self._drop_container_if_unused(container)

    def _drop_container_if_unused(self, container: SimContainer) -> None:
        if container.fd is None and not container.groups and container in self._containers:
            self._containers.remove(container)

    def _group_vanished(self, group: SimGroup) -> None:
        """The group's last VFIO device unbound (vfio_device_remove_group)."""
        if group.container is not None:
            self._detach(group)
        group.generation += 1
        group.opened = False
        group.file_closed = False

    def _device_open(self, device: SimDevice) -> None:
        """vfio_df_open: the first open enables the device (vfio_pci_core_enable)."""
        device.open_count += 1
        if device.open_count > 1:
            return
        device.group.devices_in_use += 1
        device.config.open_device()
        if device.model.supports_reset:
            device.model.reset()  # pci_try_reset_function on open

    def _device_close(self, device: SimDevice) -> None:
        """vfio_df_close: the last close disables it (vfio_pci_core_close_device)."""
        device.open_count -= 1
        if device.open_count:
            return
        device.irqs.close()
        device.config.close_device()
        device.low_power = False
        if device.model.supports_reset:
            device.model.reset()
        group = device.group
        group.devices_in_use -= 1
        if group.file_closed and not group.devices_in_use:
            self._group_release(group)

    def _shutdown(self) -> None:
        """Machine.close: close every fd the machine handed out."""
        for f in list(self._files.values()):
            del self._files[f.fd]
            try:
                os.close(f.fd)
            except OSError:
                continue
            self._release(f)
        for c in list(self._containers):
            for g in list(c.groups):
                self._detach(g)
        self._containers.clear()

    # --- ioctl dispatch ------------------------------------------------------------------

    def _ioctl(self, fd: int, nr: int, arg: _Arg) -> int:
        f = self._lookup(fd)
        if isinstance(f, _ContainerFile):
            return self._container_ioctl(f.container, nr, arg)
        if isinstance(f, _GroupFile):
            return self._group_ioctl(f, nr, arg)
        if isinstance(f, _DeviceFile):
            return self._device_ioctl(f.device, nr, arg)
        kind = f.kind() if f is not None else "foreign file"
        raise rules.NOT_SUPPORTED.error(f"ioctl {nr:#x} on fd {fd} ({kind})")

    @staticmethod
    def _buf(arg: _Arg) -> UserBuffer:
        if not isinstance(arg, UserBuffer):
            raise rules.USER_MEMORY.error(f"the argument {arg!r} is not a pointer")
        return arg

    @staticmethod
    def _int(arg: _Arg) -> int:
        return arg if isinstance(arg, int) else -1

    # container -----------------------------------------------------------------------------

    def _container_ioctl(self, c: SimContainer, nr: int, arg: _Arg) -> int:
        if nr == uapi.Ioctl.GET_API_VERSION:
            return uapi.VFIO_API_VERSION
        if nr == uapi.Ioctl.CHECK_EXTENSION:
            return self._check_extension(c, self._int(arg))
        if nr == uapi.Ioctl.SET_IOMMU:
            return self._set_iommu(c, self._int(arg))
        iommu = c.iommu
        if iommu is None:
            raise rules.CONTAINER_NO_IOMMU.error(f"ioctl {nr:#x} on {c.label()}")
        if nr == uapi.Ioctl.IOMMU_GET_INFO:
            return self._iommu_get_info(iommu, self._buf(arg))
        if nr == uapi.Ioctl.IOMMU_MAP_DMA:
            return self._map_dma(iommu, self._buf(arg))
        if nr == uapi.Ioctl.IOMMU_UNMAP_DMA:
            return self._unmap_dma(iommu, self._buf(arg))
        if nr == uapi.Ioctl.IOMMU_DIRTY_PAGES:
            raise rules.NOT_SIMULATED.error("VFIO_IOMMU_DIRTY_PAGES")
        raise rules.NOT_SUPPORTED.error(f"ioctl {nr:#x} on {c.label()} (type1)")

    @staticmethod
    def _check_extension(c: SimContainer, ext: int) -> int:
        """vfio_iommu_type1_check_extension (the only IOMMU driver of the sim)."""
        if ext in (Extension.TYPE1_IOMMU, Extension.TYPE1v2_IOMMU):
            return 1
        if ext in (Extension.UNMAP_ALL, Extension.UPDATE_VADDR):
            return 1
        if ext == Extension.DMA_CC_IOMMU:
            return 1 if c.iommu is not None else 0
        return 0

    def _set_iommu(self, c: SimContainer, iommu_type: int) -> int:
        if not c.groups:
            raise rules.SET_IOMMU_WITHOUT_GROUP.error(c.label())
        if c.iommu is not None:
            raise rules.SET_IOMMU_TWICE.error(c.label())
        if iommu_type not in (Extension.TYPE1_IOMMU, Extension.TYPE1v2_IOMMU):
            raise rules.SET_IOMMU_UNSUPPORTED.error(f"type {iommu_type}")
        m = self._machine
        c.iommu = Type1Iommu(
            v2=iommu_type == Extension.TYPE1v2_IOMMU,
            page_size=m.page_size,
            iova_ranges=m.iova_ranges,
            dma_avail=m.dma_entry_limit,
            memlock=m._memlock,
            memory=m._memory,
        )
        return 0

    def _iommu_get_info(self, iommu: Type1Iommu, buf: UserBuffer) -> int:
        """vfio_iommu_type1_get_info: migration, DMA-available and IOVA-range capabilities."""
        cls = uapi.vfio_iommu_type1_info
        minsz = _offsetofend(cls, "iova_pgsizes")
        capsz = _offsetofend(cls, "cap_offset")
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
        self._put_caps(buf, info, caps, minsz)
        return 0

    @staticmethod
    def _put_caps(
        buf: UserBuffer,
        info: uapi.vfio_iommu_type1_info | uapi.vfio_region_info,
        caps: list[bytes],
        minsz: int,
    ) -> None:
        """The capability-chain dance: the chain if argsz fits it, else the argsz it needs."""
        fixed = ctypes.sizeof(info)
        chain = _chain(caps, base=fixed)
        if info.argsz < fixed + len(chain):
            info.argsz = fixed + len(chain)
            info.cap_offset = 0
        else:
            buf.write(fixed, chain)
            info.cap_offset = fixed
        buf.put(info, minsz)

    def _map_dma(self, iommu: Type1Iommu, buf: UserBuffer) -> int:
        cls = uapi.vfio_iommu_type1_dma_map
        minsz = _offsetofend(cls, "size")
        arg = buf.get(cls, minsz)
        if arg.argsz < minsz:
            raise rules.MAP_ARGSZ.error(f"argsz {arg.argsz}, needs {minsz}")
        if arg.flags & ~int(DmaMapFlag.READ | DmaMapFlag.WRITE | DmaMapFlag.VADDR):
            raise rules.MAP_FLAGS.error(f"flags {arg.flags:#x}")
        iommu.map(arg.flags, arg.vaddr, arg.iova, arg.size)
        return 0

    def _unmap_dma(self, iommu: Type1Iommu, buf: UserBuffer) -> int:
        cls = uapi.vfio_iommu_type1_dma_unmap
        minsz = _offsetofend(cls, "size")
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

    # group ---------------------------------------------------------------------------------

    def _group_ioctl(self, f: _GroupFile, nr: int, arg: _Arg) -> int:
        if nr == uapi.Ioctl.GROUP_GET_DEVICE_FD:
            return self._get_device_fd(f, self._buf(arg))
        if nr == uapi.Ioctl.GROUP_GET_STATUS:
            return self._group_status(f, self._buf(arg))
        if nr == uapi.Ioctl.GROUP_SET_CONTAINER:
            return self._set_container(f, self._buf(arg))
        if nr == uapi.Ioctl.GROUP_UNSET_CONTAINER:
            return self._unset_container(f)
        raise rules.NOT_SUPPORTED.error(f"ioctl {nr:#x} on group {f.group.number}")

    def _group_status(self, f: _GroupFile, buf: UserBuffer) -> int:
        cls = uapi.vfio_group_status
        minsz = _offsetofend(cls, "flags")
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

    def _set_container(self, f: _GroupFile, buf: UserBuffer) -> int:
        (fd,) = struct.unpack("<i", buf.read(0, 4))
        try:
            target = self._lookup(fd)
        except OSError:
            raise rules.SET_CONTAINER_BAD_FD.error(f"fd {fd}") from None
        group = f.group
        if not f.stale and group.container is not None:
            raise rules.SET_CONTAINER_ALREADY_SET.error(
                f"group {group.number} is in {group.container.label()}"
            )
        if f.stale:
            raise rules.GROUP_GONE.error(f"group {group.number}")
        if not isinstance(target, _ContainerFile):
            kind = target.kind() if target is not None else "not a VFIO file"
            raise rules.SET_CONTAINER_NOT_CONTAINER.error(f"fd {fd} ({kind})")
        if not group.viable:
            who = ", ".join(f"{d.name} is bound to {d.driver}" for d in group.offenders())
            raise rules.SET_CONTAINER_NOT_VIABLE.error(f"group {group.number}: {who}")
        container = target.container
        container.groups.append(group)
        group.container = container
        return 0

    def _unset_container(self, f: _GroupFile) -> int:
        group = f.group
        if f.stale or group.container is None:
            raise rules.UNSET_CONTAINER_NOT_SET.error(f"group {group.number}")
        if group.devices_in_use:
            raise rules.UNSET_CONTAINER_BUSY.error(
                f"group {group.number}: {group.devices_in_use} device(s) open"
            )
        self._detach(group)
        return 0

    def _get_device_fd(self, f: _GroupFile, buf: UserBuffer) -> int:
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
            raise rules.DEVICE_NAME_UNKNOWN.error(f"{name!r} in group {group.number}")
        container = group.container
        if container is None or container.iommu is None:
            why = "no container" if container is None else f"{container.label()} has no IOMMU"
            raise rules.DEVICE_FD_NO_IOMMU.error(f"group {group.number}: {why}")
        fd, ino = self._new_fd(f"device:{device.name}")
        try:
            self._device_open(device)
        except BaseException:
            os.close(fd)
            raise
        self._install(_DeviceFile(fd, ino, device=device))
        return fd

    # device --------------------------------------------------------------------------------

    def _device_ioctl(self, d: SimDevice, nr: int, arg: _Arg) -> int:
        if nr == uapi.Ioctl.DEVICE_FEATURE:
            return self._device_feature(d, self._buf(arg))
        if nr == uapi.Ioctl.DEVICE_BIND_IOMMUFD:
            return self._bind_iommufd(self._buf(arg))
        handlers: dict[int, Callable[[SimDevice, UserBuffer], int]] = {
            uapi.Ioctl.DEVICE_GET_INFO: self._device_info,
            uapi.Ioctl.DEVICE_GET_IRQ_INFO: self._irq_info,
            uapi.Ioctl.DEVICE_GET_PCI_HOT_RESET_INFO: self._hot_reset_info,
            uapi.Ioctl.DEVICE_GET_REGION_INFO: self._region_info,
            uapi.Ioctl.DEVICE_PCI_HOT_RESET: self._hot_reset,
            uapi.Ioctl.DEVICE_SET_IRQS: self._set_irqs,
        }
        if nr == uapi.Ioctl.DEVICE_RESET:
            return self._reset(d)
        handler = handlers.get(nr)
        if handler is None:
            if nr == uapi.Ioctl.DEVICE_IOEVENTFD:
                raise rules.NOT_SIMULATED.error("VFIO_DEVICE_IOEVENTFD")
            raise rules.NOT_SUPPORTED.error(f"ioctl {nr:#x} on device {d.name}")
        return handler(d, self._buf(arg))

    @staticmethod
    def _bind_iommufd(buf: UserBuffer) -> int:
        cls = uapi.vfio_device_bind_iommufd
        minsz = _offsetofend(cls, "out_devid")
        arg = buf.get(cls, minsz)
        if arg.argsz < minsz or arg.flags or arg.iommufd < 0:
            raise rules.BIND_IOMMUFD_GROUP_DEVICE.error(
                f"argsz {arg.argsz}, flags {arg.flags:#x}, iommufd {arg.iommufd}"
            )
        raise rules.BIND_IOMMUFD_GROUP_DEVICE.error("this device fd came from a group")

    def _device_info(self, d: SimDevice, buf: UserBuffer) -> int:
        cls = uapi.vfio_device_info
        minsz = _offsetofend(cls, "num_irqs")
        capsz = _offsetofend(cls, "cap_offset")
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

    def _region_info(self, d: SimDevice, buf: UserBuffer) -> int:
        """vfio_pci_ioctl_get_region_info, with a sparse-mmap capability for mmap areas."""
        cls = uapi.vfio_region_info
        minsz = _offsetofend(cls, "offset")
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
            self._put_caps(buf, info, caps, minsz)
        else:
            buf.put(info, minsz)
        return 0

    def _irq_info(self, d: SimDevice, buf: UserBuffer) -> int:
        cls = uapi.vfio_irq_info
        minsz = _offsetofend(cls, "count")
        info = buf.get(cls, minsz)
        if info.argsz < minsz:
            raise rules.IRQ_INFO_ARGSZ.error(f"argsz {info.argsz}, needs {minsz}")
        if info.index >= PciIrq.NUM_IRQS or (info.index == PciIrq.ERR and not d.config.is_pcie):
            raise rules.IRQ_INFO_INDEX.error(f"index {info.index} of {d.name}")
        info.flags = IrqInfoFlag.EVENTFD
        if info.index == PciIrq.INTX:
            info.flags |= IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED
        else:
            info.flags |= IrqInfoFlag.NORESIZE
        info.count = d.irqs.count(info.index)
        buf.put(info, minsz)
        return 0

    def _set_irqs(self, d: SimDevice, buf: UserBuffer) -> int:
        cls = uapi.vfio_irq_set
        minsz = _offsetofend(cls, "count")
        hdr = buf.get(cls, minsz)
        max_irqs = d.irqs.count(hdr.index) if hdr.index < PciIrq.NUM_IRQS else 0
        size = validate_irq_set(
            hdr.flags, hdr.index, hdr.start, hdr.count, hdr.argsz, minsz, max_irqs
        )
        data = buf.read(minsz, size) if size else b""
        d.irqs.set_irqs(hdr.flags, hdr.index, hdr.start, hdr.count, data)
        return 0

    def _reset(self, d: SimDevice) -> int:
        if not d.model.supports_reset:
            raise rules.RESET_NOT_SUPPORTED.error(d.name)
        d.low_power = False
        d.model.reset()
        return 0

    def _bus_devices(self, d: SimDevice) -> list[SimDevice]:
        if d.bus == 0:
            raise rules.HOT_RESET_NO_BUS_RESET.error(f"{d.name} is on the root bus")
        return [o for o in self._machine._iter_devices() if o.domain == d.domain and o.bus == d.bus]

    def _hot_reset_info(self, d: SimDevice, buf: UserBuffer) -> int:
        cls = uapi.vfio_pci_hot_reset_info
        minsz = _offsetofend(cls, "count")
        hdr = buf.get(cls, minsz)
        if hdr.argsz < minsz:
            raise rules.HOT_RESET_INFO_ARGSZ.error(f"argsz {hdr.argsz}, needs {minsz}")
        hdr.flags = 0
        devices = self._bus_devices(d)
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

    def _hot_reset(self, d: SimDevice, buf: UserBuffer) -> int:
        cls = uapi.vfio_pci_hot_reset
        minsz = _offsetofend(cls, "count")
        hdr = buf.get(cls, minsz)
        if hdr.argsz < minsz or hdr.flags:
            raise rules.HOT_RESET_HEADER.error(f"argsz {hdr.argsz}, flags {hdr.flags:#x}")
        devices = self._bus_devices(d)
        if not hdr.count or hdr.count > len(devices):
            raise rules.HOT_RESET_HEADER.error(f"count {hdr.count}; {len(devices)} affected")
        raw = buf.read(ctypes.sizeof(cls), 4 * hdr.count)
        groups: list[SimGroup] = []
        for fd in struct.unpack(f"<{hdr.count}i", raw):
            try:
                f = self._lookup(fd)
            except OSError:
                raise rules.HOT_RESET_BAD_GROUP_FD.error(f"fd {fd}") from None
            if not isinstance(f, _GroupFile):
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

    def _device_feature(self, d: SimDevice, buf: UserBuffer) -> int:
        cls = uapi.vfio_device_feature
        minsz = _offsetofend(cls, "flags")
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

    # --- device file operations ------------------------------------------------------------

    def _device_rw(self, d: SimDevice, offset: int, size: int, data: bytes | None) -> bytes:
        """vfio_pci_rw: pread (data None) or pwrite of `size` bytes at `offset`."""
        index = offset >> VFIO_PCI_OFFSET_SHIFT
        pos = offset & _OFFSET_MASK
        if index >= PciRegion.NUM_REGIONS:
            raise rules.IO_BAD_REGION.error(f"offset {offset:#x} (index {index}) of {d.name}")
        if not size:
            return b""
        if index == PciRegion.CONFIG:
            return self._config_rw(d, pos, size, data)
        if index == PciRegion.VGA:
            raise rules.IO_BAD_REGION.error(f"{d.name} has no VGA region")
        spec = d.regions.get(index)
        if spec is None:
            raise rules.IO_BAD_REGION.error(f"{d.name} has no region {index}")
        if data is not None and (index == PciRegion.ROM or not spec.flags & RegionFlag.WRITE):
            raise rules.IO_READ_ONLY.error(f"{d.name} region {index}")
        if pos >= spec.size:
            raise rules.IO_PAST_END.error(f"{pos:#x} in {d.name} region {index} of {spec.size:#x}")
        count = min(size, spec.size - pos)
        if not d.config.memory_enabled:
            raise rules.IO_MEMORY_DISABLED.error(f"{d.name} region {index}")
        out = self._bar_rw(d, index, pos, count, data)
        if count < size:
            raise rules.IO_SHORT.error(
                f"{size} bytes at {pos:#x} of {d.name} region {index}: only {count} transferred"
            )
        return out

    def _bar_rw(self, d: SimDevice, index: int, pos: int, count: int, data: bytes | None) -> bytes:
        """do_io_rw: naturally aligned 8/4/2/1 chunks; the MSI-X table is excluded."""
        x_start = x_end = 0
        table = d.config.msix_table
        if table is not None and table.bar == index:
            x_start, x_end = table.offset, table.offset + table.size
        ram = d.ram[index]
        areas = d.regions[index].mmap_areas
        width = self._machine.io_width
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

    def _config_rw(self, d: SimDevice, pos: int, size: int, data: bytes | None) -> bytes:
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
                self._command_changed(d, before, cfg.command)
            done += n
        return bytes(out)

    @staticmethod
    def _command_changed(d: SimDevice, before: int, after: int) -> None:
        """vfio_basic_config_write: INTx Disable masks and unmasks INTx."""
        flipped = (before ^ after) & Command.INTX_DISABLE
        if not flipped:
            return
        if after & Command.INTX_DISABLE:
            d.irqs.intx_mask()
        else:
            d.irqs.intx_unmask()

    # --- the Kernel protocol: files ------------------------------------------------------

    @_op
    def vfio_available(self) -> bool:
        return True

    @_op
    def open_container(self) -> int:
        fd, ino = self._new_fd("container")
        self._container_numbers += 1
        container = SimContainer(self._container_numbers, fd=fd)
        self._containers.append(container)
        self._install(_ContainerFile(fd, ino, container=container))
        return fd

    @_op
    def open_group(self, group: int) -> int:
        self._sweep()
        g = self._machine._groups.get(int(group))
        if g is None or not g.exists:
            raise rules.NO_SUCH_GROUP.error(f"/dev/vfio/{group}")
        if g.opened:
            raise rules.GROUP_BUSY.error(f"group {group}")
        fd, ino = self._new_fd(f"group:{group}")
        g.opened = True
        g.file_closed = False
        self._install(_GroupFile(fd, ino, group=g, generation=g.generation))
        return fd

    @_op
    def close(self, fd: int) -> None:
        f = self._lookup(fd) if fd in self._files else None
        os.close(fd)  # EBADF for a closed fd, as close(2)
        if f is not None:
            self._forget(f)

    # --- container -----------------------------------------------------------------------

    @_op
    def get_api_version(self, container: int) -> int:
        return self._ioctl(container, uapi.Ioctl.GET_API_VERSION, None)

    @_op
    def check_extension(self, container: int, extension: int) -> int:
        return self._ioctl(container, uapi.Ioctl.CHECK_EXTENSION, int(extension))

    @_op
    def set_iommu(self, container: int, iommu_type: int) -> None:
        self._ioctl(container, uapi.Ioctl.SET_IOMMU, int(iommu_type))

    @_op
    def iommu_get_info(self, container: int, info: bytearray) -> None:
        self._ioctl(container, uapi.Ioctl.IOMMU_GET_INFO, UserBuffer(info))

    @_op
    def map_dma(self, container: int, arg: uapi.vfio_iommu_type1_dma_map) -> None:
        self._ioctl(container, uapi.Ioctl.IOMMU_MAP_DMA, UserBuffer(arg))

    @_op
    def unmap_dma(self, container: int, arg: uapi.vfio_iommu_type1_dma_unmap) -> None:
        self._ioctl(container, uapi.Ioctl.IOMMU_UNMAP_DMA, UserBuffer(arg))

    # --- group ---------------------------------------------------------------------------

    @_op
    def group_get_status(self, group_fd: int, arg: uapi.vfio_group_status) -> None:
        self._ioctl(group_fd, uapi.Ioctl.GROUP_GET_STATUS, UserBuffer(arg))

    @_op
    def group_set_container(self, group_fd: int, container: int) -> None:
        arg = UserBuffer(bytearray(ctypes.c_int32(container)))  # as LinuxKernel passes it
        self._ioctl(group_fd, uapi.Ioctl.GROUP_SET_CONTAINER, arg)

    @_op
    def group_unset_container(self, group_fd: int) -> None:
        self._ioctl(group_fd, uapi.Ioctl.GROUP_UNSET_CONTAINER, None)

    @_op
    def group_get_device_fd(self, group_fd: int, name: str) -> int:
        arg = UserBuffer(bytearray(name.encode() + b"\0"))
        return self._ioctl(group_fd, uapi.Ioctl.GROUP_GET_DEVICE_FD, arg)

    # --- device --------------------------------------------------------------------------

    @_op
    def device_get_info(self, device: int, info: bytearray) -> None:
        self._ioctl(device, uapi.Ioctl.DEVICE_GET_INFO, UserBuffer(info))

    @_op
    def device_get_region_info(self, device: int, info: bytearray) -> None:
        self._ioctl(device, uapi.Ioctl.DEVICE_GET_REGION_INFO, UserBuffer(info))

    @_op
    def device_get_irq_info(self, device: int, arg: uapi.vfio_irq_info) -> None:
        self._ioctl(device, uapi.Ioctl.DEVICE_GET_IRQ_INFO, UserBuffer(arg))

    @_op
    def device_set_irqs(self, device: int, arg: bytearray) -> None:
        self._ioctl(device, uapi.Ioctl.DEVICE_SET_IRQS, UserBuffer(arg))

    @_op
    def device_reset(self, device: int) -> None:
        self._ioctl(device, uapi.Ioctl.DEVICE_RESET, None)

    @_op
    def device_get_pci_hot_reset_info(self, device: int, info: bytearray) -> None:
        self._ioctl(device, uapi.Ioctl.DEVICE_GET_PCI_HOT_RESET_INFO, UserBuffer(info))

    @_op
    def device_pci_hot_reset(self, device: int, arg: bytearray) -> None:
        self._ioctl(device, uapi.Ioctl.DEVICE_PCI_HOT_RESET, UserBuffer(arg))

    @_op
    def device_feature(self, device: int, arg: bytearray) -> int:
        return self._ioctl(device, uapi.Ioctl.DEVICE_FEATURE, UserBuffer(arg))

    # --- iommufd (not on the simulated machine) -----------------------------------------

    @_op
    def iommufd_available(self) -> bool:
        return False

    @_op
    def open_iommufd(self) -> int:
        raise rules.NO_IOMMUFD.error("/dev/iommu")

    @_op
    def open_device_cdev(self, cdev: str) -> int:
        raise rules.NO_IOMMUFD.error(f"/dev/vfio/devices/{cdev}")

    @_op
    def device_bind_iommufd(self, device: int, arg: uapi.vfio_device_bind_iommufd) -> None:
        self._ioctl(device, uapi.Ioctl.DEVICE_BIND_IOMMUFD, UserBuffer(arg))

    @_op
    def device_attach_iommufd_pt(
        self, device: int, arg: uapi.vfio_device_attach_iommufd_pt
    ) -> None:
        self._ioctl(device, uapi.Ioctl.DEVICE_ATTACH_IOMMUFD_PT, UserBuffer(arg))

    @_op
    def device_detach_iommufd_pt(
        self, device: int, arg: uapi.vfio_device_detach_iommufd_pt
    ) -> None:
        self._ioctl(device, uapi.Ioctl.DEVICE_DETACH_IOMMUFD_PT, UserBuffer(arg))

    @_op
    def ioas_alloc(self, iommufd: int, arg: iommufd_uapi.iommu_ioas_alloc) -> None:
        self._ioctl(iommufd, IommufdIoctl.IOAS_ALLOC, UserBuffer(arg))

    @_op
    def ioas_map(self, iommufd: int, arg: iommufd_uapi.iommu_ioas_map) -> None:
        self._ioctl(iommufd, IommufdIoctl.IOAS_MAP, UserBuffer(arg))

    @_op
    def ioas_unmap(self, iommufd: int, arg: iommufd_uapi.iommu_ioas_unmap) -> None:
        self._ioctl(iommufd, IommufdIoctl.IOAS_UNMAP, UserBuffer(arg))

    @_op
    def ioas_iova_ranges(self, iommufd: int, arg: iommufd_uapi.iommu_ioas_iova_ranges) -> None:
        self._ioctl(iommufd, IommufdIoctl.IOAS_IOVA_RANGES, UserBuffer(arg))

    @_op
    def iommufd_destroy(self, iommufd: int, arg: iommufd_uapi.iommu_destroy) -> None:
        self._ioctl(iommufd, IommufdIoctl.DESTROY, UserBuffer(arg))

    # --- device I/O ----------------------------------------------------------------------

    @_op
    def pread(self, fd: int, size: int, offset: int) -> bytes:
        if size < 0:
            raise ValueError(f"negative read size {size}")  # as os.pread
        f = self._lookup(fd)
        if isinstance(f, _DeviceFile):
            return self._device_rw(f.device, offset, size, None)
        if isinstance(f, _ContainerFile | _GroupFile):
            raise rules.NO_READ_WRITE.error(f"pread of {f.kind()} fd {fd}")
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(errno.EIO, f"short read: {len(data)} of {size} bytes at {offset:#x}")
        return data

    @_op
    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        f = self._lookup(fd)
        if isinstance(f, _DeviceFile):
            self._device_rw(f.device, offset, len(data), bytes(data))
            return
        if isinstance(f, _ContainerFile | _GroupFile):
            raise rules.NO_READ_WRITE.error(f"pwrite of {f.kind()} fd {fd}")
        n = os.pwrite(fd, data, offset)
        if n != len(data):
            raise OSError(errno.EIO, f"short write: {n} of {len(data)} bytes at {offset:#x}")

    @_op
    def mmap(self, fd: int, length: int, offset: int, *, writable: bool) -> mmap.mmap:
        f = self._lookup(fd)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        if not isinstance(f, _DeviceFile):
            if f is not None:
                raise rules.NO_MMAP.error(f"mmap of {f.kind()} fd {fd}")
            return mmap.mmap(fd, length, mmap.MAP_SHARED, prot, offset=offset)
        d = f.device
        if length <= 0 or offset < 0 or offset % _PAGE:
            raise rules.MMAP_BAD_RANGE.error(f"length {length:#x} at offset {offset:#x}")
        index = offset >> VFIO_PCI_OFFSET_SHIFT
        pos = offset & _OFFSET_MASK
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
        m = mmap.mmap(d.ram[index].fd, length, mmap.MAP_SHARED, prot, offset=pos)
        what = f"{d.name} region {index} {pos:#x}+{length:#x}"
        self._mmaps.append(_Mapping(weakref.ref(m), what))
        return m

    # --- eventfd -------------------------------------------------------------------------

    @_op
    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._install(_EventFile(fd, os.fstat(fd).st_ino))
        return fd

    def eventfd_read(self, fd: int) -> int:
        """A plain read of a real eventfd: not counted, locked or injectable.

        It touches no simulated state, Linux fails it only with EAGAIN, and it
        runs on every interrupt: the machine lock and bookkeeping cost more
        than the wake itself (1.2 us of 4.9 us under uvloop).
        """
        return os.eventfd_read(fd)

    # --- sysfs ---------------------------------------------------------------------------

    def _sysfs_device(self, bdf: str) -> SimDevice:
        d = self._machine._devices.get(bdf)
        if d is None:
            raise FileNotFoundError(
                errno.ENOENT, f"no PCI device {bdf}", f"/sys/bus/pci/devices/{bdf}"
            )
        return d

    @_op
    def pci_devices(self) -> tuple[str, ...]:
        return tuple(sorted(self._machine._devices))

    @_op
    def iommu_group(self, bdf: str) -> int | None:
        return self._sysfs_device(bdf).group.number

    @_op
    def group_devices(self, group: int) -> tuple[str, ...]:
        g = self._machine._groups.get(int(group))
        if g is None:
            raise FileNotFoundError(
                errno.ENOENT, f"no IOMMU group {group}", f"/sys/kernel/iommu_groups/{group}"
            )
        return tuple(d.name for d in g.devices)

    @_op
    def driver(self, bdf: str) -> str | None:
        return self._sysfs_device(bdf).driver

    @_op
    def pci_ids(self, bdf: str) -> PciIds:
        return self._sysfs_device(bdf).ids()

    @_op
    def device_cdev(self, bdf: str) -> str | None:
        self._sysfs_device(bdf)
        return None

    # --- reports -------------------------------------------------------------------------

    def _leaks(self) -> list[str]:
        self._sweep()
        out: list[str] = []
        for fd in sorted(self._files):
            f = self._files[fd]
            if isinstance(f, _ContainerFile):
                out.append(f"container fd {fd} is open")
            elif isinstance(f, _GroupFile):
                state = " (stale)" if f.stale else ""
                out.append(f"group fd {fd} (group {f.group.number}){state} is open")
            elif isinstance(f, _DeviceFile):
                out.append(f"device fd {fd} ({f.device.name}) is open")
            else:
                out.append(f"eventfd {fd} is open")
        for group in self._machine._iter_groups():
            if group.file_closed:
                out.append(
                    f"group {group.number}: its fd was closed but open device fds still hold it"
                )
            if group.container is not None:
                out.append(f"group {group.number} is attached to {group.container.label()}")
        for c in self._containers:
            if c.iommu is not None:
                out.extend(f"DMA mapping {m} in {c.label()}" for m in c.iommu.mappings)
        for d in self._machine._iter_devices():
            out.extend(f"{d.name}: {line}" for line in d.irqs.describe())
        live = [u for u in self._mmaps if (mm := u.ref()) is not None and not mm.closed]
        self._mmaps = live
        out.extend(f"mmap of {u.what} is still mapped" for u in live)
        return out


def _brief(value: object) -> object:
    """Arguments and results for a debug log: buffers by size, not by content."""
    if isinstance(value, tuple):
        return tuple(_brief(v) for v in value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, ctypes.Structure):
        return {n: getattr(value, n) for n, *_ in value._fields_ if n != "header"}
    if isinstance(value, mmap.mmap):
        return f"<mmap {len(value)} bytes>"
    return value


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


def _chain(caps: list[bytes], *, base: int) -> bytes:
    """Concatenate capabilities (each starting with a vfio_info_cap_header), linking `next`."""
    out = bytearray()
    offsets = []
    for cap in caps:
        offsets.append(len(out))
        out += cap
    for i, off in enumerate(offsets):
        nxt = base + offsets[i + 1] if i + 1 < len(offsets) else 0
        struct.pack_into("<I", out, off + 4, nxt)
    return bytes(out)


if TYPE_CHECKING:
    from ..kernel.protocol import Kernel

    def _is_a_kernel(kernel: SimKernel) -> Kernel:
        """mypy proves here that SimKernel implements the Kernel protocol."""
        return kernel
