"""The real Linux kernel: `Kernel` implemented with os, fcntl, mmap and eventfd.

This is the only module in aiovfio that calls `fcntl.ioctl`. Every call is
logged at debug level (once structlog is configured) with its arguments and
result. Errors propagate as `OSError` with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
from pathlib import Path

from .. import _log
from .._uapi import iommufd as iommufd_uapi
from .._uapi import vfio as uapi
from .._uapi.iommufd import IommufdIoctl
from .._uapi.vfio import Ioctl
from .protocol import PciIds

__all__ = ["LinuxKernel"]

_O_FLAGS = os.O_RDWR | os.O_CLOEXEC
# Bound once: every kernel call passes through these (see benchmarks/run.py).
_raw_ioctl = fcntl.ioctl
_log_state = _log.state

# Plain ints: an IntEnum member lookup costs ~65 ns, more than the rest of a call.
_CHECK_EXTENSION = int(Ioctl.CHECK_EXTENSION)
_DEVICE_ATTACH_IOMMUFD_PT = int(Ioctl.DEVICE_ATTACH_IOMMUFD_PT)
_DEVICE_BIND_IOMMUFD = int(Ioctl.DEVICE_BIND_IOMMUFD)
_DEVICE_DETACH_IOMMUFD_PT = int(Ioctl.DEVICE_DETACH_IOMMUFD_PT)
_DEVICE_FEATURE = int(Ioctl.DEVICE_FEATURE)
_DEVICE_GET_INFO = int(Ioctl.DEVICE_GET_INFO)
_DEVICE_GET_IRQ_INFO = int(Ioctl.DEVICE_GET_IRQ_INFO)
_DEVICE_GET_PCI_HOT_RESET_INFO = int(Ioctl.DEVICE_GET_PCI_HOT_RESET_INFO)
_DEVICE_GET_REGION_INFO = int(Ioctl.DEVICE_GET_REGION_INFO)
_DEVICE_PCI_HOT_RESET = int(Ioctl.DEVICE_PCI_HOT_RESET)
_DEVICE_RESET = int(Ioctl.DEVICE_RESET)
_DEVICE_SET_IRQS = int(Ioctl.DEVICE_SET_IRQS)
_GET_API_VERSION = int(Ioctl.GET_API_VERSION)
_GROUP_GET_DEVICE_FD = int(Ioctl.GROUP_GET_DEVICE_FD)
_GROUP_GET_STATUS = int(Ioctl.GROUP_GET_STATUS)
_GROUP_SET_CONTAINER = int(Ioctl.GROUP_SET_CONTAINER)
_GROUP_UNSET_CONTAINER = int(Ioctl.GROUP_UNSET_CONTAINER)
_IOMMU_GET_INFO = int(Ioctl.IOMMU_GET_INFO)
_IOMMU_MAP_DMA = int(Ioctl.IOMMU_MAP_DMA)
_IOMMU_UNMAP_DMA = int(Ioctl.IOMMU_UNMAP_DMA)
_SET_IOMMU = int(Ioctl.SET_IOMMU)
_IOMMU_DESTROY = int(IommufdIoctl.DESTROY)
_IOMMU_IOAS_ALLOC = int(IommufdIoctl.IOAS_ALLOC)
_IOMMU_IOAS_IOVA_RANGES = int(IommufdIoctl.IOAS_IOVA_RANGES)
_IOMMU_IOAS_MAP = int(IommufdIoctl.IOAS_MAP)
_IOMMU_IOAS_UNMAP = int(IommufdIoctl.IOAS_UNMAP)


def _fields(arg: ctypes.Structure) -> dict[str, object]:
    """A structure's scalar fields, for the debug log (flexible arrays left out)."""
    out: dict[str, object] = {}
    for name, *_ in arg._fields_:
        value = getattr(arg, name)
        if not isinstance(value, ctypes.Array | ctypes.Structure | ctypes.Union):
            out[name] = value
    return out


def _ioctl(what: str, fd: int, request: int, arg: ctypes.Structure | bytearray) -> int:
    """One ioctl with an in/out buffer; returns the ioctl's return value."""
    try:
        rc: int = _raw_ioctl(fd, request, arg, True)
    except OSError as exc:
        if _log_state.is_configured:
            _log.logger.debug("kernel.ioctl", op=what, fd=fd, errno=exc.errno)
        raise
    if _log_state.is_configured:
        shown = _fields(arg) if isinstance(arg, ctypes.Structure) else {"len": len(arg)}
        _log.logger.debug("kernel.ioctl", op=what, fd=fd, result=rc, **shown)
    return rc


def _ioctl_int(what: str, fd: int, request: int, value: int | None = None) -> int:
    """One ioctl whose argument is an integer (or none); returns its result."""
    try:
        rc: int = _raw_ioctl(fd, request) if value is None else _raw_ioctl(fd, request, value)
    except OSError as exc:
        if _log_state.is_configured:
            _log.logger.debug("kernel.ioctl", op=what, fd=fd, arg=value, errno=exc.errno)
        raise
    if _log_state.is_configured:
        _log.logger.debug("kernel.ioctl", op=what, fd=fd, arg=value, result=rc)
    return rc


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


class LinuxKernel:
    """Real syscalls. `sysfs` and `dev` roots are configurable for tests."""

    name = "linux"

    def __init__(
        self, *, sysfs: str | os.PathLike[str] = "/sys", dev: str | os.PathLike[str] = "/dev"
    ) -> None:
        self.sysfs = Path(sysfs)
        self.dev = Path(dev)
        #: eventfds made by `eventfd()` and not closed yet (for leak checks:
        #: an event loop's own eventfds look the same in /proc/self/fd)
        self.open_eventfds: set[int] = set()

    def __repr__(self) -> str:
        return f"<LinuxKernel sysfs={str(self.sysfs)!r} dev={str(self.dev)!r}>"

    # --- plumbing --------------------------------------------------------------

    def _open(self, path: Path) -> int:
        fd = os.open(path, _O_FLAGS)
        _log.debug("kernel.open", path=str(path), fd=fd)
        return fd

    # --- files -----------------------------------------------------------------

    def vfio_available(self) -> bool:
        return (self.dev / "vfio" / "vfio").exists()

    def open_container(self) -> int:
        return self._open(self.dev / "vfio" / "vfio")

    def open_group(self, group: int) -> int:
        return self._open(self.dev / "vfio" / str(int(group)))

    def open_noiommu_group(self, group: int) -> int:
        return self._open(self.dev / "vfio" / f"noiommu-{int(group)}")

    def close(self, fd: int) -> None:
        _log.debug("kernel.close", fd=fd)
        self.open_eventfds.discard(fd)
        os.close(fd)

    # --- container -------------------------------------------------------------

    def get_api_version(self, container: int) -> int:
        return _ioctl_int("VFIO_GET_API_VERSION", container, _GET_API_VERSION)

    def check_extension(self, container: int, extension: int) -> int:
        return _ioctl_int("VFIO_CHECK_EXTENSION", container, _CHECK_EXTENSION, int(extension))

    def set_iommu(self, container: int, iommu_type: int) -> None:
        _ioctl_int("VFIO_SET_IOMMU", container, _SET_IOMMU, int(iommu_type))

    def iommu_get_info(self, container: int, info: bytearray) -> None:
        _ioctl("VFIO_IOMMU_GET_INFO", container, _IOMMU_GET_INFO, info)

    def map_dma(self, container: int, arg: uapi.vfio_iommu_type1_dma_map) -> None:
        _ioctl("VFIO_IOMMU_MAP_DMA", container, _IOMMU_MAP_DMA, arg)

    def unmap_dma(self, container: int, arg: uapi.vfio_iommu_type1_dma_unmap) -> None:
        _ioctl("VFIO_IOMMU_UNMAP_DMA", container, _IOMMU_UNMAP_DMA, arg)

    # --- group -----------------------------------------------------------------

    def group_get_status(self, group_fd: int, arg: uapi.vfio_group_status) -> None:
        _ioctl("VFIO_GROUP_GET_STATUS", group_fd, _GROUP_GET_STATUS, arg)

    def group_set_container(self, group_fd: int, container: int) -> None:
        _ioctl(
            "VFIO_GROUP_SET_CONTAINER",
            group_fd,
            _GROUP_SET_CONTAINER,
            bytearray(ctypes.c_int32(container)),
        )

    def group_unset_container(self, group_fd: int) -> None:
        _ioctl_int("VFIO_GROUP_UNSET_CONTAINER", group_fd, _GROUP_UNSET_CONTAINER)

    def group_get_device_fd(self, group_fd: int, name: str) -> int:
        # A mutable buffer makes fcntl.ioctl return the ioctl's value: the new fd.
        buf = bytearray(name.encode() + b"\0")
        return _ioctl("VFIO_GROUP_GET_DEVICE_FD", group_fd, _GROUP_GET_DEVICE_FD, buf)

    # --- device ----------------------------------------------------------------

    def device_get_info(self, device: int, info: bytearray) -> None:
        _ioctl("VFIO_DEVICE_GET_INFO", device, _DEVICE_GET_INFO, info)

    def device_get_region_info(self, device: int, info: bytearray) -> None:
        _ioctl("VFIO_DEVICE_GET_REGION_INFO", device, _DEVICE_GET_REGION_INFO, info)

    def device_get_irq_info(self, device: int, arg: uapi.vfio_irq_info) -> None:
        _ioctl("VFIO_DEVICE_GET_IRQ_INFO", device, _DEVICE_GET_IRQ_INFO, arg)

    def device_set_irqs(self, device: int, arg: bytearray) -> None:
        _ioctl("VFIO_DEVICE_SET_IRQS", device, _DEVICE_SET_IRQS, arg)

    def device_reset(self, device: int) -> None:
        _ioctl_int("VFIO_DEVICE_RESET", device, _DEVICE_RESET)

    def device_get_pci_hot_reset_info(self, device: int, info: bytearray) -> None:
        _ioctl(
            "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
            device,
            _DEVICE_GET_PCI_HOT_RESET_INFO,
            info,
        )

    def device_pci_hot_reset(self, device: int, arg: bytearray) -> None:
        _ioctl("VFIO_DEVICE_PCI_HOT_RESET", device, _DEVICE_PCI_HOT_RESET, arg)

    def device_feature(self, device: int, arg: bytearray) -> int:
        return _ioctl("VFIO_DEVICE_FEATURE", device, _DEVICE_FEATURE, arg)

    # --- iommufd ---------------------------------------------------------------

    def iommufd_available(self) -> bool:
        return (self.dev / "iommu").exists()

    def open_iommufd(self) -> int:
        return self._open(self.dev / "iommu")

    def open_device_cdev(self, cdev: str) -> int:
        if "/" in cdev or not cdev:
            raise FileNotFoundError(f"not a VFIO cdev name: {cdev!r}")
        return self._open(self.dev / "vfio" / "devices" / cdev)

    def device_bind_iommufd(self, device: int, arg: uapi.vfio_device_bind_iommufd) -> None:
        _ioctl("VFIO_DEVICE_BIND_IOMMUFD", device, _DEVICE_BIND_IOMMUFD, arg)

    def device_attach_iommufd_pt(
        self, device: int, arg: uapi.vfio_device_attach_iommufd_pt
    ) -> None:
        _ioctl("VFIO_DEVICE_ATTACH_IOMMUFD_PT", device, _DEVICE_ATTACH_IOMMUFD_PT, arg)

    def device_detach_iommufd_pt(
        self, device: int, arg: uapi.vfio_device_detach_iommufd_pt
    ) -> None:
        _ioctl("VFIO_DEVICE_DETACH_IOMMUFD_PT", device, _DEVICE_DETACH_IOMMUFD_PT, arg)

    def ioas_alloc(self, iommufd: int, arg: iommufd_uapi.iommu_ioas_alloc) -> None:
        _ioctl("IOMMU_IOAS_ALLOC", iommufd, _IOMMU_IOAS_ALLOC, arg)

    def ioas_map(self, iommufd: int, arg: iommufd_uapi.iommu_ioas_map) -> None:
        _ioctl("IOMMU_IOAS_MAP", iommufd, _IOMMU_IOAS_MAP, arg)

    def ioas_unmap(self, iommufd: int, arg: iommufd_uapi.iommu_ioas_unmap) -> None:
        _ioctl("IOMMU_IOAS_UNMAP", iommufd, _IOMMU_IOAS_UNMAP, arg)

    def ioas_iova_ranges(self, iommufd: int, arg: iommufd_uapi.iommu_ioas_iova_ranges) -> None:
        _ioctl("IOMMU_IOAS_IOVA_RANGES", iommufd, _IOMMU_IOAS_IOVA_RANGES, arg)

    def iommufd_destroy(self, iommufd: int, arg: iommufd_uapi.iommu_destroy) -> None:
        _ioctl("IOMMU_DESTROY", iommufd, _IOMMU_DESTROY, arg)

    # --- device I/O ------------------------------------------------------------

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(5, f"short read: {len(data)} of {size} bytes at {offset:#x}")
        return data

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        n = os.pwrite(fd, data, offset)
        if n != len(data):
            raise OSError(5, f"short write: {n} of {len(data)} bytes at {offset:#x}")

    def mmap(self, fd: int, length: int, offset: int, *, writable: bool) -> mmap.mmap:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        m = mmap.mmap(fd, length, mmap.MAP_SHARED, prot, offset=offset)
        _log.debug("kernel.mmap", fd=fd, length=length, offset=offset, writable=writable)
        return m

    # --- eventfd ---------------------------------------------------------------

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.open_eventfds.add(fd)
        _log.debug("kernel.eventfd", fd=fd)
        return fd

    def eventfd_read(self, fd: int) -> int:
        return os.eventfd_read(fd)

    # --- memory for DMA without an IOMMU -----------------------------------------

    def mlock(self, address: int, size: int) -> None:
        if _libc().mlock(ctypes.c_void_p(address), ctypes.c_size_t(size)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mlock {address:#x}+{size:#x}: {os.strerror(err)}")

    def munlock(self, address: int, size: int) -> None:
        if _libc().munlock(ctypes.c_void_p(address), ctypes.c_size_t(size)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"munlock {address:#x}+{size:#x}: {os.strerror(err)}")

    def physical_pages(self, address: int, size: int) -> tuple[int, ...]:
        page = mmap.PAGESIZE
        first, last = address // page, (address + size - 1) // page
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            data = os.pread(f.fileno(), 8 * (last - first + 1), 8 * first)
        out = []
        for i in range(last - first + 1):
            entry = int.from_bytes(data[8 * i : 8 * i + 8], "little")
            present, pfn = entry >> 63 & 1, entry & ((1 << 55) - 1)
            if present and not pfn:
                raise PermissionError(
                    1, "/proc/self/pagemap hides frame numbers: reading them needs CAP_SYS_ADMIN"
                )
            out.append(pfn * page if present else 0)
        return tuple(out)

    # --- sysfs -----------------------------------------------------------------

    def _pci(self, bdf: str) -> Path:
        if "/" in bdf or not bdf:
            raise FileNotFoundError(f"not a PCI address: {bdf!r}")
        return self.sysfs / "bus" / "pci" / "devices" / bdf

    def pci_devices(self) -> tuple[str, ...]:
        base = self.sysfs / "bus" / "pci" / "devices"
        try:
            return tuple(sorted(p.name for p in base.iterdir()))
        except FileNotFoundError:
            return ()

    def iommu_group(self, bdf: str) -> int | None:
        link = self._pci(bdf) / "iommu_group"
        if not self._pci(bdf).exists():
            raise FileNotFoundError(2, f"no PCI device {bdf}", str(self._pci(bdf)))
        try:
            return int(os.path.basename(os.readlink(link)))
        except FileNotFoundError:
            return None

    def group_devices(self, group: int) -> tuple[str, ...]:
        base = self.sysfs / "kernel" / "iommu_groups" / str(int(group)) / "devices"
        return tuple(sorted(p.name for p in base.iterdir()))

    def driver(self, bdf: str) -> str | None:
        path = self._pci(bdf)
        if not path.exists():
            raise FileNotFoundError(2, f"no PCI device {bdf}", str(path))
        try:
            return os.path.basename(os.readlink(path / "driver"))
        except FileNotFoundError:
            return None

    def pci_ids(self, bdf: str) -> PciIds:
        path = self._pci(bdf)

        def hexval(name: str) -> int:
            return int((path / name).read_text().strip(), 16)

        return PciIds(
            vendor=hexval("vendor"),
            device=hexval("device"),
            subsystem_vendor=hexval("subsystem_vendor"),
            subsystem_device=hexval("subsystem_device"),
            class_code=hexval("class"),
            revision=hexval("revision"),
        )

    def noiommu_group(self, group: int) -> bool:
        name = self.sysfs / "kernel" / "iommu_groups" / str(int(group)) / "name"
        try:
            return name.read_text().strip() == "vfio-noiommu"
        except OSError:
            return False

    def device_cdev(self, bdf: str) -> str | None:
        base = self._pci(bdf) / "vfio-dev"
        try:
            names = sorted(p.name for p in base.iterdir())
        except FileNotFoundError:
            return None
        return names[0] if names else None
