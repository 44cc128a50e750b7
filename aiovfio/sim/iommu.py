"""The simulated type1 IOMMU: DMA mappings, and device accesses translated through them.

`Type1Iommu` is the `vfio_iommu` a container gets from VFIO_SET_IOMMU: its
mappings (IOVA -> process virtual address, with READ/WRITE permission from
the device's point of view), the `dma_entry_limit` budget, the IOVA ranges
and page sizes it reports, and the map/unmap rules of vfio_iommu_type1.c.

Device DMA goes through `translate`: every byte of the access must be
mapped with the permission (READ for a device read, WRITE for a device
write), or the access is an IOMMU fault and nothing is copied. The bytes are
then copied one of two ways, and neither can crash the process:

* through the mapping's `view`, without a syscall, when the map call's
  caller lent a memoryview of exactly that memory (`aiovfio.kernel.lent`:
  the public layer lends a DmaMapping's pin and a DmaBuffer's view). This is
  safe for as long as the view is not released: the buffer protocol keeps
  the memory behind an unreleased memoryview allocated and mapped (an mmap
  with exports refuses to close, a bytearray to resize), and a released
  one raises ValueError on every access instead of touching memory; the
  machine then drops the view and falls back to the second way. Each copy
  is one C call made under the GIL (`Struct.unpack_from` to read, a slice
  assignment to write), so the lender cannot release the view half-way
  through a copy; on a free-threaded build the view is never used.
* through /proc/self/mem, for any other memory (a raw Kernel user's
  address): memory the process unmapped after MAP_DMA reads as zeros and
  takes no writes (on Linux the device would still reach the pinned pages),
  recorded as a device fault.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import mmap
import os
import resource
import struct
import sys
from collections.abc import Sequence

from attrs import define, field

from .._uapi.vfio import DmaMapFlag, DmaUnmapFlag
from ..kernel import lent
from . import rules

__all__ = [
    "DmaMapping",
    "MemlockAccount",
    "ProcessMemory",
    "TranslationFault",
    "Type1Iommu",
    "default_memlock_limit",
    "next_generation",
]

_U64 = (1 << 64) - 1
_CAP_IPC_LOCK = 14


@define(eq=False)
class DmaMapping:
    """One vfio_dma: `size` bytes at `iova`, backed by process memory at `vaddr`."""

    iova: int
    size: int
    vaddr: int
    read: bool
    write: bool
    vaddr_valid: bool = True
    #: the memory as a byte view lent by the map call's caller (see the module
    #: docstring), None to go through /proc/self/mem
    view: memoryview | None = field(default=None, repr=False)
    #: pages (indexes from `vaddr`, of the process's page size) pinned as the shared zero
    #: page (the 6.1 personality's read-only pin of never-written memory): the device
    #: reads zeros there whatever the process writes
    zero_pages: frozenset[int] = field(default=frozenset(), repr=False)
    #: iova + size, kept as a plain attribute for the translation hot path
    end: int = field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.end = self.iova + self.size

    def __str__(self) -> str:
        perm = ("R" if self.read else "-") + ("W" if self.write else "-")
        return f"IOVA {self.iova:#x}+{self.size:#x} -> vaddr {self.vaddr:#x} {perm}"


class TranslationFault(Exception):
    """A device access the IOMMU refuses; `iova` is the first refused address."""

    def __init__(self, iova: int, reason: str) -> None:
        super().__init__(reason)
        self.iova = iova
        self.reason = reason


def _has_cap_ipc_lock() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
    except OSError:
        pass
    return False


def default_memlock_limit() -> int | None:
    """The limit Linux applies to this process: None (none) with CAP_IPC_LOCK."""
    if _has_cap_ipc_lock():
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


@define(eq=False)
class MemlockAccount:
    """The process's pinned-memory account (mm->locked_vm), shared by all containers."""

    limit: int | None
    locked: int = 0


#: one `Struct(f"{n}s")` per copy size seen, for reading through a lent view (bounded)
_READERS: dict[int, struct.Struct] = {}
_MAX_READERS = 256
#: whether the GIL serialises threads (CPython's free-threaded build may run without it)
_GIL = bool(getattr(sys, "_is_gil_enabled", lambda: True)())


def borrow_view(vaddr: int, size: int) -> memoryview | None:
    """The byte view lent for [vaddr, vaddr+size) by the map call in progress, if usable."""
    view = lent.borrow(vaddr, size)
    if view is None or not _GIL:
        return None
    try:
        if (
            view.readonly
            or view.format != "B"
            or view.ndim != 1
            or not view.c_contiguous
            or view.nbytes != size
        ):
            return None
        anchor = ctypes.c_char.from_buffer(view)
        try:
            address = ctypes.addressof(anchor)
        finally:
            del anchor
    except (ValueError, TypeError, BufferError):  # released, or not exportable
        return None
    return view if address == vaddr else None


def view_read(view: memoryview, offset: int, size: int) -> bytes | None:
    """`size` bytes at `offset` of a lent view in one C call; None once it is released."""
    reader = _READERS.get(size)
    if reader is None:
        reader = struct.Struct(f"{size}s")
        if len(_READERS) < _MAX_READERS:
            _READERS[size] = reader
    try:
        data: bytes = reader.unpack_from(view, offset)[0]
    except ValueError:
        return None
    return data


def view_write(view: memoryview, offset: int, data: bytes) -> bool:
    """Copy `data` into a lent view at `offset` (one C call); False once it is released."""
    try:
        view[offset : offset + len(data)] = data
    except ValueError:
        return False
    return True


_PFN_MASK = (1 << 55) - 1
_zero: list[int] = []


def _zero_pfn() -> int:
    """The shared zero page's PFN, 0 when this process may not read PFNs (found once)."""
    if not _zero:
        pfn = 0
        probe = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            probe[0]  # a read fault maps the zero page
            anchor = ctypes.c_char.from_buffer(probe)
            address = ctypes.addressof(anchor)
            del anchor
            try:
                with open("/proc/self/pagemap", "rb", buffering=0) as f:
                    (entry,) = struct.unpack(
                        "<Q", os.pread(f.fileno(), 8, address // mmap.PAGESIZE * 8)
                    )
                pfn = entry & _PFN_MASK if entry >> 63 & 1 else 0
            except OSError:
                pfn = 0
        finally:
            probe.close()
        _zero.append(pfn)
    return _zero[0]


class ProcessMemory:
    """This process's memory, read and written through /proc/self/mem."""

    def __init__(self) -> None:
        self._fd = -1

    def _mem(self) -> int:
        if self._fd < 0:
            self._fd = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @staticmethod
    def check_access(vaddr: int, size: int, *, write: bool) -> str | None:
        """Why [vaddr, vaddr+size) cannot be pinned for this access; None when it can."""
        need = "w" if write else "r"
        pos, end = vaddr, vaddr + size
        try:
            with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
                for line in f:
                    span, perms = line.split(maxsplit=2)[:2]
                    low_s, high_s = span.split("-")
                    low, high = int(low_s, 16), int(high_s, 16)
                    if high <= pos:
                        continue
                    if low > pos:
                        break
                    if need not in perms:
                        kind = "writable" if write else "readable"
                        return f"{pos:#x} is in a mapping that is not {kind} ({perms})"
                    pos = high
                    if pos >= end:
                        return None
        except OSError as exc:
            return f"cannot read /proc/self/maps: {exc}"
        return f"{pos:#x} is not mapped in the process"

    @staticmethod
    def zero_page_pins(vaddr: int, size: int) -> frozenset[int]:
        """Pages of [vaddr, vaddr+size) a read-only long-term pin maps to the zero page on 6.1.

        Those in a private anonymous mapping that were never written: not
        present in /proc/self/pagemap (nor swapped), or present as the
        zero page (recognised by its PFN, which only a CAP_SYS_ADMIN process
        reads; without it only never-touched pages are found). Indexes count
        pages from `vaddr`.
        """
        page = mmap.PAGESIZE
        first, count = vaddr // page, -(-(vaddr % page + size) // page)
        private_anon: list[tuple[int, int]] = []
        try:
            with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
                for line in f:
                    fields = line.split()
                    low_s, high_s = fields[0].split("-")
                    low, high = int(low_s, 16), int(high_s, 16)
                    if high <= vaddr or low >= vaddr + size:
                        continue
                    anonymous = fields[4] == "0" and (len(fields) < 6 or fields[5][0] == "[")
                    if fields[1][3] == "p" and anonymous:
                        private_anon.append((low, high))
            with open("/proc/self/pagemap", "rb", buffering=0) as f:
                raw = os.pread(f.fileno(), 8 * count, 8 * first)
        except OSError:
            return frozenset()
        zero_pfn = _zero_pfn()
        pinned = set()
        for i, (entry,) in enumerate(struct.iter_unpack("<Q", raw)):
            address = (first + i) * page
            if not any(low <= address < high for low, high in private_anon):
                continue
            present, swapped = entry >> 63 & 1, entry >> 62 & 1
            pfn = entry & _PFN_MASK
            if (not present and not swapped) or (present and zero_pfn and pfn == zero_pfn):
                pinned.add(i)
        return frozenset(pinned)

    def read(self, vaddr: int, size: int) -> bytes | None:
        """The bytes, or None when the process no longer maps them."""
        try:
            data = os.pread(self._mem(), size, vaddr)
        except OSError:
            return None
        return data if len(data) == size else None

    def write(self, vaddr: int, data: bytes) -> bool:
        """Write all of `data`; False when the process no longer maps the range."""
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                n = os.pwrite(self._mem(), view[done:], vaddr + done)
                if n <= 0:
                    return False
                done += n
        except OSError:
            return False
        return True


#: Translation generations, unique across every IOMMU and IOAS of the process: a
#: number names one state of one translation, so a device moved to another IOMMU
#: never sees its old number again (`next_generation`).
_GENERATIONS = itertools.count(1)


def next_generation() -> int:
    """A number no translation state had before (see `Type1Iommu.generation`)."""
    return next(_GENERATIONS)


@define(eq=False)
class Type1Iommu:
    """A container's vfio_iommu (type1 or type1v2)."""

    v2: bool
    page_size: int
    iova_ranges: Sequence[tuple[int, int]]
    dma_avail: int
    memlock: MemlockAccount
    memory: ProcessMemory
    mappings: list[DmaMapping] = field(factory=list)
    #: a READ-only pin of never-written private anonymous memory gets the zero page
    #: (the `ro_pin_zero_page` personality row: 6.1)
    zero_page_pin: bool = False
    #: the mappings' IOVAs, sorted as `mappings` is (for bisect)
    _starts: list[int] = field(factory=list, repr=False)
    #: changes whenever what a device reaches through this IOMMU may change (a mapping
    #: added or removed, a view replaced or dropped): a model may keep a `dma_view` for
    #: as long as its device's `dma_epoch` is the same
    generation: int = field(factory=next_generation, init=False, repr=False)

    @property
    def pgsize_bitmap(self) -> int:
        """Every power-of-two size from the page size up, as Intel VT-d and AMD-Vi report."""
        return ~(self.page_size - 1) & _U64

    # --- lookups -------------------------------------------------------------------------

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

    _find = lookup

    # --- VFIO_IOMMU_MAP_DMA ----------------------------------------------------------------

    def map(self, flags: int, vaddr: int, iova: int, size: int) -> None:
        """vfio_dma_do_map (flags already checked against the known ones)."""
        set_vaddr = bool(flags & DmaMapFlag.VADDR)
        read = bool(flags & DmaMapFlag.READ)
        write = bool(flags & DmaMapFlag.WRITE)
        if (read or write) == set_vaddr:
            raise rules.MAP_NO_PERMISSION.error(f"flags {flags:#x}")
        mask = self.page_size - 1
        if not size or (size | iova | vaddr) & mask:
            raise rules.MAP_UNALIGNED.error(
                f"vaddr {vaddr:#x}, iova {iova:#x}, size {size:#x}; page size {self.page_size:#x}"
            )
        if iova + size - 1 > _U64 or vaddr + size - 1 > _U64:
            raise rules.MAP_WRAPS.error(f"iova {iova:#x}, vaddr {vaddr:#x}, size {size:#x}")
        overlap = self._overlapping(iova, size)
        if set_vaddr:
            if not overlap:
                raise rules.MAP_VADDR_NOT_FOUND.error(f"IOVA {iova:#x}+{size:#x}")
            dma = overlap[0]
            if dma.vaddr_valid or dma.iova != iova or dma.size != size:
                raise rules.MAP_VADDR_MISMATCH.error(str(dma))
            dma.vaddr = vaddr
            dma.vaddr_valid = True
            dma.view = borrow_view(vaddr, size)  # the new memory, as the sim reads by vaddr
            self.generation = next_generation()
            return
        if overlap:
            raise rules.MAP_OVERLAP.error(f"IOVA {iova:#x}+{size:#x} overlaps {overlap[0]}")
        if not self.dma_avail:
            raise rules.MAP_ENTRY_LIMIT.error(f"{len(self.mappings)} mappings")
        last = iova + size - 1
        if self.iova_ranges and not any(lo <= iova and last <= hi for lo, hi in self.iova_ranges):
            ranges = ", ".join(f"[{lo:#x}, {hi:#x}]" for lo, hi in self.iova_ranges)
            raise rules.MAP_OUTSIDE_IOVA_RANGES.error(f"IOVA {iova:#x}..{last:#x}; ranges {ranges}")
        problem = ProcessMemory.check_access(vaddr, size, write=write)
        if problem is not None:
            raise rules.MAP_BAD_VADDR.error(f"vaddr {vaddr:#x}+{size:#x}: {problem}")
        limit = self.memlock.limit
        if limit is not None and self.memlock.locked + size > limit:
            raise rules.MAP_MEMLOCK.error(
                f"{self.memlock.locked:#x} bytes pinned, {size:#x} more, limit {limit:#x}"
            )
        self.memlock.locked += size
        self.dma_avail -= 1
        zero = (
            ProcessMemory.zero_page_pins(vaddr, size)
            if self.zero_page_pin and not write
            else frozenset()
        )
        m = DmaMapping(
            iova, size, vaddr, read, write, view=borrow_view(vaddr, size), zero_pages=zero
        )
        i = bisect.bisect_right(self._starts, iova)
        self.mappings.insert(i, m)
        self._starts.insert(i, iova)
        self.generation = next_generation()

    # --- VFIO_IOMMU_UNMAP_DMA --------------------------------------------------------------

    def unmap(self, flags: int, iova: int, size: int) -> int:
        """vfio_dma_do_unmap: returns the size unmapped (0 when nothing was there)."""
        unmap_all = bool(flags & DmaUnmapFlag.ALL)
        if flags & DmaUnmapFlag.GET_DIRTY_BITMAP:
            raise rules.UNMAP_FLAGS.error("GET_DIRTY_BITMAP without dirty page tracking")
        mask = self.page_size - 1
        if iova & mask:
            raise rules.UNMAP_UNALIGNED.error(f"iova {iova:#x}; page size {self.page_size:#x}")
        if unmap_all:
            if iova or size:
                raise rules.UNMAP_ALL_WITH_RANGE.error(f"iova {iova:#x}, size {size:#x}")
            size = _U64
        elif not size or size & mask or iova + size - 1 > _U64:
            raise rules.UNMAP_UNALIGNED.error(f"iova {iova:#x}, size {size:#x}")
        end = iova + size
        if self.v2 and not unmap_all:
            first = self._find(iova)
            if first is not None and first.iova != iova:
                raise rules.UNMAP_SPLITS_MAPPING.error(f"iova {iova:#x} is inside {first}")
            last = self._find(end - 1)
            if last is not None and last.end != end:
                raise rules.UNMAP_SPLITS_MAPPING.error(f"end {end:#x} is inside {last}")
        targets: list[DmaMapping] = []
        for m in self.mappings:
            if m.end <= iova:
                continue
            if m.iova >= end:
                break
            if not self.v2 and iova > m.iova:
                break  # type1 (v1): a request offset into a mapping unmaps nothing
            targets.append(m)
        if flags & DmaUnmapFlag.VADDR:
            if any(not m.vaddr_valid for m in targets):
                raise rules.UNMAP_VADDR_TWICE.error(
                    ", ".join(str(m) for m in targets if not m.vaddr_valid)
                )
            for m in targets:
                m.vaddr_valid = False
            return sum(m.size for m in targets)
        for m in targets:
            self._remove(m)
        return sum(m.size for m in targets)

    def _remove(self, m: DmaMapping) -> None:
        i = bisect.bisect_left(self._starts, m.iova)
        del self.mappings[i], self._starts[i]
        self.dma_avail += 1
        self.memlock.locked -= m.size
        self.generation = next_generation()

    def drop_view(self, m: DmaMapping) -> None:
        """Forget `m`'s lent view (released by its lender): device accesses copy now."""
        m.view = None
        self.generation = next_generation()

    def release(self) -> None:
        """vfio_iommu_type1_release: every mapping goes."""
        for m in list(self.mappings):
            self._remove(m)

    # --- device DMA --------------------------------------------------------------------------

    def zero_spans(self, iova: int, size: int) -> list[tuple[int, int]]:
        """(offset in the access, length) of a translated access that falls on zero-page pins."""
        spans: list[tuple[int, int]] = []
        page = mmap.PAGESIZE
        pos, end = iova, iova + size
        while pos < end:
            m = self._find(pos)
            if m is None:
                break
            stop = min(end, m.end)
            if m.zero_pages:
                while pos < stop:
                    index = (m.vaddr + pos - m.iova) // page - m.vaddr // page
                    n = min(stop, pos + page - (m.vaddr + pos - m.iova) % page) - pos
                    if index in m.zero_pages:
                        spans.append((pos - iova, n))
                    pos += n
            pos = stop
        return spans

    def translate(self, iova: int, size: int, *, write: bool) -> list[tuple[int, int]]:
        """(vaddr, length) segments for a device access, or TranslationFault."""
        segments: list[tuple[int, int]] = []
        pos, end = iova, iova + size
        while pos < end:
            m = self._find(pos)
            if m is None:
                raise TranslationFault(pos, f"IOVA {pos:#x} is not mapped")
            if write and not m.write:
                raise TranslationFault(pos, f"IOVA {pos:#x} is mapped without WRITE ({m})")
            if not write and not m.read:
                raise TranslationFault(pos, f"IOVA {pos:#x} is mapped without READ ({m})")
            n = min(end, m.end) - pos
            segments.append((m.vaddr + (pos - m.iova), n))
            pos += n
        return segments
