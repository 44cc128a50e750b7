"""What `aiovfio info` learns by opening a device through VFIO (the public API)."""

from __future__ import annotations

from typing import Any

import anyio

from .._uapi import vfio as uapi
from ..errors import InvalidRequest, NotOffered
from ..kernel import Kernel

__all__ = ["collect", "from_vfio"]

_REGION_NAMES = {6: "ROM", 7: "CONFIG", 8: "VGA"}


def _region_name(index: int) -> str:
    return f"BAR{index}" if 0 <= index <= 5 else _REGION_NAMES.get(index, f"region {index}")


def _flag_names(flags: Any, enum_type: Any) -> list[str]:
    return [f.name.lower() for f in enum_type if f & flags and f.name]


async def collect(address: str, kernel: Kernel | None = None) -> dict[str, Any]:
    """Open the device, read its regions, IRQs and capabilities, and close it."""
    from .. import open_device

    async with open_device(address, kernel=kernel) as dev:
        info = dev.info
        regions = []
        for r in dev.regions:
            flags = _flag_names(r.flags, uapi.RegionFlag)
            if r.msix_mappable:
                flags.append("msix-mappable")
            regions.append(
                {
                    "index": r.index,
                    "name": _region_name(r.index),
                    "size": r.size,
                    "offset": r.offset,
                    "flags": flags,
                    "mmap_areas": [{"offset": o, "size": s} for o, s in r.mmap_areas],
                }
            )
        irqs = []
        for index in range(info.num_irqs):
            try:
                irq = dev.irq_info(index)
            except (InvalidRequest, NotOffered):
                continue  # vfio-pci refuses ERR on conventional PCI, REQ without support
            irqs.append(
                {
                    "index": index,
                    "name": irq.kind,
                    "count": irq.count,
                    "flags": _flag_names(irq.flags, uapi.IrqInfoFlag),
                }
            )
        config = dev.config
        caps = [
            {"id": c.id, "name": c.name, "offset": c.offset, "extended": c.extended}
            for c in (*config.capabilities(), *config.extended_capabilities())
        ]
        return {
            "device_flags": " ".join(_flag_names(info.flags, uapi.DeviceFlag)),
            "regions": regions,
            "irqs": irqs,
            "capabilities": caps,
        }


def from_vfio(address: str, kernel: Kernel | None = None) -> dict[str, Any]:
    """`collect` from synchronous code (the CLI)."""
    result: dict[str, Any] = anyio.run(collect, address, kernel)
    return result
