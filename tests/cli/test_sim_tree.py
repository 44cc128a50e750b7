"""The command line against the sysfs tree the simulated machine writes (`Machine.write_sysfs`).

The machine is the source of truth: `SimSysfsKernel` turns each binding write
into `Machine.set_driver` and writes the tree again, so after `aiovfio bind`
the simulated kernel itself sees the function on vfio-pci, and
`aiovfio.open_device` works on it.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import pytest
from conftest import EDU, NVME, _write_attribute, write_dev_and_proc

import aiovfio
import aiovfio.cli.binding
from aiovfio.cli import main
from aiovfio.cli.sysfs import Roots
from aiovfio.sim import Machine
from aiovfio.sim.models import Edu, Nvme


class SimSysfsKernel:
    """Applies sysfs binding writes to a simulated machine and rewrites its tree."""

    def __init__(self, machine: Machine, sysfs: Path, native: dict[str, str]) -> None:
        self.machine = machine
        self.sysfs = sysfs
        self.native = native
        self.loaded = {"vfio-pci", "pci-stub", *native.values()}
        self.overrides: dict[str, str] = {}
        self.sync()

    def sync(self) -> None:
        self.machine.write_sysfs(self.sysfs)
        drivers = self.sysfs / "bus" / "pci" / "drivers"
        for name in self.loaded:
            (drivers / name).mkdir(exist_ok=True)
            for attr in ("bind", "unbind"):
                (drivers / name / attr).touch()
        for bdf, override in self.overrides.items():
            (self.sysfs / "bus" / "pci" / "devices" / bdf / "driver_override").write_text(
                override + "\n"
            )

    def driver(self, bdf: str) -> str | None:
        return self.machine.kernel.driver(bdf)

    def _matches(self, bdf: str, driver: str) -> bool:
        override = self.overrides.get(bdf)
        return driver == override if override else self.native.get(bdf) == driver

    def write(self, path: Path, value: str) -> None:
        _write_attribute(path, value)
        rel = Path(os.path.realpath(path)).relative_to(os.path.realpath(self.sysfs))
        bdf = value.strip()
        if rel.name == "driver_override":
            device = rel.parent.name
            if bdf:
                self.overrides[device] = bdf
            else:
                self.overrides.pop(device, None)
        elif rel.parts == ("bus", "pci", "drivers_probe"):
            if self.driver(bdf) is None:
                for name in sorted(self.loaded):
                    if self._matches(bdf, name):
                        self.machine.set_driver(bdf, name)
                        break
        elif rel.name == "unbind":
            if self.driver(bdf) != rel.parent.name:
                raise OSError(errno.ENODEV, "No such device")
            self.machine.set_driver(bdf, None)
        elif rel.name == "bind":
            if self.driver(bdf) is not None or not self._matches(bdf, rel.parent.name):
                raise OSError(errno.ENODEV, "No such device")
            self.machine.set_driver(bdf, rel.parent.name)
        else:
            raise AssertionError(f"unexpected sysfs write {rel} = {value!r}")
        self.sync()

    def run(self, argv: Sequence[str]) -> None:
        assert list(argv[:1]) == ["modprobe"], argv
        self.loaded.add(argv[1])
        self.sync()


@pytest.fixture
def sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimSysfsKernel]:
    """edu (group 4, vfio-pci) and nvme (group 5, the nvme driver) on a simulated machine."""
    with Machine() as machine:
        machine.add_device(Edu(), name=EDU, group=4)
        machine.add_device(Nvme(size=1 << 20), name=NVME, group=5, driver="nvme")
        roots = Roots(
            sysfs=tmp_path / "sys",
            dev=tmp_path / "dev",
            proc=tmp_path / "proc",
            state=tmp_path / "run" / "drivers.json",
        )
        kernel = SimSysfsKernel(machine, roots.sysfs, native={NVME: "nvme"})
        write_dev_and_proc(roots)
        for name in ("sysfs", "dev", "proc", "state"):
            monkeypatch.setenv(f"AIOVFIO_{name.upper()}", str(getattr(roots, name)))
        monkeypatch.setattr(aiovfio.cli.binding, "write_attribute", kernel.write)
        monkeypatch.setattr(aiovfio.cli.binding, "run_command", kernel.run)
        yield kernel
        assert machine.leaks() == []


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_shows_edu_and_nvme_with_their_groups(
    sim: SimSysfsKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "ls")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == {EDU, NVME}
    assert "Device [1234:11e8]" in rows[EDU]
    assert rows[EDU].split()[-4:] == ["vfio-pci", "4", "yes", "-"]
    assert "(NVM Express) [0108]" in rows[NVME]
    assert rows[NVME].split()[-4:] == ["nvme", "5", "no", "-"]


def test_bind_unbind_round_trip_reaches_the_machine(
    sim: SimSysfsKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "bind", "05.0")
    assert (code, out.strip()) == (0, f"{NVME}: nvme -> vfio-pci"), err
    assert sim.machine.kernel.driver(NVME) == "vfio-pci"

    async def open_it() -> int:
        async with aiovfio.open_device(NVME, kernel=sim.machine.kernel) as dev:
            return dev.config.vendor_id

    assert anyio.run(open_it) == 0x1B36

    code, out, _ = run(capsys, "ls", "--json", "--driver", "vfio-pci")
    assert {r["address"]: r["viable"] for r in json.loads(out)["functions"]} == {
        EDU: True,
        NVME: True,
    }

    code, out, err = run(capsys, "unbind", NVME)
    assert (code, out.strip()) == (0, f"{NVME}: vfio-pci -> nvme"), err
    assert sim.machine.kernel.driver(NVME) == "nvme"


def test_doctor_reports_the_broken_group_and_the_fix_works(
    sim: SimSysfsKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.machine.add_device(Edu(), name="0000:00:05.1", group=5, driver="e1000e")
    sim.native["0000:00:05.1"] = "e1000e"
    sim.loaded.add("e1000e")
    run(capsys, "bind", NVME)
    code, out, _ = run(capsys, "doctor", NVME)
    assert code == 1
    lines = out.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("[FAIL] group 5"))
    assert "0000:00:05.1 is bound to e1000e" in lines[index]
    assert f"fix: `aiovfio bind --group {NVME}`" in lines[index + 1]

    code, _, err = run(capsys, "bind", "--group", NVME)
    assert code == 0, err
    code, out, _ = run(capsys, "doctor", "--json", NVME)
    assert (code, json.loads(out)["ok"]) == (0, True)
    assert sim.machine.kernel.driver("0000:00:05.1") == "vfio-pci"
    run(capsys, "unbind", "--group", NVME)
    assert sim.machine.kernel.driver("0000:00:05.1") == "e1000e"


def test_info_from_the_sim_tree(sim: SimSysfsKernel, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "info", "--json", "--no-open", NVME)
    assert code == 0
    data = json.loads(out)
    assert data["reset"].startswith("opening it through VFIO resets it (flr)")
    caps = {c["name"] for c in data["capabilities"]}
    assert {"MSIX", "EXP"} <= caps
    assert data["regions"][0]["name"] == "BAR0"
    code, out, _ = run(capsys, "info", "--no-open", EDU)
    assert "it has no reset method" in out
    assert "capabilities: MSI@" in out
