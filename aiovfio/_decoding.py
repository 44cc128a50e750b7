"""Memory Space (PCI COMMAND.MEM) as the public layer tracks it, and the BARs that follow it.

While Memory Space is clear the device does not decode its memory BARs, and
vfio-pci keeps user space off them: every mmap of the BARs is zapped and its
fault handler answers SIGBUS (`vfio_pci_mmap_fault`), and a trapped access
(pread/pwrite, the ROM included) is EIO (`vfio_pci_core_do_io_rw`'s
`test_mem`). A driver that forgot `dev.config.enable()`, or turned decoding
off itself, would die by a signal.

A device keeps one `MemorySpace`: it reads COMMAND when it opens, and again
after every write through its ConfigSpace that covers COMMAND and after a
reset (FLR and the like save and restore it). Each memory BAR region (and
the ROM) follows it: while MEM is clear the region's class is swapped for a
subclass whose accessors raise RegionAccessError saying what to do; when MEM
is set again the original class comes back. The hot path therefore costs
nothing while decoding is on: no test in any accessor, the same methods.
I/O-port BARs follow COMMAND.IO, which vfio-pci does not police: they are
left alone.
"""

from __future__ import annotations

import weakref
from typing import Any

from attrs import define, field

from . import _ki, errors
from ._uapi.pci import Command

__all__ = ["MemorySpace", "ACCESSORS", "COMMAND_OFFSET", "covers_command", "refusing_class"]

#: where COMMAND is in config space (its low byte holds MEMORY)
COMMAND_OFFSET = 4

#: every method that touches a region's memory
ACCESSORS = (
    "read8",
    "read16",
    "read32",
    "read64",
    "write8",
    "write16",
    "write32",
    "write64",
    "read",
    "write",
)

_refusing: dict[type, type] = {}


def _refuse(self: Any, *args: object, **kwargs: object) -> Any:
    if self.closed:
        raise errors.ClosedResourceError(f"{self.label} is closed (its device was closed)")
    raise errors.RegionAccessError(
        f"{self.label} does not decode: Memory Space is off in the device's PCI COMMAND "
        f"register (on Linux an access would be SIGBUS through the mmap, EIO through the "
        f"kernel); call `dev.config.enable()` first"
    )


def refusing_class(cls: type) -> type:
    """The subclass of region class `cls` whose accessors refuse (made once per class)."""
    sub = _refusing.get(cls)
    if sub is None:
        body: dict[str, Any] = dict.fromkeys(ACCESSORS, _refuse)
        body["__slots__"] = ()  # same layout as `cls`, so `__class__` can be swapped
        body["_memory_on_class"] = cls
        body["__doc__"] = f"A {cls.__name__} while Memory Space is off: every access refuses."
        sub = type(f"{cls.__name__}MemoryOff", (cls,), body)
        _refusing[cls] = sub
    return sub


def _follow_state(region: object, enabled: bool) -> None:
    cls = type(region)
    on_class = getattr(cls, "_memory_on_class", None)
    if enabled and on_class is not None:
        region.__class__ = on_class
    elif not enabled and on_class is None:
        region.__class__ = refusing_class(cls)


@define(eq=False)
class MemorySpace:
    """A device's COMMAND.MEM, and the memory regions whose accessors follow it."""

    enabled: bool = True
    _regions: weakref.WeakSet[Any] = field(factory=weakref.WeakSet, repr=False)

    def follow(self, region: object) -> None:
        """Make `region` refuse access whenever Memory Space is off (now too)."""
        self._regions.add(region)
        if not self.enabled:
            _follow_state(region, False)

    def update(self, command: int) -> None:
        """COMMAND was (re)read: swap the regions' accessors if MEMORY changed."""
        enabled = bool(command & Command.MEMORY)
        if enabled == self.enabled:
            return
        self.enabled = enabled
        for region in list(self._regions):
            _follow_state(region, enabled)


def covers_command(offset: int, length: int) -> bool:
    """Whether a config write of `length` bytes at `offset` reaches COMMAND's low byte."""
    return offset <= COMMAND_OFFSET < offset + length


_ki.protect_module(__name__)
