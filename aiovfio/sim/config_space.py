"""The PCI config space of a simulated function, and vfio-pci's view of it.

Two layers, as on Linux:

* the *physical* config space, which the device model reads through
  `DeviceContext.config_read`: the type-0 header built from the model's
  identity, its BARs, and its capabilities laid out and linked from 0x40.
  The machine owns the MSI and MSI-X Enable bits here: VFIO_DEVICE_SET_IRQS
  sets and clears them, as the host kernel does when vfio-pci allocates
  vectors. Status.Interrupt follows the INTx level.
* the *user's* view through the VFIO config region, emulated in the spirit
  of vfio_pci_config.c: the BARs and the ROM BAR are virtual registers that
  answer sizing writes (write all ones, read back the size mask); the MSI and
  MSI-X control words, the MSI message registers and Interrupt Line are
  virtual (what the user writes is what the user reads; it does not enable
  anything); COMMAND is writable (IO, Memory, Bus Master, Parity, SERR,
  INTx Disable) and reaches the device; everything else is read-only.

Memory Space in COMMAND gates BAR access (EIO when clear, as vfio-pci does);
Bus Master gates the device's DMA and MSI/MSI-X messages, as on real
hardware: a driver must set Bus Master itself (vfio-pci clears it on open).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from attrs import define, field, frozen

from .._uapi.pci import (
    CAP_LIST_OFFSET,
    CONFIG_SPACE_SIZE,
    EXT_CONFIG_SPACE_SIZE,
    CapId,
    Cfg,
    Command,
    MsiCtrl,
    MsixCtrl,
    Status,
)
from ..errors import InvalidArgument

__all__ = ["Bar", "ConfigSpace", "MsixTable"]

#: Capabilities start here, after the 64-byte type-0 header.
_CAPS_START = 0x40
#: COMMAND bits a driver may change (IO, Memory, Bus Master, Parity, SERR, INTx Disable).
_COMMAND_WRITABLE = (
    Command.IO
    | Command.MEMORY
    | Command.MASTER
    | Command.PARITY
    | Command.SERR
    | Command.INTX_DISABLE
)
_MSI_CTRL_WRITABLE = MsiCtrl.ENABLE | MsiCtrl.QSIZE
_MSIX_CTRL_WRITABLE = MsixCtrl.ENABLE | MsixCtrl.MASKALL
#: COMMAND as the firmware and Linux's enumeration leave a function on QEMU's q35 (SeaBIOS
#: enables I/O and Memory decoding, Linux sets SERR): vfio-pci's open keeps it, minus Bus Master.
FIRMWARE_COMMAND = Command.IO | Command.MEMORY | Command.SERR
_MEMORY = int(Command.MEMORY)  # plain ints: IntFlag arithmetic is slow on the hot path
_MASTER = int(Command.MASTER)
_BAR_MEM_64 = 0x4
_BAR_PREFETCH = 0x8
_ROM_ENABLE = 0x1
_INTERRUPT_LINE = 11
_MSIX_ENTRY = 16


@frozen
class Bar:
    """A BAR (or the ROM, index 6) as the config space shows it."""

    index: int
    size: int
    address: int
    is_64bit: bool = False
    prefetchable: bool = False


@frozen
class MsixTable:
    """Where the MSI-X table lives: vfio-pci hides it from read/write of the BAR."""

    bar: int
    offset: int
    size: int


@define(eq=False)
class ConfigSpace:
    """One function's config space: physical bytes plus the virtualised user view."""

    size: int
    phys: bytearray = field(repr=False)
    #: per byte: the bits a user write may change
    _wmask: bytearray = field(repr=False)
    #: per byte: 1 when the user's view of the byte is virtual (kept in `_virt`)
    _vbyte: bytearray = field(repr=False)
    _virt: bytearray = field(repr=False)
    #: capability id -> offset of its first instance
    caps: dict[int, int] = field(factory=dict)
    msi_vectors: int = 0
    msix_vectors: int = 0
    msix_table: MsixTable | None = None
    #: COMMAND as vfio-pci saved it on open, restored on the last close
    _saved_command: int = field(default=0, repr=False)

    # --- construction ------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        *,
        vendor_id: int,
        device_id: int,
        subsystem_vendor_id: int,
        subsystem_id: int,
        revision: int,
        class_code: int,
        interrupt_pin: int,
        bars: Sequence[Bar],
        capabilities: Sequence[tuple[int, bytes]],
    ) -> ConfigSpace:
        """Lay out the header and the capability list; ValueError for a bad model."""
        cap_ids = [int(cap_id) for cap_id, _ in capabilities]
        size = EXT_CONFIG_SPACE_SIZE if CapId.EXP in cap_ids else CONFIG_SPACE_SIZE
        phys = bytearray(size)
        struct.pack_into("<HH", phys, Cfg.VENDOR_ID, vendor_id, device_id)
        phys[Cfg.REVISION_ID] = revision & 0xFF
        phys[Cfg.CLASS_PROG : Cfg.CLASS_PROG + 3] = (class_code & 0xFFFFFF).to_bytes(3, "little")
        struct.pack_into("<HH", phys, Cfg.SUBSYSTEM_VENDOR_ID, subsystem_vendor_id, subsystem_id)
        phys[Cfg.INTERRUPT_PIN] = interrupt_pin & 0xFF
        phys[Cfg.INTERRUPT_LINE] = _INTERRUPT_LINE if interrupt_pin else 0
        space = cls(
            size=size,
            phys=phys,
            wmask=bytearray(size),
            vbyte=bytearray(size),
            virt=bytearray(size),
        )
        struct.pack_into("<H", phys, Cfg.COMMAND, FIRMWARE_COMMAND)
        space._writable(Cfg.COMMAND, 2, _COMMAND_WRITABLE)
        space._writable(Cfg.CACHE_LINE_SIZE, 1, 0xFF)
        space._writable(Cfg.LATENCY_TIMER, 1, 0xFF)
        space._writable(Cfg.INTERRUPT_LINE, 1, 0xFF, virtual=True)
        for bar in bars:
            space._place_bar(bar)
        space._place_capabilities(capabilities)
        space._virt[:] = space.phys
        return space

    def _writable(self, offset: int, size: int, mask: int, *, virtual: bool = False) -> None:
        for i in range(size):
            self._wmask[offset + i] = (mask >> (8 * i)) & 0xFF
            self._vbyte[offset + i] = 1 if virtual else 0

    def _virtual(self, offset: int, size: int) -> None:
        for i in range(size):
            self._vbyte[offset + i] = 1

    def _place_bar(self, bar: Bar) -> None:
        if bar.index == 6:  # the expansion ROM BAR
            mask = (~(bar.size - 1) & 0xFFFFF800) | _ROM_ENABLE
            struct.pack_into("<I", self.phys, Cfg.ROM_ADDRESS, bar.address & 0xFFFFF800)
            self._writable(Cfg.ROM_ADDRESS, 4, mask, virtual=True)
            return
        reg = Cfg.BASE_ADDRESS_0 + 4 * bar.index
        flags = (_BAR_MEM_64 if bar.is_64bit else 0) | (_BAR_PREFETCH if bar.prefetchable else 0)
        size_mask = ~(bar.size - 1)
        struct.pack_into("<I", self.phys, reg, (bar.address & 0xFFFFFFF0) | flags)
        self._writable(reg, 4, size_mask & 0xFFFFFFF0, virtual=True)
        if bar.is_64bit:
            struct.pack_into("<I", self.phys, reg + 4, (bar.address >> 32) & 0xFFFFFFFF)
            self._writable(reg + 4, 4, (size_mask >> 32) & 0xFFFFFFFF, virtual=True)

    def _place_capabilities(self, capabilities: Sequence[tuple[int, bytes]]) -> None:
        if not capabilities:
            return
        struct.pack_into("<H", self.phys, Cfg.STATUS, Status.CAP_LIST)
        offset = _CAPS_START
        previous = CAP_LIST_OFFSET
        for cap_id, body in capabilities:
            length = 2 + len(body)
            if offset + length > CONFIG_SPACE_SIZE:
                raise InvalidArgument(
                    f"capabilities do not fit in config space: cap {cap_id:#x} "
                    f"({length} bytes) would end at {offset + length:#x}"
                )
            self.phys[previous] = offset
            self.phys[offset] = cap_id & 0xFF
            self.phys[offset + 1] = 0
            self.phys[offset + 2 : offset + length] = body
            self.caps.setdefault(int(cap_id), offset)
            self._decode_capability(int(cap_id), offset, body)
            previous = offset + 1
            offset = (offset + length + 3) & ~3

    def _decode_capability(self, cap_id: int, offset: int, body: bytes) -> None:
        if cap_id == CapId.MSI and offset == self.caps[cap_id]:
            if len(body) < 8:
                raise InvalidArgument(
                    f"MSI capability body is {len(body)} bytes; it needs 8 or more"
                )
            ctrl = struct.unpack_from("<H", body)[0]
            self.msi_vectors = 1 << ((ctrl & MsiCtrl.QMASK) >> 1)
            # The user's MSI control low byte and message registers are virtual.
            self._writable(offset + 2, 1, _MSI_CTRL_WRITABLE, virtual=True)
            self._virtual(offset + 3, 1)
            rest = len(body) - 2
            self._writable(offset + 4, rest, (1 << (8 * rest)) - 1, virtual=True)
        elif cap_id == CapId.MSIX and offset == self.caps[cap_id]:
            if len(body) < 10:
                raise InvalidArgument(
                    f"MSI-X capability body is {len(body)} bytes; it needs 10 (control, table, PBA)"
                )
            ctrl, table = struct.unpack_from("<HI", body)
            self.msix_vectors = (ctrl & MsixCtrl.QSIZE) + 1
            self.msix_table = MsixTable(
                bar=table & 0x7, offset=table & ~0x7, size=self.msix_vectors * _MSIX_ENTRY
            )
            self._writable(offset + 2, 2, _MSIX_CTRL_WRITABLE, virtual=True)

    # --- the device's (physical) side --------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """A physical read, as the device model sees its own config space."""
        self._check(offset, size)
        return int.from_bytes(self.phys[offset : offset + size], "little")

    def _check(self, offset: int, size: int) -> None:
        if size not in (1, 2, 4) or offset < 0 or offset + size > self.size:
            raise ValueError(f"config access of {size} bytes at {offset:#x} is out of range")

    def _phys16(self, offset: int) -> int:
        return int(struct.unpack_from("<H", self.phys, offset)[0])

    def _set_phys16(self, offset: int, value: int) -> None:
        struct.pack_into("<H", self.phys, offset, value & 0xFFFF)

    @property
    def is_pcie(self) -> bool:
        return CapId.EXP in self.caps

    @property
    def command(self) -> int:
        return self._phys16(Cfg.COMMAND)

    @property
    def memory_enabled(self) -> bool:
        return bool(self.phys[Cfg.COMMAND] & _MEMORY)

    @property
    def bus_master(self) -> bool:
        return bool(self.phys[Cfg.COMMAND] & _MASTER)

    @property
    def interrupt_pin(self) -> int:
        return self.phys[Cfg.INTERRUPT_PIN]

    def set_intx_status(self, asserted: bool) -> None:
        """Status.Interrupt follows the INTx level."""
        status = self._phys16(Cfg.STATUS)
        if asserted:
            status |= Status.INTERRUPT
        else:
            status &= ~int(Status.INTERRUPT)
        self._set_phys16(Cfg.STATUS, status)

    def set_msi_enable(self, enabled: bool) -> None:
        self._set_enable(CapId.MSI, MsiCtrl.ENABLE, enabled)

    def set_msix_enable(self, enabled: bool) -> None:
        self._set_enable(CapId.MSIX, MsixCtrl.ENABLE, enabled)

    def _set_enable(self, cap_id: int, bit: int, enabled: bool) -> None:
        offset = self.caps.get(cap_id)
        if offset is None:
            return
        ctrl = self._phys16(offset + 2)
        self._set_phys16(offset + 2, (ctrl | bit) if enabled else (ctrl & ~int(bit)))

    def msi_enabled(self) -> bool:
        offset = self.caps.get(CapId.MSI)
        return offset is not None and bool(self._phys16(offset + 2) & MsiCtrl.ENABLE)

    def msix_enabled(self) -> bool:
        offset = self.caps.get(CapId.MSIX)
        return offset is not None and bool(self._phys16(offset + 2) & MsixCtrl.ENABLE)

    # --- vfio-pci's open and close ------------------------------------------------------

    def open_device(self) -> None:
        """The first open: enable Memory, clear Bus Master and INTx Disable, fresh vconfig.

        vfio_pci_core_enable: pci_clear_master, pci_enable_device (Memory on),
        INTx Disable cleared, then vfio_config_init copies the physical space.
        """
        command = (self.command | Command.MEMORY) & ~int(Command.MASTER | Command.INTX_DISABLE)
        self._set_phys16(Cfg.COMMAND, command)
        self._saved_command = command
        self._virt[:] = self.phys

    def close_device(self) -> None:
        """The last close: MSI/MSI-X off, Bus Master off, saved COMMAND restored."""
        self.set_msi_enable(False)
        self.set_msix_enable(False)
        self._set_phys16(Cfg.COMMAND, self._saved_command & ~int(Command.MASTER))

    # --- the user's (VFIO config region) side --------------------------------------------

    def user_read(self, offset: int, size: int) -> int:
        """A read through the VFIO config region (bounds checked by the caller)."""
        out = bytearray(size)
        for i in range(size):
            pos = offset + i
            out[i] = self._virt[pos] if self._vbyte[pos] else self.phys[pos]
        return int.from_bytes(out, "little")

    def user_write(self, offset: int, size: int, value: int) -> None:
        """A write through the VFIO config region: writable bits only."""
        data = value.to_bytes(size, "little")
        for i in range(size):
            pos = offset + i
            mask = self._wmask[pos]
            if not mask:
                continue
            store = self._virt if self._vbyte[pos] else self.phys
            store[pos] = (store[pos] & ~mask & 0xFF) | (data[i] & mask)
