"""An IOMMU group: the unit VFIO isolates, attached to an address space while open."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Protocol

import anyio
from attrs import define, field

from . import _ki, _log, errors
from ._resource import FdResource, State, live_resources
from ._uapi import vfio as uapi
from ._util import kcall, keeps_group_viable, normalize_bdf
from .device import Device

if TYPE_CHECKING:
    from .dma import DmaSpace
    from .kernel import Kernel

__all__ = ["Attachment", "Group", "offenders"]


class Attachment(Protocol):
    """How a group joins an address space (the type1 container's `Type1Attachment`)."""

    label: str

    def join(self, group_fd: int, group_label: str) -> DmaSpace: ...

    async def leave(self, group_fd: int, group_label: str) -> None: ...


def offenders(kernel: Kernel, number: int) -> tuple[errors.Offender, ...]:
    """The members of group `number` bound to a driver that makes it unviable."""
    found = []
    try:
        for name in kernel.group_devices(number):
            drv = kernel.driver(name)
            if not keeps_group_viable(drv):
                found.append(errors.Offender(name, drv))
    except OSError:
        return ()
    return tuple(found)


@define(eq=False, repr=False, slots=False, kw_only=True)
class Group(FdResource):
    """IOMMU group `number`, attached to its container while its context is open."""

    kernel: Kernel
    number: int
    _attachment: Attachment = field(alias="attachment")
    #: VFIO's fake group of a device without an IOMMU (/dev/vfio/noiommu-N)
    noiommu: bool = False
    _space: DmaSpace | None = field(default=None, init=False)

    def __repr__(self) -> str:
        if self.closed:
            state = "closed"
        elif self._fd < 0:
            state = "not open"
        else:
            names = ",".join(d.name for d in self.devices) or "no devices open"
            state = f"fd={self._fd} {names}"
        return f"<Group {self.number} {state}>"

    @property
    def label(self) -> str:
        return f"group {self.number}"

    @property
    def devices(self) -> tuple[Device, ...]:
        """The devices opened through this group and not closed yet."""
        return self._children.of_type(Device)

    @property
    def dma_space(self) -> DmaSpace:
        """The address space the group is attached to."""
        self._check_open()
        assert self._space is not None
        return self._space

    @property
    def device_names(self) -> tuple[str, ...]:
        """The PCI addresses of every member of the group (from sysfs)."""
        return kcall("sysfs", self.label, self.kernel.group_devices, self.number)

    @property
    def viable(self) -> bool:
        """Whether every member is bound to a VFIO driver or to none."""
        return bool(self._status() & uapi.GroupFlag.VIABLE)

    def _status(self) -> int:
        self._check_open()
        arg = uapi.vfio_group_status(argsz=8, flags=0)
        kcall("VFIO_GROUP_GET_STATUS", self.label, self.kernel.group_get_status, self._fd, arg)
        return int(arg.flags)

    # --- lifetime ----------------------------------------------------------------

    async def __aenter__(self) -> Group:
        self._begin_open()
        try:
            await anyio.lowlevel.checkpoint()
            try:
                opener = self.kernel.open_noiommu_group if self.noiommu else self.kernel.open_group
                self._fd = opener(self.number)
            except OSError as exc:
                raise self._open_error(exc) from exc
            flags = self._status()
            if not flags & uapi.GroupFlag.VIABLE:
                raise errors.GroupNotViable(self.number, offenders(self.kernel, self.number))
            self._space = self._attachment.join(self._fd, self.label)
        except BaseException:
            self._state = State.CLOSING
            with anyio.CancelScope(shield=True):
                try:
                    await self._release()
                finally:
                    self._finish_close()
            raise
        self._opened()
        _log.debug("group.open", group=self.number, fd=self._fd)
        return self

    def _open_error(self, exc: OSError) -> errors.VfioError:
        path = f"/dev/vfio/{'noiommu-' if self.noiommu else ''}{self.number}"
        if exc.errno == errno.ENOENT:
            return errors.from_oserror(
                exc,
                "open",
                path,
                hint=f"no VFIO group {self.number}: bind its devices to vfio-pci "
                f"(`aiovfio bind BDF`) or check the number with `aiovfio ls`",
            )
        if exc.errno == errno.EBUSY and self._bound_cdev() is not None:
            hint = (
                f"{self._bound_cdev()} of group {self.number} is open through its VFIO cdev "
                f"(iommufd): a cdev and its group exclude each other; close it, or open the "
                f"device with backend='iommufd'"
            )
            return errors.from_oserror(exc, "open", path, hint=hint)
        if exc.errno == errno.EBUSY:
            holder = self._holder_here()
            if holder is not None:
                hint = (
                    f"group {self.number} is already open in this process, as {holder!r}; "
                    f"use that one, or leave its `async with` first (one opener at a time)"
                )
            else:
                hint = (
                    f"group {self.number} is already open in another process (one opener at "
                    f"a time), or a device of it is open through its VFIO cdev (iommufd); "
                    f"find it with `fuser -v {path}` and close it"
                )
            return errors.from_oserror(exc, "open", path, hint=hint)
        return errors.from_oserror(exc, "open", path)

    def _bound_cdev(self) -> str | None:
        """A device of this group open here through its cdev (the iommufd backend)."""
        for r in live_resources():
            if isinstance(r, Device) and r.group_number == self.number and r.cdev_path:
                return f"device {r.name}"
        return None

    def _holder_here(self) -> Group | None:
        for r in live_resources():
            if isinstance(r, Group) and r is not self and r.number == self.number and r._fd >= 0:
                return r
        return None

    async def _release(self) -> None:
        """Leave the address space (the last group retires it), then close the fd."""
        fd = self._fd
        try:
            if self._space is not None:
                self._space = None
                await self._attachment.leave(fd, self.label)
        finally:
            fd = self._take_fd()
            if fd >= 0:
                kcall("close", self.label, self.kernel.close, fd)
                _log.debug("group.close", group=self.number, fd=fd)

    def _release_on_gc(self) -> None:
        fd = self._take_fd()
        if fd >= 0:
            self.kernel.close(fd)

    # --- devices -----------------------------------------------------------------

    def open_device(self, name: str, *, dma_mask: int | None = None) -> Device:
        """Open a member of the group by PCI address (an async context manager)."""
        self._check_open()
        assert self._space is not None
        return Device(
            kernel=self.kernel,
            name=normalize_bdf(name),
            group_fd=self._fd,
            group_label=self.label,
            group_number=self.number,
            members=self._member_names,
            dma_space=self._space,
            dma_mask=dma_mask,
            owner=self._children,
        )

    def _member_names(self) -> tuple[str, ...]:
        try:
            return self.device_names
        except errors.VfioError:
            return ()


_ki.protect_module(__name__)
