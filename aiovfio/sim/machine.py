"""The simulated machine: PCI functions in IOMMU groups, and a Kernel that drives them.

    machine = Machine(clock="manual")
    machine.add_device(Edu(), name="0000:00:04.0")
    kernel = machine.kernel          # implements aiovfio.kernel.protocol.Kernel
    ...
    assert machine.leaks() == []
    machine.close()

A `Machine` holds the topology (groups, devices, the driver each is bound
to), the simulated IOMMU, the clock that runs device work, the fault log and
the fault injector. `machine.kernel` is the `Kernel` implementation
(`aiovfio.sim.kernel.SimKernel`); its refusals are listed in
`aiovfio.sim.rules`. Everything is serialised by one lock, so device models
need no locking of their own.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import cast

from .._uapi.vfio import PciIrq, PciRegion, RegionFlag
from ..errors import ClosedResourceError, InvalidArgument
from ..kernel import hints
from ..kernel.viability import keeps_group_viable
from . import rules
from .clock import Clock, ClockKind
from .config_space import Bar, ConfigSpace
from .faults import FaultLog, FaultRecord, Injection, check_kinds
from .ioas import Ioas
from .iommu import (
    MemlockAccount,
    TranslationFault,
    Type1Iommu,
    default_memlock_limit,
    view_read,
)
from .irqs import DeviceIrqs, IrqType, Trigger
from .kernel import SimKernel
from .model import DeviceModel, IommuFault, RegionSpec
from .rules import NEWEST_KERNEL, Personality
from .topology import RegionRam, SimDevice, SimGroup, Topology

__all__ = ["Machine", "SimDevice", "SimGroup"]

_BDF = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]")
#: Group numbers handed out when add_device is not told one (real machines start low too).
_FIRST_GROUP = 10
_MMIO_32 = 0xC000_0000
_MMIO_64 = 0x80_0000_0000
_DEFAULT_IOVA_RANGES = ((0, 0xFEDF_FFFF), (0xFEF0_0000, 0x7F_FFFF_FFFF))
_COMMAND = 0x04  # config space offset of COMMAND, and its Bus Master bit
_BUS_MASTER = 0x04
_MSIX = IrqType.MSIX  # the member, as a module name (an Enum.MEMBER lookup is slow in 3.11)


def _iommu_of(device: SimDevice) -> Type1Iommu | Ioas | None:
    """The IOMMU a device's DMA goes through: its IOAS (attached through its cdev), else
    its group's container's, else none. (`Machine._window` has it inline: the hot path.)"""
    if device.ioas is not None:
        return device.ioas
    container = device.group.container
    return None if container is None else container.iommu


class _Context:
    """The DeviceContext a model gets: DMA, interrupts, config, RAM, clock, faults."""

    def __init__(self, machine: Machine, device: SimDevice) -> None:
        self._machine = machine
        self._device = device
        self.name = device.name

    def __repr__(self) -> str:
        return f"<DeviceContext {self.name}>"

    def _flush(self) -> None:
        """Faults a model caused outside a kernel call or clock callback: warn now."""
        topo = self._machine._topo
        if not topo.depth:
            topo.faults.flush(stacklevel=3)

    def dma_read(self, iova: int, size: int) -> bytes:
        topo = self._machine._topo
        try:
            return self._machine._dma(self._device, iova, size, None)
        finally:
            if not topo.depth:  # _flush, inline: every DMA passes here
                topo.faults.flush(stacklevel=2)

    def dma_write(self, iova: int, data: bytes) -> None:
        machine = self._machine
        topo = machine._topo
        size = len(data)
        with topo.lock:  # Machine._dma's fast path, inline: every completion's data passes
            window = machine._window(self._device, iova, size, True)
            if window is not None:
                view, offset = window
                try:
                    view[offset : offset + size] = data
                except ValueError:  # released by its lender: the general path
                    pass
                else:
                    return
        try:
            machine._dma(self._device, iova, size, bytes(data))
        finally:
            if not topo.depth:
                topo.faults.flush(stacklevel=2)

    def dma_view(self, iova: int, size: int, write: bool = False) -> tuple[memoryview, int] | None:
        machine = self._machine
        topo = machine._topo
        with topo.lock:
            if not topo.depth:
                return None  # outside a kernel call or clock callback nothing holds it still
            return machine._window(self._device, iova, size, write)

    def dma_epoch(self) -> int | None:
        # What `Machine._window` depends on beyond the mapping itself: Bus Master, an
        # IOMMU (not noiommu), and which one the device is attached to; the IOMMU's
        # generation covers its mappings and their views.
        device = self._device
        topo = self._machine._topo
        if not topo.depth or not device.config.phys[_COMMAND] & _BUS_MASTER or topo.noiommu:
            return None
        iommu = _iommu_of(device)
        return None if iommu is None else iommu.generation

    def set_intx(self, asserted: bool) -> None:
        with self._machine._topo.lock:
            self._device.irqs.set_intx_level(bool(asserted))
        self._flush()

    def send_msi(self, vector: int) -> None:
        with self._machine._topo.lock:
            self._device.irqs.send_msi(IrqType.MSI, vector, self._machine._signals)
        self._flush()

    def send_msix(self, vector: int) -> None:
        topo = self._machine._topo
        with topo.lock:
            self._device.irqs.send_msi(_MSIX, vector, self._machine._signals)
        if not topo.depth and topo.faults.pending:  # _flush, inline: every interrupt passes
            topo.faults.flush(stacklevel=2)

    def config_read(self, offset: int, size: int) -> int:
        with self._machine._topo.lock:
            phys = self._device.config.phys  # ConfigSpace.read, inline: MSI-X Enable per interrupt
            if size in (1, 2, 4) and 0 <= offset <= len(phys) - size:
                return int.from_bytes(phys[offset : offset + size], "little")
            return self._device.config.read(offset, size)  # its ValueError

    def ram(self, index: int) -> memoryview:
        ram = self._device.ram.get(index)
        if ram is None:
            raise ValueError(f"{self.name} has no region {index}")
        return memoryview(ram.map)

    def schedule(self, delay: float, callback: Callable[[], None]) -> None:
        self._machine._clock.schedule(delay, callback)

    def log_fault(self, message: str, kind: str = "device") -> None:
        with self._machine._topo.lock:
            self._machine.faults.add(FaultRecord(kind, self.name, str(message)))
        self._flush()


class Machine:
    """A simulated machine with PCI devices behind an IOMMU, and its `Kernel`.

    `dma_entry_limit`, `page_size` and `iova_ranges` (inclusive pairs) are
    what the type1 IOMMU enforces and reports. `memlock_limit` is the pinned
    memory limit in bytes; None applies Linux's rule to this process
    (RLIMIT_MEMLOCK, or no limit with CAP_IPC_LOCK). `clock` is "thread"
    (real time, a worker thread while work is pending) or "manual" (time
    moves only with `advance`/`run_until_idle`). `linux` is the kernel
    personality ("6.12", "6.1" or "6.12-iommufd", `aiovfio.sim.rules.PERSONALITY`): every
    behaviour where the kernels differ follows that kernel. `io_width` is the
    widest access vfio-pci makes for pread/pwrite of a BAR (None: the
    personality's, 8 on 6.12 and 4 on 6.1; a wider access reaches the model
    as several). `iommufd` gives the machine /dev/iommu and VFIO device cdevs
    (/dev/vfio/devices/vfioN, numbered as devices bind to VFIO), as a kernel
    built with CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV: IOAS objects, the
    cdev's bind/attach and its exclusion of the group path
    (`aiovfio.sim.ioas`, `aiovfio.sim.kernel.iommufd`). `noiommu` is a
    machine without an IOMMU in VFIO's unsafe noiommu mode: every group is
    /dev/vfio/noiommu-N, a container takes only VFIO_NOIOMMU_IOMMU (no
    mappings), devices have no cdev, and device DMA reaches the "physical"
    addresses `physical_pages` hands out (from `phys_base` on, contiguous per
    call) of pages that are mlocked; anything else is a fault.
    """

    def __init__(
        self,
        *,
        dma_entry_limit: int = 65535,
        page_size: int = 4096,
        iova_ranges: Sequence[tuple[int, int]] = _DEFAULT_IOVA_RANGES,
        memlock_limit: int | None = None,
        clock: ClockKind = "thread",
        io_width: int | None = None,
        linux: str = NEWEST_KERNEL,
        iommufd: bool = False,
        noiommu: bool = False,
        phys_base: int = 0x0100_0000,
    ) -> None:
        personality = Personality.of(linux)
        if io_width is None:
            io_width = personality.bar_io_width
        if not isinstance(dma_entry_limit, int) or not isinstance(page_size, int):
            raise InvalidArgument(
                f"dma_entry_limit and page_size are ints, not {dma_entry_limit!r}, {page_size!r}"
            )
        if dma_entry_limit < 0:
            raise InvalidArgument(f"dma_entry_limit must be >= 0, not {dma_entry_limit}")
        if page_size < 4096 or page_size & (page_size - 1):
            raise InvalidArgument(f"page_size must be a power of two >= 4096, not {page_size}")
        try:
            ranges = tuple((int(lo), int(hi)) for lo, hi in iova_ranges)
        except (TypeError, ValueError):
            raise InvalidArgument(
                f"iova_ranges is a sequence of (start, end) int pairs, not {iova_ranges!r}"
            ) from None
        for i, (lo, hi) in enumerate(ranges):
            if not 0 <= lo <= hi < 1 << 64 or (i and ranges[i - 1][1] >= lo):
                raise InvalidArgument(
                    f"iova_ranges must be sorted, disjoint (start, end): {ranges}"
                )
        if io_width not in (4, 8):
            raise InvalidArgument(f"io_width must be 4 or 8, not {io_width}")
        if memlock_limit is not None and (not isinstance(memlock_limit, int) or memlock_limit < 0):
            raise InvalidArgument(f"memlock_limit must be >= 0 or None, not {memlock_limit}")
        self.dma_entry_limit = dma_entry_limit
        self.page_size = page_size
        self.iova_ranges = ranges
        self.io_width = io_width
        self.personality = personality
        self._topo = Topology(
            personality=personality,
            dma_entry_limit=dma_entry_limit,
            page_size=page_size,
            iova_ranges=ranges,
            io_width=io_width,
            memlock=MemlockAccount(
                default_memlock_limit() if memlock_limit is None else memlock_limit
            ),
            iommufd=bool(iommufd),
            noiommu=bool(noiommu),
            phys_base=int(phys_base),
        )
        self.iommufd = bool(iommufd)
        self.noiommu = bool(noiommu)
        self._lock = self._topo.lock
        #: MSI/MSI-X eventfds the clock callbacks sent, signalled by `_deliver`
        self._sent: list[Trigger] = []
        #: `_sent` while a clock callback runs, else None (kernel calls signal at once)
        self._signals: list[Trigger] | None = None
        self._clock = Clock(clock, self._lock, runner=self._device_work, after=self._deliver)
        self._topo.on_device_use = self._device_use
        self._mmio32 = _MMIO_32
        self._mmio64 = _MMIO_64
        self.kernel = SimKernel(self._topo)
        hints.register_simulated(self.kernel)

    # --- context manager and close ----------------------------------------------------

    def __enter__(self) -> Machine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._topo.closed

    def close(self) -> None:
        """Stop the clock and release every fd, mapping, eventfd and region. Idempotent."""
        self._clock.close()  # without the lock: the worker may be waiting for it
        hints.unregister_simulated(self.kernel)
        with self._lock:
            if self._topo.closed:
                return
            self._topo.closed = True
            self.kernel.files.shutdown()
            for device in self._topo.devices.values():
                device.irqs.close()
                for ram in device.ram.values():
                    ram.close()
            self._topo.memory.close()

    # --- topology ------------------------------------------------------------------------

    def add_device(
        self,
        model: DeviceModel,
        *,
        name: str,
        group: int | None = None,
        driver: str | None = "vfio-pci",
    ) -> None:
        """Plug `model` in at PCI address `name`, in IOMMU group `group` (None: a new one)."""
        if not isinstance(cast(object, model), DeviceModel):
            raise InvalidArgument(f"model must be a DeviceModel, not {type(model).__name__}")
        if not isinstance(name, str) or not _BDF.fullmatch(name):
            raise InvalidArgument(
                f"{name!r} is not a PCI address like '0000:00:04.0' (lowercase hex)"
            )
        if driver is not None and (not isinstance(driver, str) or not driver or "/" in driver):
            raise InvalidArgument(f"driver must be a driver name or None, not {driver!r}")
        if group is not None and (not isinstance(group, int) or group < 0):
            raise InvalidArgument(f"group must be a non-negative int or None, not {group!r}")
        with self._lock:
            self._check_open()
            if name in self._topo.devices:
                raise InvalidArgument(f"{name} is already on this machine")
            if any(m.model is model for m in self._topo.devices.values()):
                raise InvalidArgument("this model instance is already plugged in; make a new one")
            regions = _check_regions(name, model.regions())
            bars = self._assign_bars(regions)
            config = ConfigSpace.build(
                vendor_id=model.vendor_id,
                device_id=model.device_id,
                subsystem_vendor_id=model.subsystem_vendor_id,
                subsystem_id=model.subsystem_id,
                revision=model.revision,
                class_code=model.class_code,
                interrupt_pin=model.interrupt_pin,
                bars=list(bars.values()),
                capabilities=[(int(i), bytes(b)) for i, b in model.capabilities()],
            )
            number = group if group is not None else self._topo.new_group_number(_FIRST_GROUP)
            sim_group = self._topo.groups.get(number) or SimGroup(number)
            if (
                driver is not None
                and not keeps_group_viable(driver)
                and sim_group.container is not None
            ):
                raise rules.BIND_DMA_OWNED.error(f"{name} into group {number} with {driver}")
            ram: dict[int, RegionRam] = {}
            try:
                for index, spec in regions.items():
                    ram[index] = RegionRam.create(name, index, spec.size)
            except BaseException:
                for r in ram.values():
                    r.close()
                raise
            device = SimDevice(
                name=name,
                model=model,
                group=sim_group,
                driver=driver,
                config=config,
                regions=regions,
                bars=bars,
                ram=ram,
                irqs=DeviceIrqs(
                    config,
                    lambda msg, kind="interrupt": self._dropped_interrupt(name, msg, kind),
                    self._topo.personality,
                ),
            )
            try:
                _check_irqs(device)
                model.attach(_Context(self, device))
            except BaseException:
                for r in ram.values():
                    r.close()
                raise
            self._topo.groups[number] = sim_group
            sim_group.devices.append(device)
            sim_group.devices.sort(key=lambda d: d.name)
            self._topo.devices[name] = device

    def _assign_bars(self, regions: dict[int, RegionSpec]) -> dict[int, Bar]:
        bars: dict[int, Bar] = {}
        for index, spec in regions.items():
            wide = spec.is_64bit and index != PciRegion.ROM
            base = self._mmio64 if wide else self._mmio32
            address = (base + spec.size - 1) & ~(spec.size - 1)
            if wide:
                self._mmio64 = address + spec.size
            else:
                self._mmio32 = address + spec.size
            bars[index] = Bar(index, spec.size, address, wide, spec.prefetchable)
        return bars

    def set_driver(self, name: str, driver: str | None) -> None:
        """Bind `name` to `driver` (None: unbind), as writing sysfs bind/unbind would.

        Refuses (EBUSY) to unbind a VFIO device that is open (Linux would block
        and signal REQ; the REQ eventfd is signalled here too), and to bind a
        DMA-using driver in a group whose DMA user space owns.
        """
        if driver is not None and (not isinstance(driver, str) or not driver or "/" in driver):
            raise InvalidArgument(f"driver must be a driver name or None, not {driver!r}")
        with self._lock:
            self._check_open()
            device = self._device(name)
            if driver == device.driver:
                return
            if device.open_count:
                device.irqs.signal_req()
                raise rules.UNBIND_DEVICE_OPEN.error(f"{name} has {device.open_count} open fd(s)")
            group = device.group
            if not keeps_group_viable(driver) and group.container is not None:
                raise rules.BIND_DMA_OWNED.error(f"{name} to {driver}")
            device.driver = driver
            if not group.exists:
                self._topo.group_vanished(group)

    def request_release(self, name: str) -> bool:
        """Signal the device's REQ eventfd (the kernel asking for the device back)."""
        with self._lock:
            return self._device(name).irqs.signal_req()

    def report_error(self, name: str) -> bool:
        """Signal the device's ERR eventfd (an uncorrectable AER error)."""
        with self._lock:
            return self._device(name).irqs.signal_err()

    def model(self, name: str) -> DeviceModel:
        """The model plugged in at `name`."""
        with self._lock:
            return self._device(name).model

    @property
    def device_names(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(sorted(self._topo.devices))

    @property
    def faults(self) -> FaultLog:
        """Every fault the machine's devices met, with its message."""
        return self._topo.faults

    @property
    def linux(self) -> str:
        """The kernel this machine behaves as ("6.12", "6.1" or "6.12-iommufd")."""
        return self.personality.linux

    @property
    def topology(self) -> Topology:
        """Groups, devices, containers and the lock (what the kernel and sysfs writer read)."""
        return self._topo

    @property
    def _devices(self) -> dict[str, SimDevice]:
        return self._topo.devices

    @property
    def _memlock(self) -> MemlockAccount:
        return self._topo.memlock

    def _device(self, name: str) -> SimDevice:
        return self._topo.device(name)

    def _check_open(self) -> None:
        if self._topo.closed:
            raise ClosedResourceError("this simulated machine is closed; make a new Machine")

    # --- clock ---------------------------------------------------------------------------

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def now(self) -> float:
        """Machine time in seconds."""
        return self._clock.now()

    def advance(self, seconds: float) -> int:
        """Manual clock: move time on, running the device work that falls due."""
        return self._clock.advance(seconds)

    def run_until_idle(self, *, timeout: float | None = None) -> int:
        """Manual clock: run all pending device work (returns how many callbacks ran).

        Thread clock: wait until the worker has run everything pending, at most
        `timeout` seconds (TimeoutError after that); returns 0.
        """
        if self._clock.kind == "thread":
            if not self._clock.wait_idle(timeout):
                raise TimeoutError(f"device work still pending after {timeout} s")
            return 0
        return self._clock.run_until_idle()

    @property
    def errors(self) -> list[BaseException]:
        """Exceptions device work raised on the thread clock."""
        return self._clock.errors

    # --- faults --------------------------------------------------------------------------

    def inject(
        self, op: str, errno: int, *, nth: int | None = None, times: int | None = 1
    ) -> Injection:
        """Make Kernel method `op` fail with `errno` on its `nth` call from now, `times` times.

        `nth=None` fails from the next call; `times=None` fails every call from
        then on. The failure happens before the call changes anything, except
        for `close`, which releases the fd and then raises (as close(2) does).
        """
        with self._lock:
            return self._topo.injector.inject(op, errno, nth=nth, times=times)

    def clear_injections(self) -> None:
        with self._lock:
            self._topo.injector.clear()

    @property
    def kernel_calls(self) -> Counter[str]:
        """How many times each Kernel method was called."""
        return self._topo.injector.calls

    def _device_use(self, delta: int) -> None:
        if delta > 0:
            self._clock.hold()
        else:
            self._clock.release()

    def _device_work(self, callback: Callable[[], None]) -> None:
        """Run a clock callback; its faults become warnings once it has finished.

        The MSI and MSI-X messages it sends (checked and routed now, under the
        machine lock) are signalled by `_deliver` once the clock has released
        the lock: a driver woken by the first one neither waits for the lock
        nor for the GIL while the model finishes its batch. What the driver
        can observe is unchanged: the completion was written before the
        interrupt arrives.
        """
        topo = self._topo
        topo.depth += 1
        self._signals = self._sent
        try:
            callback()
        finally:
            topo.depth -= 1
            self._signals = None
        if not topo.depth and topo.faults.pending:
            topo.faults.flush()

    def _deliver(self) -> None:
        """After a clock callback, outside the machine lock: signal the eventfds it sent."""
        sent = self._sent
        if sent:
            self._sent = []
            for trigger in sent:
                trigger.signal()  # a trigger released meanwhile is skipped

    def _dropped_interrupt(self, name: str, message: str, kind: str = "interrupt") -> None:
        self.faults.add(FaultRecord(kind, name, message))

    def expect_faults(self, *kinds: str) -> contextlib.AbstractContextManager[None]:
        """A block in which faults of `kinds` are expected (declared), not warned about.

            with machine.expect_faults("bus_master"):
                ...  # a DMA with Bus Master off

        Kinds: "bus_master", "iommu", "dma_mask", "device", "interrupt". At
        least one fault of each kind must happen in the block (else
        AssertionError); the pytest plugin fails a test for undeclared ones.
        """
        check_kinds(kinds)  # refuse a bad kind here, not on entering the block
        return self._topo.faults.expect(*kinds, lock=self._lock)

    def _window(
        self, device: SimDevice, iova: int, size: int, write: bool
    ) -> tuple[memoryview, int] | None:
        """The lent view and offset a device access of `size` bytes at `iova` may copy
        through without a fault, or None (the general path then decides, and records).

        The conditions of the fast path: Bus Master on, an IOMMU (not noiommu), the
        whole access inside one mapping with the permission, whose memory was lent as
        a view (aiovfio.sim.iommu) and is not pinned as the zero page. The caller holds
        the machine lock, so none of this can change until it releases it.
        """
        if size > 0 and device.config.phys[_COMMAND] & _BUS_MASTER and not self._topo.noiommu:
            iommu: Type1Iommu | Ioas | None = device.ioas  # _iommu_of, inline
            if iommu is None:
                container = device.group.container
                if container is not None:
                    iommu = container.iommu
            m = iommu.lookup(iova) if iommu is not None and iova >= 0 else None
            if (
                m is not None
                and m.view is not None
                and iova + size <= m.end
                and not m.zero_pages
                and (m.write if write else m.read)
            ):
                return m.view, iova - m.iova
        return None

    def _dma(self, device: SimDevice, iova: int, size: int, data: bytes | None) -> bytes:
        """A device DMA through the IOMMU: read `size` bytes, or write `data`."""
        with self._lock:
            # The fast path: one copy through the lent view, no syscall. Everything
            # else (and every fault) is `_dma_checked`.
            window = self._window(device, iova, size, data is not None)
            if window is not None:
                view, offset = window
                if data is None:
                    got = view_read(view, offset, size)
                    if got is not None:
                        return got
                else:
                    try:  # view_write, inline
                        view[offset : offset + size] = data
                    except ValueError:
                        pass
                    else:
                        return b""
                self._drop_view(device, iova)  # released by its lender: /proc/self/mem now
            return self._dma_checked(device, iova, size, data)

    def _drop_view(self, device: SimDevice, iova: int) -> None:
        """Forget the released view of the mapping holding `iova` (the general path copies)."""
        iommu = _iommu_of(device)
        if iommu is not None:
            m = iommu.lookup(iova)
            if m is not None:
                iommu.drop_view(m)

    def _dma_checked(self, device: SimDevice, iova: int, size: int, data: bytes | None) -> bytes:
        """Every check of a device DMA, each fault recorded; the copy per segment."""
        write = data is not None
        with self._lock:
            if size == 0:
                return b""
            if iova < 0 or size < 0:
                raise ValueError(f"DMA of {size} bytes at IOVA {iova:#x}")

            kind = "write" if write else "read"

            def fault(reason: str, what: str = "iommu") -> IommuFault:
                message = f"device DMA {kind} of {size} bytes at IOVA {iova:#x}: {reason}"
                self.faults.add(FaultRecord(what, device.name, message, iova, size, write))
                return IommuFault(iova, size, write, reason)

            if not device.config.bus_master:
                raise fault(
                    "dropped: Bus Master is off in COMMAND (set it: dev.config.enable(), or "
                    "COMMAND |= 0x4)",
                    "bus_master",
                )
            if self._topo.noiommu:
                return self._dma_physical(device, iova, size, data, fault)
            iommu = _iommu_of(device)
            if iommu is None:
                raise fault(
                    "the device's group is not attached to a container with an IOMMU, "
                    "and the device is not attached to an IOAS"
                )
            try:
                segments = iommu.translate(iova, size, write=write)
            except TranslationFault as exc:
                raise fault(exc.reason) from None
            if data is None:
                parts = []
                for vaddr, n in segments:
                    chunk = self._topo.memory.read(vaddr, n)
                    if chunk is None:
                        self._gone(device, vaddr, n)
                        chunk = bytes(n)
                    parts.append(chunk)
                got = b"".join(parts)
                spans = iommu.zero_spans(iova, size)
                if spans:  # pinned as the zero page (6.1): the process's writes are not seen
                    patched = bytearray(got)
                    for offset, n in spans:
                        patched[offset : offset + n] = bytes(n)
                    got = bytes(patched)
                return got
            pos = 0
            for vaddr, n in segments:
                if not self._topo.memory.write(vaddr, data[pos : pos + n]):
                    self._gone(device, vaddr, n)
                pos += n
            return b""

    def _dma_physical(
        self,
        device: SimDevice,
        address: int,
        size: int,
        data: bytes | None,
        fault: Callable[[str], IommuFault],
    ) -> bytes:
        """noiommu: the device reaches "physical" pages handed out by physical_pages."""
        page = self.page_size
        parts = []
        pos, end = address, address + size
        while pos < end:
            virt = self._topo.phys_pages.get(pos // page)
            if virt is None:
                raise fault(f"physical address {pos:#x} is no page this process asked for")
            if virt not in self._topo.locked_pages:
                raise fault(f"physical address {pos:#x}: its page is not mlocked, it may move")
            n = min(end, (pos // page + 1) * page) - pos
            vaddr = virt * page + pos % page
            if data is None:
                chunk = self._topo.memory.read(vaddr, n)
                parts.append(chunk if chunk is not None else bytes(n))
            else:
                self._topo.memory.write(vaddr, data[pos - address : pos - address + n])
            pos += n
        return b"".join(parts)

    def _gone(self, device: SimDevice, vaddr: int, size: int) -> None:
        self.faults.add(
            FaultRecord(
                "device",
                device.name,
                f"process memory at {vaddr:#x}+{size:#x} behind a live DMA mapping is no longer "
                "mapped by the process (Linux's device would still reach the pinned pages)",
            )
        )

    # --- reports -------------------------------------------------------------------------

    def leaks(self) -> list[str]:
        """Everything still open, mapped or enabled, one line each; [] when clean."""
        with self._lock:
            return self.kernel.files.leaks()

    def write_sysfs(self, root: str | os.PathLike[str]) -> Path:
        """Write a sysfs-like tree of this machine under `root` (for LinuxKernel(sysfs=root))."""
        from .sysfs_tree import write_tree

        with self._lock:
            return write_tree(Path(root), self._topo)

    def __repr__(self) -> str:
        with self._lock:
            state = "closed" if self._topo.closed else f"clock={self._clock.kind}"
            lines = [
                f"<Machine linux={self.linux} {state} groups={len(self._topo.groups)} "
                f"devices={len(self._topo.devices)}"
            ]
            for number in sorted(self._topo.groups):
                g = self._topo.groups[number]
                flags = ["viable" if g.viable else "not viable"]
                if g.opened:
                    flags.append("open")
                if g.container is not None:
                    flags.append("in a container")
                lines.append(f"  group {number} ({', '.join(flags)}):")
                for d in g.devices:
                    ids = d.ids()
                    lines.append(
                        f"    {d.name} {ids} driver={d.driver or '(none)'} "
                        f"model={type(d.model).__name__}"
                        + (f" open={d.open_count}" if d.open_count else "")
                    )
            return "\n".join(lines) + ">"


def _check_regions(name: str, specs: Sequence[RegionSpec]) -> dict[int, RegionSpec]:
    """Validate a model's regions; ValueError says what is wrong."""
    regions: dict[int, RegionSpec] = {}
    page = mmap.PAGESIZE
    for spec in specs:
        index = int(spec.index)
        where = f"{name} region {index}"
        if not 0 <= index <= PciRegion.ROM:
            raise InvalidArgument(f"{where}: models have BARs 0-5 and the ROM (6) only")
        if index in regions:
            raise InvalidArgument(f"{where} is listed twice")
        minimum = 2048 if index == PciRegion.ROM else 16
        if spec.size < minimum or spec.size & (spec.size - 1):
            raise InvalidArgument(
                f"{where}: size {spec.size:#x} is not a power of two >= {minimum}"
            )
        if spec.flags & ~int(RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP):
            raise InvalidArgument(f"{where}: flags {spec.flags!r}: only READ, WRITE (MMAP implied)")
        if index == PciRegion.ROM and spec.mmap_areas:
            raise InvalidArgument(f"{where}: the ROM cannot be mmapped")
        end = 0
        for off, size in sorted(spec.mmap_areas):
            if size <= 0 or off % page or size % page or off < end or off + size > spec.size:
                raise InvalidArgument(
                    f"{where}: mmap area {off:#x}+{size:#x} must be page aligned, inside the "
                    "region and not overlap another"
                )
            end = off + size
        regions[index] = spec
    for index, spec in regions.items():
        wide = spec.is_64bit and index != PciRegion.ROM
        if wide and (index == PciRegion.BAR5 or index + 1 in regions):
            raise InvalidArgument(f"{name} region {index} is 64-bit: it needs BAR {index + 1} free")
    return dict(sorted(regions.items()))


def _check_irqs(device: SimDevice) -> None:
    """The model's IrqSpec counts must match what its config space makes vfio-pci report."""
    for spec in device.model.irqs():
        index = int(spec.index)
        if index not in (PciIrq.INTX, PciIrq.MSI, PciIrq.MSIX):
            continue
        have = device.irqs.count(index)
        if spec.count != have:
            kind = PciIrq(index).name
            raise InvalidArgument(
                f"{device.name}: the model says {kind} has {spec.count} vector(s) but its config "
                f"space makes vfio-pci report {have} (interrupt pin / MSI QMASK / MSI-X QSIZE)"
            )
