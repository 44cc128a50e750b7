"""DMA: page-aligned buffers, IOMMU mappings as scoped resources, IOVA allocation.

A `DmaMapping` is owned by the async context manager that made it and is
unmapped on every exit path (also on cancellation: the unmap runs in a
shielded worker thread). A `DmaBuffer` is memory aiovfio allocated *and*
mapped; leaving its context unmaps it, then frees the memory.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
from attrs import define, field

from . import _log, errors

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from .container import Container

__all__ = ["DmaMapping", "DmaBuffer", "IovaAllocator", "allocate_memory", "buffer_address"]

_MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)
_HUGE_PAGE = 2 * 1024 * 1024


def buffer_address(buffer: Buffer) -> tuple[int, int]:
    """(address, length) of a writable buffer's memory, without copying it."""
    try:
        view = memoryview(buffer)
    except TypeError:
        raise errors.InvalidArgument(
            f"cannot map a {type(buffer).__name__}: pass a buffer (mmap, bytearray, DmaBuffer.view)"
        ) from None
    with view:
        if view.readonly:
            raise errors.InvalidArgument(
                "cannot map a read-only buffer: pass a writable one (mmap, bytearray); "
                "use readonly=True to forbid device writes"
            )
        if not view.c_contiguous:
            raise errors.InvalidArgument("cannot map a non-contiguous buffer")
        length = view.nbytes
        if length == 0:
            raise errors.InvalidArgument("cannot map an empty buffer")
        anchor = (ctypes.c_char * length).from_buffer(view)
        address = ctypes.addressof(anchor)
        del anchor
    return address, length


def allocate_memory(size: int, *, hugepages: bool = False) -> mmap.mmap:
    """Anonymous, page-aligned, zeroed memory that a forked child does not inherit."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if hugepages:
        flags |= _MAP_HUGETLB
    try:
        mem = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        hint = "reserve hugepages (/proc/sys/vm/nr_hugepages)" if hugepages else None
        raise errors.from_oserror(exc, "mmap", f"a {size}-byte DMA buffer", hint=hint) from exc
    # A child that inherited pinned DMA memory would break copy-on-write for
    # the parent's device (the kernel pins the parent's pages).
    mem.madvise(mmap.MADV_DONTFORK)
    return mem


@define(eq=False)
class IovaAllocator:
    """First-fit IOVA allocation within the IOMMU's ranges and a device's DMA mask.

    Only bookkeeping: it never talks to the kernel. Ranges are inclusive
    (start, end) pairs as the kernel reports them.
    """

    ranges: tuple[tuple[int, int], ...]
    page_size: int
    #: the lowest IOVA handed out when none is asked for (keeps 0 free: many
    #: devices read address 0 as "no buffer")
    floor: int = 0x10000
    _used: list[tuple[int, int]] = field(factory=list, repr=False)  # sorted (start, end_excl)

    def allocate(self, size: int, *, limit: int | None = None, align: int | None = None) -> int:
        """Reserve `size` bytes below `limit` (inclusive, a DMA mask); return the IOVA."""
        align = max(align or self.page_size, self.page_size)
        for start, end in self.ranges:
            lo = max(start, self.floor)
            hi = end if limit is None else min(end, limit)
            cand = _round_up(lo, align)
            for used_start, used_end in self._used:
                if used_end <= cand:
                    continue
                if used_start >= cand + size:
                    break
                cand = _round_up(used_end, align)
            if cand + size - 1 <= hi:
                self._insert(cand, size)
                return cand
        where = f"below {limit:#x}" if limit is not None else "in the IOMMU's IOVA ranges"
        raise errors.DmaSpaceExhausted(
            f"no free IOVA range of {size:#x} bytes {where}; unmap something, "
            f"or raise the device's DMA mask"
        )

    def reserve(self, iova: int, size: int, *, limit: int | None = None) -> None:
        """Claim a caller-chosen IOVA range, refusing overlaps and out-of-range IOVAs."""
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
        for used_start, used_end in self._used:
            if used_start < iova + size and iova < used_end:
                raise errors.InvalidArgument(
                    f"IOVA range {iova:#x}-{last:#x} overlaps the mapping at "
                    f"{used_start:#x}-{used_end - 1:#x}; pick another IOVA or let aiovfio choose"
                )
        self._insert(iova, size)

    def release(self, iova: int, size: int) -> None:
        """Give back a range handed out by `allocate` or `reserve`."""
        self._used.remove((iova, iova + size))

    def _insert(self, iova: int, size: int) -> None:
        self._used.append((iova, iova + size))
        self._used.sort()

    @property
    def used(self) -> Iterable[tuple[int, int]]:
        return tuple(self._used)


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


@define(eq=False, repr=False)
class DmaMapping:
    """A range of process memory mapped into a container's IOMMU.

    Made by `Container.map_dma(...)`; the IOMMU translation exists from
    `__aenter__` until the context exits (or `aclose()`), on every exit path.
    """

    container: Container
    vaddr: int
    size: int
    readonly: bool
    #: the IOVA asked for, None to let the container's allocator choose
    requested_iova: int | None = None
    #: the highest IOVA the device can reach (its DMA mask), None for any
    dma_mask: int | None = None
    #: keeps the caller's buffer exported (un-resizable, un-closable) while mapped
    _pin: memoryview | None = field(default=None, alias="pin")
    _iova: int | None = field(default=None, init=False)
    _closed: bool = field(default=False, init=False)

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        if self._closed:
            state = "closed"
        elif self._iova is None:
            state = "not mapped yet"
        else:
            state = "mapped"
        where = f"iova={self._iova:#x} " if self._iova is not None else ""
        return f"<DmaMapping {where}size={self.size:#x} {mode} {state}>"

    @property
    def iova(self) -> int:
        """The IO virtual address the device uses for the first byte."""
        if self._iova is None:
            raise errors.UsageError("the mapping is not made yet: use it as `async with`")
        return self._iova

    @property
    def mapped(self) -> bool:
        return self._iova is not None and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> DmaMapping:
        if self._closed:
            raise errors.ClosedResourceError(f"{self!r} was closed; map the buffer again")
        try:
            self._iova = await self.container._map(self)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Unmap (in a shielded worker thread) and forget; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._iova is not None:
                with anyio.CancelScope(shield=True):
                    await self.container._unmap(self, self._iova)
        finally:
            if self._pin is not None:
                self._pin.release()
                self._pin = None


@define(eq=False, repr=False)
class DmaBuffer:
    """Memory allocated for DMA and mapped at `iova`; `view` is a writable memoryview.

    Made by `Container.dma_buffer(...)` or `Device.dma_buffer(...)`. Entering
    allocates and maps; leaving unmaps, then frees the memory. Drop any slices
    of `view` before leaving, or the memory is freed only when they go.
    """

    container: Container
    size: int
    readonly: bool = False
    dma_mask: int | None = None
    hugepages: bool = False
    _mem: mmap.mmap | None = field(default=None, init=False)
    _mapping: DmaMapping | None = field(default=None, init=False)
    _view: memoryview | None = field(default=None, init=False)
    _closed: bool = field(default=False, init=False)

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._mapping is not None and self._mapping.mapped:
            state = f"iova={self._mapping.iova:#x}"
        else:
            state = "not mapped yet"
        return f"<DmaBuffer size={self.size:#x} {state}>"

    @property
    def mapping(self) -> DmaMapping:
        if self._mapping is None:
            raise errors.UsageError("the buffer is not allocated yet: use it as `async with`")
        return self._mapping

    @property
    def iova(self) -> int:
        """The IO virtual address the device uses for `view[0]`."""
        return self.mapping.iova

    @property
    def view(self) -> memoryview:
        """The buffer's bytes, writable, as the device sees them at `iova`."""
        if self._view is None:
            if self._closed:
                raise errors.ClosedResourceError("the DMA buffer was released; allocate a new one")
            raise errors.UsageError("the buffer is not allocated yet: use it as `async with`")
        return self._view

    async def __aenter__(self) -> DmaBuffer:
        if self._closed:
            raise errors.ClosedResourceError("the DMA buffer was released; allocate a new one")
        await anyio.lowlevel.checkpoint()
        try:
            self._mem = allocate_memory(self.size, hugepages=self.hugepages)
            address, _ = buffer_address(self._mem)
            self._mapping = DmaMapping(
                self.container, address, self.size, self.readonly, dma_mask=self.dma_mask
            )
            await self._mapping.__aenter__()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise
        self._view = memoryview(self._mem)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Unmap, then free the memory; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._view is not None:
            self._view.release()
            self._view = None
        try:
            if self._mapping is not None:
                await self._mapping.aclose()
        finally:
            self._free()

    def _free(self) -> None:
        mem, self._mem = self._mem, None
        if mem is None or mem.closed:
            return
        try:
            mem.close()
        except BufferError:
            # The caller still holds a slice of `view`: the memory is freed
            # by the garbage collector once that goes. The IOMMU mapping is
            # already gone, so the device cannot reach it.
            _log.logger.warning("dma.buffer_still_referenced", size=self.size)
