"""PCI configuration space: header fields and the capability walk.

`device.config` is a `ConfigSpace`, a `Region` (VFIO region 7, always
pread/pwrite) with named accessors for what drivers need: ids, the command
register (Memory Space and Bus Master are the driver's to set: vfio-pci does
not) and the standard and extended capability lists.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field, frozen

from . import _ki, errors
from ._decoding import COMMAND_OFFSET, covers_command
from ._uapi.pci import (
    CAP_LIST_OFFSET,
    CONFIG_SPACE_SIZE,
    EXT_CAP_START,
    CapId,
    Cfg,
    Command,
    ExtCapId,
    Status,
)
from .region import Region

__all__ = ["ConfigSpace", "PciCapability", "CapId", "ExtCapId", "Command"]

_MAX_CAPS = 48  # (256 - 64) / 4: more than that is a loop


@frozen
class PciCapability:
    """One capability in config space: its id, its offset, and whether it is extended."""

    id: int
    offset: int
    extended: bool = False
    version: int = 0

    @property
    def name(self) -> str:
        enum_ = ExtCapId if self.extended else CapId
        try:
            return enum_(self.id).name
        except ValueError:
            return f"{self.id:#x}"

    def __repr__(self) -> str:
        kind = "ext " if self.extended else ""
        return f"PciCapability({kind}{self.name} at {self.offset:#x})"


@define(eq=False, repr=False)
class ConfigSpace(Region):
    """The device's PCI configuration space (VFIO region 7).

    A write that covers COMMAND calls `on_command_write` (the device re-reads
    COMMAND and lets its memory BARs follow Memory Space: `aiovfio._decoding`).
    """

    mmap_allowed = False
    on_command_write: Callable[[], object] | None = field(default=None, init=False)

    def write8(self, offset: int, value: int) -> None:
        super().write8(offset, value)
        if offset == COMMAND_OFFSET:
            self._command_written()

    def write16(self, offset: int, value: int) -> None:
        super().write16(offset, value)
        if offset == COMMAND_OFFSET:
            self._command_written()

    def write32(self, offset: int, value: int) -> None:
        super().write32(offset, value)
        if offset == COMMAND_OFFSET:
            self._command_written()

    def write64(self, offset: int, value: int) -> None:
        super().write64(offset, value)
        if offset == 0:
            self._command_written()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        super().write(offset, data)
        if isinstance(offset, int) and covers_command(offset, memoryview(data).nbytes):
            self._command_written()

    def _command_written(self) -> None:
        if self.on_command_write is not None:
            self.on_command_write()

    def __repr__(self) -> str:
        if self.closed:
            return f"<ConfigSpace {self.label} closed>"
        return f"<ConfigSpace {self.label} {self.vendor_id:04x}:{self.device_id:04x}>"

    @property
    def vendor_id(self) -> int:
        return self.read16(Cfg.VENDOR_ID)

    @property
    def device_id(self) -> int:
        return self.read16(Cfg.DEVICE_ID)

    @property
    def revision(self) -> int:
        return self.read8(Cfg.REVISION_ID)

    @property
    def class_code(self) -> int:
        """24 bits: base class, sub class, programming interface."""
        return self.read32(Cfg.REVISION_ID) >> 8

    @property
    def command(self) -> Command:
        return Command(self.read16(Cfg.COMMAND))

    @command.setter
    def command(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise errors.InvalidArgument(
                f"the command register of {self.label} takes an int (Command flags), not {value!r}"
            )
        self.write16(Cfg.COMMAND, value)

    def enable(self, *, bus_master: bool = True) -> None:
        """Set Memory Space (and Bus Master, for DMA and MSI): do this before MMIO."""
        want = Command.MEMORY | (Command.MASTER if bus_master else 0)
        cmd = self.read16(Cfg.COMMAND)
        if cmd & want != want:
            self.write16(Cfg.COMMAND, cmd | want)

    def capabilities(self) -> list[PciCapability]:
        """The standard capability list, in list order; a malformed list raises."""
        if not self.read16(Cfg.STATUS) & Status.CAP_LIST:
            return []
        found: list[PciCapability] = []
        seen: set[int] = set()
        ptr = self.read8(CAP_LIST_OFFSET) & ~3
        while ptr:
            if ptr < 0x40 or ptr > CONFIG_SPACE_SIZE - 2 or ptr in seen or len(seen) > _MAX_CAPS:
                raise errors.DeviceFault(
                    f"{self.label}: the capability list is malformed at {ptr:#x}"
                )
            seen.add(ptr)
            found.append(PciCapability(self.read8(ptr), ptr))
            ptr = self.read8(ptr + 1) & ~3
        return found

    def extended_capabilities(self) -> list[PciCapability]:
        """The PCI Express extended capability list (empty without extended space)."""
        if self.size <= EXT_CAP_START:
            return []
        found: list[PciCapability] = []
        seen: set[int] = set()
        ptr = EXT_CAP_START
        while ptr:
            if ptr < EXT_CAP_START or ptr + 4 > self.size or ptr in seen or len(seen) > 960:
                raise errors.DeviceFault(
                    f"{self.label}: the extended capability list is malformed at {ptr:#x}"
                )
            seen.add(ptr)
            header = self.read32(ptr)
            if header in (0, 0xFFFFFFFF):
                break
            found.append(PciCapability(header & 0xFFFF, ptr, True, (header >> 16) & 0xF))
            ptr = (header >> 20) & ~3
        return found

    def find_capability(self, cap_id: int, *, extended: bool = False) -> PciCapability | None:
        """The first capability with that id, or None."""
        caps = self.extended_capabilities() if extended else self.capabilities()
        return next((c for c in caps if c.id == cap_id), None)


_ki.protect_module(__name__)
