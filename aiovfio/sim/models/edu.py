"""QEMU's `edu` teaching device (hw/misc/edu.c), register for register.

What a driver sees is what QEMU's edu does (DEVICES.md part B): the same
identity, access-width rules, factorial unit, interrupt status register and
DMA engine. Where QEMU is silent or fatal the simulator is explicit instead:

* a DMA address that `dma_mask` clamps is logged with `ctx.log_fault`;
* a device-side range that QEMU would abort the VM on (< 9.1), or copy out
  of bounds with (>= 9.1), is logged and not copied;
* an IOMMU fault drops the transfer as QEMU does (reads give zeros, writes
  write nothing; RUN still clears and the IRQ still fires). The machine has
  already counted and logged the fault.

Work that takes time in QEMU (the factorial thread, the DMA timer) completes
through `ctx.schedule`, never inside the register write that started it.
"""

from __future__ import annotations

import contextlib
import enum
import math
import struct
from collections.abc import Sequence

from attrs import define, field

from ..._uapi.pci import CapId, MsiCtrl
from ..._uapi.vfio import PciRegion
from ...errors import UsageError
from ..model import DeviceContext, DeviceModel, IommuFault, IrqSpec, RegionSpec
from ._pci import CapabilityFinder, all_ones, check_range, to_version, vfio_pci_irqs

__all__ = [
    "EDU_BAR_SIZE",
    "EDU_DMA_SIZE",
    "EDU_DMA_START",
    "EDU_IDENT",
    "Edu",
    "EduDmaCmd",
    "EduIrq",
    "EduReg",
    "EduStatus",
]

#: The value of the ident register: major 1, minor 0, 0xED.
EDU_IDENT = 0x010000ED
#: BAR0 is 1 MiB of 32-bit, non-prefetchable memory.
EDU_BAR_SIZE = 1 << 20
#: The device-side DMA buffer: 4096 bytes at device address 0x40000.
EDU_DMA_START = 0x40000
EDU_DMA_SIZE = 4096

_U32 = 0xFFFF_FFFF
_U64 = (1 << 64) - 1
#: Registers from here on are 64-bit and take 4- and 8-byte accesses.
_WIDE_REGS = 0x80
_NARROW_ACCESS = 4
_VALID_SIZES = (4, 8)  # QEMU's `.valid`: min 4, max 8, aligned
#: Versions where QEMU's device-side range check changed (DEVICES.md 1.6).
_RANGE_FIX_OFF_BY_ONE = (8, 2, 1)
_RANGE_LOG_NOT_ABORT = (9, 1)
#: n! has at least 32 factors of two from here on, so n! mod 2**32 == 0.
_FACTORIAL_ZERO_FROM = 34


class EduReg(enum.IntEnum):
    """BAR0 register offsets."""

    IDENT = 0x00
    LIVENESS = 0x04
    FACTORIAL = 0x08
    STATUS = 0x20
    IRQ_STATUS = 0x24
    IRQ_RAISE = 0x60
    IRQ_ACK = 0x64
    DMA_SRC = 0x80
    DMA_DST = 0x88
    DMA_COUNT = 0x90
    DMA_CMD = 0x98


class EduStatus(enum.IntFlag):
    """Bits of the status register (0x20)."""

    COMPUTING = 0x01
    IRQFACT = 0x80


class EduIrq(enum.IntFlag):
    """Sources in the interrupt status register (0x24)."""

    FACTORIAL = 0x001
    DMA = 0x100


class EduDmaCmd(enum.IntFlag):
    """Bits of the DMA command register (0x98)."""

    RUN = 0x1
    #: 0: RAM to device buffer; 1: device buffer to RAM.
    TO_RAM = 0x2
    IRQ = 0x4


def _factorial_u32(n: int) -> int:
    result = 1
    for k in range(2, min(n, _FACTORIAL_ZERO_FROM) + 1):
        result = (result * k) & _U32
    return result


@define(eq=False, kw_only=True)
class Edu(DeviceModel):
    """QEMU's edu device.

    `dma_mask` is QEMU's property of that name; `dma_latency` is the DMA
    timer (100 ms of guest time in QEMU); a factorial takes
    `factorial_latency` plus `factorial_step_latency` per multiplication (QEMU
    loops n times in a thread). `qemu_version` picks the version-dependent
    range check (DEVICES.md 1.6); the default is the QEMU of the VM harness.
    """

    vendor_id = 0x1234
    device_id = 0x11E8
    revision = 0x10
    class_code = 0x00FF00
    interrupt_pin = 1
    supports_reset = False

    dma_mask: int = field(default=(1 << 28) - 1, validator=check_range(0, _U64))
    dma_latency: float = field(default=0.1, validator=check_range(0, math.inf))
    factorial_latency: float = field(default=1e-5, validator=check_range(0, math.inf))
    factorial_step_latency: float = field(default=1e-9, validator=check_range(0, math.inf))
    qemu_version: tuple[int, ...] = field(default=(7, 2), converter=to_version)

    _ctx: DeviceContext | None = field(default=None, init=False, repr=False)
    _caps: CapabilityFinder = field(factory=CapabilityFinder, init=False, repr=False)
    _liveness: int = field(default=0, init=False, repr=False)
    _fact: int = field(default=0, init=False, repr=False)
    _status: EduStatus = field(default=EduStatus(0), init=False)
    _irq_status: int = field(default=0, init=False)
    _dma_src: int = field(default=0, init=False, repr=False)
    _dma_dst: int = field(default=0, init=False, repr=False)
    _dma_count: int = field(default=0, init=False, repr=False)
    _dma_cmd: EduDmaCmd = field(default=EduDmaCmd(0), init=False)
    _dma_buf: bytearray = field(factory=lambda: bytearray(EDU_DMA_SIZE), init=False, repr=False)

    # --- the DeviceModel description -----------------------------------------
    def regions(self) -> Sequence[RegionSpec]:
        """BAR0 only, trapped: every access reaches `read`/`write`."""
        return (RegionSpec(index=PciRegion.BAR0, size=EDU_BAR_SIZE),)

    def irqs(self) -> Sequence[IrqSpec]:
        """INTx and one MSI vector; no MSI-X."""
        return vfio_pci_irqs(intx=True, msi=1, msix=0, pcie=False)

    def capabilities(self) -> Sequence[tuple[int, bytes]]:
        """One MSI capability: 1 vector, 64-bit address, no per-vector mask."""
        # Message Control, Address low, Address high, Data.
        return ((CapId.MSI, struct.pack("<HIIH", MsiCtrl.ADDR64, 0, 0, 0)),)

    def attach(self, ctx: DeviceContext) -> None:
        """Remember the machine's context; a model belongs to one machine."""
        if self._ctx is not None and self._ctx is not ctx:
            raise UsageError("this Edu model is already attached to a machine; make a new one")
        self._ctx = ctx

    @property
    def _context(self) -> DeviceContext:
        if self._ctx is None:
            raise UsageError("this Edu model is not attached: add it to a sim Machine first")
        return self._ctx

    # --- register access -------------------------------------------------------
    @staticmethod
    def _accepted(region: int, offset: int, size: int) -> bool:
        # The memory core refuses 1/2-byte and misaligned accesses (reads give 0).
        return (
            region == PciRegion.BAR0
            and size in _VALID_SIZES
            and offset % size == 0
            and 0 <= offset <= EDU_BAR_SIZE - size
        )

    def read(self, region: int, offset: int, size: int) -> int:
        """A trapped read; see DEVICES.md 1.2-1.3 for the width rules."""
        if not self._accepted(region, offset, size):
            return 0
        if offset < _WIDE_REGS and size != _NARROW_ACCESS:
            return all_ones(size)
        match offset:
            case EduReg.IDENT:
                return EDU_IDENT
            case EduReg.LIVENESS:
                return self._liveness
            case EduReg.FACTORIAL:
                return self._fact
            case EduReg.STATUS:
                return int(self._status)
            case EduReg.IRQ_STATUS:
                return self._irq_status
            case EduReg.DMA_SRC:
                return self._dma_src & all_ones(size)
            case EduReg.DMA_DST:
                return self._dma_dst & all_ones(size)
            case EduReg.DMA_COUNT:
                return self._dma_count & all_ones(size)
            case EduReg.DMA_CMD:
                return int(self._dma_cmd) & all_ones(size)
        return all_ones(size)

    def write(self, region: int, offset: int, size: int, value: int) -> None:
        """A trapped write; see DEVICES.md 1.2-1.5."""
        if not self._accepted(region, offset, size):
            return
        if offset < _WIDE_REGS and size != _NARROW_ACCESS:
            return
        value &= all_ones(size)
        running = bool(self._dma_cmd & EduDmaCmd.RUN)
        match offset:
            case EduReg.LIVENESS:
                self._liveness = ~value & _U32
            case EduReg.FACTORIAL:
                self._start_factorial(value)
            case EduReg.STATUS:
                if value & EduStatus.IRQFACT:
                    self._status |= EduStatus.IRQFACT
                else:
                    self._status &= ~EduStatus.IRQFACT
            case EduReg.IRQ_RAISE:
                self._raise_irq(value & _U32)
            case EduReg.IRQ_ACK:
                self._lower_irq(value & _U32)
            case EduReg.DMA_SRC if not running:
                self._dma_src = value
            case EduReg.DMA_DST if not running:
                self._dma_dst = value
            case EduReg.DMA_COUNT if not running:
                self._dma_count = value
            case EduReg.DMA_CMD if not running and value & EduDmaCmd.RUN:
                # A write without RUN is ignored: a transfer cannot be cancelled.
                self._dma_cmd = EduDmaCmd(value & all_ones(8))
                self._context.schedule(self.dma_latency, self._dma_timer)

    # --- factorial ---------------------------------------------------------------
    def _start_factorial(self, n: int) -> None:
        if self._status & EduStatus.COMPUTING:
            return  # ignored while computing
        self._fact = n
        self._status |= EduStatus.COMPUTING
        steps = min(n, _U32)
        delay = self.factorial_latency + steps * self.factorial_step_latency
        self._context.schedule(delay, self._factorial_done)

    def _factorial_done(self) -> None:
        self._fact = _factorial_u32(self._fact)
        self._status &= ~EduStatus.COMPUTING
        # IRQFACT is checked after COMPUTING clears, as QEMU's thread does.
        if self._status & EduStatus.IRQFACT:
            self._raise_irq(EduIrq.FACTORIAL)

    # --- interrupts --------------------------------------------------------------
    def _raise_irq(self, bits: int) -> None:
        ctx = self._context
        self._irq_status |= bits
        if not self._irq_status:
            return
        if self._caps.msi_enabled(ctx):
            ctx.send_msi(0)  # once per raise, even with bits already pending
        else:
            ctx.set_intx(True)

    def _lower_irq(self, bits: int) -> None:
        ctx = self._context
        self._irq_status &= ~bits
        if not self._irq_status and not self._caps.msi_enabled(ctx):
            ctx.set_intx(False)

    # --- DMA ---------------------------------------------------------------------
    def _dma_timer(self) -> None:
        if not self._dma_cmd & EduDmaCmd.RUN:
            return
        to_ram = bool(self._dma_cmd & EduDmaCmd.TO_RAM)
        device_addr, ram_addr = (
            (self._dma_src, self._dma_dst) if to_ram else (self._dma_dst, self._dma_src)
        )
        count = self._dma_count
        problem = self._range_problem(device_addr, count)
        if problem is not None:
            self._context.log_fault(problem)
        elif count:
            self._copy(to_ram, device_addr - EDU_DMA_START, self._clamp(ram_addr), count)
        self._dma_cmd &= ~EduDmaCmd.RUN
        if self._dma_cmd & EduDmaCmd.IRQ:
            self._raise_irq(EduIrq.DMA)

    def _copy(self, to_ram: bool, buf_offset: int, iova: int, count: int) -> None:
        ctx = self._context
        window = slice(buf_offset, buf_offset + count)
        if to_ram:
            # A faulting write is dropped; the machine has logged the fault.
            with contextlib.suppress(IommuFault):
                ctx.dma_write(iova, bytes(self._dma_buf[window]))
        else:
            try:
                data = ctx.dma_read(iova, count)
            except IommuFault:
                data = bytes(count)  # a failed read yields zeros
            self._dma_buf[window] = data

    def _clamp(self, addr: int) -> int:
        clamped = addr & self.dma_mask
        if clamped != addr:
            self._context.log_fault(
                f"edu: DMA address {addr:#x} clamped to {clamped:#x} by dma_mask "
                f"{self.dma_mask:#x} (QEMU drops these bits silently; keep IOVAs below "
                f"{self.dma_mask + 1:#x}: dma_buffer(..., dma_mask=...))",
                "dma_mask",
            )
        return clamped

    def _range_problem(self, start: int, count: int) -> str | None:
        """Why QEMU `qemu_version` would not copy this device-side range, or None."""
        end = start + count
        limit = EDU_DMA_START + EDU_DMA_SIZE
        version = ".".join(map(str, self.qemu_version))
        outside = (
            f"edu: DMA of {count:#x} bytes at device address {start:#x} is outside "
            f"the buffer [{EDU_DMA_START:#x}, {limit:#x})"
        )
        if self.qemu_version >= _RANGE_LOG_NOT_ABORT:
            if start >= EDU_DMA_START and end <= limit:
                return None
            return f"{outside}; QEMU {version} would copy out of bounds; nothing copied"
        aborts = f"{outside}; QEMU {version} aborts the VM here; nothing copied"
        if not (EDU_DMA_START <= start < limit and end > start):
            return aborts  # also a count of 0, before 9.1
        if end < limit or (end == limit and self.qemu_version >= _RANGE_FIX_OFF_BY_ONE):
            return None
        if end > limit:
            return aborts
        return (
            f"edu: DMA of {count:#x} bytes at device address {start:#x} ends at "
            f"{limit:#x}: QEMU {version}'s range check is off by one (fixed in 8.2.1) "
            "and aborts the VM; use at most 4095 bytes at 0x40000; nothing copied"
        )
