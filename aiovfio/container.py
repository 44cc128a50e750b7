"""The IOMMU container (legacy VFIO type1 interface).

A container owns `/dev/vfio/vfio`, the IOMMU it gets when its first group
joins, and the DMA mappings made through it. It is an async context manager;
its groups and mappings are context managers nested inside it.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import anyio
from attrs import define, field, frozen

from . import _log, errors
from ._resource import FdResource
from ._uapi import caps
from ._uapi import vfio as uapi
from ._util import PAGE_SIZE, aclose_all, kcall, kcall_thread
from .dma import DmaBuffer, DmaMapping, IovaAllocator, buffer_address
from .kernel import Kernel, default_kernel

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from .group import Group

__all__ = ["Container", "IommuInfo"]

_HUGE_PAGE = 2 * 1024 * 1024


@frozen
class IommuInfo:
    """What VFIO_IOMMU_GET_INFO says about the container's IOMMU."""

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


def _kernel_or_default(kernel: Kernel | None) -> Kernel:
    return kernel if kernel is not None else default_kernel()


@define(eq=False, repr=False, kw_only=True)
class Container(FdResource):
    """An IOMMU container: `async with aiovfio.Container() as c:`.

    Attach groups with `c.group(n)`; the Type1v2 IOMMU is set when the first
    group joins. Map memory with `c.map_dma(buffer)` or allocate mapped memory
    with `c.dma_buffer(size)`.
    """

    kernel: Kernel = field(factory=default_kernel, converter=_kernel_or_default)
    _groups: list[Group] = field(factory=list, init=False)
    _mappings: list[DmaMapping] = field(factory=list, init=False)
    _info: IommuInfo | None = field(default=None, init=False)
    _allocator: IovaAllocator | None = field(default=None, init=False)
    _dma_avail: int | None = field(default=None, init=False)

    def __repr__(self) -> str:
        if self._closed:
            return "<Container closed>"
        if self._fd < 0:
            return "<Container not open>"
        groups = ",".join(str(g.number) for g in self._groups) or "none"
        return (
            f"<Container fd={self._fd} kernel={self.kernel.name} groups={groups} "
            f"mappings={len(self._mappings)}>"
        )

    @property
    def label(self) -> str:
        return f"container (fd {self._fd})" if self._fd >= 0 else "the container"

    @property
    def groups(self) -> tuple[Group, ...]:
        return tuple(self._groups)

    @property
    def mappings(self) -> tuple[DmaMapping, ...]:
        return tuple(self._mappings)

    @property
    def iommu_info(self) -> IommuInfo:
        """Page sizes, IOVA ranges and the DMA entries left (after a group joined)."""
        self._check_open()
        if self._info is None:
            raise errors.UsageError(
                "the container has no IOMMU yet: attach a group first (`container.group(n)`)"
            )
        return _replace_avail(self._info, self._dma_avail)

    # --- lifetime ----------------------------------------------------------------

    async def __aenter__(self) -> Container:
        self._enter_once()
        await anyio.lowlevel.checkpoint()
        k = self.kernel
        if not k.vfio_available():
            raise errors.VfioUnavailable(
                "/dev/vfio/vfio is missing: load the vfio-pci module (`modprobe vfio-pci`) "
                "and check the IOMMU is on (`aiovfio doctor`)"
            )
        self._fd = kcall("open", "/dev/vfio/vfio", k.open_container)
        try:
            version = kcall("VFIO_GET_API_VERSION", self.label, k.get_api_version, self._fd)
            if version != uapi.VFIO_API_VERSION:
                raise errors.ApiVersionMismatch(
                    f"VFIO API version {version} is not {uapi.VFIO_API_VERSION}: "
                    f"this kernel speaks a VFIO that aiovfio does not know"
                )
            has_v2 = kcall(
                "VFIO_CHECK_EXTENSION",
                self.label,
                k.check_extension,
                self._fd,
                uapi.Extension.TYPE1v2_IOMMU,
            )
            if not has_v2:
                raise errors.IommuTypeUnsupported(
                    "the container does not offer the Type1v2 IOMMU: enable the IOMMU "
                    "(intel_iommu=on or amd_iommu=on) and load vfio_iommu_type1"
                )
        except BaseException:
            self._close_fd()
            raise
        _log.debug("container.open", fd=self._fd, kernel=k.name)
        return self

    async def aclose(self) -> None:
        """Unmap what is still mapped, release groups, close; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                # A mapping whose unmap fails is dropped by the kernel when the
                # last group leaves (the IOMMU goes with it), so go on regardless.
                await aclose_all([*reversed(self._mappings), *reversed(self._groups)])
            finally:
                self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            kcall("close", f"container (fd {fd})", self.kernel.close, fd)
            _log.debug("container.close", fd=fd)

    # --- groups ------------------------------------------------------------------

    def group(self, number: int) -> Group:
        """Attach IOMMU group `number` (an async context manager yielding the Group)."""
        from .group import Group

        self._check_open()
        if not isinstance(number, int) or number < 0:
            raise errors.InvalidArgument(f"an IOMMU group number is an int >= 0, not {number!r}")
        return Group(self, number)

    def _attached(self, group: Group) -> None:
        """Called by a group that has just joined: set the IOMMU on the first one."""
        k = self.kernel
        if not self._groups:
            kcall(
                "VFIO_SET_IOMMU",
                f"{self.label} with group {group.number}",
                k.set_iommu,
                self._fd,
                uapi.Extension.TYPE1v2_IOMMU,
            )
            self._groups.append(group)
            self._info = self._query_info()
            self._dma_avail = self._info.dma_avail
            self._allocator = IovaAllocator(self._info.iova_ranges, self._info.min_page_size)
        else:
            self._groups.append(group)

    def _detached(self, group: Group) -> None:
        """Called by a group that has left; the last one takes the IOMMU with it.

        A group whose VFIO_SET_IOMMU failed was never added: nothing to remove.
        """
        if group in self._groups:
            self._groups.remove(group)
        if not self._groups:
            self._info = None
            self._allocator = None
            self._dma_avail = None

    def _query_info(self) -> IommuInfo:
        head = ctypes.sizeof(uapi.vfio_iommu_type1_info)
        buf = bytearray(head)
        info = uapi.vfio_iommu_type1_info.from_buffer(buf)
        info.argsz = head
        del info
        op = "VFIO_IOMMU_GET_INFO"
        kcall(op, self.label, self.kernel.iommu_get_info, self._fd, buf)
        need = uapi.vfio_iommu_type1_info.from_buffer_copy(buf).argsz
        if need > head:
            buf = bytearray(need)
            info = uapi.vfio_iommu_type1_info.from_buffer(buf)
            info.argsz = need
            del info
            kcall(op, self.label, self.kernel.iommu_get_info, self._fd, buf)
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

    # --- DMA ---------------------------------------------------------------------

    def map_dma(
        self,
        buffer: Buffer,
        *,
        iova: int | None = None,
        readonly: bool = False,
        dma_mask: int | None = None,
    ) -> DmaMapping:
        """Map a page-aligned writable buffer for the device (an async context manager).

        `iova` None lets the container choose one below `dma_mask`;
        `readonly=True` forbids device writes.
        """
        self._check_open()
        page = self._page_size()
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
        _check_iova_args(iova, dma_mask)
        pin = memoryview(buffer)
        return DmaMapping(
            self, address, length, bool(readonly), requested_iova=iova, dma_mask=dma_mask, pin=pin
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

        `size` is rounded up to the page size (2 MiB with `hugepages`).
        """
        self._check_open()
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise errors.InvalidArgument(f"a DMA buffer size is an int > 0, not {size!r}")
        if size > 1 << 46:
            raise errors.InvalidArgument(f"a DMA buffer of {size:#x} bytes is beyond any IOMMU")
        _check_iova_args(None, dma_mask)
        unit = _HUGE_PAGE if hugepages else max(self._page_size(), PAGE_SIZE)
        rounded = (size + unit - 1) // unit * unit
        return DmaBuffer(
            self, rounded, readonly=bool(readonly), dma_mask=dma_mask, hugepages=bool(hugepages)
        )

    def _page_size(self) -> int:
        return self._info.min_page_size if self._info is not None else PAGE_SIZE

    async def _map(self, mapping: DmaMapping) -> int:
        """Reserve an IOVA, check the entry budget, pin and map in a worker thread."""
        await anyio.lowlevel.checkpoint()
        self._check_open()
        if self._allocator is None:
            raise errors.UsageError(
                "the container has no IOMMU yet: attach a group before mapping DMA"
            )
        if self._dma_avail is not None and self._dma_avail <= 0:
            limit = len(self._mappings)
            raise errors.DmaSpaceExhausted(
                f"{self.label} has no DMA entries left: {limit} mappings are live and the "
                f"kernel allows no more (0 left); unmap some, or raise "
                f"vfio_iommu_type1.dma_entry_limit"
            )
        alloc = self._allocator
        if mapping.requested_iova is None:
            iova = alloc.allocate(mapping.size, limit=mapping.dma_mask)
        else:
            iova = mapping.requested_iova
            alloc.reserve(iova, mapping.size, limit=mapping.dma_mask)
        arg = uapi.vfio_iommu_type1_dma_map(
            argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_map),
            flags=uapi.DmaMapFlag.READ | (0 if mapping.readonly else uapi.DmaMapFlag.WRITE),
            vaddr=mapping.vaddr,
            iova=iova,
            size=mapping.size,
        )
        try:
            await kcall_thread(
                "VFIO_IOMMU_MAP_DMA",
                f"{self.label} at IOVA {iova:#x} size {mapping.size:#x}",
                self.kernel.map_dma,
                self._fd,
                arg,
            )
        except BaseException:
            alloc.release(iova, mapping.size)
            raise
        self._mappings.append(mapping)
        if self._dma_avail is not None:
            self._dma_avail -= 1
        _log.debug("dma.map", iova=hex(iova), size=mapping.size, readonly=mapping.readonly)
        return iova

    async def _unmap(self, mapping: DmaMapping, iova: int) -> None:
        """Unmap in a worker thread (the caller shields it) and check the size.

        When the kernel refuses, the mapping stays on the books so that
        closing the container tries again (and closing the fd drops it anyway).
        """
        if mapping not in self._mappings:
            return
        if self._fd < 0 or self._allocator is None:
            self._mappings.remove(mapping)  # the IOMMU went first: the kernel dropped it
            return
        arg = uapi.vfio_iommu_type1_dma_unmap(
            argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_unmap),
            flags=0,
            iova=iova,
            size=mapping.size,
        )
        target = f"{self.label} at IOVA {iova:#x} size {mapping.size:#x}"
        await kcall_thread("VFIO_IOMMU_UNMAP_DMA", target, self.kernel.unmap_dma, self._fd, arg)
        self._mappings.remove(mapping)
        self._allocator.release(iova, mapping.size)
        if self._dma_avail is not None:
            self._dma_avail += 1
        _log.debug("dma.unmap", iova=hex(iova), size=mapping.size)
        if arg.size != mapping.size:
            raise errors.KernelError(
                5,
                f"VFIO_IOMMU_UNMAP_DMA on {target} unmapped {arg.size:#x} bytes, "
                f"not {mapping.size:#x}",
                operation="VFIO_IOMMU_UNMAP_DMA",
                target=target,
            )


def _check_iova_args(iova: int | None, dma_mask: int | None) -> None:
    if iova is not None and (not isinstance(iova, int) or iova < 0 or iova >= 1 << 64):
        raise errors.InvalidArgument(f"an IOVA is an int in [0, 2**64), not {iova!r}")
    if dma_mask is not None and (
        not isinstance(dma_mask, int) or dma_mask <= 0 or dma_mask >= 1 << 64
    ):
        raise errors.InvalidArgument(f"a DMA mask is an int in (0, 2**64), not {dma_mask!r}")


def _replace_avail(info: IommuInfo, avail: int | None) -> IommuInfo:
    if avail == info.dma_avail:
        return info
    return IommuInfo(page_sizes=info.page_sizes, iova_ranges=info.iova_ranges, dma_avail=avail)
