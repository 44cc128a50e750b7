"""The command line's contract with a newcomer: names, users, several addresses, a VM's
doctor, completion, and every argument's bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import EDU, ICH9_LPC, ICH9_SATA, ICH9_SMBUS, NVME, FakeKernel

from aiovfio.cli import main
from aiovfio.cli.pciids import PciNames
from aiovfio.cli.sysfs import Sysfs


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- bad input: every argument ------------------------------------------------------

BAD_INPUT = [
    (["info", "zz:top"], "'zz:top' is not a PCI address"),
    (["info"], "the following arguments are required: BDF"),
    (["info", "09.0"], "no PCI device 0000:00:09.0"),
    (["bind"], "the following arguments are required: BDF"),
    (["bind", EDU, "0000:00:04"], "is not a PCI address"),
    (["bind", NVME, "0000:01:00.0"], "no PCI device 0000:01:00.0"),
    (["bind", "--group", NVME, "1f.7"], "no PCI device 0000:00:1f.7"),
    (["unbind", "00:2a.0"], "device number 0x2a is above 0x1f"),
    (["unbind", "--to", "../..", EDU], "'../..' is not a driver name"),
    (["unbind", "--to", "/etc", EDU], "'/etc' is not a driver name"),
    (["unbind", "--to", "e1000e", EDU], "--to e1000e: no such driver"),
    (["unbind", "--to", "nvme", "--none", EDU], "not allowed with argument"),
    (["unbind", EDU, "07.0"], "no PCI device 0000:00:07.0"),
    (["doctor", "07.0"], "no PCI device 0000:00:07.0"),
    (["doctor", "--memlock", "lots"], "'lots' is not a size"),
    (["doctor", "--memlock", "inf"], "'inf' is not a size"),
    (["doctor", "--memlock", "nan"], "'nan' is not a size"),
    (["doctor", "--memlock=-5M"], "'-5M' is not a size"),
    (["doctor", "--memlock", "0"], "at least 1 byte"),
    (["doctor", "--memlock", "1" + "0" * 400], "is too large"),
    (["doctor", "--memlock", "64Q"], "'64Q' is not a size"),
    (["ls", "--vendor", "xyzzy"], "no vendor in pci.ids has that in its name"),
    (["ls", "--device", "no-such-thing"], "no device in pci.ids has that in its name"),
    (["ls", "--driver", "a/b"], "'a/b' is not a driver name"),
    (["ls", "--bogus"], "unrecognized arguments: --bogus"),
    (["demo", "--backend", "curio"], "invalid choice: 'curio'"),
    (["repl", "--backend", "curio"], "invalid choice: 'curio'"),
    (["completion", "fish"], "invalid choice: 'fish'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize(("argv", "expected"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    before = sorted(str(p) for p in fake.root.rglob("*"))
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("aiovfio")
    assert expected in lines[0]
    assert "Traceback" not in err
    assert out == ""
    assert fake.writes == []
    assert fake.commands == []
    assert sorted(str(p) for p in fake.root.rglob("*")) == before


def test_sizes_accept_what_people_write(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    for text, shown in (
        ("64M", "64 MiB"),
        ("1.5G", "1536 MiB"),
        ("2GiB", "2 GiB"),
        ("4096", "4 KiB"),
    ):
        (fake.proc / "self" / "limits").write_text("Max locked memory  1024  1024  bytes\n")
        code, out, _ = run(capsys, "doctor", "--json", "--memlock", text)
        assert code == 1  # a 1 KiB limit is below each of them
        memlock = next(c for c in json.loads(out)["checks"] if c["name"] == "memlock")
        assert shown in memlock["summary"], (text, memlock)


def test_exit_codes(fake: FakeKernel, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version")[0] == 0
    assert run(capsys, "ls", "--help")[0] == 0
    code, _, err = run(capsys)
    assert code == 2
    assert "usage: aiovfio" in err
    code, _, err = run(capsys, "bind", "--sysfs", "/nonexistent", EDU)
    assert code == 1  # a failure, not a usage error
    assert err.startswith("aiovfio: no PCI devices in sysfs")


# --- names ---------------------------------------------------------------------------


def test_pci_ids_reader() -> None:
    db = PciNames.parse(
        [
            "# comment\n",
            "8086  Intel Corporation\n",
            "\t10d3  82574L Gigabit Network Connection\n",
            "\t\t8086 a01f  Gigabit CT Desktop Adapter\n",
            "1b36  Red Hat, Inc.\n",
            "C 02  Network controller\n",
            "\t00  Ethernet controller\n",
            "C 0c  Serial bus controller\n",
            "\t03  USB controller\n",
            "\t\t30  XHCI\n",
        ]
    )
    assert db.vendor(0x8086) == "Intel Corporation"
    assert db.device(0x8086, 0x10D3) == "82574L Gigabit Network Connection"
    assert db.subsystem(0x8086, 0x10D3, 0x8086, 0xA01F) == "Gigabit CT Desktop Adapter"
    assert db.device(0x1B36, 0x10D3) is None
    assert db.class_name(0x020000) == "Ethernet controller [0200]"
    assert db.class_name(0x0C0330) == "USB controller (XHCI) [0c03]"
    assert db.class_name(0x0C0800) == "Serial bus controller [0c08]"
    assert (
        db.product(0x8086, 0x10D3)
        == "Intel Corporation 82574L Gigabit Network Connection [8086:10d3]"
    )
    assert db.vendors_named("INTEL") == {0x8086}
    assert db.devices_named("gigabit") == {(0x8086, 0x10D3)}
    assert PciNames().product(0x8086, 0x10D3) == "[8086:10d3]"


def test_without_pci_ids_ids_stand_in(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOVFIO_PCI_IDS", "")
    code, out, err = run(capsys, "ls")
    assert code == 0
    nvme = next(line for line in out.splitlines() if line.startswith(NVME))
    assert "Class [0108]" in nvme
    assert "[1b36:0010]" in nvme
    assert "apt-get install pci.ids" in err
    code, _, err = run(capsys, "ls", "--vendor", "intel")
    assert code == 2
    assert "names need the system's pci.ids" in err
    code, out, _ = run(capsys, "ls", "--json", "--vendor", "8086")
    assert code == 0
    assert len(json.loads(out)["functions"]) == 4


# --- what uses a device --------------------------------------------------------------


def test_ls_shows_what_uses_each_function(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    with (fake.proc / "self" / "mounts").open("a") as f:
        f.write("/dev/nvme0n1 /data xfs rw 0 0\n")
    fake.add_net(ICH9_SATA, "enp0s31f2", up=True)
    fake.add_net(ICH9_SMBUS, "enp0s31f3", up=False)
    # another process holds the edu's group open through VFIO
    pid = fake.proc / "4242"
    (pid / "fd").mkdir(parents=True)
    (pid / "comm").write_text("qemu-system-x86\n")
    os.symlink("/dev/vfio/4", pid / "fd" / "7")
    code, out, _ = run(capsys, "ls")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows[NVME].endswith("nvme0n1 on /data")
    assert rows[ICH9_SATA].endswith("enp0s31f2 up")
    assert rows[ICH9_SMBUS].endswith(" -")
    assert rows[EDU].endswith("pid 4242 qemu-system-x86")
    code, out, _ = run(capsys, "ls", "--json")
    by = {r["address"]: r["in_use"] for r in json.loads(out)["functions"]}
    assert by[EDU] == ["pid 4242 qemu-system-x86"]
    assert by[ICH9_LPC] == []
    code, _, err = run(capsys, "bind", NVME)
    assert code == 1
    assert "block device nvme0n1 is mounted on /data" in err


# --- several addresses ---------------------------------------------------------------


def test_bind_and_unbind_several_one_line_each(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "bind", EDU, "05.0", "1f.3", "0000:00:05.0")
    assert code == 0, err
    assert out.splitlines() == [
        f"{EDU}: already bound to vfio-pci",
        f"{NVME}: nvme -> vfio-pci",
        f"{ICH9_SMBUS}: i801_smbus -> vfio-pci",
    ]
    assert "group 6 is not viable yet" in err
    code, out, err = run(capsys, "unbind", NVME, ICH9_SMBUS)
    assert code == 0, err
    assert out.splitlines() == [
        f"{NVME}: vfio-pci -> nvme",
        f"{ICH9_SMBUS}: vfio-pci -> i801_smbus",
    ]


def test_bind_group_of_several(fake: FakeKernel, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "bind", "--group", "1f.0", NVME, "1f.2")
    assert code == 0, err
    assert [line.split(": ")[0] for line in out.splitlines()] == [
        ICH9_LPC,
        ICH9_SATA,
        ICH9_SMBUS,
        NVME,
    ]
    assert {fake.driver_of(a) for a in (ICH9_LPC, ICH9_SATA, ICH9_SMBUS, NVME)} == {"vfio-pci"}
    assert "not viable" not in err


def test_one_failure_does_not_stop_the_others(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.add_net(ICH9_SATA, "enp0s31f2", up=True)
    code, out, err = run(capsys, "bind", ICH9_SATA, NVME)
    assert code == 1
    assert out.splitlines() == [f"{NVME}: nvme -> vfio-pci"]
    assert err.splitlines()[0].startswith(f"aiovfio: {ICH9_SATA}: {ICH9_SATA} is in use")
    assert fake.driver_of(ICH9_SATA) == "ahci"


def test_unbind_to_an_existing_driver_or_load_it(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "bind", "--group", ICH9_SATA)
    code, out, err = run(capsys, "unbind", "--to", "ahci", ICH9_SATA)
    assert (code, out.strip()) == (0, f"{ICH9_SATA}: vfio-pci -> ahci"), err
    fake.native[ICH9_SMBUS] = "i2c_i801"
    code, out, err = run(capsys, "unbind", "--load", "--to", "i2c_i801", ICH9_SMBUS)
    assert code == 0, err
    assert fake.commands == [["modprobe", "i2c_i801"]]
    assert out.strip() == f"{ICH9_SMBUS}: vfio-pci -> i2c_i801"


# --- doctor in a virtual machine -----------------------------------------------------


def _make_vm(fake: FakeKernel, *, iommu: bool) -> None:
    (fake.proc / "cpuinfo").write_text(
        "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr hypervisor lahf_lm\n"
    )
    dmi = fake.sysfs / "class" / "dmi" / "id"
    dmi.mkdir(parents=True)
    (dmi / "sys_vendor").write_text("QEMU\n")
    (dmi / "product_name").write_text("Standard PC (Q35 + ICH9, 2009)\n")
    if not iommu:
        for link in (fake.sysfs / "devices").rglob("iommu_group"):
            link.unlink()
        shutil.rmtree(fake.sysfs / "kernel" / "iommu_groups")
        shutil.rmtree(fake.sysfs / "class" / "iommu")
        (fake.proc / "cmdline").write_text("console=ttyS0 quiet\n")


def test_doctor_in_a_vm_without_iommu_advises_a_virtual_one(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    _make_vm(fake, iommu=False)
    code, out, _ = run(capsys, "doctor", "--json")
    assert code == 1
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert checks["machine"]["status"] == "info"
    assert "QEMU" in checks["machine"]["summary"]
    assert "hypervisor flag" in checks["machine"]["summary"]
    fix = checks["iommu"]["fix"]
    assert "-device intel-iommu" in fix
    assert "cloud instance type" in fix
    assert "aiovfio vm" in fix
    assert "simulated machine" in fix
    assert "update-grub" not in fix and "VT-d" not in fix
    assert checks["cmdline"]["status"] == "info"  # not a GRUB lecture for a guest
    code, out, _ = run(capsys, "doctor")
    assert "[info] machine" in out


def test_doctor_in_a_vm_with_an_iommu_is_fine(
    fake: FakeKernel, capsys: pytest.CaptureFixture[str]
) -> None:
    _make_vm(fake, iommu=True)
    code, out, _ = run(capsys, "doctor", "--json")
    data = json.loads(out)
    assert data["format"] == 1
    assert (code, data["ok"]) == (0, True)


def test_doctor_on_bare_metal_says_so(fake: FakeKernel, capsys: pytest.CaptureFixture[str]) -> None:
    (fake.proc / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu vme de pse\n")
    code, out, _ = run(capsys, "doctor", "--json")
    assert code == 0
    machine = next(c for c in json.loads(out)["checks"] if c["name"] == "machine")
    assert machine["status"] == "ok"
    assert "bare metal" in machine["summary"]


# --- shell completion ----------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_comes_from_the_parser(
    capsys: pytest.CaptureFixture[str], shell: str
) -> None:
    pytest.importorskip("shtab")  # the optional extra aiovfio[completion]; the test group has it
    code, out, _ = run(capsys, "completion", shell)
    assert code == 0
    for word in ("ls", "bind", "unbind", "doctor", "--memlock", "--vendor", "_aiovfio_bdf"):
        assert word in out


def test_bash_completes_commands_and_addresses(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("shtab")
    bash = shutil.which("bash")
    assert bash is not None
    code, out, _ = run(capsys, "completion", "bash")
    assert code == 0
    script = tmp_path / "aiovfio.bash"
    script.write_text(out)
    probe = (
        f"source {script}\n"
        "COMP_WORDS=(aiovfio un); COMP_CWORD=1; COMP_LINE='aiovfio un'; COMP_POINT=10\n"
        '_shtab_aiovfio aiovfio un aiovfio; echo "${COMPREPLY[@]}"\n'
        "COMP_WORDS=(aiovfio doctor --mem); COMP_CWORD=2\n"
        '_shtab_aiovfio aiovfio --mem doctor; echo "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run([bash, "-c", probe], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()[:2]
    assert first.split() == ["unbind"]
    assert second.split() == ["--memlock"]


def test_sysfs_drivers_lists_loaded_ones(fake: FakeKernel) -> None:
    names = Sysfs(fake.roots).drivers()
    assert "vfio-pci" in names
    assert "nvme" in names
    assert not Sysfs(fake.roots).driver_loaded("../..")
