"""iommufd: an IOAS as the DMA space, and devices opened through their VFIO cdev.

    async with Iommufd(kernel=k) as fd:            # /dev/iommu, one IOAS
        async with fd.open_device(bdf, group=n) as dev:  # cdev, BIND, ATTACH
            async with dev.dma_buffer(4096) as buf: ...  # IOMMU_IOAS_MAP

`Iommufd` is the iommufd counterpart of `Container`: it opens /dev/iommu,
allocates one IO address space (`IoasSpace`, the second implementation of
`aiovfio.dma.DmaSpace`), and reads the ranges the allocator may use with
IOMMU_IOAS_IOVA_RANGES. `CdevDevice` is a `Device` whose fd comes from
/dev/vfio/devices/vfioN (found from sysfs `vfio-dev/`), bound to the iommufd
and attached to the IOAS; leaving it detaches, then closes. Teardown runs in
reverse: devices, the IOAS's mappings, the IOAS (IOMMU_DESTROY), the fd.

The group keeps its meaning: the device's IOMMU group is still the unit of
isolation; its viability is checked from sysfs before binding (the kernel
would refuse the bind) and reported with the offending devices. The cdev and
the group path exclude each other (EBUSY either way), which the errors say.
`aiovfio.open_device` picks this backend when the kernel offers it for the
device (`backend=`, `$AIOVFIO_BACKEND`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno

import anyio
from attrs import define, field

from . import _ki, _log, errors
from ._resource import FdResource, State
from ._threads import run_sync
from ._uapi import iommufd as iuapi
from ._uapi import vfio as uapi
from ._util import PAGE_SIZE, kcall, kcall_thread
from .device import Device
from .dma import DmaSpace, IommuInfo
from .group import offenders
from .kernel import Kernel, default_kernel

__all__ = ["CdevDevice", "Iommufd", "IoasSpace", "ioas_iova_ranges"]

_U64 = (1 << 64) - 1


def ioas_iova_ranges(kernel: Kernel, iommufd: int, ioas_id: int) -> tuple[tuple[int, int], ...]:
    """IOMMU_IOAS_IOVA_RANGES: the IOAS's allowed ranges (inclusive), asked twice if needed."""
    target = f"IOAS {ioas_id} of iommufd {iommufd}"
    room = 8
    while True:
        table = (iuapi.iommu_iova_range * room)()
        arg = iuapi.iommu_ioas_iova_ranges(
            size=ctypes.sizeof(iuapi.iommu_ioas_iova_ranges),
            ioas_id=ioas_id,
            num_iovas=room,
            allowed_iovas=ctypes.addressof(table),
        )
        try:
            kernel.ioas_iova_ranges(iommufd, arg)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE and arg.num_iovas > room:
                room = int(arg.num_iovas)  # the kernel wrote back how many there are
                continue
            raise errors.from_oserror(exc, "IOMMU_IOAS_IOVA_RANGES", target) from exc
        return tuple((int(r.start), int(r.last)) for r in table[: arg.num_iovas])


@define(eq=False, repr=False, slots=False, kw_only=True)
class IoasSpace(DmaSpace):
    """An iommufd IO address space: IOMMU_IOAS_MAP / UNMAP at IOVAs aiovfio chose."""

    iommufd: int
    ioas_id: int
    backend = "iommufd"
    map_operation = "IOMMU_IOAS_MAP"
    unmap_operation = "IOMMU_IOAS_UNMAP"

    def _kernel_map(self, vaddr: int, iova: int, size: int, readonly: bool) -> None:
        flags = iuapi.IoasMapFlag.FIXED_IOVA | iuapi.IoasMapFlag.READABLE
        if not readonly:
            flags |= iuapi.IoasMapFlag.WRITEABLE
        arg = iuapi.iommu_ioas_map(
            size=ctypes.sizeof(iuapi.iommu_ioas_map),
            flags=flags,
            ioas_id=self.ioas_id,
            user_va=vaddr,
            length=size,
            iova=iova,
        )
        self.kernel.ioas_map(self.iommufd, arg)

    def _kernel_unmap(self, iova: int, size: int) -> int:
        arg = iuapi.iommu_ioas_unmap(
            size=ctypes.sizeof(iuapi.iommu_ioas_unmap), ioas_id=self.ioas_id, iova=iova, length=size
        )
        self.kernel.ioas_unmap(self.iommufd, arg)
        return int(arg.length)

    def _query_info(self) -> IommuInfo:
        """IOMMU_IOAS_IOVA_RANGES now (an attached device's domain narrows them)."""
        ranges = ioas_iova_ranges(self.kernel, self.iommufd, self.ioas_id)
        return IommuInfo(page_sizes=self.info.page_sizes, iova_ranges=ranges, dma_avail=None)


def _kernel_or_default(kernel: Kernel | None) -> Kernel:
    return kernel if kernel is not None else default_kernel()


@define(eq=False, repr=False, slots=False, kw_only=True)
class Iommufd(FdResource):
    """An open /dev/iommu with one IOAS: `async with Iommufd() as fd:`.

    Open devices into it with `fd.open_device(bdf, group=n)`; map memory with
    `fd.dma_space.map_dma(...)` or through a device.
    """

    kernel: Kernel = field(factory=default_kernel, converter=_kernel_or_default)
    _space: IoasSpace | None = field(default=None, init=False)
    _ioas_id: int = field(default=-1, init=False)

    def __repr__(self) -> str:
        if self.closed:
            return "<Iommufd closed>"
        if self._fd < 0:
            return "<Iommufd not open>"
        devices = ",".join(d.name for d in self.devices) or "none"
        n = self._space.mapping_count if self._space is not None else 0
        return (
            f"<Iommufd fd={self._fd} ioas={self._ioas_id} kernel={self.kernel.name} "
            f"devices={devices} mappings={n}>"
        )

    @property
    def label(self) -> str:
        return f"iommufd (fd {self._fd})" if self._fd >= 0 else "the iommufd"

    @property
    def devices(self) -> tuple[Device, ...]:
        return self._children.of_type(Device)

    @property
    def dma_space(self) -> IoasSpace:
        """The IOAS every device of this iommufd is attached to."""
        self._check_open()
        assert self._space is not None
        return self._space

    @property
    def iommu_info(self) -> IommuInfo:
        return self.dma_space.iommu_info

    # --- lifetime ----------------------------------------------------------------

    async def __aenter__(self) -> Iommufd:
        self._begin_open()
        try:
            await anyio.lowlevel.checkpoint()
            k = self.kernel
            if not kcall("stat", "/dev/iommu", k.iommufd_available):
                raise errors.IommufdUnavailable(
                    "/dev/iommu is missing: this kernel has no iommufd (CONFIG_IOMMUFD); "
                    "use the legacy container (backend='container', AIOVFIO_BACKEND=container)"
                )
            self._fd = kcall("open", "/dev/iommu", k.open_iommufd)
            alloc = iuapi.iommu_ioas_alloc(size=ctypes.sizeof(iuapi.iommu_ioas_alloc))
            kcall("IOMMU_IOAS_ALLOC", self.label, k.ioas_alloc, self._fd, alloc)
            self._ioas_id = int(alloc.out_ioas_id)
            ranges = ioas_iova_ranges(k, self._fd, self._ioas_id)
            self._space = IoasSpace(
                kernel=k,
                info=IommuInfo(page_sizes=PAGE_SIZE, iova_ranges=ranges, dma_avail=None),
                name=f"IOAS {self._ioas_id} of iommufd (fd {self._fd})",
                iommufd=self._fd,
                ioas_id=self._ioas_id,
                owner=self._children,
            )
        except BaseException:
            self._state = State.CLOSING
            with anyio.CancelScope(shield=True):
                try:
                    await self._release()
                finally:
                    self._finish_close()
            raise
        self._opened()
        _log.debug("iommufd.open", fd=self._fd, ioas=self._ioas_id, ranges=len(ranges))
        return self

    async def _release(self) -> None:
        space, self._space = self._space, None
        try:
            if space is not None:
                await space.aclose()
        finally:  # a cancellation raised from the unmaps (once they ran) still closes the fd
            self._close_iommufd()

    def _close_iommufd(self) -> None:
        fd = self._take_fd()
        if fd < 0:
            return
        try:
            if self._ioas_id >= 0:
                arg = iuapi.iommu_destroy(size=ctypes.sizeof(iuapi.iommu_destroy), id=self._ioas_id)
                with contextlib.suppress(OSError):  # closing the fd destroys it anyway
                    self.kernel.iommufd_destroy(fd, arg)
        finally:
            self.kernel.close(fd)
            _log.debug("iommufd.close", fd=fd, ioas=self._ioas_id)

    def _release_on_gc(self) -> None:
        for child in self._children:
            child._release_on_gc()
        fd = self._take_fd()
        if fd >= 0:
            self.kernel.close(fd)

    # --- devices -----------------------------------------------------------------

    def open_device(self, name: str, *, group: int, dma_mask: int | None = None) -> CdevDevice:
        """Open `name` (of IOMMU group `group`) through its cdev into this iommufd."""
        self._check_open()
        return CdevDevice(
            kernel=self.kernel,
            name=name,
            group_fd=-1,
            group_label=f"group {group}",
            group_number=group,
            dma_space=self.dma_space,
            dma_mask=dma_mask,
            iommufd=self._fd,
            ioas_id=self._ioas_id,
            owner=self._children,
        )


@define(eq=False, repr=False, slots=False, kw_only=True)
class CdevDevice(Device):
    """A `Device` opened through /dev/vfio/devices/vfioN, bound to an iommufd."""

    iommufd: int
    ioas_id: int
    cdev: str = field(default="", init=False)
    _attached: bool = field(default=False, init=False)

    def _repr_extra(self) -> str:
        return f" cdev={self.cdev or '?'}"

    @property
    def cdev_path(self) -> str | None:
        return f"/dev/vfio/devices/{self.cdev}" if self.cdev and self._fd >= 0 else None

    async def _get_fd(self) -> int:
        k = self.kernel
        group = self.group_number
        bad = offenders(k, group)
        if bad:
            raise errors.GroupNotViable(group, bad)
        cdev = kcall("sysfs", f"device {self.name}", k.device_cdev, self.name)
        if cdev is None:
            raise errors.NoDeviceCdev(
                f"device {self.name} has no VFIO cdev (no vfio-dev/ in sysfs): it is not bound "
                f"to vfio-pci (`aiovfio bind {self.name}`), the kernel lacks "
                f"CONFIG_VFIO_DEVICE_CDEV, or it is a noiommu device; use the legacy container "
                f"(backend='container')"
            )
        self.cdev = cdev
        path = f"/dev/vfio/devices/{cdev}"
        try:
            fd = k.open_device_cdev(cdev)
        except FileNotFoundError as exc:
            raise errors.NoDeviceCdev(
                f"{path} does not exist although sysfs names it for {self.name}: the kernel "
                f"has no VFIO device cdev nodes (noiommu devices have none); use the legacy "
                f"container (backend='container')"
            ) from exc
        except OSError as exc:
            raise errors.from_oserror(exc, "open", path) from exc
        try:
            # never abandoned (asyncio's native cancel included): the fd is closed below
            # only once the thread is done with it
            await run_sync(self._bind_and_attach, fd, path)
        except BaseException:
            with contextlib.suppress(OSError):
                k.close(fd)
            raise
        return fd

    def _bind_and_attach(self, fd: int, path: str) -> None:
        """BIND_IOMMUFD (opens the device: may reset it), then ATTACH_IOMMUFD_PT."""
        k = self.kernel
        bind = uapi.vfio_device_bind_iommufd(
            argsz=ctypes.sizeof(uapi.vfio_device_bind_iommufd), iommufd=self.iommufd
        )
        try:
            k.device_bind_iommufd(fd, bind)
        except OSError as exc:
            hint = None
            if exc.errno == errno.EBUSY:
                hint = (
                    f"{self.group_label} is open through the legacy path (/dev/vfio/"
                    f"{self.group_number}, here or in another process): a device cdev and "
                    f"its group exclude each other; close the group, or open the device "
                    f"with backend='container'"
                )
            elif exc.errno == errno.EINVAL:
                hint = f"{self.name} is already bound through another cdev fd (one bind per device)"
            raise errors.from_oserror(
                exc, "VFIO_DEVICE_BIND_IOMMUFD", f"{path} ({self.name})", hint=hint
            ) from exc
        attach = uapi.vfio_device_attach_iommufd_pt(
            argsz=ctypes.sizeof(uapi.vfio_device_attach_iommufd_pt), pt_id=self.ioas_id
        )
        kcall(
            "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
            f"{path} ({self.name})",
            k.device_attach_iommufd_pt,
            fd,
            attach,
        )
        self._attached = True
        _log.debug("iommufd.attach", device=self.name, cdev=self.cdev, ioas=self.ioas_id)

    async def _release(self) -> None:
        fd = self._fd
        try:
            if fd >= 0 and self._attached:
                self._attached = False
                arg = uapi.vfio_device_detach_iommufd_pt(
                    argsz=ctypes.sizeof(uapi.vfio_device_detach_iommufd_pt)
                )
                with contextlib.suppress(OSError):  # the close detaches too
                    await kcall_thread(
                        "VFIO_DEVICE_DETACH_IOMMUFD_PT",
                        self.label,
                        self.kernel.device_detach_iommufd_pt,
                        fd,
                        arg,
                        release=True,
                    )
        finally:
            # also when a cancellation (asyncio's native one too) is raised from the
            # detach once it ran: the fd must still be closed
            await super()._release()


_ki.protect_module(__name__)
