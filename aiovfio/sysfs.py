"""PCI discovery and driver binding through sysfs, rooted at configurable paths.

Everything here reads and writes plain files under `Roots` (`/sys`, `/dev`,
`/proc` and a state file), so the same code runs on a real machine, inside
the QEMU guest, and on a tree written by the simulated machine in a test.

Binding follows the kernel's documented sequence (what `driverctl` and DPDK's
`dpdk-devbind` do): write `vfio-pci` to the function's `driver_override`,
unbind it from its current driver, then write its address to
`bus/pci/drivers_probe`. The driver it had before is remembered in a small
JSON state file (default `/run/aiovfio/drivers.json`, a tmpfs that forgets
with the boot, as the bindings do; `AIOVFIO_STATE` or `--state` moves it) so
that `unbind` gives the function back to that driver.

A regular file tree does not react to those writes the way the kernel does,
so every write goes through `Binder.writer` and every module load through
`Binder.runner`: tests inject a fake that plays the kernel's part.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from attrs import define, field, frozen

from . import _log
from ._uapi.pci import CAP_LIST_OFFSET, CONFIG_SPACE_SIZE, EXT_CAP_START, CapId, ExtCapId
from ._util import keeps_group_viable, normalize_bdf
from .errors import DeviceNotFound, Offender, SetupError, VfioUnavailable
from .kernel.protocol import PciIds

__all__ = [
    "VFIO_DRIVER",
    "Bar",
    "BindError",
    "BindResult",
    "Binder",
    "Capability",
    "DeviceInUse",
    "DriverState",
    "GroupMember",
    "IommuGroup",
    "PciFunction",
    "PermissionRequired",
    "Roots",
    "SavedBinding",
    "Sysfs",
    "class_name",
    "is_vfio_compatible",
    "normalize_bdf",
    "run_command",
    "walk_capabilities",
    "write_attribute",
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


_BASE_CLASSES = {
    0x00: "Unclassified device",
    0x01: "Mass storage controller",
    0x02: "Network controller",
    0x03: "Display controller",
    0x04: "Multimedia controller",
    0x05: "Memory controller",
    0x06: "Bridge",
    0x07: "Communication controller",
    0x08: "Generic system peripheral",
    0x09: "Input device controller",
    0x0A: "Docking station",
    0x0B: "Processor",
    0x0C: "Serial bus controller",
    0x0D: "Wireless controller",
    0x0E: "Intelligent controller",
    0x0F: "Satellite communications controller",
    0x10: "Encryption controller",
    0x11: "Signal processing controller",
    0x12: "Processing accelerators",
    0x13: "Non-Essential Instrumentation",
    0x40: "Coprocessor",
    0xFF: "Unassigned class",
}

_SUB_CLASSES = {
    0x0000: "Non-VGA unclassified device",
    0x0001: "VGA compatible unclassified device",
    0x0100: "SCSI storage controller",
    0x0101: "IDE interface",
    0x0104: "RAID bus controller",
    0x0105: "ATA controller",
    0x0106: "SATA controller",
    0x0107: "Serial Attached SCSI controller",
    0x0108: "Non-Volatile memory controller",
    0x0200: "Ethernet controller",
    0x0207: "InfiniBand controller",
    0x0280: "Network controller",
    0x0300: "VGA compatible controller",
    0x0302: "3D controller",
    0x0380: "Display controller",
    0x0401: "Multimedia audio controller",
    0x0403: "Audio device",
    0x0500: "RAM memory",
    0x0600: "Host bridge",
    0x0601: "ISA bridge",
    0x0604: "PCI bridge",
    0x0680: "Bridge",
    0x0700: "Serial controller",
    0x0806: "IOMMU",
    0x0880: "System peripheral",
    0x0C03: "USB controller",
    0x0C04: "Fibre Channel",
    0x0C05: "SMBus",
    0x0C06: "InfiniBand",
    0x1200: "Processing accelerators",
}

_PROG_IFS = {
    0x010601: "SATA controller (AHCI)",
    0x010802: "NVM Express controller",
    0x0C0320: "USB controller (EHCI)",
    0x0C0330: "USB controller (xHCI)",
}


def class_name(class_code: int) -> str:
    """A readable name for a 24-bit PCI class code, as `lspci` shows it."""
    sub = class_code >> 8
    name = (
        _PROG_IFS.get(class_code)
        or _SUB_CLASSES.get(sub)
        or _BASE_CLASSES.get(class_code >> 16, "Unknown class")
    )
    return f"{name} [{sub:04x}]"


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

    # drivers and modules
    def driver_loaded(self, name: str) -> bool:
        return (self.pci_drivers_dir / name).is_dir()

    def module_loaded(self, name: str) -> bool:
        return (self.roots.sysfs / "module" / name.replace("-", "_")).is_dir()

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
    def in_use(self, address: str) -> tuple[str, ...]:
        """Why unbinding this function would hurt: mounts, swaps, holders, links up, VFIO users."""
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
                    reasons.append(f"block device {name} is mounted on {target}")
            if f"/dev/{name}" in swaps:
                reasons.append(f"block device {name} is used as swap")
            holders = [h.name for h in _entries(entry / "holders")]
            if holders:
                reasons.append(f"block device {name} is held by {', '.join(holders)}")
        for entry in _entries(self.roots.sysfs / "class" / "net"):
            if not _is_under(os.path.realpath(entry), device_dir):
                continue
            if _interface_up(entry):
                reasons.append(f"network interface {entry.name} is up")
        reasons.extend(self._vfio_users(address))
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

    def _vfio_users(self, address: str) -> list[str]:
        """Processes holding the function's VFIO group or cdev open."""
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
        users = []
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
                    users.append(f"process {pid_dir.name} ({comm}) has {target} open")
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


# --- state ---------------------------------------------------------------------


@frozen
class SavedBinding:
    """What a function had before `bind`: its driver and its driver_override."""

    driver: str | None
    driver_override: str | None = None


@define
class DriverState:
    """The JSON file that remembers previous drivers: `{"devices": {bdf: {...}}}`."""

    path: Path

    def get(self, address: str) -> SavedBinding | None:
        entry = self._load().get(address)
        if not isinstance(entry, dict):
            return None
        return SavedBinding(entry.get("driver"), entry.get("driver_override"))

    def put(self, address: str, saved: SavedBinding) -> None:
        with self._locked():
            devices = self._load()
            devices[address] = {"driver": saved.driver, "driver_override": saved.driver_override}
            self._store(devices)

    def forget(self, address: str) -> None:
        if not self.path.exists():
            return
        with self._locked():
            devices = self._load()
            if devices.pop(address, None) is not None:
                self._store(devices)

    def _load(self) -> dict[str, dict[str, str | None]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            _log.logger.warning("sysfs.state_unreadable", path=str(self.path))
            return {}
        devices = data.get("devices") if isinstance(data, dict) else None
        return devices if isinstance(devices, dict) else {}

    def _store(self, devices: Mapping[str, object]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"version": 1, "devices": devices}, indent=2, sort_keys=True))
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


# --- binding -------------------------------------------------------------------


class BindError(SetupError):
    """Binding or unbinding did not end with the driver it should have."""


class DeviceInUse(BindError):
    """The function is in use (mounted, a live interface, open through VFIO)."""


class PermissionRequired(SetupError):
    """Changing a binding needs root (write access to sysfs)."""


Writer = Callable[[Path, str], None]
Runner = Callable[[Sequence[str]], None]


def write_attribute(path: Path, value: str) -> None:
    """Write one sysfs attribute in a single write, as the kernel expects."""
    _log.debug("sysfs.write", path=str(path), value=value)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def run_command(argv: Sequence[str]) -> None:
    """Run a helper such as `modprobe`; raise `SetupError` with its output on failure."""
    _log.debug("sysfs.run", argv=list(argv))
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise SetupError(f"cannot run {argv[0]}: not found") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise SetupError(
            f"`{' '.join(argv)}` failed with status {proc.returncode}"
            + (f": {detail[-1]}" if detail else "")
        )


@frozen
class BindResult:
    """What a bind or unbind did to one function."""

    address: str
    before: str | None
    after: str | None
    changed: bool
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        before = self.before or "no driver"
        after = self.after or "no driver"
        if not self.changed:
            text = f"{self.address}: already bound to {after}"
        else:
            text = f"{self.address}: {before} -> {after}"
        return "; ".join((text, *self.notes))


@define
class Binder:
    """Moves PCI functions between their drivers and vfio-pci.

    `writer(path, value)` performs each sysfs write and `runner(argv)` each
    `modprobe`; both default to the real thing, and are looked up at call
    time so a test can substitute them.
    """

    sysfs: Sysfs
    state: DriverState
    writer: Writer | None = None
    runner: Runner | None = None

    @classmethod
    def from_roots(cls, roots: Roots) -> Binder:
        return cls(Sysfs(roots), DriverState(roots.state))

    def _write(self, path: Path, value: str, *, address: str) -> None:
        writer = self.writer or write_attribute
        try:
            writer(path, value)
        except PermissionError as exc:
            raise PermissionRequired(
                f"changing the driver of {address} needs root: cannot write {path} "
                f"({exc.strerror}); run it with sudo"
            ) from exc
        except OSError as exc:
            raise BindError(
                f"writing {value.strip() or 'an empty line'!r} to {path} failed: "
                f"{exc.strerror or exc}; see `dmesg` for the kernel's reason"
            ) from exc

    def _run(self, argv: Sequence[str]) -> None:
        (self.runner or run_command)(argv)

    def _check_writable(self, address: str) -> None:
        path = self.sysfs.path(address) / "driver_override"
        if not path.exists():
            raise BindError(
                f"{path} does not exist: this kernel has no driver_override (Linux >= 3.16 needed)"
            )
        if not os.access(path, os.W_OK):
            raise PermissionRequired(
                f"changing the driver of {address} needs root: {path} is not writable; "
                "run it with sudo"
            )

    def ensure_vfio_driver(self, *, load: bool = False) -> None:
        """Raise `VfioUnavailable` unless vfio-pci is loaded (or `load` loads it)."""
        if self.sysfs.driver_loaded(VFIO_DRIVER):
            return
        if not load:
            raise VfioUnavailable(
                "the vfio-pci driver is not loaded: run `modprobe vfio-pci` "
                "(or pass --load to have aiovfio run it)"
            )
        self._run(["modprobe", VFIO_DRIVER])
        if not self.sysfs.driver_loaded(VFIO_DRIVER):
            raise VfioUnavailable(
                f"`modprobe vfio-pci` ran but {self.sysfs.pci_drivers_dir / VFIO_DRIVER} "
                "did not appear; see `dmesg`"
            )

    def _require_group(self, function: PciFunction) -> int:
        if function.iommu_group is None:
            raise VfioUnavailable(
                f"{function.address} has no IOMMU group ({self.sysfs.path(function.address)}"
                "/iommu_group is missing): the IOMMU is off; enable VT-d/AMD-Vi in the "
                "firmware and boot with intel_iommu=on or amd_iommu=on; `aiovfio doctor` checks"
            )
        return function.iommu_group

    # bind

    def bind(self, address: str, *, force: bool = False, load: bool = False) -> BindResult:
        """Bind one function to vfio-pci, remembering its previous driver."""
        function = self.sysfs.function(address)
        self._require_group(function)
        self.ensure_vfio_driver(load=load)
        if function.driver == VFIO_DRIVER:
            if function.driver_override != VFIO_DRIVER:
                self._check_writable(address)
                self._write(
                    self.sysfs.path(address) / "driver_override", VFIO_DRIVER, address=address
                )
            return BindResult(address, VFIO_DRIVER, VFIO_DRIVER, changed=False)
        if not force:
            reasons = self.sysfs.in_use(address)
            if reasons:
                raise DeviceInUse(
                    f"{address} is in use: {'; '.join(reasons)}; stop using it first, "
                    "or pass --force"
                )
        self._check_writable(address)
        self.state.put(address, SavedBinding(function.driver, function.driver_override))
        path = self.sysfs.path(address)
        _log.logger.info("sysfs.bind", device=address, driver=function.driver, to=VFIO_DRIVER)
        self._write(path / "driver_override", VFIO_DRIVER, address=address)
        if function.driver is not None:
            self._write(path / "driver" / "unbind", address, address=address)
        self._write(
            self.sysfs.roots.sysfs / "bus" / "pci" / "drivers_probe", address, address=address
        )
        after = self.sysfs.driver(address)
        if after != VFIO_DRIVER:
            raise BindError(
                f"{address} is bound to {after or 'no driver'} after probing, not vfio-pci; "
                "see `dmesg` (a bridge or a device vfio-pci refuses?)"
            )
        return BindResult(address, function.driver, after, changed=True)

    def group_targets(self, address: str) -> list[str]:
        """The functions `--group` acts on: the group's members except bridges."""
        function = self.sysfs.function(address)
        number = self._require_group(function)
        return [
            m.address
            for m in self.sysfs.group(number).members
            if m.address == address or not self.sysfs.function(m.address).is_bridge
        ]

    def bind_group(
        self, address: str, *, force: bool = False, load: bool = False
    ) -> list[BindResult]:
        """Bind every function of the group (bridges stay with their driver)."""
        targets = self.group_targets(address)
        self.ensure_vfio_driver(load=load)
        if not force:
            busy = [
                f"{t}: {'; '.join(r)}"
                for t in targets
                if self.sysfs.driver(t) != VFIO_DRIVER and (r := self.sysfs.in_use(t))
            ]
            if busy:
                raise DeviceInUse(
                    f"group of {address} is in use: {' | '.join(busy)}; stop using it first, "
                    "or pass --force"
                )
        return [self.bind(t, force=True) for t in targets]

    def viability_note(self, address: str) -> str | None:
        """A sentence when the function's group is still not viable, else None."""
        group = self.sysfs.group_of(address)
        if group is None or group.viable:
            return None
        who = ", ".join(f"{o.name} is bound to {o.driver}" for o in group.offenders)
        return (
            f"group {group.number} is not viable yet: {who}; "
            f"bind the whole group with `aiovfio bind --group {address}`"
        )

    # unbind

    def unbind(
        self,
        address: str,
        *,
        to: str | None = None,
        leave_unbound: bool = False,
        force: bool = False,
        load: bool = False,
    ) -> BindResult:
        """Release a function from vfio-pci and give it back to its previous driver.

        The previous driver (and driver_override) comes from the state file;
        `to` names another driver and pins it with driver_override; without
        either the kernel picks (drivers_probe). `load` runs `modprobe` for a
        driver that is not loaded.
        """
        function = self.sysfs.function(address)
        path = self.sysfs.path(address)
        if function.driver != VFIO_DRIVER:
            return BindResult(
                address,
                function.driver,
                function.driver,
                changed=False,
                notes=("not bound to vfio-pci, nothing to do",),
            )
        if not force:
            reasons = self.sysfs.in_use(address)
            if reasons:
                raise DeviceInUse(
                    f"{address} is in use: {'; '.join(reasons)}; close it first (unbinding "
                    "would wait for it), or pass --force"
                )
        self._check_writable(address)
        saved = self.state.get(address)
        target = to if to is not None else (saved.driver if saved else None)
        if target == VFIO_DRIVER:
            target = None
        if to is not None:
            override: str | None = to  # pin it, as `driverctl set-override` does
        elif saved and saved.driver_override != VFIO_DRIVER:
            override = saved.driver_override
        else:
            override = None
        notes: list[str] = []
        if target and not self.sysfs.driver_loaded(target) and load:
            self._run(["modprobe", target])
        _log.logger.info("sysfs.unbind", device=address, to=target)
        # An empty line clears the override (the kernel treats "\n" as none).
        self._write(path / "driver_override", (override or "") + "\n", address=address)
        self._write(path / "driver" / "unbind", address, address=address)
        if not leave_unbound:
            if target and self.sysfs.driver_loaded(target):
                self._write(self.sysfs.pci_drivers_dir / target / "bind", address, address=address)
            else:
                self._write(
                    self.sysfs.roots.sysfs / "bus" / "pci" / "drivers_probe",
                    address,
                    address=address,
                )
        self.state.forget(address)
        after = self.sysfs.driver(address)
        if target and after != target and not leave_unbound:
            if not self.sysfs.driver_loaded(target):
                notes.append(f"{target} is not loaded: `modprobe {target}` binds it")
            else:
                notes.append(f"{target} did not take it; see `dmesg`")
        elif not target and after is None and not leave_unbound:
            notes.append("no driver claimed it (no previous driver was recorded)")
        return BindResult(address, VFIO_DRIVER, after, changed=True, notes=tuple(notes))

    def unbind_group(
        self, address: str, *, leave_unbound: bool = False, force: bool = False, load: bool = False
    ) -> list[BindResult]:
        """Release every vfio-pci function of the group to its previous driver."""
        return [
            self.unbind(t, leave_unbound=leave_unbound, force=force, load=load)
            for t in self.group_targets(address)
        ]
