"""A small fake `DeviceContext` for driving device models directly.

No event loop and no real time: `schedule` queues callbacks on a manual
clock that a test advances explicitly, DMA goes through a page-granular fake
IOMMU over bytearrays, and interrupts are recorded. The fake also plays the
parts of the machine a model relies on: it lays out the model's capabilities
in a config space and owns the MSI / MSI-X enable bits, as vfio-pci does.
"""

from __future__ import annotations

import heapq
import itertools
import struct
from collections.abc import Callable

from attrs import define, field

from aiovfio._uapi.pci import CAP_LIST_OFFSET, CapId, Cfg, MsiCtrl, MsixCtrl, Status
from aiovfio.sim.model import DeviceModel, IommuFault

PAGE = 4096
_FIRST_CAP = 0x40
_CONFIG_SIZE = 256


@define(eq=False)
class Mapping:
    """One IOMMU mapping: `size` bytes of `buffer` at `iova` (page aligned)."""

    iova: int
    buffer: bytearray
    readable: bool = True
    writable: bool = True

    @property
    def size(self) -> int:
        return len(self.buffer)


@define(eq=False)
class FakeContext:
    """Implements `aiovfio.sim.model.DeviceContext` for unit tests."""

    model: DeviceModel = field(repr=False)
    name: str = "0000:00:04.0"
    now: float = 0.0
    mappings: list[Mapping] = field(factory=list)
    #: IommuFault objects raised into the model, in order.
    iommu_faults: list[IommuFault] = field(factory=list)
    #: messages from `log_fault`.
    faults: list[str] = field(factory=list)
    fault_kinds: list[str] = field(factory=list)
    #: INTx level changes as (time, level); `intx` is the current level.
    intx_history: list[tuple[float, bool]] = field(factory=list)
    intx: bool = False
    #: vectors delivered (only while MSI / MSI-X is enabled, as the machine does).
    msi: list[int] = field(factory=list)
    msix: list[int] = field(factory=list)
    #: vectors the model tried to send while MSI / MSI-X was disabled.
    dropped: list[tuple[str, int]] = field(factory=list)
    config: bytearray = field(factory=lambda: bytearray(_CONFIG_SIZE), repr=False)
    cap_offsets: dict[int, int] = field(factory=dict)
    _queue: list[tuple[float, int, Callable[[], None]]] = field(factory=list, repr=False)
    _seq: itertools.count[int] = field(factory=itertools.count, repr=False)
    in_access: bool = False
    #: how many times the model asked for a direct view (`dma_view`)
    views: int = 0
    #: False: `dma_view` always says None (the model goes entry by entry)
    direct: bool = True
    #: what `dma_epoch` answers while `direct`: changes with every map and unmap
    epoch: int = 1

    def __attrs_post_init__(self) -> None:
        self._build_config()
        self.model.attach(self)

    # --- config space ---------------------------------------------------------
    def _build_config(self) -> None:
        m = self.model
        struct.pack_into("<HH", self.config, Cfg.VENDOR_ID, m.vendor_id, m.device_id)
        self.config[Cfg.REVISION_ID] = m.revision
        self.config[Cfg.CLASS_PROG : Cfg.CLASS_PROG + 3] = m.class_code.to_bytes(3, "little")
        struct.pack_into(
            "<HH", self.config, Cfg.SUBSYSTEM_VENDOR_ID, m.subsystem_vendor_id, m.subsystem_id
        )
        self.config[Cfg.INTERRUPT_PIN] = m.interrupt_pin
        offset, previous = _FIRST_CAP, CAP_LIST_OFFSET
        for cap_id, body in m.capabilities():
            self.config[offset] = cap_id
            self.config[offset + 2 : offset + 2 + len(body)] = body
            self.config[previous] = offset
            self.cap_offsets[cap_id] = offset
            previous = offset + 1
            offset = (offset + 2 + len(body) + 3) & ~3
        if self.cap_offsets:
            struct.pack_into("<H", self.config, Cfg.STATUS, Status.CAP_LIST)

    def _ctrl(self, cap_id: int) -> int:
        return self.cap_offsets[cap_id] + 2

    def _set_ctrl_bit(self, cap_id: int, bit: int, on: bool) -> None:
        ctrl = self._ctrl(cap_id)
        value = struct.unpack_from("<H", self.config, ctrl)[0]
        value = value | bit if on else value & ~bit
        struct.pack_into("<H", self.config, ctrl, value)

    def enable_msi(self, on: bool = True) -> None:
        self._set_ctrl_bit(CapId.MSI, MsiCtrl.ENABLE, on)

    def enable_msix(self, on: bool = True) -> None:
        self._set_ctrl_bit(CapId.MSIX, MsixCtrl.ENABLE, on)

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset : offset + size], "little")

    # --- register access, as the machine does it ----------------------------
    def read(self, offset: int, size: int = 4, region: int = 0) -> int:
        """A driver's trapped read of BAR `region`."""
        self.in_access = True
        try:
            return self.model.read(region, offset, size)
        finally:
            self.in_access = False

    def write(self, offset: int, value: int, size: int = 4, region: int = 0) -> None:
        """A driver's trapped write of BAR `region`."""
        self.in_access = True
        try:
            self.model.write(region, offset, size, value)
        finally:
            self.in_access = False

    # --- the fake IOMMU -----------------------------------------------------
    def map(
        self, iova: int, size: int, *, readable: bool = True, writable: bool = True
    ) -> bytearray:
        """Map `size` fresh zeroed bytes at `iova`; returns the backing bytes."""
        assert iova % PAGE == 0
        assert size % PAGE == 0
        assert size > 0
        for m in self.mappings:
            assert iova + size <= m.iova or m.iova + m.size <= iova, "overlapping map"
        buffer = bytearray(size)
        self.mappings.append(Mapping(iova, buffer, readable, writable))
        self.epoch += 1
        return buffer

    def unmap(self, iova: int) -> None:
        self.mappings = [m for m in self.mappings if m.iova != iova]
        self.epoch += 1

    def dma_epoch(self) -> int | None:
        """As the machine's: the views `dma_view` gave hold while this is unchanged."""
        return self.epoch if self.direct else None

    def _segments(self, iova: int, size: int, write: bool) -> list[tuple[Mapping, int, int]]:
        segments, pos, end = [], iova, iova + size
        while pos < end:
            for m in self.mappings:
                if m.iova <= pos < m.iova + m.size:
                    break
            else:
                raise self._fault(iova, size, write, f"IOVA {pos:#x} is not mapped")
            if not (m.writable if write else m.readable):
                kind = "write" if write else "read"
                raise self._fault(iova, size, write, f"mapping at {m.iova:#x} forbids {kind}")
            length = min(end, m.iova + m.size) - pos
            segments.append((m, pos - m.iova, length))
            pos += length
        return segments

    def _fault(self, iova: int, size: int, write: bool, reason: str) -> IommuFault:
        fault = IommuFault(iova, size, write, reason)
        self.iommu_faults.append(fault)
        return fault

    def dma_view(self, iova: int, size: int, write: bool = False) -> tuple[memoryview, int] | None:
        """The mapping's buffer when one mapping with the permission holds the whole range."""
        assert not self.in_access, "device DMA inside a register access"
        self.views += 1
        if size <= 0 or not self.direct:
            return None
        for m in self.mappings:
            if m.iova <= iova and iova + size <= m.iova + m.size:
                if m.writable if write else m.readable:
                    return memoryview(m.buffer), iova - m.iova
                return None
        return None

    def dma_read(self, iova: int, size: int) -> bytes:
        assert not self.in_access, "device DMA inside a register access"
        out = bytearray()
        for m, offset, length in self._segments(iova, size, write=False):
            out += m.buffer[offset : offset + length]
        return bytes(out)

    def dma_write(self, iova: int, data: bytes) -> None:
        assert not self.in_access, "device DMA inside a register access"
        segments = self._segments(iova, len(data), write=True)  # all or nothing
        pos = 0
        for m, offset, length in segments:
            m.buffer[offset : offset + length] = data[pos : pos + length]
            pos += length

    # --- interrupts ---------------------------------------------------------
    def set_intx(self, asserted: bool) -> None:
        if asserted != self.intx:
            self.intx_history.append((self.now, asserted))
        self.intx = asserted

    def _enabled(self, cap_id: int, bit: int) -> bool:
        if cap_id not in self.cap_offsets:
            return False
        return bool(self.config_read(self._ctrl(cap_id), 2) & bit)

    def send_msi(self, vector: int) -> None:
        if self._enabled(CapId.MSI, MsiCtrl.ENABLE):
            self.msi.append(vector)
        else:
            self.dropped.append(("msi", vector))

    def send_msix(self, vector: int) -> None:
        if self._enabled(CapId.MSIX, MsixCtrl.ENABLE):
            self.msix.append(vector)
        else:
            self.dropped.append(("msix", vector))

    # --- the rest of DeviceContext ------------------------------------------
    def ram(self, index: int) -> memoryview:
        raise AssertionError("these models offer no mmap areas")

    def log_fault(self, message: str, kind: str = "device") -> None:
        self.faults.append(message)
        self.fault_kinds.append(kind)

    # --- the manual clock ---------------------------------------------------
    def schedule(self, delay: float, callback: Callable[[], None]) -> None:
        assert delay >= 0
        heapq.heappush(self._queue, (self.now + delay, next(self._seq), callback))

    @property
    def pending(self) -> int:
        """How many scheduled callbacks have not run yet."""
        return len(self._queue)

    @property
    def next_due(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def advance(self, seconds: float) -> int:
        """Move the clock forward, running what falls due (in order); returns the count."""
        target = self.now + seconds
        ran = 0
        while self._queue and self._queue[0][0] <= target:
            due, _, callback = heapq.heappop(self._queue)
            self.now = max(self.now, due)
            callback()
            ran += 1
        self.now = target
        return ran

    def run_due(self) -> int:
        """Run the callbacks due now (delay 0), and those they schedule for now."""
        return self.advance(0)

    def run_all(self, limit: int = 10_000) -> int:
        """Run every scheduled callback, advancing the clock as needed."""
        ran = 0
        while self._queue:
            assert ran < limit, "runaway scheduling"
            self.advance(self._queue[0][0] - self.now)
            ran += 1
        return ran
