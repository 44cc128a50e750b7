"""The simulated machine's topology: groups, devices, containers, and the one lock.

`Topology` is the state the machine, its kernel and the sysfs writer share:
the PCI functions (`SimDevice`) in their IOMMU groups (`SimGroup`), the open
containers (`SimContainer`), the machine-wide settings the type1 IOMMU
enforces, the kernel personality (`aiovfio.sim.rules.Personality`), the
fault log and the fault injector. Everything in it is serialised by
`Topology.lock`. `Machine` builds it and adds devices to it;
`aiovfio.sim.kernel` reads and changes it as Linux's drivers/vfio changes
struct vfio_group / vfio_device / vfio_container; `sysfs_tree` only reads it.
Nothing here imports the machine or the kernel, so imports run one way:
machine -> kernel -> topology.

The lifecycles that several file kinds share live here too: a group
releasing its container, a device's first open and last close.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Sequence

from attrs import define, field

from .._uapi.vfio import PciRegion, RegionFlag
from ..errors import DeviceNotFound
from ..kernel.protocol import PciIds
from ..kernel.viability import is_vfio_driver, keeps_group_viable
from .config_space import Bar, ConfigSpace
from .faults import FaultLog, Injector
from .ioas import Ioas
from .iommu import MemlockAccount, ProcessMemory, Type1Iommu
from .irqs import DeviceIrqs
from .model import DeviceModel, RegionSpec
from .rules import Personality

_BAR5 = int(PciRegion.BAR5)
_REGION_WRITE = int(RegionFlag.WRITE)

__all__ = ["RegionRam", "SimContainer", "SimDevice", "SimGroup", "Topology"]


@define(eq=False)
class RegionRam:
    """The memfd behind a region: what mmap areas show, and `DeviceContext.ram`."""

    index: int
    size: int
    fd: int = field(repr=False)
    map: mmap.mmap = field(repr=False)

    @classmethod
    def create(cls, name: str, index: int, size: int) -> RegionRam:
        fd = os.memfd_create(f"aiovfio-sim:{name}:region{index}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(index, size, fd, m)

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a model still holds a view; GC unmaps it
            self.map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@define(eq=False)
class SimContainer:
    """An open /dev/vfio/vfio (struct vfio_container)."""

    number: int
    groups: list[SimGroup] = field(factory=list, repr=False)
    iommu: Type1Iommu | None = None
    #: the fd, None once the user closed it (groups keep the container alive)
    fd: int | None = None
    #: VFIO_SET_IOMMU(VFIO_NOIOMMU_IOMMU) was done: no IOMMU, no mappings
    noiommu: bool = False

    def label(self) -> str:
        return f"container fd {self.fd}" if self.fd is not None else f"container #{self.number}"


@define(eq=False)
class SimGroup:
    """An IOMMU group and what VFIO knows about it (struct vfio_group)."""

    number: int
    devices: list[SimDevice] = field(factory=list)
    #: bumped when the last VFIO device unbinds: older group files are stale
    generation: int = 0
    #: group->opened_file: an opener holds it (its fd, or open device fds)
    opened: bool = False
    #: the opener closed its fd while device fds still hold the group
    file_closed: bool = False
    container: SimContainer | None = field(default=None, repr=False)
    #: devices of the group with open device fds (container users besides the group)
    devices_in_use: int = 0
    #: group->cdev_device_open_cnt: devices bound through their cdev block the group path
    cdev_binds: int = 0

    @property
    def exists(self) -> bool:
        """Whether /dev/vfio/<number> exists: a device is bound to a VFIO driver."""
        return any(d.vfio for d in self.devices)

    @property
    def viable(self) -> bool:
        return all(keeps_group_viable(d.driver) for d in self.devices)

    def offenders(self) -> list[SimDevice]:
        return [d for d in self.devices if not keeps_group_viable(d.driver)]


@define(eq=False)
class SimDevice:
    """One PCI function: its model, config space, region memory and interrupt state."""

    name: str
    model: DeviceModel
    group: SimGroup = field(repr=False)
    driver: str | None
    config: ConfigSpace = field(repr=False)
    regions: dict[int, RegionSpec] = field(repr=False)
    bars: dict[int, Bar] = field(repr=False)
    ram: dict[int, RegionRam] = field(repr=False)
    irqs: DeviceIrqs = field(repr=False)
    #: device->open_count: open device fds
    open_count: int = 0
    low_power: bool = False
    #: the N of /dev/vfio/devices/vfioN on an iommufd machine, once bound to VFIO
    cdev: int | None = None
    #: the IOAS the device is attached to through its cdev
    ioas: Ioas | None = field(default=None, repr=False)
    #: trapped BARs without mmap areas: index -> (size, writable, MSI-X table start, end),
    #: as plain values for the register-access fast path (`kernel.device.device_rw`)
    trapped_bars: dict[int, tuple[int, bool, int, int]] = field(init=False, repr=False)
    #: register accesses already judged by the fast path's static rules (`SimKernel.pread`,
    #: `pwrite`): offset -> (size, region index or -1 if they fail, position in the region)
    fast_reads: dict[int, tuple[int, int, int]] = field(init=False, factory=dict, repr=False)
    fast_writes: dict[int, tuple[int, int, int]] = field(init=False, factory=dict, repr=False)

    def __attrs_post_init__(self) -> None:
        table = self.config.msix_table
        self.trapped_bars = {}
        for index, spec in self.regions.items():
            if index > _BAR5 or spec.mmap_areas:
                continue
            start = end = 0
            if table is not None and table.bar == index:
                start, end = table.offset, table.offset + table.size
            writable = bool(int(spec.flags) & _REGION_WRITE)
            self.trapped_bars[index] = (spec.size, writable, start, end)

    @property
    def vfio(self) -> bool:
        return is_vfio_driver(self.driver)

    @property
    def domain(self) -> int:
        return int(self.name[0:4], 16)

    @property
    def bus(self) -> int:
        return int(self.name[5:7], 16)

    @property
    def devfn(self) -> int:
        return (int(self.name[8:10], 16) << 3) | int(self.name[11], 16)

    def ids(self) -> PciIds:
        m = self.model
        return PciIds(
            vendor=m.vendor_id,
            device=m.device_id,
            subsystem_vendor=m.subsystem_vendor_id,
            subsystem_device=m.subsystem_id,
            class_code=m.class_code,
            revision=m.revision,
        )


class Topology:
    """Groups, devices, containers, settings and the lock of one simulated machine."""

    def __init__(
        self,
        *,
        personality: Personality,
        dma_entry_limit: int,
        page_size: int,
        iova_ranges: Sequence[tuple[int, int]],
        io_width: int,
        memlock: MemlockAccount,
        iommufd: bool = False,
        noiommu: bool = False,
        phys_base: int = 0x0100_0000,
    ) -> None:
        self.lock = threading.RLock()
        #: /dev/iommu and the VFIO device cdevs exist (CONFIG_IOMMUFD, VFIO_DEVICE_CDEV)
        self.iommufd = iommufd
        #: no IOMMU: every group is VFIO's fake noiommu group (/dev/vfio/noiommu-N)
        self.noiommu = noiommu
        #: noiommu DMA: "physical" page -> process page, handed out by physical_pages
        self.phys_pages: dict[int, int] = {}
        self._virt_to_phys: dict[int, int] = {}
        self._phys_next = phys_base
        #: pages mlocked through the Kernel (noiommu DMA needs them pinned)
        self.locked_pages: set[int] = set()
        self._cdevs = 0
        self._ioas_ids = 0
        self.personality = personality
        self.dma_entry_limit = dma_entry_limit
        self.page_size = page_size
        self.iova_ranges = tuple(iova_ranges)
        self.io_width = io_width
        #: the access widths vfio-pci makes at once (do_io_rw), for the register fast path
        self.io_widths = frozenset(w for w in (1, 2, 4, 8) if w <= io_width)
        self.memlock = memlock
        self.memory = ProcessMemory()
        self.faults = FaultLog()
        self.injector = Injector()
        self.devices: dict[str, SimDevice] = {}
        self.groups: dict[int, SimGroup] = {}
        self.containers: list[SimContainer] = []
        self._container_numbers = 0
        self.closed = False
        #: called with +1 on a device's first open and -1 on its last close
        #: (the machine keeps its clock's worker thread alive meanwhile)
        self.on_device_use: Callable[[int], None] | None = None
        #: > 0 while a kernel call or a clock callback runs (fault warnings wait for its end)
        self.depth = 0

    # --- look-ups ------------------------------------------------------------------------

    def iter_devices(self) -> list[SimDevice]:
        return [self.devices[n] for n in sorted(self.devices)]

    def iter_groups(self) -> list[SimGroup]:
        return [self.groups[n] for n in sorted(self.groups)]

    def device(self, name: str) -> SimDevice:
        """The device at `name`; DeviceNotFound naming the machine's devices."""
        try:
            return self.devices[name]
        except (KeyError, TypeError):
            have = ", ".join(sorted(self.devices)) or "none (add_device first)"
            raise DeviceNotFound(
                f"no device {name!r} on this simulated machine; its devices: {have}"
            ) from None

    def cdev_name(self, device: SimDevice) -> str | None:
        """`vfioN` of the device's cdev: numbered on first bind to VFIO, None without one.

        A noiommu device has none (vfio_device_add: no cdev for noiommu devices).
        """
        if not self.iommufd or not device.vfio or self.noiommu:
            return None
        if device.cdev is None:
            device.cdev = self._cdevs
            self._cdevs += 1
        return f"vfio{device.cdev}"

    def new_ioas(self) -> Ioas:
        """An IOAS with the machine's IOMMU domain: page size and usable ranges."""
        self._ioas_ids += 1
        return Ioas(
            self._ioas_ids,
            self.page_size,
            self.iova_ranges or ((0, (1 << 64) - 1),),
            memlock=self.memlock,
            memory=self.memory,
        )

    def physical(self, address: int, size: int, page: int) -> tuple[int, ...]:
        """Physical addresses of the pages of a range: given out contiguously, kept per page."""
        first, last = address // page, (address + size - 1) // page
        fresh = [p for p in range(first, last + 1) if p not in self._virt_to_phys]
        for p in fresh:
            self._virt_to_phys[p] = self._phys_next // page
            self.phys_pages[self._phys_next // page] = p
            self._phys_next += page
        return tuple(self._virt_to_phys[p] * page for p in range(first, last + 1))

    def forget_physical(self, address: int, size: int, page: int) -> None:
        """munlock: the pages may move now; their physical addresses mean nothing."""
        for p in range(address // page, (address + size - 1) // page + 1):
            self.locked_pages.discard(p)
            phys = self._virt_to_phys.pop(p, None)
            if phys is not None:
                self.phys_pages.pop(phys, None)

    def new_group_number(self, first: int) -> int:
        number = first
        while number in self.groups:
            number += 1
        return number

    # --- containers ----------------------------------------------------------------------

    def new_container(self, fd: int) -> SimContainer:
        self._container_numbers += 1
        container = SimContainer(self._container_numbers, fd=fd)
        self.containers.append(container)
        return container

    def new_iommu(self, *, v2: bool) -> Type1Iommu:
        """The vfio_iommu VFIO_SET_IOMMU gives a container, with the machine's settings."""
        return Type1Iommu(
            v2=v2,
            page_size=self.page_size,
            iova_ranges=self.iova_ranges,
            dma_avail=self.dma_entry_limit,
            memlock=self.memlock,
            memory=self.memory,
            zero_page_pin=self.personality.ro_pin_zero_page == "zero page",
        )

    def drop_container_if_unused(self, container: SimContainer) -> None:
        if container.fd is None and not container.groups and container in self.containers:
            self.containers.remove(container)

    # --- groups --------------------------------------------------------------------------

    def attach(self, group: SimGroup, container: SimContainer) -> None:
        container.groups.append(group)
        group.container = container

    def detach(self, group: SimGroup) -> None:
        """vfio_group_detach_container; the last group takes the IOMMU with it."""
        container = group.container
        assert container is not None
        container.groups.remove(group)
        group.container = None
        if not container.groups:
            container.noiommu = False
        if not container.groups and container.iommu is not None:
            container.iommu.release()
            container.iommu = None
        self.drop_container_if_unused(container)

    def group_release(self, group: SimGroup) -> None:
        """vfio_group_fops_release: detach the container, let the group be opened again."""
        if group.container is not None:
            self.detach(group)
        group.opened = False
        group.file_closed = False

    def group_vanished(self, group: SimGroup) -> None:
        """The group's last VFIO device unbound (vfio_device_remove_group)."""
        if group.container is not None:
            self.detach(group)
        group.generation += 1
        group.opened = False
        group.file_closed = False

    # --- devices -------------------------------------------------------------------------

    def device_open(self, device: SimDevice) -> None:
        """vfio_df_open: the first open enables the device (vfio_pci_core_enable)."""
        device.open_count += 1
        if device.open_count > 1:
            return
        device.group.devices_in_use += 1
        if self.on_device_use is not None:
            self.on_device_use(1)
        device.config.open_device()
        if device.model.supports_reset:
            device.model.reset()  # pci_try_reset_function on open

    def device_close(self, device: SimDevice) -> None:
        """vfio_df_close: the last close disables it (vfio_pci_core_close_device)."""
        device.open_count -= 1
        if device.open_count:
            return
        device.irqs.close()
        device.config.close_device()
        device.low_power = False
        if device.model.supports_reset:
            device.model.reset()
        if self.on_device_use is not None:
            self.on_device_use(-1)
        group = device.group
        group.devices_in_use -= 1
        if group.file_closed and not group.devices_in_use:
            self.group_release(group)

    def shutdown_containers(self) -> None:
        for c in list(self.containers):
            for g in list(c.groups):
                self.detach(g)
        self.containers.clear()

    def describe_groups(self) -> Iterable[str]:
        """Group-level leaks: half-closed groups, container attachments, mlocked pages."""
        if self.locked_pages:
            yield f"{len(self.locked_pages)} page(s) still mlocked for noiommu DMA"
        for group in self.iter_groups():
            if group.file_closed:
                yield f"group {group.number}: its fd was closed but open device fds still hold it"
            if group.container is not None:
                yield f"group {group.number} is attached to {group.container.label()}"
        for c in self.containers:
            if c.iommu is not None:
                yield from (f"DMA mapping {m} in {c.label()}" for m in c.iommu.mappings)
