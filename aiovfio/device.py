"""A VFIO device: regions, config space, interrupts, reset, and DMA on its address space."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
from attrs import define, field, frozen

from . import _ki, _log, errors
from ._decoding import COMMAND_OFFSET, MemorySpace
from ._resource import FdResource, State
from ._threads import run_sync
from ._uapi import vfio as uapi
from ._uapi.pci import Cfg, Command
from ._util import kcall, kcall_thread
from .irq import InterruptSet, IrqInfo, IrqKind
from .pci import ConfigSpace
from .region import MappedRegion, Region, RegionInfo, query_region_info

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from .dma import DmaBuffer, DmaMapping, DmaSpace, IommuInfo
    from .kernel import Kernel

__all__ = ["Device", "DeviceInfo"]

_REGION_NAMES = {0: "BAR0", 1: "BAR1", 2: "BAR2", 3: "BAR3", 4: "BAR4", 5: "BAR5", 6: "ROM"}
_REGION_NAMES.update({7: "config", 8: "VGA"})


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


def _no_members() -> tuple[str, ...]:
    return ()


@define(eq=False, repr=False, slots=False, kw_only=True)
class Device(FdResource):
    """An open VFIO device: `async with group.open_device(bdf) as dev:`.

    It is handed what it uses: the kernel, its group's fd (to get its own),
    its DMA space, and its group's registry of open devices. `dma_mask`
    (None: any IOVA) bounds the IOVAs `dma_buffer` hands out; edu, for one,
    reaches only 28 bits.
    """

    kernel: Kernel
    name: str
    group_fd: int
    group_label: str = ""
    group_number: int = -1
    dma_space: DmaSpace
    dma_mask: int | None = None
    _members: Callable[[], tuple[str, ...]] = field(default=_no_members, alias="members")
    _info: DeviceInfo | None = field(default=None, init=False)
    _region_infos: dict[int, RegionInfo] = field(factory=dict, init=False)
    _regions: dict[int, Region] = field(factory=dict, init=False)
    _memory: MemorySpace | None = field(default=None, init=False)

    def __repr__(self) -> str:
        if self.closed:
            return f"<Device {self.name} closed>"
        if self._fd < 0:
            return f"<Device {self.name} not open>"
        irqs = ",".join(s.info.kind for s in self.interrupt_sets) or "none"
        backend = self.dma_space.backend
        if backend == "noiommu":
            backend += " UNSAFE"  # no IOMMU: the device reaches all physical memory
        return (
            f"<Device {self.name} group={self.group_number} fd={self._fd} "
            f"kernel={self.kernel.name} backend={backend}{self._repr_extra()} irqs={irqs}>"
        )

    def _repr_extra(self) -> str:
        """More `key=value` words for the repr (a cdev device names its cdev)."""
        return ""

    @property
    def cdev_path(self) -> str | None:
        """/dev/vfio/devices/vfioN when opened through its cdev (iommufd), else None."""
        return None

    @property
    def label(self) -> str:
        return f"device {self.name}"

    @property
    def interrupt_sets(self) -> tuple[InterruptSet, ...]:
        """The interrupt sets entered on this device and not left yet."""
        return self._children.of_type(InterruptSet)

    @property
    def iommu_info(self) -> IommuInfo:
        """Page sizes, IOVA ranges and DMA entries left of the device's address space."""
        self._check_open()
        return self.dma_space.iommu_info

    # --- lifetime ----------------------------------------------------------------

    async def __aenter__(self) -> Device:
        self._begin_open()
        try:
            await anyio.lowlevel.checkpoint()
            # GET_DEVICE_FD may reset the function (vfio-pci's open path): a thread.
            self._fd = await self._get_fd()
            self._info = self._query_info()
            self.dma_space.device_attached()  # its domain may narrow the IOVA ranges
        except BaseException:
            self._state = State.CLOSING
            with anyio.CancelScope(shield=True):
                try:
                    await self._release()
                finally:
                    self._finish_close()
            raise
        self._opened()
        _log.debug("device.open", device=self.name, fd=self._fd)
        return self

    async def _get_fd(self) -> int:
        """GET_DEVICE_FD in a worker thread; the fd is ours (`_own_fd`) before any
        interruption, asyncio's native Task.cancel included, leaves this await."""
        k = self.kernel
        try:
            return await run_sync(
                k.group_get_device_fd, self.group_fd, self.name, then=self._own_fd
            )
        except OSError as exc:
            hint = None
            if exc.errno in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                hint = (
                    f"{self.name} is not a member of {self.group_label} bound to vfio-pci; "
                    f"members: {', '.join(self._members()) or 'none'}"
                )
            raise errors.from_oserror(
                exc, "VFIO_GROUP_GET_DEVICE_FD", f"{self.group_label} device {self.name}", hint=hint
            ) from exc

    def _own_fd(self, fd: int) -> None:
        self._fd = fd

    async def _shutdown(self) -> None:
        """Interrupt sets and regions (newest first), then the fd.

        Closing may reset the function (vfio-pci), so the close runs in a
        worker thread; the caller (`aclose`) shields it.
        """
        try:
            await self._children.aclose_all()
        finally:
            self._regions.clear()
            await self._release()

    async def _release(self) -> None:
        fd = self._take_fd()
        if fd >= 0:
            await self._close_fd(fd)

    async def _close_fd(self, fd: int) -> None:
        """Close the device fd in a worker thread, as a release: it runs even when
        interrupted before the thread started (trio delivers KeyboardInterrupt at
        the thread's starting checkpoint, even when shielded)."""
        await kcall_thread("close", self.label, self.kernel.close, fd, release=True)
        _log.debug("device.close", device=self.name, fd=fd)

    def _release_on_gc(self) -> None:
        for child in self._children:
            child._release_on_gc()
        fd = self._take_fd()
        if fd >= 0:
            self.kernel.close(fd)

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
        n = self.info.num_regions
        if isinstance(index, bool) or not isinstance(index, int):
            raise errors.InvalidArgument(
                f"a region index is an int from 0 to {n - 1} on {self.label}, not {index!r}"
            )
        if not 0 <= index < n:
            names = ", ".join(f"{i} ({_REGION_NAMES.get(i, 'device-specific')})" for i in range(n))
            raise errors.InvalidArgument(
                f"{self.label} has no region {index}; its regions are {names}"
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
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 5:
            raise errors.InvalidArgument(f"a BAR number is an int from 0 to 5, not {n!r}")
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
        if region is not None and not region.closed:
            return region
        info = self.region_info(index)
        if not info.size or not info.flags & (uapi.RegionFlag.READ | uapi.RegionFlag.WRITE):
            raise errors.NotOffered(f"{self.label} has no {what} (its region {index} is empty)")
        cls: type[Region]
        if index == uapi.PciRegion.CONFIG:
            cls = ConfigSpace
        elif info.mappable and info.mmap_areas == ((0, info.size),):
            cls = MappedRegion
        else:
            cls = Region
        memory = None
        if index <= uapi.PciRegion.ROM and self._decodes_memory(index):
            memory = self._memory_space()
        region = cls(info, self.kernel, self._fd, f"{self.label} {what}", owner=self._children)
        if isinstance(region, ConfigSpace):
            region.on_command_write = self._reread_command
        region.open()
        self._regions[index] = region
        if memory is not None:
            memory.follow(region)  # refuses access while Memory Space is off
        return region

    # --- Memory Space (PCI COMMAND.MEM): BAR access is refused while it is off ---------

    def _memory_space(self) -> MemorySpace:
        """The device's Memory Space, read from COMMAND the first time a BAR is used."""
        if self._memory is None:
            self._memory = MemorySpace(
                enabled=bool(self.config.read16(COMMAND_OFFSET) & Command.MEMORY)
            )
        return self._memory

    def _reread_command(self, _: object = None) -> None:
        """COMMAND may have changed (a config write covering it, a reset): follow it."""
        if self._memory is not None and not self.closed:
            self._memory.update(self.config.read16(COMMAND_OFFSET))

    def _decodes_memory(self, index: int) -> bool:
        """Whether region `index` is a memory BAR or the ROM (I/O-port BARs follow COMMAND.IO,
        which vfio-pci does not police)."""
        if index == uapi.PciRegion.ROM:
            return True
        return not self.config.read32(Cfg.BASE_ADDRESS_0 + 4 * index) & 1

    # --- interrupts ----------------------------------------------------------------

    def irq_info(self, index: int | str) -> IrqInfo:
        """VFIO's description of IRQ index `index` ("intx", "msi", "msix", "err", "req")."""
        self._check_open()
        kind = IrqKind.parse(index)
        if kind >= self.info.num_irqs:
            raise errors.NotOffered(f"{self.label} has no {kind.name.lower()} IRQ index")
        arg = uapi.vfio_irq_info(argsz=ctypes.sizeof(uapi.vfio_irq_info), index=int(kind))
        try:
            self.kernel.device_get_irq_info(self._fd, arg)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # vfio-pci: ERR exists only on PCI Express
                raise errors.NotOffered(
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

        VFIO allows one of intx, msi, msix at a time; err and req may be added
        beside it. That rule is checked when the set is entered.
        """
        if isinstance(count, bool) or not isinstance(count, int):
            raise errors.InvalidArgument(f"a vector count is an int >= 1, not {count!r}")
        info = self.irq_info(kind)
        if not info.count:
            raise errors.NotOffered(
                f"{self.label} has no {info.kind} interrupts; "
                f"it offers: {', '.join(self._irq_kinds()) or 'none'}"
            )
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= info.count:
            raise errors.InvalidArgument(
                f"{self.label} has {info.count} {info.kind} vector(s); ask for 1 to {info.count}, "
                f"not {count!r}"
            )
        if not info.flags & uapi.IrqInfoFlag.EVENTFD:
            raise errors.NotOffered(f"{self.label} {info.kind} cannot signal an eventfd")
        return InterruptSet(
            kernel=self.kernel,
            device_fd=self._fd,
            device_name=self.name,
            info=info,
            count=count,
            owner=self._children,
        )

    def _irq_kinds(self) -> list[str]:
        return [k.name.lower() for k in IrqKind if self._irq_count(k)]

    def _irq_count(self, kind: IrqKind) -> int:
        """Vectors of `kind`; 0 where the device lacks the index."""
        try:
            return self.irq_info(kind).count if kind < self.info.num_irqs else 0
        except errors.NotOffered:
            return 0

    # --- DMA -----------------------------------------------------------------------

    def dma_buffer(
        self,
        size: int,
        *,
        dma_mask: int | None = None,
        readonly: bool = False,
        hugepages: bool = False,
    ) -> DmaBuffer:
        """Allocate and map memory in the device's DMA space, below its DMA mask."""
        self._check_open()
        mask = dma_mask if dma_mask is not None else self.dma_mask
        return self.dma_space.dma_buffer(
            size, dma_mask=mask, readonly=readonly, hugepages=hugepages
        )

    def map_dma(
        self, buffer: Buffer, *, iova: int | None = None, readonly: bool = False
    ) -> DmaMapping:
        """Map a caller's page-aligned buffer in the device's DMA space."""
        self._check_open()
        return self.dma_space.map_dma(buffer, iova=iova, readonly=readonly, dma_mask=self.dma_mask)

    # --- reset ---------------------------------------------------------------------

    async def reset(self) -> None:
        """VFIO_DEVICE_RESET (function-level reset), in a worker thread."""
        self._check_open()
        if not self.info.can_reset:
            raise errors.NotOffered(
                f"{self.label} offers no function reset (VFIO_DEVICE_FLAGS_RESET is clear)"
            )
        await kcall_thread(
            "VFIO_DEVICE_RESET",
            self.label,
            self.kernel.device_reset,
            self._fd,
            then=self._reread_command,  # a reset restores COMMAND (pci_restore_state)
        )
        _log.debug("device.reset", device=self.name)


_ki.protect_module(__name__)
