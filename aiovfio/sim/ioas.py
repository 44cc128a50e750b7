"""The simulated iommufd IO address space (IOAS): mappings, ranges, translation.

As drivers/iommu/iommufd/io_pagetable.c: an IOAS holds areas (IOVA ->
process virtual address, READABLE/WRITEABLE) independently of any device;
mapping before a device is attached is allowed, and an attached device's
DMA is translated through it. The allowed IOVA ranges are everything until a
device is attached; then the IOMMU domain's aperture minus its reserved
regions (the x86 MSI window) apply, and later maps must avoid them. A map at
a fixed IOVA must be aligned and must not overlap; without FIXED_IOVA the
IOAS picks the lowest free aligned range. An unmap must cover whole areas
(ENOENT otherwise, and when nothing is there). Pinned bytes are charged to
the process's memlock account, as iommufd's default accounting does.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from attrs import define, field

from .._uapi.iommufd import IoasMapFlag
from . import rules
from .iommu import (
    DmaMapping,
    MemlockAccount,
    ProcessMemory,
    TranslationFault,
    borrow_view,
    next_generation,
)

__all__ = ["Ioas", "U64"]

U64 = (1 << 64) - 1


@define(eq=False)
class Ioas:
    """One IOAS object of an iommufd context."""

    id: int
    page_size: int
    #: the attached domain's usable ranges (inclusive), once a device is attached
    domain_ranges: Sequence[tuple[int, int]]
    memlock: MemlockAccount = field(repr=False)
    memory: ProcessMemory = field(repr=False)
    mappings: list[DmaMapping] = field(factory=list)
    #: names of the devices attached to it
    devices: list[str] = field(factory=list)
    #: the mappings' IOVAs, sorted as `mappings` is (for bisect)
    _starts: list[int] = field(factory=list, repr=False)
    #: as `Type1Iommu.generation`: changes with every mapping added, removed or dropped
    generation: int = field(factory=next_generation, init=False, repr=False)

    def label(self) -> str:
        return f"IOAS {self.id}"

    # --- IOMMU_IOAS_IOVA_RANGES ------------------------------------------------------------

    def ranges(self) -> list[tuple[int, int]]:
        """The allowed IOVA ranges: all of them until a device is attached."""
        return list(self.domain_ranges) if self.devices else [(0, U64)]

    def can_attach(self) -> str | None:
        """Why a device cannot be attached now (a mapping in its reserved ranges), or None."""
        for m in self.mappings:
            if not _inside(self.domain_ranges, m.iova, m.end - 1):
                return f"{m} lies in a range the device's IOMMU domain reserves"
        return None

    # --- IOMMU_IOAS_MAP --------------------------------------------------------------------

    def map(self, flags: int, user_va: int, length: int, iova: int) -> int:
        """iopt_map_user_pages; returns the IOVA (picked here without FIXED_IOVA)."""
        read = bool(flags & IoasMapFlag.READABLE)
        write = bool(flags & IoasMapFlag.WRITEABLE)
        if not (read or write):
            raise rules.IOAS_MAP_NO_PERMISSION.error(f"flags {flags:#x}")
        if length >= U64 or iova >= U64:
            raise rules.IOAS_MAP_OVERFLOW.error(f"iova {iova:#x}, length {length:#x}")
        mask = self.page_size - 1
        if not length or (length | user_va) & mask:
            raise rules.IOAS_MAP_UNALIGNED.error(
                f"user_va {user_va:#x}, length {length:#x}; alignment {self.page_size:#x}"
            )
        if flags & IoasMapFlag.FIXED_IOVA:
            if iova & mask:
                raise rules.IOAS_MAP_UNALIGNED.error(
                    f"iova {iova:#x}; alignment {self.page_size:#x}"
                )
            last = iova + length - 1
            if last > U64:
                raise rules.IOAS_MAP_OVERFLOW.error(f"iova {iova:#x}, length {length:#x}")
            if not _inside(self.ranges(), iova, last):
                shown = ", ".join(f"[{lo:#x}, {hi:#x}]" for lo, hi in self.ranges())
                raise rules.IOAS_MAP_RESERVED.error(f"IOVA {iova:#x}..{last:#x}; allowed {shown}")
            overlap = self._overlapping(iova, length)
            if overlap:
                raise rules.IOAS_MAP_OVERLAP.error(
                    f"IOVA {iova:#x}+{length:#x} overlaps {overlap[0]}"
                )
        else:
            iova = self._pick(length, user_va)
        problem = ProcessMemory.check_access(user_va, length, write=write)
        if problem is not None:
            raise rules.IOAS_MAP_BAD_VADDR.error(f"user_va {user_va:#x}+{length:#x}: {problem}")
        limit = self.memlock.limit
        if limit is not None and self.memlock.locked + length > limit:
            raise rules.IOAS_MAP_MEMLOCK.error(
                f"{self.memlock.locked:#x} bytes pinned, {length:#x} more, limit {limit:#x}"
            )
        self.memlock.locked += length
        m = DmaMapping(iova, length, user_va, read, write, view=borrow_view(user_va, length))
        i = bisect.bisect_right(self._starts, iova)
        self.mappings.insert(i, m)
        self._starts.insert(i, iova)
        self.generation = next_generation()
        return iova

    def _pick(self, length: int, user_va: int) -> int:
        """iopt_alloc_iova: the lowest free range aligned as the length (at most the VA's)."""
        align = max(self.page_size, 1 << (length - 1).bit_length())
        if user_va:
            align = max(self.page_size, min(align, user_va & -user_va))
        for lo, hi in self.ranges():
            cand = _round_up(lo, align)
            for m in self.mappings:
                if m.end <= cand:
                    continue
                if m.iova >= cand + length:
                    break
                cand = _round_up(m.end, align)
            if cand + length - 1 <= hi:
                return cand
        raise rules.IOAS_MAP_NO_SPACE.error(f"{length:#x} bytes aligned to {align:#x}")

    # --- IOMMU_IOAS_UNMAP ------------------------------------------------------------------

    def unmap(self, iova: int, length: int) -> int:
        """iopt_unmap_iova / iopt_unmap_all; returns the bytes unmapped."""
        if iova == 0 and length == U64:
            targets = list(self.mappings)
        else:
            if not length:
                raise rules.IOAS_UNMAP_EMPTY.error(f"iova {iova:#x}")
            last = iova + length - 1
            targets = [m for m in self.mappings if m.iova <= last and iova < m.end]
            for m in targets:
                if m.iova < iova or m.end - 1 > last:
                    raise rules.IOAS_UNMAP_SPLITS.error(f"{iova:#x}+{length:#x} cuts {m}")
        if not targets:
            raise rules.IOAS_UNMAP_NOTHING.error(f"IOVA {iova:#x}+{length:#x} in {self.label()}")
        for m in targets:
            self._remove(m)
        return sum(m.size for m in targets)

    def _remove(self, m: DmaMapping) -> None:
        i = self.mappings.index(m)
        del self.mappings[i], self._starts[i]
        self.memlock.locked -= m.size
        self.generation = next_generation()

    def drop_view(self, m: DmaMapping) -> None:
        """Forget `m`'s lent view (released by its lender): device accesses copy now."""
        m.view = None
        self.generation = next_generation()

    def release(self) -> None:
        """The IOAS is destroyed (or its iommufd closed): every area goes."""
        for m in list(self.mappings):
            self._remove(m)

    # --- device DMA --------------------------------------------------------------------------

    def _overlapping(self, start: int, size: int) -> list[DmaMapping]:
        end = start + size
        return [m for m in self.mappings if m.iova < end and start < m.end]

    def lookup(self, iova: int) -> DmaMapping | None:
        """The mapping holding `iova`: a binary search of the sorted starts (O(log n))."""
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0:
            m = self.mappings[i]
            if iova < m.end:
                return m
        return None

    def zero_spans(self, iova: int, size: int) -> list[tuple[int, int]]:
        """None: iommufd pins as the kernels that unshare the zero page (see Type1Iommu)."""
        return []

    def translate(self, iova: int, size: int, *, write: bool) -> list[tuple[int, int]]:
        """(vaddr, length) segments for a device access, or TranslationFault."""
        segments: list[tuple[int, int]] = []
        pos, end = iova, iova + size
        while pos < end:
            m = self.lookup(pos)
            if m is None:
                raise TranslationFault(pos, f"IOVA {pos:#x} is not mapped in {self.label()}")
            if write and not m.write:
                raise TranslationFault(pos, f"IOVA {pos:#x} is mapped without WRITEABLE ({m})")
            if not write and not m.read:
                raise TranslationFault(pos, f"IOVA {pos:#x} is mapped without READABLE ({m})")
            n = min(end, m.end) - pos
            segments.append((m.vaddr + (pos - m.iova), n))
            pos += n
        return segments


def _inside(ranges: Sequence[tuple[int, int]], first: int, last: int) -> bool:
    return any(lo <= first and last <= hi for lo, hi in ranges)


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align
