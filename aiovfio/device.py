"""A VFIO device: regions, config space, interrupts, reset, and `open_device`."""

from __future__ import annotations

import contextlib
import ctypes
import errno
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
from attrs import define, field, frozen

from . import _log, errors
from ._resource import FdResource
from ._uapi import vfio as uapi
from ._util import aclose_all, kcall, kcall_thread, normalize_bdf
from .container import Container
from .irq import InterruptSet, IrqInfo, IrqKind
from .kernel import Kernel, default_kernel
from .pci import ConfigSpace
from .region import MappedRegion, Region, RegionInfo, query_region_info

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from .dma import DmaBuffer, DmaMapping
    from .group import Group

__all__ = ["Device", "DeviceInfo", "open_device"]


@frozen
class DeviceInfo:
    """What VFIO_DEVICE_GET_INFO says about the device."""

    flags: uapi.DeviceFlag
    num_regions: int
    num_irqs: int

    @property
    def is_pci(self) -> bool:
        return bool(self.flags & uapi.DeviceFlag.PCI)

    @property
    def can_reset(self) -> bool:
        return bool(self.flags & uapi.DeviceFlag.RESET)

    def __repr__(self) -> str:
        names = "|".join(f.name for f in uapi.DeviceFlag if f & self.flags and f.name) or "0"
        return f"DeviceInfo(flags={names}, regions={self.num_regions}, irqs={self.num_irqs})"


@define(eq=False, repr=False)
class Device(FdResource):
    """An open VFIO device: `async with group.open_device(bdf) as dev:`.

    `dma_mask` (None: any IOVA) bounds the IOVAs `dma_buffer` hands out;
    edu, for one, reaches only 28 bits.
    """

    group: Group
    name: str
    dma_mask: int | None = None
    _info: DeviceInfo | None = field(default=None, init=False)
    _region_infos: dict[int, RegionInfo] = field(factory=dict, init=False)
    _regions: dict[int, Region] = field(factory=dict, init=False)
    _interrupt_sets: list[InterruptSet] = field(factory=list, init=False)

    def __repr__(self) -> str:
        if self._closed:
            return f"<Device {self.name} closed>"
        if self._fd < 0:
            return f"<Device {self.name} not open>"
        irqs = ",".join(s.info.kind for s in self._interrupt_sets) or "none"
        return (
            f"<Device {self.name} group={self.group.number} fd={self._fd} "
            f"kernel={self.kernel.name} irqs={irqs}>"
        )

    @property
    def kernel(self) -> Kernel:
        return self.group.container.kernel

    @property
    def container(self) -> Container:
        return self.group.container

    @property
    def label(self) -> str:
        return f"device {self.name}"

    # --- lifetime ----------------------------------------------------------------

    async def __aenter__(self) -> Device:
        self._enter_once()
        await anyio.lowlevel.checkpoint()
        group = self.group
        group._check_open()
        k = self.kernel
        # GET_DEVICE_FD may reset the function (vfio-pci's open path): a thread.
        try:
            self._fd = await anyio.to_thread.run_sync(k.group_get_device_fd, group.fd, self.name)
        except OSError as exc:
            hint = None
            if exc.errno in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                hint = (
                    f"{self.name} is not a member of group {group.number} bound to vfio-pci; "
                    f"members: {', '.join(group.device_names) or 'none'}"
                )
            raise errors.from_oserror(
                exc, "VFIO_GROUP_GET_DEVICE_FD", f"{group.label} device {self.name}", hint=hint
            ) from exc
        group._devices.append(self)
        try:
            self._info = self._query_info()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise
        _log.debug("device.open", device=self.name, fd=self._fd)
        return self

    async def aclose(self) -> None:
        """Disable interrupts, unmap regions, close the fd; a second call does nothing.

        Closing may reset the function (vfio-pci), so it runs in a worker
        thread, shielded from cancellation.
        """
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                await aclose_all(reversed(self._interrupt_sets))
            finally:
                regions, self._regions = self._regions, {}
                for region in regions.values():
                    region.close()
                fd, self._fd = self._fd, -1
                self.group._device_closed(self)
                if fd >= 0:
                    await self._close_fd(fd)

    async def _close_fd(self, fd: int) -> None:
        """Close the device fd in a worker thread; if a BaseException (trio delivers
        KeyboardInterrupt at the thread's starting checkpoint, even when shielded)
        stops it before the thread ran, close it here instead of leaking it."""
        started = False

        def close() -> None:
            nonlocal started
            started = True
            self.kernel.close(fd)

        try:
            await kcall_thread("close", self.label, close)
        except BaseException:
            if not started:
                with contextlib.suppress(OSError):  # close(2) frees the fd even so
                    self.kernel.close(fd)
            raise
        _log.debug("device.close", device=self.name, fd=fd)

    # --- description ---------------------------------------------------------------

    def _query_info(self) -> DeviceInfo:
        head = ctypes.sizeof(uapi.vfio_device_info)
        buf = bytearray(uapi.vfio_device_info(argsz=head))
        kcall("VFIO_DEVICE_GET_INFO", self.label, self.kernel.device_get_info, self._fd, buf)
        info = uapi.vfio_device_info.from_buffer_copy(buf)
        return DeviceInfo(
            flags=uapi.DeviceFlag(info.flags & 0x1FF),
            num_regions=int(info.num_regions),
            num_irqs=int(info.num_irqs),
        )

    @property
    def info(self) -> DeviceInfo:
        self._check_open()
        assert self._info is not None
        return self._info

    def region_info(self, index: int) -> RegionInfo:
        """VFIO's description of region `index` (0-5 BARs, 6 ROM, 7 config)."""
        self._check_open()
        if not isinstance(index, int) or not 0 <= index < self.info.num_regions:
            raise errors.DeviceNotFound(
                f"{self.label} has regions 0 to {self.info.num_regions - 1}, not {index!r}"
            )
        cached = self._region_infos.get(index)
        if cached is None:
            cached = query_region_info(self.kernel, self._fd, index, self.label)
            self._region_infos[index] = cached
        return cached

    @property
    def regions(self) -> tuple[RegionInfo, ...]:
        """Every region the device has (those with a size), with capabilities decoded."""
        out = []
        for index in range(self.info.num_regions):
            try:
                info = self.region_info(index)
            except errors.InvalidRequest:  # an index the bus driver does not implement
                continue
            if info.size:
                out.append(info)
        return tuple(out)

    def bar(self, n: int) -> Region:
        """BAR `n` (0-5): mmap'd where VFIO allows it, trapped (pread/pwrite) elsewhere."""
        if not isinstance(n, int) or not 0 <= n <= 5:
            raise errors.InvalidArgument(f"a BAR number is 0 to 5, not {n!r}")
        return self._region(n, f"BAR{n}")

    @property
    def rom(self) -> Region:
        return self._region(uapi.PciRegion.ROM, "ROM")

    @property
    def config(self) -> ConfigSpace:
        """The PCI configuration space (region 7), with a capability walk."""
        region = self._region(uapi.PciRegion.CONFIG, "config")
        assert isinstance(region, ConfigSpace)
        return region

    def _region(self, index: int, what: str) -> Region:
        self._check_open()
        region = self._regions.get(index)
        if region is not None:
            return region
        info = self.region_info(index)
        if not info.size or not info.flags & (uapi.RegionFlag.READ | uapi.RegionFlag.WRITE):
            raise errors.Unsupported(f"{self.label} has no {what} (its region {index} is empty)")
        cls: type[Region]
        if index == uapi.PciRegion.CONFIG:
            cls = ConfigSpace
        elif info.mappable and info.mmap_areas == ((0, info.size),):
            cls = MappedRegion
        else:
            cls = Region
        region = cls(info, self.kernel, self._fd, f"{self.label} {what}")
        if cls is not ConfigSpace:
            region.map()
        self._regions[index] = region
        return region

    # --- interrupts ----------------------------------------------------------------

    def irq_info(self, index: int | str) -> IrqInfo:
        """VFIO's description of IRQ index `index` ("intx", "msi", "msix", "err", "req")."""
        self._check_open()
        kind = IrqKind.parse(index)
        if kind >= self.info.num_irqs:
            raise errors.Unsupported(f"{self.label} has no {kind.name.lower()} IRQ index")
        arg = uapi.vfio_irq_info(argsz=ctypes.sizeof(uapi.vfio_irq_info), index=int(kind))
        try:
            self.kernel.device_get_irq_info(self._fd, arg)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # vfio-pci: ERR exists only on PCI Express
                raise errors.Unsupported(
                    f"{self.label} has no {kind.name.lower()} IRQ index "
                    f"(the kernel refused it: {exc.strerror})"
                ) from exc
            target = f"{self.label} irq {kind.name.lower()}"
            raise errors.from_oserror(exc, "VFIO_DEVICE_GET_IRQ_INFO", target) from exc
        return IrqInfo(
            index=int(kind), count=int(arg.count), flags=uapi.IrqInfoFlag(arg.flags & 0xF)
        )

    def interrupts(self, kind: str | int, count: int = 1) -> InterruptSet:
        """Enable `count` vectors of `kind` (an async context manager of InterruptStreams).

        Only one set per device at a time for intx/msi/msix (VFIO's rule: one
        interrupt mode at once); err and req may be added beside it.
        """
        info = self.irq_info(kind)
        if not info.count:
            raise errors.Unsupported(
                f"{self.label} has no {info.kind} interrupts; "
                f"it offers: {', '.join(self._irq_kinds()) or 'none'}"
            )
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= info.count:
            raise errors.InvalidArgument(
                f"{self.label} has {info.count} {info.kind} vector(s); ask for 1 to {info.count}, "
                f"not {count!r}"
            )
        if not info.flags & uapi.IrqInfoFlag.EVENTFD:
            raise errors.Unsupported(f"{self.label} {info.kind} cannot signal an eventfd")
        modes = (IrqKind.INTX, IrqKind.MSI, IrqKind.MSIX)
        for other in self._interrupt_sets:
            if other.info.index == info.index or (
                info.index in modes and other.info.index in modes
            ):
                raise errors.BusyResourceError(
                    f"{self.label} already has {other.info.kind} interrupts enabled; leave that "
                    f"`async with` first (VFIO allows one of intx, msi, msix at a time)"
                )
        return InterruptSet(self, info, count)

    def _irq_kinds(self) -> list[str]:
        return [k.name.lower() for k in IrqKind if self._irq_count(k)]

    def _irq_count(self, kind: IrqKind) -> int:
        """Vectors of `kind`; 0 where the device lacks the index."""
        try:
            return self.irq_info(kind).count if kind < self.info.num_irqs else 0
        except errors.Unsupported:
            return 0

    def _interrupts_opened(self, iset: InterruptSet) -> None:
        self._interrupt_sets.append(iset)

    def _interrupts_closed(self, iset: InterruptSet) -> None:
        if iset in self._interrupt_sets:
            self._interrupt_sets.remove(iset)

    # --- DMA -----------------------------------------------------------------------

    def dma_buffer(
        self,
        size: int,
        *,
        dma_mask: int | None = None,
        readonly: bool = False,
        hugepages: bool = False,
    ) -> DmaBuffer:
        """Allocate and map memory on the device's container, below its DMA mask."""
        self._check_open()
        mask = dma_mask if dma_mask is not None else self.dma_mask
        return self.container.dma_buffer(
            size, dma_mask=mask, readonly=readonly, hugepages=hugepages
        )

    def map_dma(
        self, buffer: Buffer, *, iova: int | None = None, readonly: bool = False
    ) -> DmaMapping:
        """Map a caller's page-aligned buffer on the device's container."""
        self._check_open()
        return self.container.map_dma(buffer, iova=iova, readonly=readonly, dma_mask=self.dma_mask)

    # --- reset ---------------------------------------------------------------------

    async def reset(self) -> None:
        """VFIO_DEVICE_RESET (function-level reset), in a worker thread."""
        self._check_open()
        if not self.info.can_reset:
            raise errors.Unsupported(
                f"{self.label} offers no function reset (VFIO_DEVICE_FLAGS_RESET is clear)"
            )
        await kcall_thread("VFIO_DEVICE_RESET", self.label, self.kernel.device_reset, self._fd)
        _log.debug("device.reset", device=self.name)


def _find_group(kernel: Kernel, bdf: str) -> int:
    try:
        group = kernel.iommu_group(bdf)
    except FileNotFoundError:
        raise errors.DeviceNotFound(
            f"no PCI device {bdf} on this machine; list them with `aiovfio ls`"
        ) from None
    except OSError as exc:
        raise errors.from_oserror(exc, "sysfs", f"PCI device {bdf}") from exc
    if group is None:
        raise errors.VfioUnavailable(
            f"{bdf} has no IOMMU group: the IOMMU is off or the device is not behind one; "
            f"see `aiovfio doctor {bdf}`"
        )
    return group


@contextlib.asynccontextmanager
async def open_device(
    bdf: str, *, kernel: Kernel | None = None, dma_mask: int | None = None
) -> AsyncIterator[Device]:
    """Open one PCI device: its own container, its group, then the device.

    `async with aiovfio.open_device("0000:01:00.0") as dev:` Everything is
    released in reverse order when the block exits, on every exit path.
    """
    k = kernel if kernel is not None else default_kernel()
    name = normalize_bdf(bdf)
    number = _find_group(k, name)
    async with (
        Container(kernel=k) as container,
        container.group(number) as group,
        group.open_device(name) as device,
    ):
        device.dma_mask = dma_mask
        yield device
