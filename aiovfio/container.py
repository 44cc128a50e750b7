"""The IOMMU container (legacy VFIO type1 interface).

A container owns `/dev/vfio/vfio` and, while at least one group is attached,
a type1 DMA space (`dma.Type1Space`): VFIO_SET_IOMMU creates it when the
first group joins; the last group leaving retires it (unmapping what is
left). Groups get a `Type1Attachment`, never the container itself.
"""

from __future__ import annotations

import errno
import mmap
import warnings
from typing import TYPE_CHECKING

import anyio
from attrs import define, field

from . import _ki, _log, errors
from ._resource import FdResource
from ._uapi import vfio as uapi
from ._util import check_int, check_kernel, kcall
from .dma import DmaBuffer, DmaMapping, DmaSpace, IommuInfo, Type1Space, query_type1_info
from .group import Group
from .kernel import Kernel, default_kernel
from .noiommu import NOIOMMU_RISK, NoiommuSpace, opted_in

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Container", "IommuInfo", "Type1Attachment"]


def _kernel_or_default(kernel: Kernel | None) -> Kernel:
    if kernel is None:
        return default_kernel()
    check_kernel(kernel)
    return kernel


@define(eq=False, repr=False, slots=False)
class Type1Attachment:
    """What a group is handed to join (and leave) its container's address space.

    The first group to join sets the IOMMU, which creates the DMA space; the
    last to leave retires it before it unsets the container, so every
    mapping is unmapped while the IOMMU still exists.
    """

    kernel: Kernel
    container_fd: int
    label: str
    _groups: list[int] = field(factory=list, init=False)  # group fds, in joining order
    space: DmaSpace | None = field(default=None, init=False)

    def join(self, group_fd: int, group_label: str) -> DmaSpace:
        """GROUP_SET_CONTAINER, then VFIO_SET_IOMMU when it is the first group."""
        k = self.kernel
        kcall(
            "VFIO_GROUP_SET_CONTAINER",
            group_label,
            k.group_set_container,
            group_fd,
            self.container_fd,
        )
        if self.space is None:
            try:
                kcall(
                    "VFIO_SET_IOMMU",
                    f"{self.label} with {group_label}",
                    k.set_iommu,
                    self.container_fd,
                    self.iommu_type,
                )
                space = self._new_space()
            except BaseException:
                kcall("VFIO_GROUP_UNSET_CONTAINER", group_label, k.group_unset_container, group_fd)
                raise
            self.space = space
        self._groups.append(group_fd)
        return self.space

    #: the VFIO_SET_IOMMU type the first group sets
    iommu_type = uapi.Extension.TYPE1v2_IOMMU

    def _new_space(self) -> DmaSpace:
        """The address space SET_IOMMU just created."""
        info = query_type1_info(self.kernel, self.container_fd, self.label)
        return Type1Space(
            kernel=self.kernel, info=info, name=self.label, container_fd=self.container_fd
        )

    async def leave(self, group_fd: int, group_label: str) -> None:
        """Retire the space when this is the last group, then GROUP_UNSET_CONTAINER.

        The kernel detaches a group itself when its last device is unbound
        while the group is open (an unbind after REQ); then the IOMMU and its
        mappings are gone already, and neither the unmaps nor the unset can
        succeed: that is not an error.
        """
        k = self.kernel
        if group_fd in self._groups:
            self._groups.remove(group_fd)
        try:
            if not self._groups and self.space is not None:
                space, self.space = self.space, None
                try:
                    await space.aclose()
                except errors.KernelError:
                    if self._attached(group_fd):
                        raise
                    _log.debug("container.detached_by_kernel", group=group_label)
        finally:
            try:
                kcall("VFIO_GROUP_UNSET_CONTAINER", group_label, k.group_unset_container, group_fd)
            except errors.InvalidRequest:
                if self._attached(group_fd):
                    raise
                _log.debug("container.detached_by_kernel", group=group_label)

    def _attached(self, group_fd: int) -> bool:
        """Whether the kernel still counts the group in a container (GROUP_GET_STATUS)."""
        arg = uapi.vfio_group_status(argsz=8, flags=0)
        try:
            self.kernel.group_get_status(group_fd, arg)
        except OSError as exc:
            # ENODEV: the group itself is gone (Linux revokes it with its last device)
            return exc.errno != errno.ENODEV  # else: cannot tell, report the first failure
        return bool(arg.flags & uapi.GroupFlag.CONTAINER_SET)

    @property
    def group_count(self) -> int:
        return len(self._groups)


@define(eq=False, repr=False, slots=False)
class NoiommuAttachment(Type1Attachment):
    """The noiommu container's attachment: SET_IOMMU(NOIOMMU) and a space of physical addresses."""

    iommu_type = uapi.Extension.NOIOMMU_IOMMU

    def _new_space(self) -> DmaSpace:
        info = IommuInfo(
            page_sizes=mmap.PAGESIZE, iova_ranges=((0, (1 << 64) - 1),), dma_avail=None
        )
        return NoiommuSpace(kernel=self.kernel, info=info, name=f"{self.label} (noiommu)")


@define(eq=False, repr=False, slots=False, kw_only=True)
class Container(FdResource):
    """An IOMMU container: `async with aiovfio.Container() as c:`.

    Attach groups with `c.group(n)`; the Type1v2 IOMMU is set when the first
    group joins. Map memory with `c.map_dma(buffer)` or allocate mapped memory
    with `c.dma_buffer(size)`.
    """

    kernel: Kernel = field(factory=default_kernel, converter=_kernel_or_default)
    #: a container for noiommu groups only (VFIO_NOIOMMU_IOMMU: `aiovfio.noiommu`). A
    #: default container takes IOMMU groups, and noiommu groups too when
    #: $AIOVFIO_NOIOMMU=1 opts in: the first group decides the container's kind.
    noiommu: bool = False
    _attachment: Type1Attachment | NoiommuAttachment | None = field(default=None, init=False)

    def __repr__(self) -> str:
        if self.closed:
            return "<Container closed>"
        if self._fd < 0:
            return "<Container not open>"
        groups = ",".join(str(g.number) for g in self.groups) or "none"
        space = self.dma_space_or_none
        n = space.mapping_count if space is not None else 0
        return f"<Container fd={self._fd} kernel={self.kernel.name} groups={groups} mappings={n}>"

    @property
    def label(self) -> str:
        return f"container (fd {self._fd})" if self._fd >= 0 else "the container"

    @property
    def groups(self) -> tuple[Group, ...]:
        return self._children.of_type(Group)

    @property
    def dma_space_or_none(self) -> DmaSpace | None:
        a = self._attachment
        return a.space if a is not None else None

    @property
    def dma_space(self) -> DmaSpace:
        """The type1 address space (exists while a group is attached)."""
        self._check_open()
        space = self.dma_space_or_none
        if space is None:
            raise errors.UsageError(
                "the container has no IOMMU yet: attach a group first (`container.group(n)`)"
            )
        return space

    @property
    def mappings(self) -> tuple[DmaMapping | DmaBuffer, ...]:
        space = self.dma_space_or_none
        if space is None:
            return ()
        return tuple(c for c in space._children if isinstance(c, (DmaMapping, DmaBuffer)))

    @property
    def iommu_info(self) -> IommuInfo:
        """Page sizes, IOVA ranges and the DMA entries left (after a group joined)."""
        return self.dma_space.iommu_info

    # --- lifetime ----------------------------------------------------------------

    async def __aenter__(self) -> Container:
        self._begin_open()
        try:
            await anyio.lowlevel.checkpoint()
            k = self.kernel
            if not k.vfio_available():
                raise errors.VfioUnavailable(
                    "/dev/vfio/vfio is missing: load the vfio-pci module (`modprobe vfio-pci`) "
                    "and check the IOMMU is on (`aiovfio doctor`)"
                )
            self._fd = kcall("open", "/dev/vfio/vfio", k.open_container)
            version = kcall("VFIO_GET_API_VERSION", self.label, k.get_api_version, self._fd)
            if version != uapi.VFIO_API_VERSION:
                raise errors.ApiVersionMismatch(
                    f"VFIO API version {version} is not {uapi.VFIO_API_VERSION}: "
                    f"this kernel speaks a VFIO that aiovfio does not know"
                )
            iommu = uapi.Extension.NOIOMMU_IOMMU if self.noiommu else uapi.Extension.TYPE1v2_IOMMU
            has_v2 = kcall("VFIO_CHECK_EXTENSION", self.label, k.check_extension, self._fd, iommu)
            if not has_v2 and self.noiommu:
                raise errors.IommuTypeUnsupported(
                    "the container does not offer VFIO_NOIOMMU_IOMMU: boot with "
                    "vfio.enable_unsafe_noiommu_mode=1 on a kernel built with CONFIG_VFIO_NOIOMMU"
                )
            if not has_v2 and opted_in():  # noiommu groups only, by the opt-in
                has_v2 = kcall(
                    "VFIO_CHECK_EXTENSION",
                    self.label,
                    k.check_extension,
                    self._fd,
                    uapi.Extension.NOIOMMU_IOMMU,
                )
            if not has_v2:
                raise errors.IommuTypeUnsupported(
                    "the container does not offer the Type1v2 IOMMU: enable the IOMMU "
                    "(intel_iommu=on or amd_iommu=on) and load vfio_iommu_type1"
                )
        except BaseException:
            self._abort_open()
            raise
        self._opened()
        _log.debug("container.open", fd=self._fd, kernel=self.kernel.name)
        return self

    def _abort_open(self) -> None:
        self._state = self._state.CLOSING
        try:
            self._close_fd()
        finally:
            self._finish_close()

    async def _shutdown(self) -> None:
        """Groups newest first (the last one retires the DMA space), then the fd."""
        try:
            await self._children.aclose_all()
            a = self._attachment
            if a is not None and a.space is not None:  # no group left, yet a space: retire it
                space, a.space = a.space, None
                await space.aclose()
        finally:
            self._close_fd()

    def _close_fd(self) -> None:
        fd = self._take_fd()
        if fd >= 0:
            kcall("close", f"container (fd {fd})", self.kernel.close, fd)
            _log.debug("container.close", fd=fd)

    def _release_on_gc(self) -> None:
        fd = self._take_fd()
        if fd >= 0:
            self.kernel.close(fd)

    # --- groups ------------------------------------------------------------------

    def group(self, number: int) -> Group:
        """Attach IOMMU group `number` (an async context manager yielding the Group)."""
        self._check_open()
        check_int("an IOMMU group number", number, minimum=0)
        noiommu = self._is_noiommu(number)
        attachment = self._attachment_for(number, noiommu)
        if noiommu:
            warnings.warn(
                f"group {number} (/dev/vfio/noiommu-{number}) is driven without an IOMMU "
                f"(noiommu): {NOIOMMU_RISK}",
                errors.NoiommuWarning,
                stacklevel=2,
            )
        return Group(
            kernel=self.kernel,
            number=number,
            attachment=attachment,
            noiommu=noiommu,
            owner=self._children,
        )

    def _is_noiommu(self, number: int) -> bool:
        """Whether group `number` is a noiommu one; refused without the opt-in."""
        k = self.kernel
        if not kcall("sysfs", f"IOMMU group {number}", k.noiommu_group, number):
            if self.noiommu:
                raise errors.InvalidArgument(
                    f"group {number} is an IOMMU group and this is a noiommu container "
                    "(`Container(noiommu=True)`): attach it to a default `Container()`"
                )
            return False
        if not opted_in(self.noiommu):
            raise errors.NoiommuRefused(
                f"group {number} is a noiommu group (/dev/vfio/noiommu-{number}): opt in with "
                "`Container(noiommu=True)` or $AIOVFIO_NOIOMMU=1, which risks this: "
                f"{NOIOMMU_RISK}"
            )
        return True

    def _attachment_for(self, number: int, noiommu: bool) -> Type1Attachment:
        """The container's attachment; the first group decides its kind."""
        kind = NoiommuAttachment if noiommu else Type1Attachment
        a = self._attachment
        if a is not None and type(a) is not kind:
            if a.group_count:
                held, this = ("IOMMU", "noiommu") if noiommu else ("noiommu", "IOMMU")
                raise errors.InvalidArgument(
                    f"group {number} is a {this} group and this container holds {held} "
                    "groups: one container holds one kind; open another container for it"
                )
            a = None
        if a is None:
            a = self._attachment = kind(self.kernel, self._fd, self.label)
        return a

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
        return self.dma_space.map_dma(buffer, iova=iova, readonly=readonly, dma_mask=dma_mask)

    def dma_buffer(
        self,
        size: int,
        *,
        dma_mask: int | None = None,
        readonly: bool = False,
        hugepages: bool = False,
    ) -> DmaBuffer:
        """Allocate zeroed memory and map it (an async context manager yielding a DmaBuffer).

        `size` is rounded up to the IOMMU page size (2 MiB with `hugepages`).
        """
        return self.dma_space.dma_buffer(
            size, dma_mask=dma_mask, readonly=readonly, hugepages=hugepages
        )


_ki.protect_module(__name__)
