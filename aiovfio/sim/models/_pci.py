"""Helpers the models share: finding their own capabilities in config space.

The machine lays out the capabilities a model returns from `capabilities()`
and owns the MSI / MSI-X enable bits (vfio-pci sets them on
VFIO_DEVICE_SET_IRQS). A device reads those bits when it raises an interrupt,
as QEMU's `msi_enabled()` / `msix_enabled()` do; this module finds the
capability by walking the list through `DeviceContext.config_read`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from attrs import Attribute, define, field

from ..._uapi.pci import CAP_LIST_OFFSET, CONFIG_SPACE_SIZE, CapId, MsiCtrl, MsixCtrl
from ..._uapi.vfio import IrqInfoFlag, PciIrq
from ...errors import InvalidArgument
from ..model import DeviceContext, IrqSpec

__all__ = [
    "MSG_CTRL_OFFSET",
    "CapabilityFinder",
    "all_ones",
    "check_range",
    "to_version",
    "vfio_pci_irqs",
]

#: Offset of the Message Control word inside an MSI or MSI-X capability.
MSG_CTRL_OFFSET = 2
#: Capability pointers are dword aligned; the low two bits are reserved.
_CAP_POINTER_MASK = 0xFC
#: The Enable bits as plain ints (an IntFlag `&` is a Python-level call, made per interrupt).
_MSI_ENABLE, _MSIX_ENABLE = int(MsiCtrl.ENABLE), int(MsixCtrl.ENABLE)
#: the members themselves, as module names (an `Enum.MEMBER` lookup is ~200 ns in 3.11)
_CAP_MSI, _CAP_MSIX = CapId.MSI, CapId.MSIX
#: The list cannot hold more entries than there are dwords after the header.
_MAX_CAPS = (CONFIG_SPACE_SIZE - 0x40) // 4


def all_ones(size: int) -> int:
    """The value a read of `size` bytes returns when nothing answers it."""
    return (1 << (8 * size)) - 1


@define(eq=False)
class CapabilityFinder:
    """Finds (and caches) capability offsets in one device's config space."""

    _found: dict[int, int | None] = field(factory=dict, init=False, repr=False)

    def offset(self, ctx: DeviceContext, cap_id: int) -> int | None:
        """The config offset of capability `cap_id`, or None if absent."""
        found = self._found.get(cap_id)
        if found is None:
            # Absence is not cached: the layout is the machine's, not ours.
            found = self._found[cap_id] = self._walk(ctx, cap_id)
        return found

    @staticmethod
    def _walk(ctx: DeviceContext, cap_id: int) -> int | None:
        pointer = ctx.config_read(CAP_LIST_OFFSET, 1) & _CAP_POINTER_MASK
        for _ in range(_MAX_CAPS):
            if pointer == 0:
                return None
            if ctx.config_read(pointer, 1) == cap_id:
                return pointer
            pointer = ctx.config_read(pointer + 1, 1) & _CAP_POINTER_MASK
        return None  # a looping list: treat as absent

    def msi_enabled(self, ctx: DeviceContext) -> bool:
        """MSI Enable in the device's MSI capability (False without one)."""
        cap = self.offset(ctx, _CAP_MSI)
        if cap is None:
            return False
        return bool(ctx.config_read(cap + MSG_CTRL_OFFSET, 2) & _MSI_ENABLE)

    def msix_enabled(self, ctx: DeviceContext) -> bool:
        """MSI-X Enable in the device's MSI-X capability (False without one)."""
        cap = self.offset(ctx, _CAP_MSIX)
        if cap is None:
            return False
        return bool(ctx.config_read(cap + MSG_CTRL_OFFSET, 2) & _MSIX_ENABLE)


def vfio_pci_irqs(*, intx: bool, msi: int, msix: int, pcie: bool) -> tuple[IrqSpec, ...]:
    """The IRQ indexes vfio-pci reports for a device with these interrupts.

    Mirrors VFIO_DEVICE_GET_IRQ_INFO in vfio-pci: INTx is maskable and
    auto-masked; every other index is NORESIZE (kernels before dynamic MSI-X
    allocation, 6.5, say so for MSI-X too); ERR exists only on PCI Express;
    REQ always has one vector.
    """
    fixed = IrqInfoFlag.EVENTFD | IrqInfoFlag.NORESIZE
    specs = [
        IrqSpec(
            PciIrq.INTX,
            1 if intx else 0,
            IrqInfoFlag.EVENTFD | IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED,
        ),
        IrqSpec(PciIrq.MSI, msi, fixed),
        IrqSpec(PciIrq.MSIX, msix, fixed),
    ]
    if pcie:
        specs.append(IrqSpec(PciIrq.ERR, 1, fixed))
    specs.append(IrqSpec(PciIrq.REQ, 1, fixed))
    return tuple(specs)


def check_range(
    low: int | float, high: int | float
) -> Callable[[object, Attribute[Any], Any], None]:
    """An attrs validator: `low <= value <= high`, else `InvalidArgument`."""

    def check(instance: object, attribute: Attribute[Any], value: Any) -> None:
        if not low <= value <= high:
            raise InvalidArgument(
                f"{type(instance).__name__}: {attribute.name} must be in "
                f"[{low}, {high}], not {value!r}"
            )

    return check


def to_version(value: Iterable[int]) -> tuple[int, ...]:
    """An attrs converter: a QEMU version as a comparable tuple, e.g. (7, 2) or (8, 2, 1)."""
    version = tuple(value)
    if not version or not all(isinstance(part, int) and part >= 0 for part in version):
        raise InvalidArgument(f"qemu_version must be like (7, 2) or (8, 2, 1), not {value!r}")
    return version
