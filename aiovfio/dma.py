"""DMA: the DMA space (one IOMMU address space), its mappings, and DMA memory.

`DmaSpace` is one IOMMU address space. It owns its IOVA allocator, its entry
budget, its live mappings, the map and unmap calls, and its own lifetime:
when it retires (the type1 container's last group leaves, an IOAS is
destroyed) it unmaps what is still mapped and ends every `DmaMapping` and
`DmaBuffer` made in it, so none can ever be unmapped in a later address
space. Two implementations: `Type1Space` here (the legacy container's) and
iommufd's IOAS (`aiovfio.iommufd`). The public objects (`DmaMapping`,
`DmaBuffer`) only see the `DmaSpace` interface.

A `DmaMapping` maps memory the caller owns; a `DmaBuffer` is memory aiovfio
allocates (aligned to the space's smallest IOMMU page) *and* maps. Both are
unmapped on every exit path, also on cancellation (the unmap runs in a
shielded worker thread).
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import errno
import gc
import mmap
import os
import resource
import warnings
from typing import TYPE_CHECKING

import anyio
from attrs import define, field, frozen

from . import _fork, _ki, _log, errors
from ._iova import IovaAllocator
from ._resource import Resource, State
from ._uapi import caps
from ._uapi import vfio as uapi
from ._util import PAGE_SIZE, check_int, kcall, kcall_thread
from .kernel import lent

_OPEN = State.OPEN

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from .kernel import Kernel

__all__ = [
    "DmaBuffer",
    "DmaMapping",
    "DmaSpace",
    "IommuInfo",
    "IovaAllocator",
    "Type1Space",
    "allocate_memory",
    "buffer_address",
    "check_iova_args",
    "populate_write",
]

_MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)
_HUGE_PAGE = 2 * 1024 * 1024
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


@frozen
class IommuInfo:
    """What the IOMMU says about an address space (VFIO_IOMMU_GET_INFO, or the IOAS)."""

    #: bitmap of supported IOMMU page sizes
    page_sizes: int
    #: inclusive (start, end) IOVA ranges the device may use
    iova_ranges: tuple[tuple[int, int], ...]
    #: how many more mappings the kernel allows, None when it does not say
    dma_avail: int | None

    @property
    def min_page_size(self) -> int:
        """The smallest IOMMU page size: the alignment every mapping needs."""
        return self.page_sizes & -self.page_sizes if self.page_sizes else PAGE_SIZE

    def __repr__(self) -> str:
        ranges = ", ".join(f"{s:#x}-{e:#x}" for s, e in self.iova_ranges)
        return (
            f"IommuInfo(page_sizes={self.page_sizes:#x}, iova_ranges=[{ranges}], "
            f"dma_avail={self.dma_avail})"
        )


# --- memory ---------------------------------------------------------------------------------


def buffer_address(buffer: Buffer) -> tuple[int, int]:
    """(address, length) of a writable buffer's memory, without copying it."""
    try:
        view = memoryview(buffer)
    except TypeError:
        raise errors.InvalidArgument(
            f"cannot map a {type(buffer).__name__}: pass a buffer (mmap, bytearray, DmaBuffer.view)"
        ) from None
    except ValueError as exc:  # a released memoryview, a closed mmap
        raise errors.UsageError(
            f"cannot map a {type(buffer).__name__} that was released or closed ({exc}): "
            f"pass live memory"
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
    """Anonymous, page-aligned, zeroed memory that a forked child gets as zeros."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if hugepages:
        flags |= _MAP_HUGETLB
    try:
        mem = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        hint = "reserve hugepages (/proc/sys/vm/nr_hugepages)" if hugepages else None
        raise errors.from_oserror(exc, "mmap", f"a {size}-byte DMA buffer", hint=hint) from exc
    # A child must not share the parent's pinned pages (copy-on-write would break
    # the device's view) nor lack them (a DONTFORK area is a SIGSEGV there):
    # WIPEONFORK gives it zero pages; hugetlb memory falls back to DONTFORK and
    # the child maps zeros over it at fork (`DmaBuffer._forget_after_fork`).
    _fork.protect_memory(mem)
    return mem


_libc: ctypes.CDLL | None = None


def populate_write(view: memoryview, page: int = PAGE_SIZE) -> None:
    """Write-fault every page of `view` (keeping its bytes) so none is the shared zero page.

    Linux 6.1 pins the shared zero page for a read-only long-term pin of an
    untouched anonymous page: the device then reads zeros whatever the CPU
    writes later. MADV_POPULATE_WRITE (Linux >= 5.14) faults each page in
    writable without changing it; elsewhere each page is touched by hand.
    """
    global _libc
    address, length = ctypes.addressof((ctypes.c_char * view.nbytes).from_buffer(view)), view.nbytes
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if (
        address % PAGE_SIZE == 0
        and _libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), _MADV_POPULATE_WRITE)
        == 0
    ):
        return
    raw = view.cast("B")
    for offset in range(0, length, page):
        raw[offset] = raw[offset]  # a write fault that keeps the byte
    raw.release()


def _holders(obj: object, mine: tuple[object, ...]) -> str:
    """The types of what still references `obj` (for the exported-view warning)."""
    names = sorted(
        {
            f"{type(r).__module__}.{type(r).__qualname__}".removeprefix("builtins.")
            for r in gc.get_referrers(obj)
            if r not in mine
            and not isinstance(r, (dict, list, tuple))
            and type(r).__name__ not in ("frame", "cell", "function")
        }
    )
    return ", ".join(names) or "an exported buffer (a slice, a numpy array, a PickleBuffer)"


# --- the DMA space --------------------------------------------------------------------------


@define(eq=False, repr=False, slots=False, kw_only=True)
class DmaSpace(Resource, abc.ABC):
    """One IOMMU address space: IOVA allocator, entry budget, live mappings, map and unmap.

    Subclasses say how the kernel maps (`_kernel_map`, `_kernel_unmap`); the
    rest (allocation, budget, bookkeeping, retirement) is shared, so every
    implementation obeys the same rules. Created open; `aclose()` retires it.
    """

    kernel: Kernel
    info: IommuInfo
    #: "container (fd 5)", "IOAS 2 of iommufd 7", for messages
    name: str
    _allocator: IovaAllocator = field(init=False)
    _dma_avail: int | None = field(init=False)
    _pinned: int = field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self._allocator = IovaAllocator(self.info.iova_ranges, self.page_size)
        self._dma_avail = self.info.dma_avail
        self._open_now()

    #: which kernel interface the space is ("container", "iommufd", "noiommu")
    backend = "unknown"

    def __repr__(self) -> str:
        state = "retired" if self.closed else f"mappings={len(self._children)}"
        return (
            f"<{type(self).__name__} {self.name} backend={self.backend} "
            f"page={self.page_size:#x} {state}>"
        )

    @property
    def label(self) -> str:
        return f"the DMA space of {self.name}"

    @property
    def page_size(self) -> int:
        """The smallest IOMMU page: every mapping's address and size are multiples of it."""
        return max(self.info.min_page_size, PAGE_SIZE)

    @property
    def mapping_count(self) -> int:
        """How many mappings are live in it."""
        return len(self._allocator)

    @property
    def dma_avail(self) -> int | None:
        """How many more mappings the kernel allows, None when it does not say."""
        return self._dma_avail

    @property
    def iommu_info(self) -> IommuInfo:
        """The IOMMU's description, with the entries left now."""
        self._check_open()
        info = self.info
        if self._dma_avail == info.dma_avail:
            return info
        return IommuInfo(
            page_sizes=info.page_sizes, iova_ranges=info.iova_ranges, dma_avail=self._dma_avail
        )

    def device_attached(self) -> None:
        """Re-read the space's IOVA ranges after a device joined it.

        A device's domain can narrow them: iommufd reserves the MSI window, and
        iommufd's emulation of the legacy container attaches the domain only when
        a device fd is opened (before that it allows any IOVA, past the IOMMU's
        aperture). The allocator is rebuilt over the new ranges with every live
        mapping still reserved; if one no longer fits (the kernel would have
        refused the attach), the old ranges stay.
        """
        info = self._query_info()
        if info is None or info.iova_ranges == self.info.iova_ranges:
            return
        old = self._allocator
        fresh = IovaAllocator(info.iova_ranges, max(info.min_page_size, PAGE_SIZE), floor=old.floor)
        try:
            for start, end in old.used:
                fresh.reserve(start, end - start)
        except errors.VfioError as exc:
            _log.logger.warning("dma.ranges_kept", space=self.name, why=str(exc))
            return
        self.info = IommuInfo(
            page_sizes=info.page_sizes, iova_ranges=info.iova_ranges, dma_avail=self.info.dma_avail
        )
        self._allocator = fresh
        _log.debug(
            "dma.ranges", space=self.name, ranges=[f"{s:#x}-{e:#x}" for s, e in info.iova_ranges]
        )

    def _query_info(self) -> IommuInfo | None:
        """The kernel's description of the space now; None where it cannot change."""
        return None

    def translate(self, address: int, length: int) -> tuple[int, bool] | None:
        """(IOVA, readonly) of process memory [address, address+length) if one live
        mapping of this space holds all of it, else None. O(live mappings)."""
        for child in self._children:
            mapping = child._mapping if isinstance(child, DmaBuffer) else child
            if not isinstance(mapping, DmaMapping) or not mapping.mapped:
                continue
            start = mapping.vaddr
            if start <= address and address + length <= start + mapping.size:
                assert mapping._iova is not None
                return mapping._iova + (address - start), mapping.readonly
        return None

    # --- the public objects made here ------------------------------------------------

    def map_dma(
        self,
        buffer: Buffer,
        *,
        iova: int | None = None,
        readonly: bool = False,
        dma_mask: int | None = None,
    ) -> DmaMapping:
        """Map a page-aligned writable buffer (an async context manager yielding the mapping)."""
        self._check_open()
        page = self.page_size
        address, length = buffer_address(buffer)
        if address % page:
            raise errors.AlignmentError(
                f"buffer at {address:#x} is not aligned to the IOMMU page size {page:#x}: "
                f"allocate it with mmap, or use `dma_buffer(size)`"
            )
        if length % page:
            raise errors.AlignmentError(
                f"buffer size {length:#x} is not a multiple of the IOMMU page size {page:#x}"
            )
        check_iova_args(iova, dma_mask)
        pin = memoryview(buffer)
        return DmaMapping(
            self,
            address,
            length,
            bool(readonly),
            requested_iova=iova,
            dma_mask=dma_mask,
            pin=pin,
            owner=self._children,
        )

    def dma_buffer(
        self,
        size: int,
        *,
        dma_mask: int | None = None,
        readonly: bool = False,
        hugepages: bool = False,
    ) -> DmaBuffer:
        """Allocate zeroed memory and map it (an async context manager yielding a DmaBuffer).

        `size` is rounded up to the IOMMU page (2 MiB with `hugepages`); the
        memory is aligned to it.
        """
        self._check_open()
        check_int("a DMA buffer size", size, minimum=1)
        if size > 1 << 46:
            raise errors.InvalidArgument(f"a DMA buffer of {size:#x} bytes is beyond any IOMMU")
        check_iova_args(None, dma_mask)
        readonly, hugepages = bool(readonly), bool(hugepages)
        unit = max(_HUGE_PAGE, self.page_size) if hugepages else self.page_size
        rounded = (size + unit - 1) // unit * unit
        return DmaBuffer(
            self,
            rounded,
            readonly=readonly,
            dma_mask=dma_mask,
            hugepages=hugepages,
            align=unit,
            owner=self._children,
        )

    # --- map and unmap -----------------------------------------------------------------

    async def map(self, mapping: DmaMapping) -> int:
        """Reserve an IOVA, spend an entry, pin and map in a worker thread; return the IOVA."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        if self._dma_avail is not None and self._dma_avail <= 0:
            raise errors.DmaSpaceExhausted(
                f"{self.name} has no DMA entries left: {self.mapping_count} mappings are live "
                f"and the kernel allows no more (0 left); unmap some, or raise "
                f"vfio_iommu_type1.dma_entry_limit"
            )
        alloc = self._allocator
        if mapping.requested_iova is None:
            iova = alloc.allocate(mapping.size, limit=mapping.dma_mask)
        else:
            iova = mapping.requested_iova
            alloc.reserve(iova, mapping.size, limit=mapping.dma_mask)
        target = f"{self.name} at IOVA {iova:#x} size {mapping.size:#x}"

        def own(_: None) -> None:
            # Runs as soon as the kernel mapped it, before any interruption
            # (asyncio's Task.cancel too) leaves the await: the mapping is
            # recorded, so its owner's cleanup unmaps it.
            mapping._iova = iova
            if self._dma_avail is not None:
                self._dma_avail -= 1
            self._pinned += mapping.size

        # A kernel that can copy through a view of the memory (the simulator) may
        # keep it instead of reading process memory by address (aiovfio.kernel.lent).
        memory = mapping._pin if mapping._pin is not None else mapping._memory
        mapping._memory = None  # lent for this call only: the owner's exports stay its own
        try:
            with lent.lend(mapping.vaddr, mapping.size, memory):
                await kcall_thread(
                    self.map_operation,
                    target,
                    self._kernel_map,
                    mapping.vaddr,
                    iova,
                    mapping.size,
                    mapping.readonly,
                    then=own,
                )
        except errors.OutOfMemory as exc:
            alloc.release(iova, mapping.size)
            raise self._enomem(exc, mapping.size) from exc
        except BaseException:
            if mapping._iova is None:  # not mapped: the IOVA is free again
                alloc.release(iova, mapping.size)
            raise
        _log.debug("dma.map", iova=hex(iova), size=mapping.size, readonly=mapping.readonly)
        return iova

    async def unmap(self, iova: int, size: int) -> None:
        """Unmap in a worker thread (the caller shields it); retry once when the kernel fails.

        After a second failure the range stays allocated here (never handed
        out again in this space) and the error propagates; the kernel drops
        the mapping with the address space.
        """
        target = f"{self.name} at IOVA {iova:#x} size {size:#x}"

        def forget(_: int) -> None:
            # Runs as soon as the kernel unmapped it, before any interruption
            # leaves the await (a release: it runs even if interrupted first).
            self._allocator.release(iova, size)
            if self._dma_avail is not None:
                self._dma_avail += 1
            self._pinned -= size

        op, unmap = self.unmap_operation, self._kernel_unmap
        try:
            done = await kcall_thread(op, target, unmap, iova, size, then=forget, release=True)
        except errors.KernelError as first:
            _log.debug("dma.unmap_retry", iova=hex(iova), size=size, error=str(first))
            done = await kcall_thread(op, target, unmap, iova, size, then=forget, release=True)
        _log.debug("dma.unmap", iova=hex(iova), size=size)
        if done != size:
            raise errors.KernelError(
                errno.EIO,
                f"{self.unmap_operation} on {target} unmapped {done:#x} bytes, not {size:#x}",
                operation=self.unmap_operation,
                target=target,
            )

    def _enomem(self, exc: errors.OutOfMemory, size: int) -> errors.OutOfMemory:
        """ENOMEM from a map: say whether RLIMIT_MEMLOCK or memory itself ran out."""
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        pinned = self._pinned
        if soft != resource.RLIM_INFINITY and pinned + size > soft:
            hint = (
                f"RLIMIT_MEMLOCK is hit: {pinned:#x} bytes are pinned in {self.name} and "
                f"{size:#x} more would pass the limit of {soft:#x}; raise it (`ulimit -l`, "
                f"LimitMEMLOCK=) or map less"
            )
        else:
            limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft:#x}"
            hint = (
                f"RLIMIT_MEMLOCK ({limit}) is not the cause ({pinned:#x} bytes pinned here): "
                f"the kernel could not pin or allocate memory; free memory or map less"
            )
        return errors.OutOfMemory(
            errno.ENOMEM,
            f"{exc.operation} on {exc.target} failed: {os.strerror(errno.ENOMEM)}; {hint}",
            operation=exc.operation,
            target=exc.target,
        )

    # --- the kernel side (what an implementation provides) -----------------------------

    #: the operation's name in errors and logs
    map_operation = "map"
    unmap_operation = "unmap"

    @abc.abstractmethod
    def _kernel_map(self, vaddr: int, iova: int, size: int, readonly: bool) -> None:
        """Map [vaddr, vaddr+size) at `iova` (runs in a worker thread)."""

    @abc.abstractmethod
    def _kernel_unmap(self, iova: int, size: int) -> int:
        """Unmap [iova, iova+size) (a worker thread); return the size the kernel unmapped."""

    # --- retirement ---------------------------------------------------------------------

    async def _release(self) -> None:
        """Every mapping was ended by `_shutdown` (children first): nothing more to give back."""
        _log.debug("dma.space_retired", space=self.name)


@define(eq=False, repr=False, slots=False, kw_only=True)
class Type1Space(DmaSpace):
    """The legacy container's address space (VFIO type1 IOMMU): made by VFIO_SET_IOMMU."""

    container_fd: int
    backend = "container"
    map_operation = "VFIO_IOMMU_MAP_DMA"
    unmap_operation = "VFIO_IOMMU_UNMAP_DMA"

    def _kernel_map(self, vaddr: int, iova: int, size: int, readonly: bool) -> None:
        arg = uapi.vfio_iommu_type1_dma_map(
            argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_map),
            flags=uapi.DmaMapFlag.READ | (0 if readonly else uapi.DmaMapFlag.WRITE),
            vaddr=vaddr,
            iova=iova,
            size=size,
        )
        self.kernel.map_dma(self.container_fd, arg)

    def _kernel_unmap(self, iova: int, size: int) -> int:
        arg = uapi.vfio_iommu_type1_dma_unmap(
            argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_unmap), flags=0, iova=iova, size=size
        )
        self.kernel.unmap_dma(self.container_fd, arg)
        return int(arg.size)

    def _query_info(self) -> IommuInfo:
        return query_type1_info(self.kernel, self.container_fd, self.name)


def query_type1_info(kernel: Kernel, container_fd: int, label: str) -> IommuInfo:
    """VFIO_IOMMU_GET_INFO of a container: page sizes, IOVA ranges, DMA entries left."""
    head = ctypes.sizeof(uapi.vfio_iommu_type1_info)
    buf = bytearray(head)
    info = uapi.vfio_iommu_type1_info.from_buffer(buf)
    info.argsz = head
    del info
    op = "VFIO_IOMMU_GET_INFO"
    kcall(op, label, kernel.iommu_get_info, container_fd, buf)
    need = uapi.vfio_iommu_type1_info.from_buffer_copy(buf).argsz
    if need > head:
        buf = bytearray(need)
        info = uapi.vfio_iommu_type1_info.from_buffer(buf)
        info.argsz = need
        del info
        kcall(op, label, kernel.iommu_get_info, container_fd, buf)
    info_c = uapi.vfio_iommu_type1_info.from_buffer_copy(buf)
    ranges: tuple[tuple[int, int], ...] = ((0, (1 << 64) - 1),)
    avail: int | None = None
    if info_c.flags & uapi.IommuInfoFlag.CAPS and info_c.cap_offset:
        for cap in caps.walk(buf, info_c.cap_offset, start=head):
            if cap.id == uapi.IommuInfoCap.IOVA_RANGE:
                ranges = tuple(caps.iova_ranges(cap))
            elif cap.id == uapi.IommuInfoCap.DMA_AVAIL:
                avail = caps.dma_avail(cap)
    sizes = info_c.iova_pgsizes if info_c.flags & uapi.IommuInfoFlag.PGSIZES else PAGE_SIZE
    return IommuInfo(page_sizes=sizes, iova_ranges=ranges, dma_avail=avail)


def check_iova_args(iova: int | None, dma_mask: int | None) -> None:
    if iova is not None:
        check_int("an IOVA", iova, minimum=0, below=1 << 64)
    if dma_mask is not None:
        check_int("a DMA mask", dma_mask, minimum=1, below=1 << 64)


# --- mappings and buffers ---------------------------------------------------------------------


@define(eq=False, repr=False, slots=False)
class DmaMapping(Resource):
    """A range of process memory mapped into a DMA space.

    Made by `map_dma(...)` (on a container or a device); the IOMMU translation
    exists from `__aenter__` until the context exits (or `aclose()`), on every
    exit path, or until its DMA space retires, whichever comes first.
    """

    space: DmaSpace
    vaddr: int
    size: int
    readonly: bool
    #: the IOVA asked for, None to let the space's allocator choose
    requested_iova: int | None = None
    #: the highest IOVA the device can reach (its DMA mask), None for any
    dma_mask: int | None = None
    #: keeps the caller's buffer exported (un-resizable, un-closable) while mapped
    _pin: memoryview | None = field(default=None, alias="pin")
    #: the mapped bytes when the mapping does not own them (a DmaBuffer's view): lent to
    #: the kernel during the map call, as the pin is
    _memory: memoryview | None = field(default=None, alias="memory")
    _iova: int | None = field(default=None, init=False)

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        if self.closed:
            state = "closed"
        elif self._iova is None:
            state = "not mapped yet"
        else:
            state = "mapped"
        where = f"iova={self._iova:#x} " if self._iova is not None and not self.closed else ""
        return f"<DmaMapping {where}size={self.size:#x} {mode} {state}>"

    @property
    def label(self) -> str:
        where = f" at IOVA {self._iova:#x}" if self._iova is not None else ""
        return f"the DMA mapping{where} of {self.size:#x} bytes"

    @property
    def iova(self) -> int:
        """The IO virtual address the device uses for the first byte."""
        self._check_open()
        assert self._iova is not None
        return self._iova

    @property
    def mapped(self) -> bool:
        return self._state == State.OPEN

    async def __aenter__(self) -> DmaMapping:
        self._begin_open()
        try:
            if self.readonly and self._pin is not None:
                populate_write(self._pin, self.space.page_size)
            # Type1Space.map records the IOVA as soon as the kernel mapped it (so an
            # interruption after that still unmaps it below); others return it.
            self._iova = await self.space.map(self)
        except BaseException:
            self._state = State.CLOSING
            with anyio.CancelScope(shield=True):
                try:
                    await self._release()  # unmaps if the kernel mapped it, drops the pin
                finally:
                    self._finish_close()
            raise
        self._opened()
        return self

    async def _release(self) -> None:
        try:
            iova, self._iova = self._iova, None
            if iova is not None:
                await self.space.unmap(iova, self.size)
        finally:
            self._release_pin()

    def _forget_after_fork(self) -> None:
        super()._forget_after_fork()
        self._iova = None
        self._release_pin()

    def _release_pin(self) -> None:
        pin, self._pin = self._pin, None
        if pin is not None:
            pin.release()


@define(eq=False, repr=False, slots=False)
class DmaBuffer(Resource):
    """Memory allocated for DMA and mapped at `iova`; `view` is a writable memoryview.

    Made by `dma_buffer(...)` (on a container or a device). Entering
    allocates (aligned to the IOMMU page) and maps; leaving unmaps, then frees
    the memory. A view exported past the block (a slice, numpy, a
    PickleBuffer) never keeps the mapping: the memory is unmapped at once and
    freed when the last export goes, with a ResourceWarning naming the holder.
    """

    space: DmaSpace
    size: int
    readonly: bool = False
    dma_mask: int | None = None
    hugepages: bool = False
    align: int = PAGE_SIZE
    _mem: mmap.mmap | None = field(default=None, init=False)
    _mapping: DmaMapping | None = field(default=None, init=False)
    _view: memoryview | None = field(default=None, init=False)

    def __repr__(self) -> str:
        if self.closed:
            state = "closed"
        elif self._mapping is not None and self._mapping.mapped:
            state = f"iova={self._mapping.iova:#x}"
        else:
            state = "not mapped yet"
        return f"<DmaBuffer size={self.size:#x} {state}>"

    @property
    def label(self) -> str:
        return f"the DMA buffer of {self.size:#x} bytes"

    @property
    def mapping(self) -> DmaMapping:
        self._check_open()
        assert self._mapping is not None
        return self._mapping

    @property
    def iova(self) -> int:
        """The IO virtual address the device uses for `view[0]`."""
        # Inline for the open case (every zero-copy command asks): the two
        # property calls and two open checks below only explain a refusal.
        m = self._mapping
        if self._state == _OPEN and m is not None and m._state == _OPEN:
            iova = m._iova
            if iova is not None:
                return iova
        return self.mapping.iova

    @property
    def view(self) -> memoryview:
        """The buffer's bytes, writable, as the device sees them at `iova`."""
        self._check_open()
        assert self._view is not None
        return self._view

    async def __aenter__(self) -> DmaBuffer:
        self._begin_open()
        try:
            await anyio.lowlevel.checkpoint()
            extra = self.align - PAGE_SIZE if self.align > PAGE_SIZE and not self.hugepages else 0
            self._mem = allocate_memory(self.size + extra, hugepages=self.hugepages)
            whole = memoryview(self._mem)
            base, _ = buffer_address(whole)
            skip = -base % self.align if extra else 0
            self._view = whole[skip : skip + self.size]
            whole.release()
            address = base + skip
            if self.readonly:
                populate_write(self._view, self.space.page_size)
            self._mapping = DmaMapping(
                self.space,
                address,
                self.size,
                self.readonly,
                dma_mask=self.dma_mask,
                memory=self._view,
            )
            await self._mapping.__aenter__()
        except BaseException:
            self._state = State.CLOSING
            with anyio.CancelScope(shield=True):
                try:
                    await self._release()
                finally:
                    self._finish_close()
            raise
        self._opened()
        return self

    async def _release(self) -> None:
        """Unmap first; then free the memory, or leave that to the last export."""
        try:
            if self._mapping is not None:
                await self._mapping.aclose()
        finally:
            self._free()

    def _free(self) -> None:
        view, self._view = self._view, None
        mem, self._mem = self._mem, None
        if mem is None:
            return
        held: object = view
        try:
            if view is not None:
                view.release()
            held = mem
            mem.close()
        except BufferError:
            holders = _holders(held, (self, mem, view))
            warnings.warn(
                f"{self.label} is unmapped, but its memory is still exported to {holders}; "
                f"it is freed when that is released (drop views of `view` before leaving "
                f"the block)",
                ResourceWarning,
                stacklevel=4,
            )

    def _forget_after_fork(self) -> None:
        """In a forked child: closed; the memory stays mapped (a view the child holds
        must not fault) but as fresh zero pages, whatever madvise managed at
        allocation (WIPEONFORK did it already; a hugetlb area was DONTFORK)."""
        super()._forget_after_fork()
        mem = self._mem
        if mem is not None and not mem.closed:
            _fork.wipe_in_child(_fork.address_of(mem), len(mem))

    def _release_on_gc(self) -> None:
        # the mapping (a child of the space) is ended by the space; the memory goes with us
        self._view = None
        with contextlib.suppress(BufferError):
            if self._mem is not None:
                self._mem.close()


_ki.protect_module(__name__)
