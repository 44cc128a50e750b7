"""Moving PCI functions between their drivers and vfio-pci: the binding policy.

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
import fcntl
import json
import os
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from attrs import define, frozen

from .. import _log
from ..errors import InvalidArgument, NoiommuRefused, SetupError, VfioUnavailable
from ..noiommu import NOIOMMU_RISK, opted_in
from .sysfs import VFIO_DRIVER, PciFunction, Roots, Sysfs

__all__ = [
    "BindError",
    "BindResult",
    "Binder",
    "DeviceInUse",
    "DriverState",
    "PermissionRequired",
    "SavedBinding",
    "run_command",
    "write_attribute",
]


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

    def load_driver(self, name: str) -> None:
        """`modprobe NAME`, then require /sys/bus/pci/drivers/NAME."""
        self._check_driver_name(name)
        self._run(["modprobe", name])
        if not self.sysfs.driver_loaded(name):
            raise SetupError(
                f"`modprobe {name}` ran but {self.sysfs.pci_drivers_dir / name} did not appear: "
                "is it a PCI driver? see `dmesg`"
            )

    def _check_driver_name(self, name: str) -> None:
        if not name or "/" in name or name.startswith(".") or "\0" in name:
            raise InvalidArgument(
                f"{name!r} is not a driver name: write one of {self.sysfs.pci_drivers_dir}"
            )

    def _require_group(self, function: PciFunction) -> int | None:
        """The function's IOMMU group; None for one that gets a noiommu group when bound."""
        if function.iommu_group is None and self.sysfs.noiommu_mode():
            if opted_in():
                return None  # vfio-pci's probe gives it a noiommu group
            raise NoiommuRefused(
                f"{function.address} has no IOMMU group and VFIO's unsafe noiommu mode is on: "
                "binding it to vfio-pci gives it a noiommu group, and pass --noiommu to "
                f"allow that, which risks this: {NOIOMMU_RISK}"
            )
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
        if number is None:  # noiommu: a group of its own once bound
            return [address]
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
        if to is not None:
            self._check_driver_name(to)
            if not self.sysfs.driver_loaded(to):
                if not load:
                    raise InvalidArgument(
                        f"no driver {to} in {self.sysfs.pci_drivers_dir}: `modprobe {to}` first, "
                        "or pass --load"
                    )
                self.load_driver(to)
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
        self,
        address: str,
        *,
        to: str | None = None,
        leave_unbound: bool = False,
        force: bool = False,
        load: bool = False,
    ) -> list[BindResult]:
        """Release every vfio-pci function of the group to its previous driver (or `to`)."""
        return [
            self.unbind(t, to=to, leave_unbound=leave_unbound, force=force, load=load)
            for t in self.group_targets(address)
        ]
