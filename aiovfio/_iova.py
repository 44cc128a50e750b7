"""IOVA allocation: a buddy allocator over the IOMMU's ranges, O(log n) per operation.

Only bookkeeping: it never talks to the kernel. Free space is kept as
naturally aligned power-of-two blocks, one set and one min-heap per order
(the heap answers "the lowest free block of this order" in O(log n)). An
allocation takes the smallest free block that fits below the DMA mask (the
lowest of its order, so the space stays in large blocks), splits it, and
gives back the unused tail; a release frees the range's aligned pieces and
merges buddies. Every range is aligned to
its own size rounded up to a power of two (as Linux's own IOVA allocator does
with `size_aligned`).

Ranges are inclusive (start, end) pairs as the kernel reports them.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

from . import _ki, errors

__all__ = ["IovaAllocator"]

_MAX_ORDER = 64


def _pieces(start: int, end: int) -> Iterator[tuple[int, int]]:
    """[start, end) as maximal naturally aligned power-of-two blocks: (address, order)."""
    while start < end:
        fits = (end - start).bit_length() - 1
        order = min((start & -start).bit_length() - 1, fits) if start else fits
        yield start, order
        start += 1 << order


class _Buddy:
    """Free blocks of one IOVA area (the allocatable part, or the part below the floor)."""

    __slots__ = ("_free", "_heaps")

    def __init__(self, spans: Iterable[tuple[int, int]]) -> None:
        self._free: list[set[int]] = [set() for _ in range(_MAX_ORDER + 1)]
        self._heaps: list[list[int]] = [[] for _ in range(_MAX_ORDER + 1)]
        for start, end in spans:
            for address, order in _pieces(start, end):
                self._add(address, order)

    def _add(self, address: int, order: int) -> None:
        self._free[order].add(address)
        heap = self._heaps[order]
        heapq.heappush(heap, address)
        if len(heap) > 2 * len(self._free[order]) + 64:  # drop stale entries, amortised
            self._heaps[order] = sorted(self._free[order])

    def free(self, address: int, order: int) -> None:
        """Give a block back, merging it with its buddy while that is free."""
        while order < _MAX_ORDER:
            buddy = address ^ (1 << order)
            if buddy not in self._free[order]:
                break
            self._free[order].discard(buddy)  # its heap entry goes stale
            address &= ~(1 << order)
            order += 1
        self._add(address, order)

    def lowest(self, order: int) -> int | None:
        """The lowest free block of exactly `order`, None when there is none."""
        free = self._free[order]
        if not free:
            return None
        heap = self._heaps[order]
        while heap[0] not in free:
            heapq.heappop(heap)
        return heap[0]

    def take(self, address: int, order: int) -> None:
        self._free[order].discard(address)

    def container(self, address: int, order: int) -> tuple[int, int] | None:
        """The free block that holds the aligned block (address, order), if any."""
        for k in range(order, _MAX_ORDER + 1):
            block = address & ~((1 << k) - 1)
            if block in self._free[k]:
                return block, k
        return None

    def carve(self, address: int, order: int) -> None:
        """Take the aligned block (address, order) out of the free block holding it."""
        found = self.container(address, order)
        assert found is not None
        block, k = found
        self.take(block, k)
        while k > order:
            k -= 1
            half = block + (1 << k)
            if address >= half:
                self._add(block, k)
                block = half
            else:
                self._add(half, k)


class IovaAllocator:
    """IOVA allocation within the IOMMU's ranges and a device's DMA mask.

    `allocate` hands out an aligned range from the smallest free block that fits, never below
    `floor` (many devices read address 0 as "no buffer"); `reserve` claims a
    caller-chosen range (anywhere in the ranges); `release` gives either back.
    Each is O(log n) in the number of live ranges.
    """

    def __init__(
        self, ranges: tuple[tuple[int, int], ...], page_size: int, *, floor: int = 0x10000
    ) -> None:
        self.ranges = ranges
        self.page_size = page_size
        self.floor = floor
        spans = [(s, e + 1) for s, e in ranges]
        self._high = _Buddy((max(s, floor), e) for s, e in spans if e > floor)
        self._low = _Buddy((s, min(e, floor)) for s, e in spans if s < floor)
        #: live ranges: start -> size
        self._used: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"<IovaAllocator page={self.page_size:#x} live={len(self._used)}>"

    def __len__(self) -> int:
        return len(self._used)

    @property
    def used(self) -> tuple[tuple[int, int], ...]:
        """The live (start, end_exclusive) ranges, sorted."""
        return tuple(sorted((s, s + n) for s, n in self._used.items()))

    def _round(self, size: int) -> int:
        page = self.page_size
        return (size + page - 1) // page * page

    def allocate(self, size: int, *, limit: int | None = None, align: int | None = None) -> int:
        """Reserve `size` bytes ending at or below `limit` (a DMA mask); return the IOVA."""
        size = self._round(size)
        need = max(size, align or 1, self.page_size)
        order = (need - 1).bit_length()
        # The smallest order with a block that fits below the limit (a buddy
        # allocator's best fit); within an order, the lowest address.
        best: tuple[int, int] | None = None
        for k in range(order, _MAX_ORDER + 1):
            address = self._high.lowest(k)
            if address is not None and (limit is None or address + size - 1 <= limit):
                best = (address, k)
                break
        if best is None:
            where = f"below {limit:#x}" if limit is not None else "in the IOMMU's IOVA ranges"
            raise errors.DmaSpaceExhausted(
                f"no free IOVA range of {size:#x} bytes {where} ({len(self._used)} mappings "
                f"live); unmap something, or raise the device's DMA mask"
            )
        address, k = best
        self._high.take(address, k)
        while k > order:  # split: the upper halves go back
            k -= 1
            self._high.free(address + (1 << k), k)
        for piece, piece_order in _pieces(address + size, address + (1 << order)):
            self._high.free(piece, piece_order)  # the unused tail goes back
        self._used[address] = size
        return address

    def reserve(self, iova: int, size: int, *, limit: int | None = None) -> None:
        """Claim a caller-chosen IOVA range, refusing overlaps and out-of-range IOVAs."""
        size = self._round(size)
        last = iova + size - 1
        if iova % self.page_size:
            raise errors.AlignmentError(
                f"IOVA {iova:#x} is not aligned to the IOMMU page size {self.page_size:#x}"
            )
        if limit is not None and last > limit:
            raise errors.InvalidArgument(
                f"IOVA range {iova:#x}-{last:#x} exceeds the DMA mask {limit:#x}"
            )
        if not any(start <= iova and last <= end for start, end in self.ranges):
            shown = ", ".join(f"{s:#x}-{e:#x}" for s, e in self.ranges)
            raise errors.InvalidArgument(
                f"IOVA range {iova:#x}-{last:#x} is outside the IOMMU's IOVA ranges ({shown})"
            )
        pieces = list(self._split(iova, iova + size))
        for area, address, order in pieces:
            if area.container(address, order) is None:
                s, e = self._overlapping(iova, iova + size)
                raise errors.InvalidArgument(
                    f"IOVA range {iova:#x}-{last:#x} overlaps the mapping at "
                    f"{s:#x}-{e - 1:#x}; pick another IOVA or let aiovfio choose"
                )
        for area, address, order in pieces:
            area.carve(address, order)
        self._used[iova] = size

    def release(self, iova: int, size: int) -> None:
        """Give back a range handed out by `allocate` or `reserve`."""
        size = self._round(size)
        if self._used.get(iova) != size:
            raise errors.UsageError(f"IOVA range {iova:#x}+{size:#x} is not allocated")
        del self._used[iova]
        for area, address, order in self._split(iova, iova + size):
            area.free(address, order)

    def _split(self, start: int, end: int) -> Iterator[tuple[_Buddy, int, int]]:
        floor = self.floor
        if start < floor:
            for address, order in _pieces(start, min(end, floor)):
                yield self._low, address, order
        if end > floor:
            for address, order in _pieces(max(start, floor), end):
                yield self._high, address, order

    def _overlapping(self, start: int, end: int) -> tuple[int, int]:
        """The first live range that overlaps [start, end) (the error path only: O(n))."""
        for s, e in self.used:
            if s < end and start < e:
                return s, e
        return start, end


_ki.protect_module(__name__)
