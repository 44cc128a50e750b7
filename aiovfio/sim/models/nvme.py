"""QEMU's `nvme` controller (hw/nvme/ctrl.c) with one namespace, as a model.

The subset a user-space driver needs, with QEMU's checks and status codes
(DEVICES.md parts C and E): controller enable, disable and shutdown; the admin
commands Identify, Get Log Page, Get/Set Features, Create/Delete I/O SQ/CQ,
Abort and Async Event Request; the I/O commands Read, Write, Write Zeroes and
Flush with PRPs (PRP1 offsets, PRP lists, chained list pages); phase tags;
completions held while a CQ is full; MSI-X (or INTx) interrupts.

Timing follows QEMU's bottom halves: a doorbell write only records the new
tail and schedules the queue's processing with `ctx.schedule`, so commands
run after the write returns; each processed batch posts its completions and
interrupts once.

Every device access to host memory goes through `ctx.dma_read`/`dma_write`,
that is through the IOMMU. A fault while fetching a command or posting a
completion sets CSTS.CFS (the controller is dead until disabled); a fault
while moving a command's data ends that command with Data Transfer Error.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

from attrs import define, field, frozen

from ..._uapi.pci import CapId
from ..._uapi.vfio import PciRegion
from ...errors import InvalidArgument, UsageError
from ..model import DeviceContext, DeviceModel, IommuFault, IrqSpec, RegionSpec
from ._nvme_spec import (
    CQE,
    DNR,
    IDENTIFY_SIZE,
    NSID_BROADCAST,
    SQE,
    AdminOpcode,
    Cap,
    Cc,
    Cns,
    Command,
    Csts,
    FeatureId,
    IdCtrl,
    IdNs,
    IoOpcode,
    LogId,
    Reg,
    Smart,
    Status,
    field_get,
)
from ._nvme_store import BufferStore, SparseStore, open_store
from ._pci import CapabilityFinder, check_range, to_version, vfio_pci_irqs

__all__ = ["Nvme"]

_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF
_PAGE_SHIFT_MIN = 12
_DOORBELL_STRIDE = 4  # CAP.DSTRD = 0
_NVME_VERSION = 0x0001_0400  # 1.4
_MAX_NAMESPACES = 256
_NSID = 1  # the one namespace, from `drive=`
_AERL = 3  # up to four Async Event Requests outstanding (0-based)
_AER_MAX_QUEUED = 64  # QEMU's aer_max_queued: events kept while no AER waits
_AER_TYPE_ERROR, _AER_TYPE_SMART = 0, 1
_AER_INVALID_DOORBELL_REGISTER, _AER_INVALID_DOORBELL_VALUE = 0x00, 0x01
_LOG_RAE = 1 << 15  # Get Log Page: Retain Asynchronous Event
_TIMEOUT = 0x0F  # CAP.TO: 7.5 s in 500 ms units
_MPSMAX = 4  # 64 KiB pages
_TEMPERATURE = 0x143  # Kelvin, as QEMU reports
_TEMPERATURE_WARNING = 0x157
_CSS_ADMIN_ONLY_UNTIL = (10, 0)  # QEMU dropped CAP.CSS bit 7 in 10.0
_MSIX_ENTRY = 16
_MSIX_VECTOR_CTRL = 12
_MSIX_MASKBIT = 0x1
_MSIX_MAX = 2048
_SERIAL_MAX = 20
_PAGE = 4096
_PRP_ENTRY = 8
_SQE_SIZE, _CQE_SIZE = SQE.size, CQE.size
#: The fields of an SQ entry a Read or Write needs (opcode, flags, CID, NSID, PRP1, CDW10-12):
#: what `Nvme._run_io` unpacks first; anything it does not finish is decoded whole.
_IO_FIELDS = struct.Struct("<BBHI8x8xQ8xIII")
_SMART_UNIT = 512 * 1000  # a "data unit" is 1000 512-byte units
_ERROR_LOG_ENTRY = 64
_FW_SLOT_REVISION = 8  # FRS1 offset in the firmware slot log
#: Feature capability bits, as Get Features with SEL=3 reports them.
_FEAT_SAVEABLE, _FEAT_NS_SPECIFIC, _FEAT_CHANGEABLE = 0x1, 0x2, 0x4
_ARBITRATION_NO_LIMIT = 0x7
_GET_FEATURES_SEL_DEFAULT, _GET_FEATURES_SEL_SAVED, _GET_FEATURES_SEL_CAPS = 1, 2, 3
_TEMP_THSEL_OVER, _TEMP_THSEL_UNDER = 0, 1
_NSID_DESCRIPTOR_CSI = 0x04
#: Supported features: fid -> (capabilities as Get Features SEL=3 reports, default).
_FEATURES: dict[int, tuple[int, int]] = {
    FeatureId.ARBITRATION: (0, _ARBITRATION_NO_LIMIT),
    FeatureId.POWER_MANAGEMENT: (0, 0),
    FeatureId.TEMPERATURE_THRESHOLD: (_FEAT_CHANGEABLE, 0),
    FeatureId.VOLATILE_WRITE_CACHE: (_FEAT_CHANGEABLE, 0),
    FeatureId.NUMBER_OF_QUEUES: (_FEAT_CHANGEABLE, 0),
    FeatureId.INTERRUPT_COALESCING: (0, 0),
    FeatureId.ASYNC_EVENT_CONFIG: (_FEAT_CHANGEABLE, 0),
}
#: LBA formats as QEMU lists them: (metadata bytes, log2 of the block size).
_LBA_FORMATS = ((0, 9), (8, 9), (16, 9), (64, 9), (0, 12), (8, 12), (16, 12), (64, 12))
_REGISTERS = struct.Struct("<QIIIIIIIIQQ")  # CAP .. ACQ, as NvmeBar lays them out
_REGISTER_FILE = 0x1000
_CSTS, _CC = int(Reg.CSTS), int(Reg.CC)
# Module aliases of the enum members the per-command path compares with, as plain ints:
# in Python 3.11 `Enum.MEMBER` costs ten times a module global, and a comparison with an
# IntEnum member is not specialised as one of two ints is (the same values, so no change).
_BAR0, _DOORBELLS, _SUCCESS = int(PciRegion.BAR0), int(Reg.DOORBELLS), int(Status.SUCCESS)
_FLUSH, _READ, _WRITE = int(IoOpcode.FLUSH), int(IoOpcode.READ), int(IoOpcode.WRITE)
_WRITE_ZEROES = int(IoOpcode.WRITE_ZEROES)
_READ_OR_WRITE = frozenset((_READ, _WRITE))
#: Identify Controller constants that are QEMU's.
_MODEL_NUMBER = "QEMU NVMe Ctrl"
_NQN_PREFIX = "nqn.2019-08.org.qemu:"
_IEEE_OUI = bytes((0x00, 0x54, 0x52))
_RAB = 6
_CNTRLTYPE_IO = 1
_FRMW_ONE_SLOT_READ_ONLY = 0x03
_LPA_SMART_PER_NS_AND_EXTENDED = 0x05
_VWC_PRESENT_AND_BROADCAST_FLUSH = 0x07
_ONCS_WRITE_ZEROES = 1 << 3
_PSD0_MAX_POWER, _PSD0_ENTRY_LAT, _PSD0_EXIT_LAT = 0x9C4, 0x10, 0x4
#: The PCI Express capability (version 2, 0x3C bytes) of a PCIe endpoint with
#: FLR, as QEMU's pcie_endpoint_cap_init + pcie_cap_flr_init fill it:
#: (offset in the capability, struct format, value).
_EXP_SIZE = 0x3C
_EXP_FIELDS = (
    (0x02, "<H", 0x0002),  # Flags: version 2, type 0 (endpoint)
    (0x04, "<I", 1 << 15 | 1 << 28),  # DevCap: role-based error reporting, FLR
    (0x08, "<H", 0x2810),  # DevCtl: the spec's reset value (RO, NS, MRRS 512)
    (0x0C, "<I", 0x11),  # LnkCap: 2.5 GT/s, x1
    (0x12, "<H", 0x11),  # LnkSta: 2.5 GT/s, x1
    (0x24, "<I", 0x10),  # DevCap2: completion timeout disable supported
)
_PM_PMC_VERSION_1_2 = 0x0003
_PM_CTRL_NO_SOFT_RESET = 0x0008


def _pow2ceil(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _padded(text: str, size: int, fill: bytes = b" ") -> bytes:
    return text.encode("ascii")[:size].ljust(size, fill)


def _status(code: Status, *, dnr: bool = True) -> int:
    return code | DNR if dnr else int(code)


@frozen
class _Result:
    """How a command ends: a status and the CQE's DW0."""

    status: int = Status.SUCCESS
    result: int = 0


_OK = _Result()


def _fail(code: Status, *, dnr: bool = True) -> _Result:
    return _Result(_status(code, dnr=dnr))


#: the empty view: what an unset window or ring view holds
_NO_VIEW = memoryview(b"")


@define(eq=False)
class _SubmissionQueue:
    qid: int
    base: int
    size: int
    cqid: int
    head: int = 0
    tail: int = 0
    #: commands fetched whose completion is not posted yet (QEMU's requests)
    outstanding: int = 0
    scheduled: bool = False
    #: the clock callback that processes this queue (`Nvme._process_sq`), made once
    process: Callable[[], None] = field(default=lambda: None, repr=False)
    #: the whole ring through `dma_view` (its view, the offset of entry 0) and the
    #: `dma_epoch` it was given under (0: none kept)
    ring_epoch: int = field(default=0, repr=False)
    ring_view: memoryview = field(default=_NO_VIEW, repr=False)
    ring_offset: int = field(default=0, repr=False)


@define(eq=False)
class _Usage:
    """The SMART log's counters (a plain class: the model's own attributes pay attrs'
    validating __setattr__, and these change on every command)."""

    bytes_read: int = 0
    bytes_written: int = 0
    reads: int = 0
    writes: int = 0


@define(eq=False)
class _DataWindows:
    """The mappings the data of earlier commands went through, as `dma_view` gave them
    (the view of the whole mapping, so any range inside it is reached the same way), one
    for the device's writes and one for its reads. Valid while the device's `dma_epoch`
    is `epoch`: `Nvme._process_sq` empties it when the epoch has changed. Used only
    while `active` (inside `_process_sq`). An empty window (end 0) has the empty
    `_NO_VIEW`."""

    active: bool = False
    epoch: int = 0
    write_start: int = 0
    write_end: int = 0
    write_view: memoryview = _NO_VIEW
    read_start: int = 0
    read_end: int = 0
    read_view: memoryview = _NO_VIEW

    def clear(self) -> None:
        self.active = False
        self.epoch = 0
        self.write_start = self.write_end = self.read_start = self.read_end = 0
        self.write_view = self.read_view = _NO_VIEW


class _Completion(NamedTuple):
    """A command's completion, held until its CQ has room (a tuple: one per command; the
    I/O path appends plain 4-tuples in this order)."""

    sq: _SubmissionQueue
    cid: int
    status: int
    result: int


#: what a CQ holds: _Completion, or a plain tuple of the same four fields
_Held = tuple[_SubmissionQueue, int, int, int]


@frozen
class _AsyncEvent:
    type: int
    info: int
    log_page: int


@define(eq=False)
class _CompletionQueue:
    qid: int
    base: int
    size: int
    vector: int
    irq_enabled: bool
    head: int = 0
    tail: int = 0
    phase: int = 1
    held: deque[_Held] = field(factory=deque)
    sqids: set[int] = field(factory=set)
    #: as `_SubmissionQueue.ring_epoch`: the whole ring's writable view, kept
    ring_epoch: int = field(default=0, repr=False)
    ring_view: memoryview = field(default=_NO_VIEW, repr=False)
    ring_offset: int = field(default=0, repr=False)

    @property
    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head

    @property
    def pending(self) -> bool:
        """Posted entries the host has not consumed yet."""
        return self.head != self.tail


@define(eq=False, kw_only=True)
class Nvme(DeviceModel):
    """QEMU's nvme device with one namespace (NSID 1).

    The namespace is `backing` (a bytearray, or the path of a raw image file
    that is mapped, so writes land in it) or, without one, `size` bytes of
    sparse memory that reads zeros until written (64 MiB by default).
    `max_ioqpairs`, `msix_qsize`, `mqes` and `mdts` are QEMU's properties;
    `qemu_version` picks CAP.CSS and the firmware revision;
    `command_latency` is the delay between a doorbell write and the
    processing of the queue.
    """

    vendor_id = 0x1B36
    device_id = 0x0010
    revision = 2
    class_code = 0x010802
    interrupt_pin = 1
    supports_reset = True

    serial: str = field(default="aiovfio0")
    size: int | None = None
    backing: bytearray | str | os.PathLike[str] | None = field(default=None, repr=False)
    lba_size: int = 512
    max_ioqpairs: int = field(default=64, validator=check_range(1, _U16))
    msix_qsize: int = field(default=65, validator=check_range(1, _MSIX_MAX))
    mqes: int = field(default=0x7FF, validator=check_range(1, _U16))
    mdts: int = field(default=7, validator=check_range(1, 9))
    qemu_version: tuple[int, ...] = field(default=(7, 2), converter=to_version)
    command_latency: float = field(default=0.0, validator=check_range(0, math.inf))

    _store: SparseStore | BufferStore = field(init=False, repr=False)
    _ctx: DeviceContext | None = field(default=None, init=False, repr=False)
    _caps: CapabilityFinder = field(factory=CapabilityFinder, init=False, repr=False)
    # registers
    _cap: int = field(init=False, repr=False)
    _cc: int = field(default=0, init=False)
    _csts: int = field(default=0, init=False)
    _intms: int = field(default=0, init=False, repr=False)
    _aqa: int = field(default=0, init=False, repr=False)
    _asq: int = field(default=0, init=False, repr=False)
    _acq: int = field(default=0, init=False, repr=False)
    # controller state
    _page_size: int = field(default=_PAGE, init=False, repr=False)
    _sqs: dict[int, _SubmissionQueue] = field(factory=dict, init=False, repr=False)
    _cqs: dict[int, _CompletionQueue] = field(factory=dict, init=False, repr=False)
    _qs_created: bool = field(default=False, init=False, repr=False)
    _aers: list[_Completion] = field(factory=list, init=False, repr=False)
    _events: deque[_AsyncEvent] = field(factory=deque, init=False, repr=False)
    _aer_mask: int = field(default=0, init=False, repr=False)
    _irq_status: int = field(default=0, init=False, repr=False)
    _intx: bool = field(default=False, init=False, repr=False)
    _msix_table: bytearray = field(init=False, repr=False)
    _msix_pending: int = field(default=0, init=False, repr=False)
    _write_cache: bool = field(default=True, init=False, repr=False)
    _async_config: int = field(default=0, init=False, repr=False)
    _temp_over: int = field(default=_TEMPERATURE_WARNING, init=False, repr=False)
    _temp_under: int = field(default=0, init=False, repr=False)
    _usage: _Usage = field(factory=_Usage, init=False, repr=False)
    _windows: _DataWindows = field(factory=_DataWindows, init=False, repr=False)
    #: the I/O hooks are Nvme's own, so `_run_io` may run Reads and Writes inline
    _fast_io: bool = field(default=False, init=False, repr=False)
    # BAR0 layout, as QEMU computes it from max_ioqpairs and msix_qsize
    _table_offset: int = field(init=False, repr=False)
    _pba_offset: int = field(init=False, repr=False)
    _bar_size: int = field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.lba_size not in {1 << shift for ms, shift in _LBA_FORMATS if ms == 0}:
            raise InvalidArgument(f"Nvme: lba_size must be 512 or 4096, not {self.lba_size}")
        if not self.serial or not self.serial.isascii() or len(self.serial) > _SERIAL_MAX:
            raise InvalidArgument(f"Nvme: serial must be 1-20 ASCII characters: {self.serial!r}")
        self._store = open_store(self.backing, self.size)
        if self._store.size < self.lba_size or self._store.size % self.lba_size:
            raise InvalidArgument(
                f"Nvme: size {self._store.size} is not a positive multiple of lba_size "
                f"{self.lba_size}"
            )
        self.size = self._store.size
        css = Cap.CSS_NVM | Cap.CSS_CSI
        if self.qemu_version < _CSS_ADMIN_ONLY_UNTIL:
            css |= Cap.CSS_ADMIN_ONLY
        self._cap = (
            self.mqes << Cap.MQES[0]
            | 1 << Cap.CQR[0]
            | _TIMEOUT << Cap.TO[0]
            | css << Cap.CSS[0]
            | _MPSMAX << Cap.MPSMAX[0]
        )
        registers = _pow2ceil(_REGISTER_FILE + 2 * (self.max_ioqpairs + 1) * _DOORBELL_STRIDE)
        self._table_offset = _align_up(registers, _PAGE)
        self._pba_offset = _align_up(self._table_offset + _MSIX_ENTRY * self.msix_qsize, _PAGE)
        self._bar_size = _pow2ceil(self._pba_offset + _align_up(self.msix_qsize, 64) // 8)
        self._msix_table = bytearray(_MSIX_ENTRY * self.msix_qsize)
        cls = type(self)
        self._fast_io = all(  # a subclass that changes how an I/O command runs is asked
            getattr(cls, hook) is getattr(Nvme, hook)
            for hook in (
                "_io",
                "_read_write",
                "_to_host",
                "_from_host",
                "_prp1_to_host",
                "_prp1_from_host",
            )
        )

    # --- the DeviceModel description ------------------------------------------
    def regions(self) -> Sequence[RegionSpec]:
        """BAR0, 64-bit, trapped so that every doorbell write reaches the model."""
        return (RegionSpec(index=PciRegion.BAR0, size=self._bar_size, is_64bit=True),)

    def irqs(self) -> Sequence[IrqSpec]:
        """INTx and `msix_qsize` MSI-X vectors; no MSI."""
        return vfio_pci_irqs(intx=True, msi=0, msix=self.msix_qsize, pcie=True)

    def capabilities(self) -> Sequence[tuple[int, bytes]]:
        """MSI-X, PCI Express endpoint with FLR, power management (QEMU's list order)."""
        msix = struct.pack("<HII", self.msix_qsize - 1, self._table_offset, self._pba_offset)
        express = bytearray(_EXP_SIZE - 2)  # the body starts after ID and next pointer
        for offset, fmt, value in _EXP_FIELDS:
            struct.pack_into(fmt, express, offset - 2, value)
        # PMC, PMCSR, PMCSR_BSE, Data.
        power = struct.pack("<HHBB", _PM_PMC_VERSION_1_2, _PM_CTRL_NO_SOFT_RESET, 0, 0)
        return ((CapId.MSIX, msix), (CapId.EXP, bytes(express)), (CapId.PM, power))

    def attach(self, ctx: DeviceContext) -> None:
        """Remember the machine's context; a model belongs to one machine."""
        if self._ctx is not None and self._ctx is not ctx:
            raise UsageError("this Nvme model is already attached to a machine; make a new one")
        self._ctx = ctx

    @property
    def _context(self) -> DeviceContext:
        if self._ctx is None:
            raise UsageError("this Nvme model is not attached: add it to a sim Machine first")
        return self._ctx

    def reset(self) -> None:
        """Function-level reset: controller reset plus every register and vector."""
        self._controller_reset()
        self._aqa = self._asq = self._acq = 0
        self._msix_table[:] = bytes(len(self._msix_table))
        self._msix_pending = 0
        self._write_cache = True
        self._async_config = 0
        self._temp_over, self._temp_under = _TEMPERATURE_WARNING, 0

    # --- register access ------------------------------------------------------
    def read(self, region: int, offset: int, size: int) -> int:
        """Registers (any width), doorbells (read 0), MSI-X table and PBA."""
        if offset == _CSTS and size == 4 and region == _BAR0:  # what a driver polls, first
            return self._csts  # (inside every BAR0: QEMU's is at least 16 KiB)
        if region != _BAR0 or not 0 <= offset <= self._bar_size - size:
            return 0
        if size == 4 and offset == _CC:  # without packing the register file
            return self._cc
        if offset < _REGISTER_FILE:
            if offset + size > _REGISTER_FILE:
                return 0
            registers = _REGISTERS.pack(
                self._cap,
                _NVME_VERSION,
                self._intms,
                self._intms,  # INTMC reads the mask too
                self._cc,
                0,
                self._csts,
                0,
                self._aqa,
                self._asq,
                self._acq,
            )
            return int.from_bytes(registers[offset : offset + size], "little")
        if not self._msix_access(offset, size):
            return 0  # doorbells read 0, as does the space past the PBA
        if offset < self._pba_offset:
            start = offset - self._table_offset
            return int.from_bytes(self._msix_table[start : start + size], "little")
        pending = self._msix_pending.to_bytes(_align_up(self.msix_qsize, 64) // 8, "little")
        start = offset - self._pba_offset
        return int.from_bytes(pending[start : start + size], "little")

    def write(self, region: int, offset: int, size: int, value: int) -> None:
        """Registers, doorbells, and the MSI-X table (if the machine passes it on)."""
        if (
            size == 4
            and region == _BAR0
            and not offset & 7
            and 0x1000 <= offset < self._table_offset
        ):
            # A 4-byte SQ tail doorbell (one per command): _doorbell's valid case, inline.
            # (Below the MSI-X table, so inside BAR0; every other case is checked below.)
            sq = self._sqs.get((offset - _REGISTER_FILE) >> 3)
            value &= _U16
            if sq is not None and value < sq.size:
                sq.tail = value
                if not sq.scheduled:
                    self._schedule_sq(sq)
                return
        if region != _BAR0 or not 0 <= offset <= self._bar_size - size:
            return
        value &= (1 << (8 * size)) - 1
        if _REGISTER_FILE <= offset < self._table_offset:  # the doorbells
            self._doorbell(offset, value)
        elif offset < _REGISTER_FILE:
            self._write_register(offset, size, value)
        elif offset < self._pba_offset and self._msix_access(offset, size):
            self._write_msix_table(offset - self._table_offset, size, value)

    def _msix_access(self, offset: int, size: int) -> bool:
        # QEMU's MSI-X table and PBA take aligned 4- and 8-byte accesses only.
        in_table = self._table_offset <= offset < self._table_offset + len(self._msix_table)
        pba_bytes = _align_up(self.msix_qsize, 64) // 8
        in_pba = self._pba_offset <= offset < self._pba_offset + pba_bytes
        return (in_table or in_pba) and size in (4, 8) and offset % size == 0

    def _write_register(self, offset: int, size: int, value: int) -> None:
        match offset:
            case Reg.INTMS:
                self._intms |= value & _U32
                self._update_intx()
            case Reg.INTMC:
                self._intms &= ~value & _U32
                self._update_intx()
            case Reg.CC:
                self._write_cc(value & _U32)
            case Reg.AQA:
                self._aqa = value & _U32
            case Reg.ASQ:
                self._asq = _replace_low(self._asq, size, value)
            case Reg.ACQ:
                self._acq = _replace_low(self._acq, size, value)
            case _ if offset == Reg.ASQ + 4:
                self._asq = (self._asq & _U32) | (value & _U32) << 32
            case _ if offset == Reg.ACQ + 4:
                self._acq = (self._acq & _U32) | (value & _U32) << 32
            # CAP, VS, CSTS (NSSRO is not supported), NSSR and the rest: ignored.

    # --- enable, disable, shutdown --------------------------------------------
    def _write_cc(self, new: int) -> None:
        old, self._cc = self._cc, new
        csts = self._csts
        shn_new, shn_old = field_get(new, *Cc.SHN), field_get(old, *Cc.SHN)
        if shn_new and not shn_old:
            self._store.flush()
            csts = (csts & ~Csts.SHST_MASK) | Csts.SHST_COMPLETE
        elif shn_old and not shn_new:
            csts &= ~Csts.SHST_MASK
        en_new, en_old = field_get(new, *Cc.EN), field_get(old, *Cc.EN)
        if en_new and not en_old:
            problem = self._start()
            if problem is None:
                csts = Csts.RDY
            else:
                self._context.log_fault(f"nvme: enable failed, CSTS.CFS set: {problem}")
                csts = Csts.CFS
        elif en_old and not en_new:
            self._controller_reset()  # also clears CC and CSTS, as QEMU does
            return
        self._csts = int(csts)

    def _start(self) -> str | None:
        """QEMU's nvme_start_ctrl: why the enable fails, or None after creating the admin queues."""
        cc = self._cc
        mps = field_get(cc, *Cc.MPS)
        page = 1 << (_PAGE_SHIFT_MIN + mps)
        css = field_get(cc, *Cc.CSS)
        asqs, acqs = field_get(self._aqa, 0, 12), field_get(self._aqa, 16, 12)
        if 0 in self._sqs or 0 in self._cqs:
            return "the admin queues already exist"
        if self._asq % page:
            return f"ASQ {self._asq:#x} is not aligned to the {page}-byte page"
        if self._acq % page:
            return f"ACQ {self._acq:#x} is not aligned to the {page}-byte page"
        if not field_get(self._cap, *Cap.CSS) & (1 << css):
            return f"CC.CSS {css} is not in CAP.CSS {field_get(self._cap, *Cap.CSS):#x}"
        if not field_get(self._cap, *Cap.MPSMIN) <= mps <= field_get(self._cap, *Cap.MPSMAX):
            return f"CC.MPS {mps} is outside CAP.MPSMIN..MPSMAX"
        if not asqs:
            return "AQA.ASQS is 0"
        if not acqs:
            return "AQA.ACQS is 0"
        self._page_size = page
        self._cqs[0] = _CompletionQueue(0, self._acq, acqs + 1, vector=0, irq_enabled=True)
        self._sqs[0] = self._new_sq(0, self._asq, asqs + 1, 0)
        self._cqs[0].sqids.add(0)
        return None

    def _controller_reset(self) -> None:
        """CC.EN 1 -> 0 (and FLR): free every queue; CC, CSTS and the INTx mask become 0."""
        self._sqs.clear()
        self._cqs.clear()
        self._aers.clear()
        self._events.clear()
        self._aer_mask = 0
        self._qs_created = False
        self._cc = self._csts = self._intms = 0
        self._irq_status = 0
        if self._intx and self._ctx is not None:
            self._intx = False
            self._ctx.set_intx(False)

    def _fatal(self, message: str) -> None:
        """A controller fatal status: CSTS becomes CFS alone, as in QEMU."""
        self._csts = Csts.CFS
        self._context.log_fault(f"nvme: {message}; CSTS.CFS set (disable and re-enable)")

    # --- doorbells and queue processing ---------------------------------------
    def _doorbell(self, offset: int, value: int) -> None:
        if offset % _DOORBELL_STRIDE:
            return  # misaligned: ignored
        index = (offset - _DOORBELLS) // _DOORBELL_STRIDE
        qid, is_cq = index >> 1, bool(index & 1)
        value &= _U16
        if is_cq:
            cq = self._cqs.get(qid)
            if cq is None or value >= cq.size:
                self._ignored_doorbell("CQ", qid, "head", value, None if cq is None else cq.size)
                return
            was_full = (cq.tail + 1) % cq.size == cq.head  # cq.full, inline
            cq.head = value
            if was_full:
                self._schedule(lambda: self._post_if_current(cq))
            if value == cq.tail and (self._irq_status or self._intx):  # consumed all: INTx
                self._deassert_irq(cq)  # (with nothing asserted, deasserting changes nothing)
        else:
            sq = self._sqs.get(qid)
            if sq is None or value >= sq.size:
                self._ignored_doorbell("SQ", qid, "tail", value, None if sq is None else sq.size)
                return
            sq.tail = value
            if not sq.scheduled:
                self._schedule_sq(sq)

    def _ignored_doorbell(
        self, kind: str, qid: int, what: str, value: int, size: int | None
    ) -> None:
        why = f"{kind} {qid} does not exist" if size is None else f"{kind} {qid} has {size} entries"
        self._context.log_fault(f"nvme: {kind} {what} doorbell write {value} ignored: {why}")
        if self._aers:  # NVMe 1.4 4.1: tell an outstanding Async Event Request
            info = _AER_INVALID_DOORBELL_REGISTER if size is None else _AER_INVALID_DOORBELL_VALUE
            self._enqueue_event(_AsyncEvent(_AER_TYPE_ERROR, info, LogId.ERROR_INFO))
            admin = self._cqs[0]
            self._schedule(lambda: self._post_if_current(admin))

    def _schedule(self, callback: Callable[[], None]) -> None:
        self._context.schedule(self.command_latency, callback)

    def _schedule_sq(self, sq: _SubmissionQueue) -> None:
        """Have the clock process `sq` (called when it is not scheduled already)."""
        if not sq.scheduled:
            sq.scheduled = True
            ctx = self._ctx
            assert ctx is not None  # a doorbell or a completion: attached
            ctx.schedule(self.command_latency, sq.process)

    def _new_sq(self, qid: int, base: int, size: int, cqid: int) -> _SubmissionQueue:
        sq = _SubmissionQueue(qid, base, size, cqid)
        sq.process = functools.partial(self._process_sq, sq)  # a subclass's, if it has one
        return sq

    def _process_sq(self, sq: _SubmissionQueue) -> None:
        """QEMU's nvme_process_sq: fetch and run commands, then post the batch.

        Each entry is read just before it runs, as QEMU reads it. The run of
        entries up to the tail (or the ring's end) is read through one
        `dma_view` when the device reaches all of it (a controller's
        prefetch, without a copy: the view is live), entry by entry through
        `dma_read` otherwise, so a fetch fault is recorded at the entry where
        QEMU records it. An I/O queue's run goes through `_run_io`.
        """
        sq.scheduled = False
        if self._sqs.get(sq.qid) is not sq:
            return
        ctx = self._ctx
        assert ctx is not None  # scheduled by a doorbell: attached
        cq = self._cqs[sq.cqid]
        held = cq.held
        before = len(held)
        run = self._io if sq.qid else None
        fast = run is not None and self._fast_io
        decode = Command.decode
        # The views kept from earlier callbacks (the ring's, the data's) hold while the
        # device's DMA epoch is theirs: no mapping, view or attachment changed since.
        epoch = ctx.dma_epoch()
        windows = self._windows
        if windows.epoch != epoch:
            windows.write_end = windows.read_end = 0
            windows.write_view = windows.read_view = _NO_VIEW
            windows.epoch = epoch or 0
        windows.active = True
        while sq.head != sq.tail and sq.outstanding < sq.size:
            head, size = sq.head, sq.size
            count = min((sq.tail if sq.tail > head else size) - head, size - sq.outstanding)
            address = sq.base + head * _SQE_SIZE
            window: tuple[memoryview, int] | None
            if sq.ring_epoch == epoch or self._keep_ring(sq, epoch, _SQE_SIZE, False):
                window = sq.ring_view, sq.ring_offset + head * _SQE_SIZE
            else:  # the ring is not one view: this run's entries, if they are
                window = ctx.dma_view(address, count * _SQE_SIZE)
            first = 0
            if window is not None and fast:
                first = self._run_io(sq, window[0], window[1], count, held)
                if first == count:
                    continue
                window = None  # its owner released the memory: the rest entry by entry
                sq.ring_epoch = 0
            for i in range(first, count):
                command = None
                if window is not None:
                    try:
                        command = decode(window[0], window[1] + i * _SQE_SIZE)
                    except ValueError:  # its owner released the memory: entry by entry
                        window = None
                        sq.ring_epoch = 0
                if command is None:
                    entry = address + i * _SQE_SIZE
                    try:
                        raw = ctx.dma_read(entry, _SQE_SIZE)
                    except IommuFault as fault:
                        self._fatal(
                            f"fetching SQ {sq.qid} entry {head + i} at IOVA {entry:#x}: {fault}"
                        )
                        windows.clear()
                        if len(held) > before:
                            self._post(cq)
                        return
                    command = decode(raw)
                sq.head = head + i + 1 if head + i + 1 < size else 0
                sq.outstanding += 1
                result = run(command) if run is not None else self._admin(sq, command)
                if result is not None:
                    held.append((sq, command.cid, result.status, result.result))
        windows.active = False  # (its views kept for the next callback of this epoch)
        if len(held) > before:  # new completions (an AER may have met a queued event)
            self._post(cq)

    def _keep_ring(
        self, queue: _SubmissionQueue | _CompletionQueue, epoch: int | None, entry: int, write: bool
    ) -> bool:
        """Keep the view of `queue`'s whole ring under `epoch`, if the device reaches it
        whole through one view; False (nothing kept) otherwise."""
        ctx = self._ctx
        assert ctx is not None  # device work: attached
        window = ctx.dma_view(queue.base, queue.size * entry, write) if epoch else None
        if window is None or epoch is None:
            queue.ring_epoch = 0
            return False
        queue.ring_view, queue.ring_offset = window
        queue.ring_epoch = epoch
        return True

    def _run_io(
        self, sq: _SubmissionQueue, ring: memoryview, start: int, count: int, held: deque[_Held]
    ) -> int:
        """Run `count` entries of I/O queue `sq` seen through `ring` from offset `start`;
        how many ran (fewer only when the ring's memory was released meanwhile).

        What `_io` would do, for the commonest commands, without its frames: a Read
        or Write of NSID 1 without fused operation or SGL, inside MDTS and the
        namespace, whose data is inside PRP1's page, goes straight to the data: the
        mapping the batch's data already went through (`_DataWindows`) in this
        frame, any other through `_prp1_to_host`/`_prp1_from_host` (`_to_host`'s and
        `_from_host`'s own PRP1 case, faults included). Every other entry, and any
        entry whose data view was released, is decoded whole and runs through `_io`,
        in order. The SQ's head and request count advance once per run: nothing an I/O
        command does reads them, and the CQE that reports the head is posted after.
        """
        # (locals only for what every entry uses: a run is often one entry, at QD1)
        unpack = _IO_FIELDS.unpack_from
        append = held.append
        w = self._windows
        store = self._store
        lba_size = self.lba_size
        page = self._page_size
        most = page << self.mdts
        blocks = store.size // lba_size
        read_bytes = written_bytes = reads = writes = 0  # the SMART counters, once per run
        ran = count
        try:
            for offset in range(start, start + count * _SQE_SIZE, _SQE_SIZE):
                try:
                    op, flags, cid, nsid, prp1, cdw10, cdw11, cdw12 = unpack(ring, offset)
                except ValueError:  # its owner released the memory: the caller goes on
                    ran = (offset - start) // _SQE_SIZE
                    break
                if nsid == _NSID and not flags and op in _READ_OR_WRITE:
                    nlb = (cdw12 & _U16) + 1
                    length = nlb * lba_size
                    slba = cdw11 << 32 | cdw10
                    if length <= most and slba + nlb <= blocks and prp1 % page + length <= page:
                        if op == _READ:
                            if w.write_start <= prp1 and prp1 + length <= w.write_end:
                                at = prp1 - w.write_start
                                try:
                                    w.write_view[at : at + length] = store.read(
                                        slba * lba_size, length
                                    )
                                except ValueError:  # released: _to_host asks again
                                    w.write_end = 0
                                else:
                                    read_bytes += length
                                    reads += 1
                                    append((sq, cid, 0, 0))
                                    continue
                            else:  # not the batch's mapping (its first command): as _to_host
                                data = store.read(slba * lba_size, length)
                                status = self._prp1_to_host(prp1, data)
                                if not status:
                                    read_bytes += length
                                    reads += 1
                                append((sq, cid, status, 0))
                                continue
                        elif w.read_start <= prp1 and prp1 + length <= w.read_end:
                            at = prp1 - w.read_start
                            try:
                                data = bytes(w.read_view[at : at + length])
                            except ValueError:  # released: _from_host asks again
                                w.read_end = 0
                            else:
                                store.write(slba * lba_size, data)
                                written_bytes += length
                                writes += 1
                                append((sq, cid, 0, 0))
                                continue
                        else:  # not the batch's mapping (its first write): as _from_host
                            got = self._prp1_from_host(prp1, length)
                            if isinstance(got, int):
                                append((sq, cid, got, 0))
                                continue
                            store.write(slba * lba_size, got)
                            written_bytes += length
                            writes += 1
                            append((sq, cid, 0, 0))
                            continue
                try:  # every other case, decoded whole and run as _process_sq runs it
                    command = Command.decode(ring, offset)
                except ValueError:  # its owner released the memory: the caller goes on
                    ran = (offset - start) // _SQE_SIZE
                    break
                done = self._io(command)
                append((sq, cid, done.status, done.result))
        finally:
            head = sq.head + ran
            sq.head = head if head < sq.size else 0
            sq.outstanding += ran
            if reads or writes:
                usage = self._usage
                usage.bytes_read += read_bytes
                usage.reads += reads
                usage.bytes_written += written_bytes
                usage.writes += writes
        return ran

    def _post_if_current(self, cq: _CompletionQueue) -> None:
        if self._cqs.get(cq.qid) is cq:
            self._post(cq)

    def _post(self, cq: _CompletionQueue) -> None:
        """QEMU's nvme_post_cqes: post held completions while the CQ has room.

        The run of free entries up to the ring's end is written through one
        `dma_view` when the device reaches all of it, entry by entry through
        `dma_write` otherwise (a fault stops at the entry QEMU stops at). Through
        a view, the CQ's tail and each source SQ's request count move once per run.
        """
        ctx = self._ctx
        assert ctx is not None  # a completion to post: attached
        held = cq.held
        popleft = held.popleft
        posted: set[int] = set()
        pack_into = CQE.pack_into
        failed = False
        epoch = ctx.dma_epoch()
        while held and not failed:
            tail, size = cq.tail, cq.size
            count = min(len(held), (cq.head - tail - 1) % size, size - tail)  # 0: full
            if not count:
                break
            address = cq.base + tail * _CQE_SIZE
            window: tuple[memoryview, int] | None
            if cq.ring_epoch == epoch or self._keep_ring(cq, epoch, _CQE_SIZE, True):
                window = cq.ring_view, cq.ring_offset + tail * _CQE_SIZE
            else:  # the ring is not one view: this run's entries, if they are
                window = ctx.dma_view(address, count * _CQE_SIZE, True)
            phase = cq.phase
            first = 0
            if window is not None:
                view, start = window
                stop = end = start + count * _CQE_SIZE
                last: _SubmissionQueue | None = None
                mark = start
                sqhd = sqid = 0
                for offset in range(start, end, _CQE_SIZE):
                    done = popleft()
                    source, cid, status, result = done
                    if source is not last:  # the SQ head and ID the entries report
                        if last is not None:
                            last.outstanding -= (offset - mark) // _CQE_SIZE
                        last, mark = source, offset
                        sqhd, sqid = source.head, source.qid
                        posted.add(sqid)
                    try:
                        pack_into(
                            view, offset, result, 0, sqhd, sqid, cid, (status << 1 | phase) & _U16
                        )
                    except (ValueError, TypeError):  # its owner released the memory (for
                        held.appendleft(done)  # pack_into, a TypeError): entry by entry
                        stop = offset
                        cq.ring_epoch = 0
                        break
                if last is not None:
                    last.outstanding -= (stop - mark) // _CQE_SIZE
                first = (stop - start) // _CQE_SIZE
                cq.tail = tail + first
            for i in range(first, count):
                source, cid, status, result = held[0]
                status = (status << 1 | phase) & _U16
                entry = CQE.pack(result, 0, source.head, source.qid, cid, status)
                try:
                    ctx.dma_write(address + i * _CQE_SIZE, entry)
                except IommuFault as fault:
                    self._fatal(
                        f"posting to CQ {cq.qid} entry {tail + i} at IOVA "
                        f"{address + i * _CQE_SIZE:#x}: {fault}"
                    )
                    failed = True
                    break
                popleft()
                source.outstanding -= 1
                posted.add(source.qid)
                cq.tail = tail + i + 1
            if cq.tail == size:
                cq.tail, cq.phase = 0, phase ^ 1
        if cq.head != cq.tail:  # cq.pending
            self._assert_irq(cq)
        for qid in posted:
            sq = self._sqs.get(qid)
            if sq is not None and sq.head != sq.tail:
                self._schedule_sq(sq)  # it may have stalled on its request slots

    # --- interrupts -----------------------------------------------------------
    def _assert_irq(self, cq: _CompletionQueue) -> None:
        if not cq.irq_enabled:
            return
        ctx = self._context
        if self._caps.msix_enabled(ctx):
            vector = cq.vector  # QEMU's msix_notify: a masked vector is only marked pending
            if vector >= self.msix_qsize:
                return
            if self._msix_table[_MSIX_ENTRY * vector + _MSIX_VECTOR_CTRL] & _MSIX_MASKBIT:
                self._msix_pending |= 1 << vector
            else:
                ctx.send_msix(vector)
        else:
            self._irq_status |= 1 << cq.vector
            self._update_intx()

    def _deassert_irq(self, cq: _CompletionQueue) -> None:
        if not cq.irq_enabled or self._caps.msix_enabled(self._context):
            return
        if not any(
            other.irq_enabled and other.vector == cq.vector and other.pending
            for other in self._cqs.values()
        ):
            self._irq_status &= ~(1 << cq.vector)
        self._update_intx()

    def _update_intx(self) -> None:
        """INTx follows pending, unmasked vectors while MSI-X is off."""
        if self._ctx is None or self._caps.msix_enabled(self._ctx):
            return
        level = bool(self._irq_status & ~self._intms)
        if level != self._intx:
            self._intx = level
            self._ctx.set_intx(level)

    def _vector_masked(self, vector: int) -> bool:
        control = _MSIX_ENTRY * vector + _MSIX_VECTOR_CTRL
        return bool(self._msix_table[control] & _MSIX_MASKBIT)

    def _write_msix_table(self, offset: int, size: int, value: int) -> None:
        first, last = offset // _MSIX_ENTRY, (offset + size - 1) // _MSIX_ENTRY
        was_masked = [self._vector_masked(v) for v in range(first, last + 1)]
        self._msix_table[offset : offset + size] = value.to_bytes(size, "little")
        for vector, masked in zip(range(first, last + 1), was_masked, strict=True):
            bit = 1 << vector
            if masked and not self._vector_masked(vector) and self._msix_pending & bit:
                self._msix_pending &= ~bit
                self._context.send_msix(vector)

    # --- data movement --------------------------------------------------------
    def _map_prp(self, prp1: int, prp2: int, length: int) -> list[tuple[int, int]] | int:
        """QEMU's nvme_map_prp: the (IOVA, length) segments, or an error status."""
        page = self._page_size
        first = min(length, page - prp1 % page)
        segments = [(prp1, first)]
        remaining = length - first
        if not remaining:
            return segments
        if remaining <= page:
            if prp2 % page:
                return _status(Status.INVALID_PRP_OFFSET)
            return [*segments, (prp2, remaining)]
        if prp2 % _PRP_ENTRY:
            # A PRP list pointer is qword aligned (NVMe 1.4, 4.3); one in the last 7
            # bytes of a page would hold no whole entry (QEMU reads past its list).
            return _status(Status.INVALID_PRP_OFFSET)
        per_page = page // _PRP_ENTRY
        count = min(per_page, (page - prp2 % page) // _PRP_ENTRY)  # to the end of its page
        entries = self._read_prp_list(prp2, count)
        index = 0
        while remaining:
            if entries is None:
                return _status(Status.DATA_TRANSFER_ERROR, dnr=False)
            entry = entries[index]
            if index == count - 1 and remaining > page:
                # The last slot of a list page chains to the next list page.
                if entry % page:
                    return _status(Status.INVALID_PRP_OFFSET)
                index, count = 0, min(per_page, -(-remaining // page))
                entries = self._read_prp_list(entry, count)
                continue
            if entry % page:
                return _status(Status.INVALID_PRP_OFFSET)
            chunk = min(remaining, page)
            segments.append((entry, chunk))
            remaining -= chunk
            index += 1
        return segments

    def _read_prp_list(self, address: int, count: int) -> tuple[int, ...] | None:
        try:
            raw = self._context.dma_read(address, count * _PRP_ENTRY)
        except IommuFault:
            return None
        return struct.unpack(f"<{count}Q", raw)

    def _to_host(self, command: Command, data: bytes) -> int:
        """Write `data` to the command's PRPs (controller to host)."""
        ctx = self._ctx
        assert ctx is not None  # a command runs in the clock's callback: attached
        prp1 = command.prp1
        page = self._page_size
        if prp1 % page + len(data) <= page:  # _map_prp's first case, inline: PRP1 alone
            return self._prp1_to_host(prp1, data)
        segments = self._map_prp(prp1, command.prp2, len(data))
        if isinstance(segments, int):
            return segments
        try:
            if len(segments) == 1:
                ctx.dma_write(segments[0][0], data)  # PRP1 alone: no copy of the slice
                return _SUCCESS
            position = 0
            for address, length in segments:
                if length:
                    ctx.dma_write(address, data[position : position + length])
                position += length
        except IommuFault:
            return _status(Status.DATA_TRANSFER_ERROR, dnr=False)
        return _SUCCESS

    def _prp1_to_host(self, prp1: int, data: bytes) -> int:
        """`_to_host` for data inside PRP1's page: through the mapping the batch's data
        already went through, a new one the device reaches whole, or `dma_write`."""
        ctx = self._ctx
        assert ctx is not None  # a command runs in the clock's callback: attached
        size = len(data)
        w = self._windows
        if w.active and w.write_start <= prp1 and prp1 + size <= w.write_end:  # kept
            offset = prp1 - w.write_start
            try:
                w.write_view[offset : offset + size] = data
            except ValueError:  # its owner released the memory: ask the machine again
                w.write_end = 0
            else:
                return _SUCCESS
        elif w.active:
            window = ctx.dma_view(prp1, size, True)
            if window is not None:
                view, offset = window
                try:
                    view[offset : offset + size] = data
                except ValueError:
                    pass
                else:
                    w.write_start = prp1 - offset
                    w.write_end = w.write_start + view.nbytes
                    w.write_view = view
                    return _SUCCESS
        try:
            ctx.dma_write(prp1, data)
        except IommuFault:
            return _status(Status.DATA_TRANSFER_ERROR, dnr=False)
        return _SUCCESS

    def _from_host(self, command: Command, length: int) -> bytes | int:
        """Read `length` bytes from the command's PRPs (host to controller)."""
        prp1 = command.prp1
        if prp1 % self._page_size + length <= self._page_size:  # PRP1 alone, as _to_host
            return self._prp1_from_host(prp1, length)
        segments = self._map_prp(command.prp1, command.prp2, length)
        if isinstance(segments, int):
            return segments
        try:
            return b"".join(self._context.dma_read(a, n) for a, n in segments if n)
        except IommuFault:
            return _status(Status.DATA_TRANSFER_ERROR, dnr=False)

    def _prp1_from_host(self, prp1: int, length: int) -> bytes | int:
        """`_from_host` for data inside PRP1's page, as `_prp1_to_host` (or `dma_read`)."""
        w = self._windows
        if w.active and w.read_start <= prp1 and prp1 + length <= w.read_end:  # kept
            offset = prp1 - w.read_start
            try:
                return bytes(w.read_view[offset : offset + length])
            except ValueError:  # its owner released the memory: ask the machine again
                w.read_end = 0
        elif w.active and length:
            window = self._context.dma_view(prp1, length)
            if window is not None:
                view, offset = window
                try:
                    got = bytes(view[offset : offset + length])
                except ValueError:
                    pass
                else:
                    w.read_start = prp1 - offset
                    w.read_end = w.read_start + view.nbytes
                    w.read_view = view
                    return got
        if not length:
            return b""
        try:
            return self._context.dma_read(prp1, length)
        except IommuFault:
            return _status(Status.DATA_TRANSFER_ERROR, dnr=False)

    def _check_mdts(self, length: int) -> int:
        if length > self._page_size << self.mdts:
            return _status(Status.INVALID_FIELD)
        return _SUCCESS

    # --- admin commands -------------------------------------------------------
    def _admin(self, sq: _SubmissionQueue, command: Command) -> _Result | None:
        handlers: dict[int, Callable[[Command], _Result]] = {
            AdminOpcode.DELETE_SQ: self._delete_sq,
            AdminOpcode.CREATE_SQ: self._create_sq,
            AdminOpcode.GET_LOG_PAGE: self._get_log_page,
            AdminOpcode.DELETE_CQ: self._delete_cq,
            AdminOpcode.CREATE_CQ: self._create_cq,
            AdminOpcode.IDENTIFY: self._identify,
            AdminOpcode.ABORT: self._abort,
            AdminOpcode.SET_FEATURES: self._set_features,
            AdminOpcode.GET_FEATURES: self._get_features,
        }
        if command.opcode not in handlers and command.opcode != AdminOpcode.ASYNC_EVENT_REQUEST:
            return _fail(Status.INVALID_OPCODE)
        if command.psdt:
            return _fail(Status.INVALID_FIELD)  # no SGLs for admin commands over PCIe
        if command.fuse:
            return _fail(Status.INVALID_FIELD, dnr=False)
        if command.opcode == AdminOpcode.ASYNC_EVENT_REQUEST:
            return self._async_event_request(sq, command)
        return handlers[command.opcode](command)

    def _create_cq(self, command: Command) -> _Result:
        qid, qsize = command.cdw10 & _U16, command.cdw10 >> 16
        contiguous, enable = command.cdw11 & 1, command.cdw11 >> 1 & 1
        vector = command.cdw11 >> 16
        cc = self._cc
        if field_get(cc, *Cc.IOSQES) != Cc.SQES or field_get(cc, *Cc.IOCQES) != Cc.CQES:
            return _fail(Status.INVALID_QUEUE_SIZE)
        if not qid or qid > self.max_ioqpairs or qid in self._cqs:
            return _fail(Status.INVALID_QID)
        if not qsize or qsize > self.mqes:
            return _fail(Status.INVALID_QUEUE_SIZE)
        if command.prp1 % self._page_size:
            return _fail(Status.INVALID_PRP_OFFSET)
        if vector and not self._caps.msix_enabled(self._context):
            return _fail(Status.INVALID_VECTOR)
        if vector >= self.msix_qsize:
            return _fail(Status.INVALID_VECTOR)
        if not contiguous:
            return _fail(Status.INVALID_FIELD)
        self._cqs[qid] = _CompletionQueue(qid, command.prp1, qsize + 1, vector, bool(enable))
        self._qs_created = True
        return _OK

    def _create_sq(self, command: Command) -> _Result:
        qid, qsize = command.cdw10 & _U16, command.cdw10 >> 16
        contiguous, cqid = command.cdw11 & 1, command.cdw11 >> 16
        if not cqid or cqid not in self._cqs:
            return _fail(Status.INVALID_CQID)
        if not qid or qid > self.max_ioqpairs or qid in self._sqs:
            return _fail(Status.INVALID_QID)
        if not qsize or qsize > self.mqes:
            return _fail(Status.INVALID_QUEUE_SIZE)
        if command.prp1 % self._page_size:
            return _fail(Status.INVALID_PRP_OFFSET)
        if not contiguous:
            return _fail(Status.INVALID_FIELD)
        self._sqs[qid] = self._new_sq(qid, command.prp1, qsize + 1, cqid)
        self._cqs[cqid].sqids.add(qid)
        return _OK

    def _delete_sq(self, command: Command) -> _Result:
        qid = command.cdw10 & _U16
        if not qid or qid not in self._sqs:
            return _fail(Status.INVALID_QID)
        sq = self._sqs.pop(qid)
        cq = self._cqs[sq.cqid]
        cq.sqids.discard(qid)
        self._post(cq)  # what fits is posted; the rest of this SQ's is dropped
        cq.held = deque(done for done in cq.held if done[0] is not sq)
        return _OK

    def _delete_cq(self, command: Command) -> _Result:
        qid = command.cdw10 & _U16
        if not qid or qid not in self._cqs:
            return _fail(Status.INVALID_CQID)
        cq = self._cqs[qid]
        if cq.sqids:
            return _fail(Status.INVALID_QUEUE_DELETION, dnr=False)
        del self._cqs[qid]
        self._deassert_irq(cq)
        return _OK

    def _identify(self, command: Command) -> _Result:
        nsid = command.nsid
        match command.cdw10 & 0xFF:
            case Cns.CONTROLLER:
                data = self._identify_controller()
            case Cns.NAMESPACE:
                if not self._nsid_valid(nsid) or nsid == NSID_BROADCAST:
                    return _fail(Status.INVALID_NSID)
                data = self._identify_namespace() if nsid == _NSID else bytes(IDENTIFY_SIZE)
            case Cns.ACTIVE_NS_LIST:
                if nsid >= NSID_BROADCAST - 1:
                    return _fail(Status.INVALID_NSID)
                active = [_NSID] if nsid < _NSID else []
                data = struct.pack(f"<{len(active)}I", *active).ljust(IDENTIFY_SIZE, b"\0")
            case Cns.NS_DESCRIPTOR_LIST:
                if not self._nsid_valid(nsid) or nsid == NSID_BROADCAST:
                    return _fail(Status.INVALID_NSID)
                if nsid != _NSID:
                    return _fail(Status.INVALID_FIELD)
                # One descriptor: the Command Set Identifier, 0 (NVM).
                csi = struct.pack("<BBxxB", _NSID_DESCRIPTOR_CSI, 1, 0)
                data = csi.ljust(IDENTIFY_SIZE, b"\0")
            case _:
                return _fail(Status.INVALID_FIELD)
        return _Result(self._to_host(command, data))

    def _get_log_page(self, command: Command) -> _Result:
        lid, retain = command.cdw10 & 0xFF, bool(command.cdw10 & _LOG_RAE)
        dwords = ((command.cdw11 & _U16) << 16 | command.cdw10 >> 16) + 1
        length = dwords * 4
        offset = command.cdw13 << 32 | command.cdw12
        if offset % 4:
            return _fail(Status.INVALID_FIELD)
        status = self._check_mdts(length)
        if status:
            return _Result(status)
        match lid:
            case LogId.SMART:
                if command.nsid not in (NSID_BROADCAST, _NSID):
                    return _fail(Status.INVALID_NSID)
                log = self._smart_log()
                if not retain:
                    self._clear_events(_AER_TYPE_SMART)
            case LogId.ERROR_INFO:
                log = bytes(_ERROR_LOG_ENTRY)
                if not retain:
                    self._clear_events(_AER_TYPE_ERROR)
            case LogId.FIRMWARE_SLOT:
                # AFI: slot 1 active; FRS1: its revision.
                log = b"\x01".ljust(_FW_SLOT_REVISION, b"\0") + _padded("1.0", 8)
                log = log.ljust(Smart.SIZE, b"\0")
            case _:
                return _fail(Status.INVALID_FIELD)
        if offset >= len(log):
            return _fail(Status.INVALID_FIELD)
        return _Result(self._to_host(command, log[offset : offset + length]))

    @property
    def _queue_count_result(self) -> int:
        # QEMU ignores the request and always grants max_ioqpairs of each.
        return (self.max_ioqpairs - 1) | (self.max_ioqpairs - 1) << 16

    def _get_features(self, command: Command) -> _Result:
        fid, select = command.cdw10 & 0xFF, command.cdw10 >> 8 & 0x7
        if fid not in _FEATURES:
            return _fail(Status.INVALID_FIELD)
        capabilities, default = _FEATURES[fid]
        if select == _GET_FEATURES_SEL_CAPS:
            return _Result(result=capabilities)
        current = select not in (_GET_FEATURES_SEL_DEFAULT, _GET_FEATURES_SEL_SAVED)
        match fid:
            case FeatureId.TEMPERATURE_THRESHOLD:
                return self._temperature_threshold(command.cdw11, current)
            case FeatureId.NUMBER_OF_QUEUES:
                return _Result(result=self._queue_count_result)
            case FeatureId.VOLATILE_WRITE_CACHE if current:
                return _Result(result=int(self._write_cache))
            case FeatureId.ASYNC_EVENT_CONFIG if current:
                return _Result(result=self._async_config)
        return _Result(result=default)

    def _temperature_threshold(self, cdw11: int, current: bool) -> _Result:
        if field_get(cdw11, 16, 4):  # TMPSEL: only the composite sensor exists
            return _OK
        threshold = field_get(cdw11, 20, 2)
        if not current:
            return _Result(result=_TEMPERATURE_WARNING if threshold == _TEMP_THSEL_OVER else 0)
        if threshold == _TEMP_THSEL_OVER:
            return _Result(result=self._temp_over)
        if threshold == _TEMP_THSEL_UNDER:
            return _Result(result=self._temp_under)
        return _fail(Status.INVALID_FIELD)

    def _set_features(self, command: Command) -> _Result:
        fid, save, value = command.cdw10 & 0xFF, command.cdw10 >> 31, command.cdw11
        if save:
            return _fail(Status.FEATURE_NOT_SAVEABLE)
        if fid not in _FEATURES:
            return _fail(Status.INVALID_FIELD)
        if command.nsid and command.nsid != NSID_BROADCAST:
            if not self._nsid_valid(command.nsid):
                return _fail(Status.INVALID_NSID)
            return _fail(Status.FEATURE_NOT_NS_SPECIFIC)
        if not _FEATURES[fid][0] & _FEAT_CHANGEABLE:
            return _fail(Status.FEATURE_NOT_CHANGEABLE)
        match fid:
            case FeatureId.NUMBER_OF_QUEUES:
                if self._qs_created:
                    return _fail(Status.COMMAND_SEQUENCE_ERROR)
                if value & _U16 == _U16 or value >> 16 == _U16:
                    return _fail(Status.INVALID_FIELD)
                return _Result(result=self._queue_count_result)
            case FeatureId.VOLATILE_WRITE_CACHE:
                if self._write_cache and not value & 1:
                    self._store.flush()
                self._write_cache = bool(value & 1)
            case FeatureId.ASYNC_EVENT_CONFIG:
                self._async_config = value
            case FeatureId.TEMPERATURE_THRESHOLD if not field_get(value, 16, 4):
                threshold = field_get(value, 20, 2)
                if threshold == _TEMP_THSEL_OVER:
                    self._temp_over = value & _U16
                elif threshold == _TEMP_THSEL_UNDER:
                    self._temp_under = value & _U16
                else:
                    return _fail(Status.INVALID_FIELD)
        return _OK

    def _async_event_request(self, sq: _SubmissionQueue, command: Command) -> _Result | None:
        """Parked until an event (this model raises only invalid-doorbell errors)."""
        if len(self._aers) > _AERL:
            return _fail(Status.ASYNC_EVENT_LIMIT_EXCEEDED, dnr=False)
        self._aers.append(_Completion(sq, command.cid, Status.SUCCESS, 0))
        self._process_events()
        return None

    def _enqueue_event(self, event: _AsyncEvent) -> None:
        if len(self._events) < _AER_MAX_QUEUED:
            self._events.append(event)
            self._process_events()

    def _process_events(self) -> None:
        """QEMU's nvme_process_aers: complete AERs (newest first) with unmasked events."""
        for event in list(self._events):
            if not self._aers:
                return
            if self._aer_mask & 1 << event.type:
                continue  # one event per type until the host reads its log page
            self._events.remove(event)
            self._aer_mask |= 1 << event.type
            aer = self._aers.pop()
            result = event.type | event.info << 8 | event.log_page << 16
            self._cqs[0].held.append(aer._replace(result=result))

    def _clear_events(self, event_type: int) -> None:
        self._aer_mask &= ~(1 << event_type)
        self._events = deque(e for e in self._events if e.type != event_type)

    def _abort(self, command: Command) -> _Result:
        sqid, cid = command.cdw10 & _U16, command.cdw10 >> 16
        if sqid not in self._sqs:
            return _Result(_status(Status.INVALID_FIELD), result=1)
        for aer in self._aers if sqid == 0 else ():
            if aer.cid == cid:
                self._aers.remove(aer)
                self._cqs[0].held.append(aer._replace(status=Status.ABORT_REQUESTED))
                return _Result(result=0)
        return _Result(result=1)  # nothing in flight to abort: commands complete at once

    # --- I/O commands ---------------------------------------------------------
    def _io(self, command: Command) -> _Result:
        # QEMU 7.2's order (checked against it): the broadcast NSID passes the
        # validity check and, except for Flush, then names no namespace.
        nsid = command.nsid
        if nsid == 0 or (nsid != NSID_BROADCAST and nsid > _MAX_NAMESPACES):  # _nsid_valid
            return _fail(Status.INVALID_NSID)
        opcode = command.opcode  # compared with module aliases: an enum member lookup is slow
        if opcode == _FLUSH and nsid == NSID_BROADCAST:
            self._store.flush()
            return _OK
        if nsid != _NSID:
            return _fail(Status.INVALID_FIELD)
        if opcode == _FLUSH:
            self._store.flush()
            return _OK
        if command.fuse:
            return _fail(Status.INVALID_FIELD, dnr=False)
        if opcode == _READ:
            return self._read_write(command, write=False)
        if opcode == _WRITE:
            return self._read_write(command, write=True)
        if opcode == _WRITE_ZEROES:
            return self._write_zeroes(command)
        return _fail(Status.INVALID_OPCODE)

    def _lba_range(self, command: Command) -> tuple[int, int]:
        return command.cdw11 << 32 | command.cdw10, (command.cdw12 & _U16) + 1

    @property
    def _blocks(self) -> int:
        return self._store.size // self.lba_size

    def _read_write(self, command: Command, *, write: bool) -> _Result:
        # _lba_range, _check_mdts and _blocks, inline: this runs for every I/O
        slba, nlb = command.cdw11 << 32 | command.cdw10, (command.cdw12 & _U16) + 1
        lba_size = self.lba_size
        length = nlb * lba_size
        if length > self._page_size << self.mdts:
            return _fail(Status.INVALID_FIELD)
        if slba + nlb > self._store.size // lba_size:
            return _fail(Status.LBA_OUT_OF_RANGE)
        if command.psdt:
            return _fail(Status.INVALID_FIELD)  # SGLs are not offered (Identify SGLS = 0)
        offset = slba * lba_size
        if write:
            data = self._from_host(command, length)
            if isinstance(data, int):
                return _Result(data)
            self._store.write(offset, data)
            usage = self._usage
            usage.bytes_written += length
            usage.writes += 1
            return _OK
        status = self._to_host(command, self._store.read(offset, length))
        if not status:
            usage = self._usage
            usage.bytes_read += length
            usage.reads += 1
            return _OK
        return _Result(status)

    def _write_zeroes(self, command: Command) -> _Result:
        slba, nlb = self._lba_range(command)
        if slba + nlb > self._blocks:
            return _fail(Status.LBA_OUT_OF_RANGE)
        self._store.write(slba * self.lba_size, bytes(nlb * self.lba_size))
        return _OK

    # --- data structures ------------------------------------------------------
    @staticmethod
    def _nsid_valid(nsid: int) -> bool:
        return nsid != 0 and (nsid == NSID_BROADCAST or nsid <= _MAX_NAMESPACES)

    @property
    def _firmware_revision(self) -> str:
        major, minor, *rest = (*self.qemu_version, 0)
        return f"{major}.{minor}.{rest[0]}"

    def _identify_controller(self) -> bytes:
        data = bytearray(IDENTIFY_SIZE)

        def put(offset: int, fmt: str, *values: int) -> None:
            struct.pack_into(fmt, data, offset, *values)

        put(IdCtrl.VID, "<HH", self.vendor_id, self.subsystem_vendor_id)
        data[IdCtrl.SN : IdCtrl.SN + 20] = _padded(self.serial, 20)
        data[IdCtrl.MN : IdCtrl.MN + 40] = _padded(_MODEL_NUMBER, 40)
        data[IdCtrl.FR : IdCtrl.FR + 8] = _padded(self._firmware_revision, 8)
        data[IdCtrl.RAB] = _RAB
        data[IdCtrl.IEEE : IdCtrl.IEEE + 3] = _IEEE_OUI
        data[IdCtrl.MDTS] = self.mdts
        put(IdCtrl.VER, "<I", _NVME_VERSION)
        data[IdCtrl.CNTRLTYPE] = _CNTRLTYPE_IO
        data[IdCtrl.ACL] = _AERL
        data[IdCtrl.AERL] = _AERL
        data[IdCtrl.FRMW] = _FRMW_ONE_SLOT_READ_ONLY
        data[IdCtrl.LPA] = _LPA_SMART_PER_NS_AND_EXTENDED
        data[IdCtrl.SQES] = Cc.SQES << 4 | Cc.SQES
        data[IdCtrl.CQES] = Cc.CQES << 4 | Cc.CQES
        put(IdCtrl.NN, "<I", _MAX_NAMESPACES)
        put(IdCtrl.ONCS, "<H", _ONCS_WRITE_ZEROES)
        data[IdCtrl.VWC] = _VWC_PRESENT_AND_BROADCAST_FLUSH
        data[IdCtrl.SUBNQN : IdCtrl.SUBNQN + 256] = _padded(_NQN_PREFIX + self.serial, 256, b"\0")
        put(IdCtrl.PSD0, "<HxxII", _PSD0_MAX_POWER, _PSD0_ENTRY_LAT, _PSD0_EXIT_LAT)
        return bytes(data)

    def _identify_namespace(self) -> bytes:
        data = bytearray(IDENTIFY_SIZE)
        blocks = self._blocks
        struct.pack_into("<QQQ", data, IdNs.NSZE, blocks, blocks, blocks)
        data[IdNs.NLBAF] = len(_LBA_FORMATS) - 1
        data[IdNs.FLBAS] = _LBA_FORMATS.index((0, self.lba_size.bit_length() - 1))
        for index, (metadata, shift) in enumerate(_LBA_FORMATS):
            struct.pack_into("<HBx", data, IdNs.LBAF0 + 4 * index, metadata, shift)
        return bytes(data)

    def _smart_log(self) -> bytes:
        data = bytearray(Smart.SIZE)

        def put128(offset: int, value: int) -> None:
            data[offset : offset + 16] = value.to_bytes(16, "little")

        struct.pack_into("<H", data, Smart.TEMPERATURE, _TEMPERATURE)
        usage = self._usage
        put128(Smart.DATA_UNITS_READ, -(-usage.bytes_read // _SMART_UNIT))
        put128(Smart.DATA_UNITS_WRITTEN, -(-usage.bytes_written // _SMART_UNIT))
        put128(Smart.HOST_READ_COMMANDS, usage.reads)
        put128(Smart.HOST_WRITE_COMMANDS, usage.writes)
        return bytes(data)


def _replace_low(register: int, size: int, value: int) -> int:
    """Store `size` bytes of `value` into the low end of a 64-bit register."""
    mask = (1 << (8 * size)) - 1
    return (register & ~mask) | (value & mask)
