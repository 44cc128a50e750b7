"""The contract between the simulated machine and its device models.

A device model (edu, nvme, or a user's own) describes its regions and IRQs
with value objects and answers trapped register accesses synchronously at the
exact width the driver used. It reaches the rest of the machine only through
the `DeviceContext` the machine hands it when the device is added: DMA through
the IOMMU, interrupts through the eventfds the driver registered, and a clock
for work that completes after the register write that started it.

Thread safety: the machine serialises every call into a model (register
accesses from the driver's thread, scheduled callbacks from the machine's
clock) with one lock, so a model needs no locking of its own.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Protocol

from attrs import field, frozen

from .._uapi.vfio import IrqInfoFlag, RegionFlag

__all__ = [
    "RegionSpec",
    "IrqSpec",
    "DeviceContext",
    "DeviceModel",
    "IommuFault",
]


class IommuFault(Exception):
    """A device access to an IOVA that is unmapped or mapped without that permission.

    Raised into the model by `DeviceContext.dma_read` / `dma_write`; the
    machine has already counted and logged it. The model decides what the
    device does about it (edu: drops the transfer silently, as QEMU does with
    a failed `pci_dma_*`; nvme: sets CSTS.CFS or completes with an error).
    """

    def __init__(self, iova: int, size: int, write: bool, reason: str) -> None:
        self.iova = iova
        self.size = size
        self.write = write
        self.reason = reason
        kind = "write" if write else "read"
        super().__init__(f"IOMMU fault: device {kind} of {size} bytes at IOVA {iova:#x}: {reason}")


@frozen
class RegionSpec:
    """One VFIO region of a model (PCI: BAR0..5 = 0..5, ROM = 6; config is the machine's).

    `mmap_areas` are (offset, size) pairs, page aligned, that the driver may
    mmap (the sparse-mmap capability); the machine backs them with a memfd the
    model reads and writes through `DeviceContext.ram(index)`. Everything else
    in the region is trapped: each access reaches `DeviceModel.read`/`write`.
    """

    index: int
    size: int
    flags: RegionFlag = RegionFlag.READ | RegionFlag.WRITE
    mmap_areas: tuple[tuple[int, int], ...] = ()
    #: PCI BAR attributes for the config-space BAR registers
    is_64bit: bool = False
    prefetchable: bool = False


@frozen
class IrqSpec:
    """One VFIO IRQ index of a model (PCI: INTx 0, MSI 1, MSI-X 2, ERR 3, REQ 4)."""

    index: int
    count: int
    flags: IrqInfoFlag = field(default=IrqInfoFlag.EVENTFD)


class DeviceContext(Protocol):
    """What the machine offers a model. Given to `DeviceModel.attach`."""

    #: The device's PCI address.
    name: str

    def dma_read(self, iova: int, size: int) -> bytes:
        """Read process memory through the IOMMU; `IommuFault` if not allowed."""
        ...

    def dma_write(self, iova: int, data: bytes) -> None:
        """Write process memory through the IOMMU; `IommuFault` if not allowed.

        A fault anywhere in the range writes nothing.
        """
        ...

    def dma_view(self, iova: int, size: int, write: bool = False) -> tuple[memoryview, int] | None:
        """Direct access to process memory for a range the device reaches without a fault.

        `(view, offset)`: bytes `offset .. offset + size` of `view` are the
        `size` bytes at `iova`, readable (or, with `write`, writable) by the
        device as `dma_read`/`dma_write` would copy them, live (a write by
        the process or the device is seen by the next access). `view` is the
        whole mapping that holds the range, so every range of it is reached
        the same way, at `iova - offset + k` for byte k. Valid until the
        register access or clock callback that asked returns; nothing else
        may keep it. None when there is no such view (a fault, memory nobody
        lent, outside device work): nothing is recorded, so a model that then
        goes entry by entry through `dma_read`/`dma_write` gets exactly the
        faults it would have had. An access through the view raises
        ValueError if its owner released the memory meanwhile: fall back the
        same way. For batched ring accesses (a controller prefetching
        commands, posting completions).

        A model may keep a view past that, for later device work, while
        `dma_epoch()` returns the number it returned when the view was given.
        """
        ...

    def dma_epoch(self) -> int | None:
        """A number that stays the same while every view `dma_view` gave stays valid.

        It changes when a mapping of the device's IOMMU is added or removed, a
        lent view is dropped, or the device moves to another IOMMU; None while
        the device cannot DMA through a view at all (Bus Master off, no IOMMU,
        noiommu, outside device work). A model caches its rings' views under
        it: one call instead of a translation per ring per callback.
        """
        ...

    def set_intx(self, asserted: bool) -> None:
        """Drive the INTx line level (INTx is level-triggered and auto-masked)."""
        ...

    def send_msi(self, vector: int) -> None:
        """Send MSI vector `vector` (dropped unless MSI is enabled by the driver)."""
        ...

    def send_msix(self, vector: int) -> None:
        """Send MSI-X vector `vector` (dropped unless enabled and unmasked)."""
        ...

    def config_read(self, offset: int, size: int) -> int:
        """Read the device's own config space (e.g. to see whether MSI is enabled)."""
        ...

    def ram(self, index: int) -> memoryview:
        """The memfd-backed bytes behind region `index`'s mmap areas (whole region)."""
        ...

    def schedule(self, delay: float, callback: Callable[[], None]) -> None:
        """Run `callback` `delay` seconds of machine time from now.

        Never inside the current register access: device work completes after
        the access that started it returns.
        """
        ...

    def log_fault(self, message: str, kind: str = "device") -> None:
        """Record a device-level error (e.g. a DMA out of the device's range).

        `kind` is "device" or "dma_mask" (an address the device's mask clamped).
        """
        ...


class DeviceModel(abc.ABC):
    """Base class of simulated PCI devices."""

    vendor_id: int
    device_id: int
    subsystem_vendor_id: int = 0x1AF4
    subsystem_id: int = 0x1100
    revision: int = 0
    class_code: int = 0xFF0000
    interrupt_pin: int = 1  # INTA
    #: whether VFIO_DEVICE_RESET is offered (the device flags say RESET)
    supports_reset: bool = False

    @abc.abstractmethod
    def regions(self) -> Sequence[RegionSpec]:
        """The device's BARs (and ROM), in index order; absent BARs are omitted."""

    @abc.abstractmethod
    def irqs(self) -> Sequence[IrqSpec]:
        """The device's IRQ indexes (absent ones are reported with count 0)."""

    @abc.abstractmethod
    def capabilities(self) -> Sequence[tuple[int, bytes]]:
        """PCI capabilities for config space: (cap id, body after the 2-byte header).

        The machine lays them out, links the list, and owns the MSI/MSI-X
        enable bits (set by VFIO_DEVICE_SET_IRQS as vfio-pci does).
        """

    @abc.abstractmethod
    def attach(self, ctx: DeviceContext) -> None:
        """Called once when the device is added to a machine."""

    @abc.abstractmethod
    def read(self, region: int, offset: int, size: int) -> int:
        """A trapped read of `size` (1, 2, 4 or 8) bytes; returns the value."""

    @abc.abstractmethod
    def write(self, region: int, offset: int, size: int, value: int) -> None:
        """A trapped write of `size` (1, 2, 4 or 8) bytes."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """Function-level reset (only called when `supports_reset`)."""
