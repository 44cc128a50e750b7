"""noiommu: VFIO without an IOMMU, by explicit opt-in only (`open_device(..., noiommu=True)`).

With `vfio.enable_unsafe_noiommu_mode=1` a device behind no IOMMU gets a
fake group, /dev/vfio/noiommu-N, and a container that takes only the
VFIO_NOIOMMU_IOMMU type: nothing translates, so the device reaches
*physical* memory, all of it. aiovfio goes there only when asked
(`noiommu=True`, the CLI's `--noiommu`, or `AIOVFIO_NOIOMMU=1`), and says so:
a `NoiommuWarning`, a warning in the log, and "UNSAFE noiommu" in reprs.

`NoiommuSpace` is the DMA space of such a container. A buffer's "IOVA" is
the physical address of its first page, from /proc/self/pagemap (as root),
and its pages stay mlocked while it is mapped so that address stays true.
The device needs the pages physically contiguous and below its DMA mask;
`NoiommuBuffer` allocates a pool, keeps the first run of pages that
qualifies and frees the rest. When nothing qualifies (or a caller's own
buffer for `map_dma` does not), it is refused with `NoiommuDmaError`.
"""

from __future__ import annotations

import mmap
import os

import anyio
from attrs import define, field

from . import _ki, _log, errors
from ._resource import State
from ._util import PAGE_SIZE, kcall, kcall_thread
from .dma import _HUGE_PAGE, DmaBuffer, DmaMapping, DmaSpace, allocate_memory, buffer_address

__all__ = [
    "NOIOMMU_RISK",
    "NoiommuBuffer",
    "NoiommuSpace",
    "opted_in",
    "physical_run",
]

#: What the opt-in risks, for refusals and warnings.
NOIOMMU_RISK = (
    "without an IOMMU the device can read and write all physical memory: a driver bug "
    "or a misprogrammed DMA corrupts the kernel or other processes, and nothing isolates "
    "the device (CAP_SYS_RAWIO is needed, and the kernel is tainted)"
)


def opted_in(explicit: bool = False) -> bool:
    """The noiommu opt-in: `explicit` (noiommu=True) or $AIOVFIO_NOIOMMU=1 (`--noiommu`)."""
    flag = os.environ.get("AIOVFIO_NOIOMMU", "").strip().lower()
    return explicit or flag in ("1", "yes", "true", "on")


#: Pages tried per DMA buffer when looking for a physically contiguous run.
POOL_PAGES = 256


def physical_run(
    pages: tuple[int, ...], count: int, limit: int | None, page: int = PAGE_SIZE
) -> int | None:
    """Index of the first run of `count` contiguous present pages ending at or below `limit`."""
    for i in range(len(pages) - count + 1):
        first = pages[i]
        if not first:
            continue
        if limit is not None and first + count * page - 1 > limit:
            continue
        if all(pages[i + j] == first + j * page for j in range(1, count)):
            return i
    return None


@define(eq=False, repr=False, slots=False, kw_only=True)
class NoiommuSpace(DmaSpace):
    """No address space at all: "IOVAs" are physical addresses of mlocked pages."""

    backend = "noiommu"
    map_operation = "mlock"
    unmap_operation = "munlock"
    #: physical address -> (virtual address, size) of every mapped range (mlocked)
    _locked: dict[int, tuple[int, int]] = field(factory=dict, init=False)

    @property
    def mapping_count(self) -> int:
        return len(self._locked)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + " UNSAFE noiommu>"

    def dma_buffer(
        self,
        size: int,
        *,
        dma_mask: int | None = None,
        readonly: bool = False,
        hugepages: bool = False,
    ) -> DmaBuffer:
        """Allocate physically contiguous, mlocked memory below `dma_mask` (see the module)."""
        self._check_open()
        buf = super().dma_buffer(size, dma_mask=dma_mask, readonly=readonly, hugepages=hugepages)
        self._children.discard(buf)
        return NoiommuBuffer(
            self,
            buf.size,
            readonly=buf.readonly,
            dma_mask=buf.dma_mask,
            hugepages=buf.hugepages,
            align=buf.align,
            owner=self._children,
        )

    async def map(self, mapping: DmaMapping) -> int:
        """mlock the pages, read their physical addresses, check them: that is the IOVA."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        if mapping.requested_iova is not None:
            raise errors.InvalidArgument(
                "without an IOMMU the IOVA is the memory's physical address: pass no iova="
            )
        k = self.kernel
        target = f"{self.name} memory at {mapping.vaddr:#x} size {mapping.size:#x}"
        locked = False

        def own(_: None) -> None:  # before any interruption leaves the await
            nonlocal locked
            locked = True

        try:
            await kcall_thread("mlock", target, k.mlock, mapping.vaddr, mapping.size, then=own)
            phys = kcall(
                "/proc/self/pagemap", target, k.physical_pages, mapping.vaddr, mapping.size
            )
            count = len(phys)
            if physical_run(phys, count, mapping.dma_mask, self.page_size) != 0:
                raise errors.NoiommuDmaError(_why(phys, mapping.dma_mask, self.page_size))
        except BaseException:
            if locked:
                kcall("munlock", target, k.munlock, mapping.vaddr, mapping.size)
            raise
        self._pinned += mapping.size
        self._locked[phys[0]] = (mapping.vaddr, mapping.size)
        _log.debug("dma.map", iova=hex(phys[0]), size=mapping.size, noiommu=True)
        return phys[0]

    async def unmap(self, iova: int, size: int) -> None:
        """munlock (the caller shields it); the memory itself is the mapping's to free."""
        vaddr, size = self._locked.pop(iova, (0, 0))
        if size:
            self._pinned -= size
            kcall("munlock", self.name, self.kernel.munlock, vaddr, size)
        _log.debug("dma.unmap", iova=hex(iova), size=size, noiommu=True)

    def _kernel_map(self, vaddr: int, iova: int, size: int, readonly: bool) -> None:
        raise AssertionError("noiommu maps through map()")  # pragma: no cover

    def _kernel_unmap(self, iova: int, size: int) -> int:
        raise AssertionError("noiommu unmaps through unmap()")  # pragma: no cover


def _why(phys: tuple[int, ...], limit: int | None, page: int) -> str:
    if not all(phys):
        return (
            "noiommu DMA: a page of the buffer is not resident; touch the memory first "
            "(or use dma_buffer, which does)"
        )
    if limit is not None and phys[0] + len(phys) * page - 1 > limit:
        return (
            f"noiommu DMA: the buffer is at physical {phys[0]:#x}, above the device's DMA mask "
            f"{limit:#x}: without an IOMMU it cannot reach it; use dma_buffer (it searches "
            f"low memory), or a machine with less memory above the mask"
        )
    return (
        f"noiommu DMA: the buffer's {len(phys)} pages are not physically contiguous: a "
        f"device without an IOMMU needs them so; use dma_buffer, smaller buffers, or hugepages"
    )


@define(eq=False, repr=False, slots=False)
class NoiommuBuffer(DmaBuffer):
    """A DmaBuffer whose pages are physically contiguous and below the DMA mask."""

    _pool: mmap.mmap | None = field(default=None, init=False)

    async def _contiguous(
        self, count: int, page: int, *, hugepages: bool, quiet: bool = False
    ) -> tuple[memoryview, int] | None:
        """Fresh memory holding `count` physically contiguous pages below the mask:
        (a view of all of it, the run's first page), kept as `_mem`; None if it has none.

        `quiet`: a failing hugetlb mmap (none reserved or free) is None, not an error.
        """
        k = self.space.kernel
        size = max(POOL_PAGES, 4 * count) * page
        if hugepages:
            size = -(-count * page // _HUGE_PAGE) * _HUGE_PAGE
        try:
            mem = allocate_memory(size, hugepages=hugepages)
        except errors.VfioError:
            if quiet:
                return None
            raise
        view = memoryview(mem)
        try:
            base, _ = buffer_address(view)
            for i in range(size // page):  # fault every page in, so each has a frame
                view[i * page] = 0
            phys = await kcall_thread(
                "/proc/self/pagemap", self.label, k.physical_pages, base, size
            )
        except BaseException:
            view.release()
            mem.close()
            raise
        start = physical_run(phys, count, self.dma_mask, page)
        if start is None:
            view.release()
            mem.close()
            return None
        self._mem = mem
        return view, start

    async def __aenter__(self) -> DmaBuffer:
        self._begin_open()
        try:
            await anyio.lowlevel.checkpoint()
            space = self.space
            page = space.page_size
            count = self.size // page
            found = await self._contiguous(count, page, hugepages=self.hugepages)
            if found is None and not self.hugepages and self.size <= _HUGE_PAGE:
                # a hugetlb page is physically contiguous: the fallback when the
                # buddy allocator's 4 KiB pages gave no run (memory fragments)
                found = await self._contiguous(count, page, hugepages=True, quiet=True)
            if found is None:
                raise errors.NoiommuDmaError(
                    f"noiommu DMA: none of {max(POOL_PAGES, 4 * count)} fresh pages gives "
                    f"{count} physically contiguous page(s)"
                    + (f" below the DMA mask {self.dma_mask:#x}" if self.dma_mask else "")
                    + ", and no free hugepage did either; a device without an IOMMU needs "
                    "that: use a smaller buffer, reserve hugepages "
                    "(/proc/sys/vm/nr_hugepages, or hugepages=N at boot), or boot with less "
                    "memory above the mask"
                )
            view, start = found
            base, _ = buffer_address(view)
            self._view = view[start * page : (start + count) * page]
            view.release()
            self._mapping = DmaMapping(
                space, base + start * page, self.size, self.readonly, dma_mask=self.dma_mask
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


_ki.protect_module(__name__)
