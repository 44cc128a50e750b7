"""The `aiovfio` command line against a sysfs tree in tmp_path (see conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from conftest import EDU, ICH9_SATA, ICH9_SMBUS, NVME, FakeKernel

import aiovfio.cli.binding
from aiovfio.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The one line a failure (`aiovfio: ...`) or usage error (`aiovfio CMD: ...`) prints."""
    lines = [line for line in err.splitlines() if line.startswith("aiovfio")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --- ls ------------------------------------------------------------------------------


def test_ls_shows_edu_and_nvme_with_groups(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "ls")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "ADDRESS",
        "CLASS",
        "DEVICE",
        "DRIVER",
        "GROUP",
        "VIABLE",
        "IN",
        "USE",
    ]
    edu = next(line for line in lines if line.startswith(EDU))
    nvme = next(line for line in lines if line.startswith(NVME))
    assert "Device [1234:11e8]" in edu  # pci.ids does not know QEMU's edu
    assert "Unclassified device [00ff]" in edu
    assert edu.split()[-4:] == ["vfio-pci", "4", "yes", "-"]
    assert "Red Hat, Inc. QEMU NVM Express Controller [1b36:0010]" in nvme
    assert "Non-Volatile memory controller (NVM Express) [0108]" in nvme
    assert nvme.split()[-4:] == ["nvme", "5", "no", "-"]


def test_ls_json_and_filters(fake: FakeKernel, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "ls", "--json")
    assert code == 0
    document = json.loads(out)
    assert document["format"] == 1
    rows = {r["address"]: r for r in document["functions"]}
    assert rows[NVME]["vendor_name"] == "Red Hat, Inc."
    assert rows[NVME]["device_name"] == "QEMU NVM Express Controller"
    assert rows[ICH9_SATA]["subsystem_name"] == "QEMU Virtual Machine"
    assert rows[EDU]["vendor_name"] is None
    assert rows[NVME]["in_use"] == []
    assert rows[EDU]["iommu_group"] == 4
    assert rows[EDU]["viable"] is True
    assert rows[NVME] | {"viable": None} == rows[NVME] | {
        "vendor": "1b36",
        "device": "0010",
        "class": "010802",
        "driver": "nvme",
        "iommu_group": 5,
        "viable": None,
    }

    def addresses(*argv: str) -> list[str]:
        code, out, _ = run(capsys, "ls", "--json", *argv)
        assert code == 0
        return [r["address"] for r in json.loads(out)["functions"]]

    assert addresses("--vendor", "1234") == [EDU]
    assert addresses("--vendor", "red hat") == [NVME]
    assert addresses("--vendor", "intel", "--device", "smbus") == [ICH9_SMBUS]
    assert addresses("--device", "nvm express") == [NVME]
    assert addresses("--device", "2922") == [ICH9_SATA]
    assert addresses("--class", "non-volatile") == [NVME]
    assert addresses("--vendor", "0x1b36:0010") == [NVME]
    assert addresses("--vendor", "1b36:ffff") == []
    assert addresses("--class", "0108") == [NVME]
    assert addresses("--class", "sata") == [ICH9_SATA]
    assert addresses("--driver", "vfio-pci") == [EDU]
    assert addresses("--driver", "none") == ["0000:00:00.0"]


def test_ls_unknown_vendor_name_is_one_line(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "ls", "--vendor", "xyzzy")
    assert code == 2
    assert "no vendor in pci.ids has that in its name" in one_error_line(err)


def test_ls_says_when_there_is_no_iommu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    k = FakeKernel(tmp_path)
    k.add_function("0000:00:03.0", (0x8086, 0x100E), 0x020000, group=None, driver="e1000")
    monkeypatch.setenv("AIOVFIO_SYSFS", str(k.sysfs))
    code, out, err = run(capsys, "ls")
    assert code == 0
    assert "0000:00:03.0" in out
    assert "no IOMMU groups" in err


# --- bind / unbind -------------------------------------------------------------------


def test_bind_unbind_round_trip(fake: FakeKernel, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "bind", "05.0")
    assert code == 0, err
    assert out.strip() == f"{NVME}: nvme -> vfio-pci"
    assert fake.driver_of(NVME) == "vfio-pci"
    state = json.loads(fake.roots.state.read_text())
    assert state["devices"][NVME]["driver"] == "nvme"

    code, out, _ = run(capsys, "ls", "--json", "--vendor", "1b36")
    assert json.loads(out)["functions"][0]["viable"] is True

    code, out, _ = run(capsys, "bind", "0000:00:05.0")
    assert (code, out.strip()) == (0, f"{NVME}: already bound to vfio-pci")

    code, out, err = run(capsys, "unbind", "00:05.0")
    assert code == 0, err
    assert out.strip() == f"{NVME}: vfio-pci -> nvme"
    assert fake.driver_of(NVME) == "nvme"


def test_bind_group(fake: FakeKernel, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "bind", "1f.2")
    assert code == 0
    assert "group 6 is not viable yet" in err
    assert f"aiovfio bind --group {ICH9_SATA}" in err
    code, out, err = run(capsys, "bind", "--group", "1f.2")
    assert code == 0
    assert len(out.splitlines()) == 3
    assert "not viable" not in err
    code, out, _ = run(capsys, "unbind", "--group", "1f.0")
    assert code == 0
    assert out.splitlines()[-1].endswith("vfio-pci -> i801_smbus")


def test_bind_refuses_a_mounted_device_unless_forced(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    with (fake.proc / "self" / "mounts").open("a") as f:
        f.write("/dev/nvme0n1 /data xfs rw 0 0\n")
    code, _, err = run(capsys, "bind", NVME)
    assert code == 1
    line = one_error_line(err)
    assert "nvme0n1 is mounted on /data" in line
    assert "--force" in line
    assert fake.driver_of(NVME) == "nvme"
    code, _, _ = run(capsys, "bind", "--force", NVME)
    assert code == 0
    assert fake.driver_of(NVME) == "vfio-pci"


def test_bind_refuses_an_interface_that_is_up(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.add_net(ICH9_SATA, "enp0s31f2", up=True)
    code, _, err = run(capsys, "bind", ICH9_SATA)
    assert code == 1
    assert "network interface enp0s31f2 is up" in one_error_line(err)


def test_bind_when_vfio_pci_is_not_loaded(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.remove_driver("vfio-pci")
    code, _, err = run(capsys, "bind", NVME)
    assert code == 1
    line = one_error_line(err)
    assert "`modprobe vfio-pci`" in line
    assert "--load" in line
    code, out, _ = run(capsys, "bind", "--load", NVME)
    assert code == 0
    assert fake.commands == [["modprobe", "vfio-pci"]]
    assert out.strip().endswith("nvme -> vfio-pci")


def test_bind_when_not_root(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(path: object, value: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(aiovfio.cli.binding, "write_attribute", denied)
    code, _, err = run(capsys, "bind", NVME)
    assert code == 1
    line = one_error_line(err)
    assert "needs root" in line
    assert "sudo" in line


def test_bind_without_iommu(fake: FakeKernel, capsys: pytest.CaptureFixture[str]) -> None:
    fake.add_function("0000:00:03.0", (0x8086, 0x100E), 0x020000, group=None, driver="e1000")
    code, _, err = run(capsys, "bind", "03.0")
    assert code == 1
    line = one_error_line(err)
    assert "no IOMMU group" in line
    assert "intel_iommu=on" in line


# --- doctor --------------------------------------------------------------------------


def test_doctor_reports_a_group_that_is_not_viable(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    # the deliberately broken setup: nvme on vfio-pci, a second function of its
    # group (an audio controller) still bound to its kernel driver
    run(capsys, "bind", NVME)
    fake.add_function("0000:00:05.1", (0x8086, 0x293E), 0x040300, group=5, driver="snd_hda_intel")
    code, out, _ = run(capsys, "doctor", "05.0")
    assert code == 1
    line = next(line for line in out.splitlines() if "group 5" in line)
    assert line.startswith("[FAIL]")
    assert "0000:00:05.1 is bound to snd_hda_intel" in line
    fix = out.splitlines()[out.splitlines().index(line) + 1]
    assert "fix:" in fix
    assert f"aiovfio bind --group {NVME}" in fix
    assert "aiovfio bind 0000:00:05.1" in fix

    code, out, _ = run(capsys, "doctor", "--json", NVME)
    data = json.loads(out)
    assert (code, data["ok"]) == (1, False)
    group = next(c for c in data["checks"] if c["name"] == "group 5")
    assert group["status"] == "fail"

    run(capsys, "bind", "--group", NVME)
    code, out, _ = run(capsys, "doctor", "--json", NVME)
    assert (code, json.loads(out)["ok"]) == (0, True)


def test_doctor_on_a_healthy_tree(fake: FakeKernel, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "doctor")
    assert code == 0, out
    assert "ready for VFIO" in err
    names = [line[7:].split()[0] for line in out.splitlines() if line.startswith("[")]
    assert names[:7] == ["sysfs", "machine", "iommu", "cmdline", "modules", "dev-vfio", "memlock"]
    assert any(line.startswith("[ ok ] group 4") for line in out.splitlines())
    for name in ("iommufd", "noiommu", "hugepages"):
        assert name in names


def test_doctor_finds_every_problem(fake: FakeKernel, capsys: pytest.CaptureFixture[str]) -> None:
    # no IOMMU, no modules, no /dev/vfio, a small memlock limit, noiommu on
    import shutil

    shutil.rmtree(fake.sysfs / "kernel" / "iommu_groups")
    shutil.rmtree(fake.sysfs / "class" / "iommu")
    shutil.rmtree(fake.sysfs / "module" / "vfio_pci")
    fake.remove_driver("vfio-pci")
    (fake.dev / "vfio" / "vfio").unlink()
    (fake.sysfs / "module" / "vfio" / "parameters" / "enable_unsafe_noiommu_mode").write_text("Y\n")
    (fake.proc / "cmdline").write_text("quiet\n")
    (fake.proc / "self" / "limits").write_text("Max locked memory  8388608  8388608  bytes\n")
    code, out, _ = run(capsys, "doctor", "--json", "--memlock", "1G")
    assert code == 1
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert checks["iommu"]["status"] == "fail"
    assert "intel_iommu=on" in checks["iommu"]["fix"]
    assert checks["cmdline"]["status"] == "warn"
    assert checks["modules"]["status"] == "fail"
    assert "vfio_pci" in checks["modules"]["summary"]
    assert "modprobe vfio-pci" in checks["modules"]["fix"]
    assert checks["dev-vfio"]["status"] == "fail"
    assert checks["memlock"]["status"] == "fail"
    assert "ulimit -l" in checks["memlock"]["fix"]
    assert checks["noiommu"]["status"] == "warn"
    assert checks["iommufd"]["status"] == "info"
    assert checks["hugepages"]["status"] == "info"


def test_doctor_memlock_passes_with_cap_ipc_lock(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    (fake.proc / "self" / "status").write_text("CapEff:\t000001ffffffffff\n")
    _, out, _ = run(capsys, "doctor", "--json", "--memlock", "1T")
    memlock = next(c for c in json.loads(out)["checks"] if c["name"] == "memlock")
    assert memlock["status"] == "ok"
    assert "CAP_IPC_LOCK" in memlock["summary"]


def test_doctor_iommufd_and_hugepages(fake: FakeKernel, capsys: pytest.CaptureFixture[str]) -> None:
    (fake.dev / "iommu").touch()
    (fake.dev / "vfio" / "devices").mkdir()
    (fake.dev / "vfio" / "devices" / "vfio0").touch()
    huge = fake.sysfs / "kernel" / "mm" / "hugepages" / "hugepages-2048kB"
    (huge / "nr_hugepages").write_text("64\n")
    (huge / "free_hugepages").write_text("60\n")
    _, out, _ = run(capsys, "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert checks["iommufd"]["status"] == "ok"
    assert "vfio0" in checks["iommufd"]["summary"]
    assert checks["hugepages"] == {
        "name": "hugepages",
        "status": "ok",
        "summary": "2048kB: 64 (60 free)",
        "fix": None,
    }


def test_doctor_on_a_kernel_where_iommufd_serves_the_container(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    # CONFIG_IOMMUFD_VFIO_CONTAINER: no vfio_iommu_type1, /dev/iommu serves /dev/vfio/vfio
    import shutil

    shutil.rmtree(fake.sysfs / "module" / "vfio_iommu_type1")
    code, out, _ = run(capsys, "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert (code, checks["modules"]["status"]) == (1, "fail")
    assert "vfio_iommu_type1" in checks["modules"]["summary"]
    (fake.dev / "iommu").touch()
    code, out, _ = run(capsys, "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert (code, checks["modules"]["status"]) == (0, "ok"), checks["modules"]
    assert "iommufd serves the container" in checks["modules"]["summary"]


def _noiommu_mode(fake: FakeKernel) -> None:
    """No IOMMU, VFIO's unsafe noiommu mode on: edu in noiommu group 0, as Linux shows it."""
    import shutil

    shutil.rmtree(fake.sysfs / "class" / "iommu")
    (fake.sysfs / "module" / "vfio" / "parameters" / "enable_unsafe_noiommu_mode").write_text("Y\n")
    (fake.proc / "cmdline").write_text("console=ttyS0 vfio.enable_unsafe_noiommu_mode=1\n")


def test_bind_in_noiommu_mode_takes_the_opt_in(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # without an IOMMU a device gets its (noiommu) group only when vfio-pci binds it
    monkeypatch.delenv("AIOVFIO_NOIOMMU", raising=False)
    _noiommu_mode(fake)
    fake.add_function("0000:00:06.0", (0x1B36, 0x0010), 0x010802, group=None, driver="nvme")
    code, _, err = run(capsys, "bind", "06.0")
    assert code == 1
    line = one_error_line(err)
    assert "noiommu group" in line and "--noiommu" in line and "physical memory" in line
    assert fake.driver_of("0000:00:06.0") == "nvme"
    code, out, err = run(capsys, "--noiommu", "bind", "06.0")
    assert code == 0, err
    assert out.strip() == "0000:00:06.0: nvme -> vfio-pci"


def test_doctor_and_info_in_noiommu_mode(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIOVFIO_NOIOMMU", raising=False)
    _noiommu_mode(fake)
    for group in fake.sysfs.joinpath("kernel", "iommu_groups").iterdir():
        (group / "name").write_text("vfio-noiommu\n")
        node = fake.dev / "vfio" / group.name
        if node.exists():
            node.rename(fake.dev / "vfio" / f"noiommu-{group.name}")
    code, out, _ = run(capsys, "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert checks["iommu"]["status"] == "warn", checks["iommu"]
    assert "noiommu group" in checks["iommu"]["summary"]
    assert "--noiommu" in checks["iommu"]["fix"]
    assert checks["noiommu"]["status"] == "warn"
    assert checks["cmdline"]["status"] != "ok"  # no "the kernel enables it by default"
    code, out, _ = run(capsys, "info", "--json", "04.0")
    data = json.loads(out)
    assert (code, data["source"]) == (0, "sysfs")
    assert data["why_sysfs"] == "it is in noiommu group 4: pass --noiommu to open it"


# --- info ----------------------------------------------------------------------------


def test_info_from_sysfs(fake: FakeKernel, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "info", "05.0")
    assert code == 0
    assert out.splitlines()[0].startswith(
        f"{NVME}  Non-Volatile memory controller (NVM Express) [0108]: "
        "Red Hat, Inc. QEMU NVM Express Controller [1b36:0010] rev 02"
    )
    assert "in use: nvme0n1 on /" not in out
    assert "reset: opening it through VFIO resets it (flr, pm)" in out
    assert "IOMMU group 5: NOT viable" in out
    assert "from sysfs only: it is bound to nvme, not vfio-pci" in out
    assert "BAR0" in out
    assert "capabilities: MSIX@0x40, PM@0x60, EXP@0x80" in out

    code, out, _ = run(capsys, "info", "--json", "--no-open", EDU)
    data = json.loads(out)
    assert data["format"] == 1
    assert data["source"] == "sysfs"
    assert data["reset"].startswith("it has no reset method")
    assert data["group"]["members"] == [{"address": EDU, "driver": "vfio-pci"}]
    assert [c["name"] for c in data["capabilities"]] == ["MSI"]


def test_info_falls_back_when_vfio_cannot_open(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    # /dev/vfio/vfio in the tree is a regular file: the open works, the ioctl does not
    code, out, _ = run(capsys, "info", EDU)
    assert code == 0
    assert "from sysfs only: opening it through VFIO failed" in out


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["info", "zz:top"], "'zz:top' is not a PCI address"),
        (["bind", "0000:00:04"], "is not a PCI address"),
        (["unbind", "00:2a.0"], "device number 0x2a is above 0x1f"),
        (["info", "09.0"], "no PCI device 0000:00:09.0"),
        (["bind", "0000:01:00.0"], "no PCI device 0000:01:00.0"),
        (["doctor", "07.0"], "no PCI device 0000:00:07.0"),
        (["doctor", "--memlock", "lots"], "is not a size"),
    ],
)
def test_bad_input_is_one_line(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert expected in one_error_line(err)
    assert out == ""
    assert fake.writes == []


def test_no_sysfs_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--sysfs", f"{tmp_path}/nowhere", "ls")
    assert code == 1
    assert "is sysfs mounted" in one_error_line(err)
    code, _, err = run(capsys, "bind", "--sysfs", f"{tmp_path}/nowhere", "04.0")
    assert code == 1
    assert "is sysfs mounted" in one_error_line(err)


def test_verbose_shows_the_traceback(fake: FakeKernel, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "-v", "ls", "--sysfs", "/nonexistent/sys")
    assert code == 1
    assert "Traceback" in err
    assert err.rstrip().splitlines()[-1].startswith("aiovfio: no PCI devices in sysfs")


def test_verbose_logs_every_sysfs_write(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "bind", NVME)
    assert code == 0
    assert "sysfs.bind" in err
    assert "sysfs.write" not in err
    code, _, err = run(capsys, "unbind", "-v", NVME)
    assert code == 0
    assert "sysfs.unbind" in err
    writes = [line for line in err.splitlines() if "sysfs.write" in line]
    assert len(writes) == 3
    assert all("debug" in line for line in writes)


def test_main_leaves_structlog_as_it_found_it(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    structlog.reset_defaults()
    run(capsys, "ls")
    assert not structlog.is_configured()


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys)
    assert code == 2
    assert "usage: aiovfio" in err


def test_unknown_option_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "ls", "--bogus")
    assert code == 2
    assert "unrecognized arguments: --bogus" in one_error_line(err)
    assert out == ""


def test_vm_is_dispatched(monkeypatch: pytest.MonkeyPatch) -> None:
    import aiovfio.testing.vm

    seen: list[list[str]] = []

    def fake_vm(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    monkeypatch.setattr(aiovfio.testing.vm, "main", fake_vm)
    assert main(["vm", "--", "true"]) == 7
    assert seen == [["--", "true"]]


def test_python_dash_m_runs_the_cli(fake: FakeKernel) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "aiovfio", "ls", "--driver", "vfio-pci"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert EDU in proc.stdout
