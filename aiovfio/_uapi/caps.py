"""Capability chains: walking and decoding, with bounds checks.

VFIO's info ioctls (device, region, IOMMU) may append a chain of capabilities
after the fixed structure: each starts with a `vfio_info_cap_header` whose
`next` is the offset of the following one from the start of the buffer, 0 at
the end. A chain from a buggy kernel or a broken model must end cleanly: a
loop, an offset past the buffer or a truncated header raises
`CapabilityChainError`, never an endless loop or an IndexError.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Iterator

from attrs import frozen

from ..errors import CapabilityChainError, InvalidArgument
from .vfio import (
    vfio_info_cap_header,
    vfio_iommu_type1_info_cap_iova_range,
    vfio_iommu_type1_info_dma_avail,
    vfio_iova_range,
    vfio_region_info_cap_sparse_mmap,
    vfio_region_info_cap_type,
    vfio_region_sparse_mmap_area,
)

__all__ = [
    "MAX_CAPABILITIES",
    "Capability",
    "dma_avail",
    "iova_ranges",
    "region_type",
    "sparse_mmap_areas",
    "walk",
]

#: A chain longer than this is treated as corrupt.
MAX_CAPABILITIES = 64

_HEADER = ctypes.sizeof(vfio_info_cap_header)


@frozen
class Capability:
    """One capability: its id, version, and bytes from its header to its end."""

    id: int
    version: int
    offset: int
    data: bytes


def walk(buf: bytes | bytearray | memoryview, first: int, *, start: int) -> list[Capability]:
    """Return the capabilities of `buf`, the chain starting at offset `first`.

    `start` is the size of the fixed structure: a capability may not begin
    before it. `first == 0` means no chain. A malformed chain (a loop, an
    offset out of the buffer or inside the fixed structure, an unaligned or
    truncated header, two capabilities overlapping) raises
    `CapabilityChainError`.
    """
    if start < 0:
        raise InvalidArgument(f"fixed structure size {start} is negative")
    data = bytes(buf)
    return list(_iter(data, first, start))


def _iter(data: bytes, first: int, start: int) -> Iterator[Capability]:
    size = len(data)
    seen: set[int] = set()
    offsets: list[int] = []
    off = first
    while off:
        if off in seen:
            raise CapabilityChainError(f"capability chain loops back to offset {off:#x}")
        if len(seen) >= MAX_CAPABILITIES:
            raise CapabilityChainError(f"capability chain longer than {MAX_CAPABILITIES}")
        if off < 0:
            raise CapabilityChainError(f"capability offset {off} is negative")
        if off < start:
            raise CapabilityChainError(
                f"capability at offset {off:#x} overlaps the {start}-byte info structure"
            )
        if off % 4:
            raise CapabilityChainError(f"capability at offset {off:#x} is not 4-byte aligned")
        if off >= size:
            raise CapabilityChainError(
                f"capability offset {off:#x} is past the end of the {size:#x}-byte buffer"
            )
        if off + _HEADER > size:
            raise CapabilityChainError(
                f"capability header at {off:#x} is truncated: the buffer ends at {size:#x}"
            )
        seen.add(off)
        offsets.append(off)
        header = vfio_info_cap_header.from_buffer_copy(data, off)
        off = header.next
    # A capability extends to the next one in memory, or to the buffer's end.
    ordered = sorted(offsets)
    for low, high in itertools.pairwise(ordered):
        if high - low < _HEADER:
            raise CapabilityChainError(f"capabilities at offsets {low:#x} and {high:#x} overlap")
    for off in offsets:
        header = vfio_info_cap_header.from_buffer_copy(data, off)
        later = [o for o in ordered if o > off]
        end = later[0] if later else size
        yield Capability(header.id, header.version, off, data[off:end])


def _need(cap: Capability, size: int, what: str) -> None:
    if len(cap.data) < size:
        raise CapabilityChainError(
            f"{what} capability at {cap.offset:#x} is truncated: "
            f"{len(cap.data)} bytes, needs {size}"
        )


def sparse_mmap_areas(cap: Capability) -> list[tuple[int, int]]:
    """Decode a SPARSE_MMAP capability into (offset, size) pairs."""
    head = ctypes.sizeof(vfio_region_info_cap_sparse_mmap)
    _need(cap, head, "sparse mmap")
    hdr = vfio_region_info_cap_sparse_mmap.from_buffer_copy(cap.data)
    item = ctypes.sizeof(vfio_region_sparse_mmap_area)
    _need(cap, head + hdr.nr_areas * item, "sparse mmap")
    areas = []
    for i in range(hdr.nr_areas):
        a = vfio_region_sparse_mmap_area.from_buffer_copy(cap.data, head + i * item)
        areas.append((a.offset, a.size))
    return areas


def region_type(cap: Capability) -> tuple[int, int]:
    """Decode a region TYPE capability into (type, subtype)."""
    _need(cap, ctypes.sizeof(vfio_region_info_cap_type), "region type")
    t = vfio_region_info_cap_type.from_buffer_copy(cap.data)
    return (t.type, t.subtype)


def iova_ranges(cap: Capability) -> list[tuple[int, int]]:
    """Decode an IOMMU IOVA_RANGE capability into inclusive (start, end) pairs."""
    head = ctypes.sizeof(vfio_iommu_type1_info_cap_iova_range)
    _need(cap, head, "IOVA range")
    hdr = vfio_iommu_type1_info_cap_iova_range.from_buffer_copy(cap.data)
    item = ctypes.sizeof(vfio_iova_range)
    _need(cap, head + hdr.nr_iovas * item, "IOVA range")
    out = []
    for i in range(hdr.nr_iovas):
        r = vfio_iova_range.from_buffer_copy(cap.data, head + i * item)
        out.append((r.start, r.end))
    return out


def dma_avail(cap: Capability) -> int:
    """Decode an IOMMU DMA_AVAIL capability: how many more mappings may be made."""
    _need(cap, ctypes.sizeof(vfio_iommu_type1_info_dma_avail), "DMA available")
    return int(vfio_iommu_type1_info_dma_avail.from_buffer_copy(cap.data).avail)
