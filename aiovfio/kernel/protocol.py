"""The Kernel boundary: every syscall aiovfio makes, as one typed Protocol.

Two implementations: `aiovfio.kernel.linux.LinuxKernel` (real syscalls) and
`aiovfio.sim.Machine().kernel` (the simulated machine). The public objects talk
to a `Kernel` and never know which one.

Conventions, identical in both implementations:

* One method per operation, never a raw `ioctl(fd, nr, buf)`.
* Fixed-size ioctl arguments are the `_uapi` ctypes structures; the kernel
  reads them and may write results back into them.
* Variable-length arguments (info with capability chains, IRQ sets with an
  eventfd array, hot reset) are a `bytearray` that starts with the fixed
  structure (argsz included); the kernel writes results back into it.
* Failures are `OSError` with the kernel's errno. Mapping to `VfioError`
  subclasses with context is the public layer's job (`errors.from_oserror`).
* File descriptors are real: `close` closes them, `eventfd` makes a real,
  non-blocking, close-on-exec eventfd.
"""

from __future__ import annotations

import mmap
from typing import Protocol, runtime_checkable

from attrs import frozen

from .._uapi import iommufd as iommufd_uapi
from .._uapi import vfio as uapi

__all__ = ["Kernel", "PciIds"]


@frozen
class PciIds:
    """The identity of a PCI function, as sysfs tells it."""

    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    class_code: int  # 24 bits: base class, sub class, prog-if
    revision: int

    def __str__(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"


@runtime_checkable
class Kernel(Protocol):
    """What aiovfio needs from an operating-system kernel."""

    #: "linux" or "sim", for logs and reprs.
    name: str

    # --- files ---------------------------------------------------------------
    def vfio_available(self) -> bool:
        """Whether the legacy VFIO container device exists."""
        ...

    def open_container(self) -> int:
        """Open `/dev/vfio/vfio`."""
        ...

    def open_group(self, group: int) -> int:
        """Open `/dev/vfio/<group>`."""
        ...

    def open_noiommu_group(self, group: int) -> int:
        """Open `/dev/vfio/noiommu-<group>` (VFIO's unsafe no-IOMMU mode)."""
        ...

    def close(self, fd: int) -> None:
        """Close any fd this kernel handed out (container, group, device, eventfd)."""
        ...

    # --- container (type1) ---------------------------------------------------
    def get_api_version(self, container: int) -> int: ...

    def check_extension(self, container: int, extension: int) -> int: ...

    def set_iommu(self, container: int, iommu_type: int) -> None: ...

    def iommu_get_info(self, container: int, info: bytearray) -> None:
        """VFIO_IOMMU_GET_INFO; `info` starts with vfio_iommu_type1_info."""
        ...

    def map_dma(self, container: int, arg: uapi.vfio_iommu_type1_dma_map) -> None: ...

    def unmap_dma(self, container: int, arg: uapi.vfio_iommu_type1_dma_unmap) -> None:
        """VFIO_IOMMU_UNMAP_DMA; the kernel writes the size it unmapped to `arg.size`."""
        ...

    # --- group ---------------------------------------------------------------
    def group_get_status(self, group_fd: int, arg: uapi.vfio_group_status) -> None: ...

    def group_set_container(self, group_fd: int, container: int) -> None: ...

    def group_unset_container(self, group_fd: int) -> None: ...

    def group_get_device_fd(self, group_fd: int, name: str) -> int: ...

    # --- device --------------------------------------------------------------
    def device_get_info(self, device: int, info: bytearray) -> None:
        """VFIO_DEVICE_GET_INFO; `info` starts with vfio_device_info."""
        ...

    def device_get_region_info(self, device: int, info: bytearray) -> None:
        """VFIO_DEVICE_GET_REGION_INFO; `info` starts with vfio_region_info."""
        ...

    def device_get_irq_info(self, device: int, arg: uapi.vfio_irq_info) -> None: ...

    def device_set_irqs(self, device: int, arg: bytearray) -> None:
        """VFIO_DEVICE_SET_IRQS; `arg` is vfio_irq_set followed by its data."""
        ...

    def device_reset(self, device: int) -> None: ...

    def device_get_pci_hot_reset_info(self, device: int, info: bytearray) -> None: ...

    def device_pci_hot_reset(self, device: int, arg: bytearray) -> None: ...

    def device_feature(self, device: int, arg: bytearray) -> int:
        """VFIO_DEVICE_FEATURE; returns the ioctl's return value."""
        ...

    # --- iommufd -------------------------------------------------------------
    def iommufd_available(self) -> bool:
        """Whether `/dev/iommu` exists."""
        ...

    def open_iommufd(self) -> int: ...

    def open_device_cdev(self, cdev: str) -> int:
        """Open `/dev/vfio/devices/<cdev>` (e.g. "vfio0")."""
        ...

    def device_bind_iommufd(self, device: int, arg: uapi.vfio_device_bind_iommufd) -> None: ...

    def device_attach_iommufd_pt(
        self, device: int, arg: uapi.vfio_device_attach_iommufd_pt
    ) -> None: ...

    def device_detach_iommufd_pt(
        self, device: int, arg: uapi.vfio_device_detach_iommufd_pt
    ) -> None: ...

    def ioas_alloc(self, iommufd: int, arg: iommufd_uapi.iommu_ioas_alloc) -> None: ...

    def ioas_map(self, iommufd: int, arg: iommufd_uapi.iommu_ioas_map) -> None: ...

    def ioas_unmap(self, iommufd: int, arg: iommufd_uapi.iommu_ioas_unmap) -> None: ...

    def ioas_iova_ranges(self, iommufd: int, arg: iommufd_uapi.iommu_ioas_iova_ranges) -> None:
        """IOMMU_IOAS_IOVA_RANGES; `arg.allowed_iovas` points at caller memory."""
        ...

    def iommufd_destroy(self, iommufd: int, arg: iommufd_uapi.iommu_destroy) -> None: ...

    # --- device I/O ----------------------------------------------------------
    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """One read of exactly `size` bytes at `offset` of a device fd."""
        ...

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        """One write of all of `data` at `offset` of a device fd."""
        ...

    def mmap(self, fd: int, length: int, offset: int, *, writable: bool) -> mmap.mmap:
        """A shared mapping of `length` bytes at `offset` of a device fd."""
        ...

    # --- eventfd -------------------------------------------------------------
    def eventfd(self) -> int:
        """A new non-blocking, close-on-exec eventfd (counter mode)."""
        ...

    def eventfd_read(self, fd: int) -> int:
        """Read and reset an eventfd's count; BlockingIOError when it is zero."""
        ...

    # --- sysfs ---------------------------------------------------------------
    def pci_devices(self) -> tuple[str, ...]:
        """Every PCI address, sorted."""
        ...

    def iommu_group(self, bdf: str) -> int | None:
        """The IOMMU group number of a PCI function, None when it has none."""
        ...

    def group_devices(self, group: int) -> tuple[str, ...]:
        """The PCI addresses in an IOMMU group, sorted."""
        ...

    def driver(self, bdf: str) -> str | None:
        """The driver a PCI function is bound to, None when unbound."""
        ...

    def pci_ids(self, bdf: str) -> PciIds: ...

    def device_cdev(self, bdf: str) -> str | None:
        """The name of the device's VFIO cdev (`vfio-dev/vfioN`), None without one."""
        ...

    def noiommu_group(self, group: int) -> bool:
        """Whether IOMMU group `group` is VFIO's fake noiommu group (name "vfio-noiommu")."""
        ...

    # --- memory for DMA without an IOMMU ---------------------------------------
    def mlock(self, address: int, size: int) -> None:
        """mlock(2): keep the pages resident (their physical address stays put)."""
        ...

    def munlock(self, address: int, size: int) -> None:
        """munlock(2)."""
        ...

    def physical_pages(self, address: int, size: int) -> tuple[int, ...]:
        """The physical address of each page of the range (/proc/self/pagemap).

        0 for a page that is not present. Needs CAP_SYS_ADMIN (PermissionError
        otherwise: the kernel hides frame numbers from other users).
        """
        ...
