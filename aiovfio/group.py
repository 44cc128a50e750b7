"""An IOMMU group: the unit VFIO isolates, opened through a container."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import anyio
from attrs import define, field

from . import _log, errors
from ._resource import FdResource
from ._uapi import vfio as uapi
from ._util import aclose_all, kcall, keeps_group_viable, normalize_bdf

if TYPE_CHECKING:
    from .container import Container
    from .device import Device

__all__ = ["Group", "offenders"]


def offenders(container: Container, number: int) -> tuple[errors.Offender, ...]:
    """The members of group `number` bound to a driver that makes it unviable."""
    k = container.kernel
    found = []
    try:
        for name in k.group_devices(number):
            drv = k.driver(name)
            if not keeps_group_viable(drv):
                found.append(errors.Offender(name, drv))
    except OSError:
        return ()
    return tuple(found)


@define(eq=False, repr=False)
class Group(FdResource):
    """IOMMU group `number`, attached to `container` while its context is open."""

    container: Container
    number: int
    _attached: bool = field(default=False, init=False)
    _devices: list[Device] = field(factory=list, init=False)

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._fd < 0:
            state = "not open"
        else:
            names = ",".join(d.name for d in self._devices) or "no devices open"
            state = f"fd={self._fd} {names}"
        return f"<Group {self.number} {state}>"

    @property
    def label(self) -> str:
        return f"group {self.number}"

    @property
    def devices(self) -> tuple[Device, ...]:
        """The devices opened through this group and not closed yet."""
        return tuple(self._devices)

    @property
    def device_names(self) -> tuple[str, ...]:
        """The PCI addresses of every member of the group (from sysfs)."""
        return kcall("sysfs", self.label, self.container.kernel.group_devices, self.number)

    @property
    def viable(self) -> bool:
        """Whether every member is bound to a VFIO driver or to none."""
        return bool(self._status() & uapi.GroupFlag.VIABLE)

    def _status(self) -> int:
        self._check_open()
        arg = uapi.vfio_group_status(argsz=8, flags=0)
        kcall(
            "VFIO_GROUP_GET_STATUS",
            self.label,
            self.container.kernel.group_get_status,
            self._fd,
            arg,
        )
        return int(arg.flags)

    # --- lifetime ----------------------------------------------------------------

    async def __aenter__(self) -> Group:
        self._enter_once()
        await anyio.lowlevel.checkpoint()
        c = self.container
        c._check_open()
        k = c.kernel
        try:
            self._fd = k.open_group(self.number)
        except OSError as exc:
            raise self._open_error(exc) from exc
        try:
            flags = self._status()
            if not flags & uapi.GroupFlag.VIABLE:
                raise errors.GroupNotViable(self.number, offenders(c, self.number))
            kcall("VFIO_GROUP_SET_CONTAINER", self.label, k.group_set_container, self._fd, c.fd)
            self._attached = True
            c._attached(self)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise
        _log.debug("group.open", group=self.number, fd=self._fd)
        return self

    def _open_error(self, exc: OSError) -> errors.VfioError:
        path = f"/dev/vfio/{self.number}"
        if exc.errno == errno.ENOENT:
            return errors.from_oserror(
                exc,
                "open",
                path,
                hint=f"no VFIO group {self.number}: bind its devices to vfio-pci "
                f"(`aiovfio bind BDF`) or check the number with `aiovfio ls`",
            )
        if exc.errno == errno.EBUSY:
            return errors.from_oserror(
                exc,
                "open",
                path,
                hint=f"group {self.number} is already open, in this or another process; "
                f"close that first (one opener at a time)",
            )
        return errors.from_oserror(exc, "open", path)

    async def aclose(self) -> None:
        """Close its devices, leave the container, close; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                await aclose_all(reversed(self._devices))
            finally:
                self._release()

    def _release(self) -> None:
        k = self.container.kernel
        fd = self._fd
        try:
            if self._attached:
                self._attached = False
                try:
                    kcall("VFIO_GROUP_UNSET_CONTAINER", self.label, k.group_unset_container, fd)
                finally:
                    self.container._detached(self)
        finally:
            self._fd = -1
            if fd >= 0:
                kcall("close", self.label, k.close, fd)
                _log.debug("group.close", group=self.number, fd=fd)

    # --- devices -----------------------------------------------------------------

    def open_device(self, name: str) -> Device:
        """Open a member of the group by PCI address (an async context manager)."""
        from .device import Device

        self._check_open()
        return Device(self, normalize_bdf(name))

    def _device_closed(self, device: Device) -> None:
        if device in self._devices:
            self._devices.remove(device)
