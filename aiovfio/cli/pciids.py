"""Vendor, device, subsystem and class names from the system's `pci.ids`.

The file is the PCI ID Repository's, as Debian ships it (package `pci.ids`:
/usr/share/misc/pci.ids; `hwdata`: /usr/share/hwdata/pci.ids);
`AIOVFIO_PCI_IDS` names another. Without it every name falls back to the
hex ids, as `lspci` does. A small reader rather than a library: python-hwdata,
the maintained one, knows neither subsystems nor the class section, and the
format is four kinds of line.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
from collections.abc import Iterable
from pathlib import Path

from attrs import define, field

__all__ = ["SEARCH_PATH", "PciNames", "find_pci_ids", "names"]

#: Where `pci.ids` is looked for, after `$AIOVFIO_PCI_IDS`.
SEARCH_PATH = (
    Path("/usr/share/misc/pci.ids"),
    Path("/usr/share/hwdata/pci.ids"),
    Path("/usr/share/pci.ids"),
    Path("/usr/share/misc/pci.ids.gz"),
)

_VENDOR = re.compile(r"([0-9a-fA-F]{4})\s+(.*)")
_SUBSYSTEM = re.compile(r"([0-9a-fA-F]{4})\s+([0-9a-fA-F]{4})\s+(.*)")
_CLASS = re.compile(r"C\s+([0-9a-fA-F]{2})\s+(.*)")
_SUBCLASS = re.compile(r"([0-9a-fA-F]{2})\s+(.*)")


@define
class PciNames:
    """The names one `pci.ids` file gives (all empty when there is none)."""

    path: Path | None = None
    vendors: dict[int, str] = field(factory=dict, repr=False)
    devices: dict[tuple[int, int], str] = field(factory=dict, repr=False)
    subsystems: dict[tuple[int, int, int, int], str] = field(factory=dict, repr=False)
    #: base class (8 bits), base+subclass (16 bits), base+subclass+prog-if (24 bits)
    classes: dict[int, str] = field(factory=dict, repr=False)
    subclasses: dict[int, str] = field(factory=dict, repr=False)
    prog_ifs: dict[int, str] = field(factory=dict, repr=False)

    @classmethod
    def parse(cls, lines: Iterable[str], path: Path | None = None) -> PciNames:
        """Read the pci.ids format: vendors, devices, subsystems, then `C` classes."""
        db = cls(path)
        vendor = device = base = sub = -1
        in_classes = False
        for raw in lines:
            line = raw.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            depth = len(line) - len(line.lstrip("\t"))
            text = line.strip()
            if depth == 0:
                m = _CLASS.fullmatch(text)
                in_classes = m is not None
                if m:
                    base = int(m[1], 16)
                    db.classes[base] = m[2]
                    continue
                m = _VENDOR.fullmatch(text)
                vendor = int(m[1], 16) if m else -1
                if m:
                    db.vendors[vendor] = m[2]
            elif in_classes:
                m = _SUBCLASS.fullmatch(text)
                if m is None:
                    continue
                if depth == 1:
                    sub = base << 8 | int(m[1], 16)
                    db.subclasses[sub] = m[2]
                elif depth == 2 and sub >= 0:
                    db.prog_ifs[sub << 8 | int(m[1], 16)] = m[2]
            elif vendor >= 0:
                if depth == 1:
                    m = _VENDOR.fullmatch(text)
                    device = int(m[1], 16) if m else -1
                    if m:
                        db.devices[vendor, device] = m[2]
                elif depth == 2 and device >= 0:
                    m = _SUBSYSTEM.fullmatch(text)
                    if m:
                        db.subsystems[vendor, device, int(m[1], 16), int(m[2], 16)] = m[3]
        return db

    @classmethod
    def load(cls, path: Path) -> PciNames:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            return cls.parse(f, path)

    # --- look-ups: a name, or None when the file does not know it ------------------

    def vendor(self, vendor: int) -> str | None:
        return self.vendors.get(vendor)

    def device(self, vendor: int, device: int) -> str | None:
        return self.devices.get((vendor, device))

    def subsystem(self, vendor: int, device: int, sub_vendor: int, sub_device: int) -> str | None:
        return self.subsystems.get((vendor, device, sub_vendor, sub_device))

    def class_name(self, class_code: int) -> str:
        """`Non-Volatile memory controller (NVM Express) [0108]`, or `Class [0108]`."""
        sub = class_code >> 8
        name = self.subclasses.get(sub) or self.classes.get(class_code >> 16) or "Class"
        prog_if = self.prog_ifs.get(class_code)
        return f"{name}{f' ({prog_if})' if prog_if else ''} [{sub:04x}]"

    def product(self, vendor: int, device: int) -> str:
        """`Red Hat, Inc. QEMU NVM Express Controller [1b36:0010]`, ids alone when unknown."""
        ids = f"[{vendor:04x}:{device:04x}]"
        words = [w for w in (self.vendor(vendor), self.device(vendor, device)) if w]
        if not words and self.path is not None:
            words = ["Device"]
        return " ".join([*words, ids])

    # --- searches, for `--vendor intel` and `--device ethernet` --------------------

    def vendors_named(self, text: str) -> set[int]:
        """The vendor ids whose name contains `text` (any case)."""
        needle = text.casefold()
        return {v for v, name in self.vendors.items() if needle in name.casefold()}

    def devices_named(self, text: str) -> set[tuple[int, int]]:
        """The (vendor, device) pairs whose device name contains `text` (any case)."""
        needle = text.casefold()
        return {k for k, name in self.devices.items() if needle in name.casefold()}


def find_pci_ids(environ: dict[str, str] | None = None) -> Path | None:
    """`$AIOVFIO_PCI_IDS`, else the first of SEARCH_PATH that exists; None without one."""
    env = (os.environ if environ is None else environ).get("AIOVFIO_PCI_IDS")
    if env is not None:
        return Path(env) if env and Path(env).is_file() else None
    return next((p for p in SEARCH_PATH if p.is_file()), None)


@functools.lru_cache(maxsize=4)
def _load(path: Path | None) -> PciNames:
    if path is None:
        return PciNames()
    try:
        return PciNames.load(path)
    except OSError:
        return PciNames()


def names() -> PciNames:
    """The system's names (read once per file); empty when there is no pci.ids."""
    return _load(find_pci_ids())
