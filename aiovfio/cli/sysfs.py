"""PCI discovery through sysfs, rooted at configurable paths: read only.

Everything here reads plain files under `Roots` (`/sys`, `/dev`, `/proc`), so
the same code runs on a real machine, inside the QEMU guest, and on a tree
written by the simulated machine in a test. Changing bindings is
`binding.py`'s job.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Mapping
from pathlib import Path

from attrs import define, field, frozen

from .._uapi.pci import CAP_LIST_OFFSET, CONFIG_SPACE_SIZE, EXT_CAP_START, CapId, ExtCapId
from .._util import keeps_group_viable, normalize_bdf
from ..errors import DeviceNotFound, Offender, SetupError
from ..kernel.protocol import PciIds
from . import pciids

__all__ = [
    "VFIO_DRIVER",
    "Bar",
    "Capability",
    "GroupMember",
    "IommuGroup",
    "PciFunction",
    "Roots",
    "Sysfs",
    "class_name",
    "is_vfio_compatible",
    "normalize_bdf",
    "walk_capabilities",
]

#: The driver aiovfio binds functions to.
VFIO_DRIVER = "vfio-pci"


# --- roots ---------------------------------------------------------------------


@frozen
class Roots:
    """Where sysfs, devtmpfs, procfs and aiovfio's binding state live."""

    sysfs: Path = field(default=Path("/sys"), converter=Path)
    dev: Path = field(default=Path("/dev"), converter=Path)
    proc: Path = field(default=Path("/proc"), converter=Path)
    #: JSON file remembering the driver each function had before `bind`.
    state: Path = field(default=Path("/run/aiovfio/drivers.json"), converter=Path)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        **overrides: str | os.PathLike[str] | None,
    ) -> Roots:
        """Roots from `AIOVFIO_SYSFS`/`_DEV`/`_PROC`/`_STATE`, then `overrides`."""
        env = os.environ if environ is None else environ
        values: dict[str, Path] = {}
        for name in ("sysfs", "dev", "proc", "state"):
            value = overrides.get(name) or env.get(f"AIOVFIO_{name.upper()}")
            if value:
                values[name] = Path(value)
        return cls(**values)


# --- names ---------------------------------------------------------------------


def class_name(class_code: int) -> str:
    """A readable name for a 24-bit PCI class code, from the system's pci.ids."""
    return pciids.names().class_name(class_code)


#: Whether a function bound to a driver leaves its IOMMU group viable.
is_vfio_compatible = keeps_group_viable


# --- values --------------------------------------------------------------------


@frozen
class PciFunction:
    """One PCI function as sysfs shows it."""

    address: str
    ids: PciIds
    driver: str | None
    iommu_group: int | None
    driver_override: str | None = None

    @property
    def class_name(self) -> str:
        return class_name(self.ids.class_code)

    @property
    def is_bridge(self) -> bool:
        return self.ids.class_code >> 8 == 0x0604


@frozen
class GroupMember:
    """A function of an IOMMU group and the driver that holds it."""

    address: str
    driver: str | None

    @property
    def compatible(self) -> bool:
        return is_vfio_compatible(self.driver)


@frozen
class IommuGroup:
    """An IOMMU group: viable when every member is bound to VFIO or to nothing."""

    number: int
    members: tuple[GroupMember, ...]

    @property
    def viable(self) -> bool:
        return all(m.compatible for m in self.members)

    @property
    def offenders(self) -> tuple[Offender, ...]:
        return tuple(Offender(m.address, m.driver) for m in self.members if not m.compatible)


class BarKind(enum.Enum):
    MEMORY = "mem"
    IO = "io"


@frozen
class Bar:
    """A BAR or ROM from sysfs `resource`: index, bus address, size, kind."""

    index: int
    start: int
    size: int
    kind: BarKind
    is_64bit: bool
    prefetchable: bool


@frozen
class Capability:
    """A PCI capability found in config space."""

    id: int
    offset: int
    extended: bool = False
    version: int = 0

    @property
    def name(self) -> str:
        enum_type: type[enum.IntEnum] = ExtCapId if self.extended else CapId
        try:
            return enum_type(self.id).name
        except ValueError:
            return f"{'ext ' if self.extended else ''}cap {self.id:#x}"


def walk_capabilities(config: bytes) -> tuple[Capability, ...]:
    """The standard and extended capability lists of a config-space image.

    Tolerates truncated images (sysfs gives non-root readers 64 bytes) and
    loops (a visited offset ends the walk).
    """
    caps: list[Capability] = []
    if len(config) < 0x40 or not config[0x06] & 0x10:  # Status.CAP_LIST
        return ()
    seen: set[int] = set()
    offset = config[CAP_LIST_OFFSET] & 0xFC
    while 0x40 <= offset < min(len(config), CONFIG_SPACE_SIZE) - 1 and offset not in seen:
        seen.add(offset)
        caps.append(Capability(config[offset], offset))
        offset = config[offset + 1] & 0xFC
    offset = EXT_CAP_START
    while EXT_CAP_START <= offset <= len(config) - 4 and offset not in seen:
        seen.add(offset)
        header = int.from_bytes(config[offset : offset + 4], "little")
        if header in (0, 0xFFFFFFFF):
            break
        caps.append(Capability(header & 0xFFFF, offset, True, (header >> 16) & 0xF))
        offset = (header >> 20) & 0xFFC
    return tuple(caps)


# --- reading -------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _link_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:  # a directory instead of a link (a flattened tree)
        return path.name if path.is_dir() else None


def _entries(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


@define
class Sysfs:
    """Read-only look-ups of PCI functions, IOMMU groups and modules."""

    roots: Roots = field(factory=Roots)

    def __repr__(self) -> str:
        return f"<Sysfs {str(self.roots.sysfs)!r}>"

    # paths
    @property
    def pci_devices_dir(self) -> Path:
        return self.roots.sysfs / "bus" / "pci" / "devices"

    @property
    def pci_drivers_dir(self) -> Path:
        return self.roots.sysfs / "bus" / "pci" / "drivers"

    @property
    def groups_dir(self) -> Path:
        return self.roots.sysfs / "kernel" / "iommu_groups"

    def path(self, address: str) -> Path:
        """The sysfs directory of a function (the address is not checked)."""
        return self.pci_devices_dir / address

    # checks
    def require_pci(self) -> None:
        """Raise `SetupError` when there is no PCI sysfs at the root."""
        if not self.pci_devices_dir.is_dir():
            raise SetupError(
                f"no PCI devices in sysfs: {self.pci_devices_dir} does not exist; "
                "is sysfs mounted (`mount -t sysfs sysfs /sys`), or is --sysfs/AIOVFIO_SYSFS wrong?"
            )

    def resolve(self, text: str) -> str:
        """Normalise an address and check that the function exists."""
        address = normalize_bdf(text)
        self.require_pci()
        if not self.path(address).exists():
            raise DeviceNotFound(
                f"no PCI device {address} in {self.pci_devices_dir}; `aiovfio ls` lists them"
            )
        return address

    # functions
    def addresses(self) -> tuple[str, ...]:
        self.require_pci()
        return tuple(p.name for p in _entries(self.pci_devices_dir))

    def function(self, address: str) -> PciFunction:
        path = self.path(address)
        if not path.exists():
            raise DeviceNotFound(f"no PCI device {address} in {self.pci_devices_dir}")

        def hexval(name: str) -> int:
            text = _read(path / name)
            try:
                return int(text, 16) if text else 0
            except ValueError:
                return 0

        ids = PciIds(
            vendor=hexval("vendor"),
            device=hexval("device"),
            subsystem_vendor=hexval("subsystem_vendor"),
            subsystem_device=hexval("subsystem_device"),
            class_code=hexval("class"),
            revision=hexval("revision"),
        )
        group = _link_name(path / "iommu_group")
        override = _read(path / "driver_override")
        return PciFunction(
            address=address,
            ids=ids,
            driver=self.driver(address),
            iommu_group=int(group) if group and group.isdigit() else None,
            driver_override=None if override in (None, "", "(null)") else override,
        )

    def functions(self) -> list[PciFunction]:
        return [self.function(a) for a in self.addresses()]

    def driver(self, address: str) -> str | None:
        return _link_name(self.path(address) / "driver")

    # groups
    def group(self, number: int) -> IommuGroup:
        devices = self.groups_dir / str(number) / "devices"
        if not devices.is_dir():
            raise DeviceNotFound(f"no IOMMU group {number} in {self.groups_dir}")
        members = tuple(GroupMember(p.name, self.driver(p.name)) for p in _entries(devices))
        return IommuGroup(number, members)

    def group_of(self, address: str) -> IommuGroup | None:
        number = self.function(address).iommu_group
        return None if number is None else self.group(number)

    def groups(self) -> tuple[int, ...]:
        return tuple(sorted(int(p.name) for p in _entries(self.groups_dir) if p.name.isdigit()))

    def noiommu_groups(self) -> tuple[int, ...]:
        """The groups VFIO made for devices without an IOMMU (their name is vfio-noiommu)."""
        return tuple(n for n in self.groups() if _is_noiommu_group(self.groups_dir / str(n)))

    # drivers and modules
    def driver_loaded(self, name: str) -> bool:
        """Whether /sys/bus/pci/drivers/NAME exists (a plain name: no path tricks)."""
        if not name or "/" in name or name.startswith("."):
            return False
        return (self.pci_drivers_dir / name).is_dir()

    def drivers(self) -> tuple[str, ...]:
        """The PCI drivers the kernel has loaded."""
        return tuple(p.name for p in _entries(self.pci_drivers_dir) if p.is_dir())

    def module_loaded(self, name: str) -> bool:
        return (self.roots.sysfs / "module" / name.replace("-", "_")).is_dir()

    @property
    def noiommu_param(self) -> Path:
        return self.roots.sysfs / "module" / "vfio" / "parameters" / "enable_unsafe_noiommu_mode"

    def noiommu_mode(self) -> bool:
        """Whether VFIO's unsafe noiommu mode is on (vfio-pci then gives a device
        without an IOMMU a noiommu group when it binds it)."""
        try:
            return self.noiommu_param.read_text().strip().upper() in ("Y", "1")
        except OSError:
            return False

    # device details
    def reset_methods(self, address: str) -> tuple[str, ...] | None:
        """How vfio-pci can reset the function: () for no way, None for an unknown device.

        The kernel shows `reset_method` (>= 5.15) and `reset` only for a
        function it can reset; with `reset` alone the method is "unknown".
        """
        path = self.path(address)
        if not path.exists():
            return None
        text = _read(path / "reset_method")
        if text is not None:
            return tuple(text.split())
        return ("unknown",) if (path / "reset").exists() else ()

    def config(self, address: str) -> bytes:
        """The config-space image sysfs gives this reader (64 bytes unless root)."""
        try:
            return (self.path(address) / "config").read_bytes()
        except FileNotFoundError:
            return b""

    def bars(self, address: str) -> tuple[Bar, ...]:
        """BARs 0-5 and the ROM (index 6) from `resource`, empty ones left out."""
        text = _read(self.path(address) / "resource") or ""
        bars = []
        for index, line in enumerate(text.splitlines()[:7]):
            try:
                start, end, flags = (int(x, 16) for x in line.split())
            except ValueError:
                continue
            if end <= start and not flags:
                continue
            bars.append(
                Bar(
                    index=index,
                    start=start,
                    size=end - start + 1 if end >= start else 0,
                    kind=BarKind.IO if flags & 0x100 else BarKind.MEMORY,
                    is_64bit=bool(flags & 0x100000),
                    prefetchable=bool(flags & 0x2000),
                )
            )
        return tuple(bars)

    def vfio_cdev(self, address: str) -> str | None:
        entries = _entries(self.path(address) / "vfio-dev")
        return entries[0].name if entries else None

    # in-use checks
    def in_use(self, address: str, *, short: bool = False) -> tuple[str, ...]:
        """What uses this function: mounts, swaps, holders, links up, VFIO users.

        `short` gives the words `aiovfio ls` shows (`eth0 up`, `nvme0n1p1 on /`,
        `pid 812 python3`); else whole sentences for an error message.
        """
        device_dir = os.path.realpath(self.path(address))
        reasons: list[str] = []
        mounts = self._mounts()
        swaps = self._swaps()
        for entry in _entries(self.roots.sysfs / "class" / "block"):
            if not _is_under(os.path.realpath(entry), device_dir):
                continue
            name = entry.name
            for source, target in mounts:
                if source == f"/dev/{name}":
                    reasons.append(
                        f"{name} on {target}"
                        if short
                        else f"block device {name} is mounted on {target}"
                    )
            if f"/dev/{name}" in swaps:
                reasons.append(f"{name} swap" if short else f"block device {name} is used as swap")
            holders = [h.name for h in _entries(entry / "holders")]
            if holders:
                reasons.append(
                    f"{name} held by {','.join(holders)}"
                    if short
                    else f"block device {name} is held by {', '.join(holders)}"
                )
        for entry in _entries(self.roots.sysfs / "class" / "net"):
            if not _is_under(os.path.realpath(entry), device_dir):
                continue
            if _interface_up(entry):
                reasons.append(
                    f"{entry.name} up" if short else f"network interface {entry.name} is up"
                )
        for pid, comm, target in self._vfio_users(address):
            reasons.append(
                f"pid {pid} {comm}" if short else f"process {pid} ({comm}) has {target} open"
            )
        return tuple(reasons)

    def _mounts(self) -> list[tuple[str, str]]:
        for candidate in ("self/mounts", "mounts"):
            text = _read(self.roots.proc / candidate)
            if text is not None:
                out = []
                for line in text.splitlines():
                    parts = line.split()
                    if len(parts) >= 2:
                        out.append((parts[0], parts[1].replace("\\040", " ")))
                return out
        return []

    def _swaps(self) -> set[str]:
        text = _read(self.roots.proc / "swaps") or ""
        return {line.split()[0] for line in text.splitlines()[1:] if line.split()}

    def _vfio_users(self, address: str) -> list[tuple[str, str, str]]:
        """Processes holding the function's VFIO group or cdev open: (pid, comm, node)."""
        function = self.function(address)
        if function.driver != VFIO_DRIVER:
            return []
        names = set()
        if function.iommu_group is not None:
            names.add(f"vfio/{function.iommu_group}")
        cdev = self.vfio_cdev(address)
        if cdev:
            names.add(f"vfio/devices/{cdev}")
        wanted = {f"/dev/{n}" for n in names} | {str(self.roots.dev / n) for n in names}
        users: list[tuple[str, str, str]] = []
        for pid_dir in _entries(self.roots.proc):
            if not pid_dir.name.isdigit() or pid_dir.name == str(os.getpid()):
                continue
            for fd in _entries(pid_dir / "fd"):
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target in wanted:
                    comm = _read(pid_dir / "comm") or "?"
                    users.append((pid_dir.name, comm, target))
                    break
        return users


def _is_under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _interface_up(entry: Path) -> bool:
    flags = _read(entry / "flags")
    if flags:
        with contextlib.suppress(ValueError):
            return bool(int(flags, 16) & 0x1)  # IFF_UP
    return _read(entry / "operstate") in ("up", "unknown")


def _is_noiommu_group(group_dir: Path) -> bool:
    try:
        return (group_dir / "name").read_text().strip() == "vfio-noiommu"
    except OSError:
        return False
