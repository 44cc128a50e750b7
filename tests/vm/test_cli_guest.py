"""The `aiovfio` command line against the real sysfs of the QEMU guest.

    aiovfio vm -- python -m pytest -p no:cacheprovider tests/vm/test_cli_guest.py

At boot the guest binds edu and nvme to vfio-pci and loads no nvme driver;
these tests `modprobe nvme`, move the controller to the kernel's driver and
back with `aiovfio unbind` / `aiovfio bind`, and leave it on vfio-pci.
The binding state goes to a temporary file, not the guest's /run/aiovfio.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiovfio.cli import main, pciids
from aiovfio.cli.binding import Binder
from aiovfio.cli.sysfs import Roots, Sysfs


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "drivers.json"
    monkeypatch.setenv("AIOVFIO_STATE", str(path))
    return path


@pytest.fixture
def nvme_on_vfio(nvme_bdf: str, state: Path) -> Iterator[str]:
    """The nvme controller; whatever a test does, it ends bound to vfio-pci again."""
    yield nvme_bdf
    sysfs = Sysfs(Roots(state=state))
    if sysfs.driver(nvme_bdf) != "vfio-pci":
        Binder.from_roots(sysfs.roots).bind(nvme_bdf, force=True)
    assert sysfs.driver(nvme_bdf) == "vfio-pci"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def ls(capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, object]]:
    code, out, err = run(capsys, "ls", "--json")
    assert code == 0, err
    document = json.loads(out)
    assert document["format"] == 1
    return {row["address"]: row for row in document["functions"]}


def test_ls_shows_the_guest_devices(
    capsys: pytest.CaptureFixture[str], edu_bdf: str, nvme_bdf: str
) -> None:
    rows = ls(capsys)
    edu, nvme = rows[edu_bdf], rows[nvme_bdf]
    assert (edu["vendor"], edu["device"], edu["class"]) == ("1234", "11e8", "00ff00")
    assert (nvme["vendor"], nvme["device"], nvme["class"]) == ("1b36", "0010", "010802")
    for row in (edu, nvme):
        assert row["driver"] == "vfio-pci"
        assert isinstance(row["iommu_group"], int)
        assert row["viable"] is True
    assert edu["iommu_group"] != nvme["iommu_group"]
    names = pciids.names()  # the system's pci.ids (the host's, seen through the guest's root)
    assert nvme["vendor_name"] == names.vendor(0x1B36)
    assert nvme["device_name"] == names.device(0x1B36, 0x0010)
    assert nvme["in_use"] == []
    code, out, _ = run(capsys, "ls", "--vendor", "1234:11e8")
    assert code == 0
    assert edu_bdf in out
    assert nvme_bdf not in out


def test_unbind_to_nvme_and_back(
    capsys: pytest.CaptureFixture[str], nvme_on_vfio: str, state: Path
) -> None:
    bdf = nvme_on_vfio
    subprocess.run(["modprobe", "nvme"], check=True)
    # bound at boot, not by aiovfio: nothing is remembered, so the kernel picks nvme
    code, out, err = run(capsys, "unbind", bdf)
    assert code == 0, err
    assert out.strip() == f"{bdf}: vfio-pci -> nvme"
    row = ls(capsys)[bdf]
    # without an IOMMU, a device has a (noiommu) group only while vfio-pci holds it
    viable = None if os.environ.get("AIOVFIO_VM_IOMMU") == "none" else False
    assert (row["driver"], row["viable"], row["driver_override"]) == ("nvme", viable, None)

    code, out, err = run(capsys, "doctor", "--json", bdf)
    device = next(c for c in json.loads(out)["checks"] if c["name"] == "device")
    assert device["status"] == "warn"
    assert f"aiovfio bind {bdf}" in device["fix"]

    code, out, err = run(capsys, "bind", bdf)
    assert code == 0, err
    assert out.strip() == f"{bdf}: nvme -> vfio-pci"
    assert json.loads(state.read_text())["devices"][bdf]["driver"] == "nvme"
    assert ls(capsys)[bdf]["viable"] is True

    # now remembered: unbind restores nvme, bind goes back to vfio-pci
    code, out, err = run(capsys, "unbind", bdf)
    assert (code, out.strip()) == (0, f"{bdf}: vfio-pci -> nvme")
    code, out, err = run(capsys, "bind", bdf)
    assert (code, out.strip()) == (0, f"{bdf}: nvme -> vfio-pci")


@pytest.mark.needs_iommu("doctor's IOMMU and command-line checks pass only with an IOMMU")
def test_doctor_in_the_guest(capsys: pytest.CaptureFixture[str], edu_bdf: str) -> None:
    code, out, _ = run(capsys, "doctor", "--json", edu_bdf)
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert code == 0, checks
    for name in ("sysfs", "iommu", "cmdline", "modules", "dev-vfio", "memlock", "device"):
        assert checks[name]["status"] == "ok", checks[name]
    group = next(c for n, c in checks.items() if n.startswith("group "))
    assert group["status"] == "ok"
    assert "intel_iommu=on" in checks["cmdline"]["summary"]


@pytest.mark.needs_noiommu("doctor in VFIO's unsafe noiommu mode")
def test_doctor_in_a_noiommu_guest(capsys: pytest.CaptureFixture[str], edu_bdf: str) -> None:
    code, out, _ = run(capsys, "doctor", "--json", edu_bdf)
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert code == 0, checks  # warnings, no failure: the device can be driven, unsafely
    assert checks["iommu"]["status"] == "warn", checks["iommu"]
    assert "noiommu group" in checks["iommu"]["summary"]
    assert checks["noiommu"]["status"] == "warn"
    for name in ("sysfs", "modules", "dev-vfio", "memlock", "device"):
        assert checks[name]["status"] == "ok", checks[name]
    group = next(c for n, c in checks.items() if n.startswith("group "))
    assert group["status"] == "ok"
    assert "noiommu-" in checks["dev-vfio"]["summary"]


def test_info_opens_the_device(capsys: pytest.CaptureFixture[str], edu_bdf: str) -> None:
    code, out, err = run(capsys, "info", "--json", edu_bdf)
    assert code == 0, err
    data = json.loads(out)
    assert data["source"] == "vfio", data.get("why_sysfs")
    bar0 = next(r for r in data["regions"] if r["name"] == "BAR0")
    assert bar0["size"] == 1 << 20
    irqs = {i["name"]: i["count"] for i in data["irqs"]}
    assert (irqs["intx"], irqs["msi"], irqs["msix"]) == (1, 1, 0)
    assert [c["name"] for c in data["capabilities"]] == ["MSI"]
    assert data["reset"].startswith("it has no reset method")


def test_bad_input_in_the_guest(capsys: pytest.CaptureFixture[str], edu_bdf: str) -> None:
    # a usage error (exit 2), one line, and the edu stays where it was
    code, out, err = run(capsys, "bind", edu_bdf, "1f.7")
    assert code == 2
    assert err.splitlines() == [
        "aiovfio bind: no PCI device 0000:00:1f.7 in /sys/bus/pci/devices; `aiovfio ls` lists them"
    ]
    assert out == ""
    code, _, err = run(capsys, "unbind", "--to", "../..", edu_bdf)
    assert code == 2
    assert "'../..' is not a driver name" in err
    assert Sysfs(Roots()).driver(edu_bdf) == "vfio-pci"
