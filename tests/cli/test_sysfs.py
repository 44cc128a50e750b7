"""aiovfio.cli.sysfs and .binding: addresses, class names, capability walks, groups,
in-use checks, binding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import EDU, ICH9_LPC, ICH9_SATA, ICH9_SMBUS, NVME, FakeKernel, _config

from aiovfio.cli.binding import (
    Binder,
    BindError,
    DeviceInUse,
    DriverState,
    PermissionRequired,
    SavedBinding,
)
from aiovfio.cli.sysfs import (
    Roots,
    Sysfs,
    class_name,
    is_vfio_compatible,
    normalize_bdf,
    walk_capabilities,
)
from aiovfio.errors import DeviceNotFound, InvalidArgument, SetupError, VfioUnavailable


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("04.0", "0000:00:04.0"),
        ("4.0", "0000:00:04.0"),
        ("00:04.0", "0000:00:04.0"),
        ("0000:00:04.0", "0000:00:04.0"),
        (" 0000:3B:1F.7\n", "0000:3b:1f.7"),
        ("10000:e1:00.1", "10000:e1:00.1"),
    ],
)
def test_normalize_bdf(text: str, address: str) -> None:
    assert normalize_bdf(text) == address


@pytest.mark.parametrize(
    "text", ["", "04", "04.8", "20.0", "0000:00:04", "x:04.0", "0000:000:04.0"]
)
def test_normalize_bdf_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument, match="is not a PCI address"):
        normalize_bdf(text)


def test_class_names_come_from_pci_ids() -> None:
    assert class_name(0x00FF00) == "Unclassified device [00ff]"
    assert class_name(0x010802) == "Non-Volatile memory controller (NVM Express) [0108]"
    assert class_name(0x0108FF) == "Non-Volatile memory controller [0108]"
    assert class_name(0x020000) == "Ethernet controller [0200]"
    assert class_name(0x0C0330) == "USB controller (XHCI) [0c03]"
    assert class_name(0x120000) == "Processing accelerators [1200]"
    assert class_name(0x777777) == "Class [7777]"


def test_class_names_without_pci_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOVFIO_PCI_IDS", "")
    assert class_name(0x010802) == "Class [0108]"


def test_vfio_compatible_drivers() -> None:
    for ok in (None, "vfio-pci", "pci-stub", "pcieport", "mlx5_vfio_pci"):
        assert is_vfio_compatible(ok)
    for bad in ("nvme", "ahci", "e1000e"):
        assert not is_vfio_compatible(bad)


def test_walk_capabilities() -> None:
    cfg = bytearray(_config(0x1B36, 0x10, 0x010802, [0x11, 0x01, 0x10]))
    assert [(c.name, c.offset) for c in walk_capabilities(bytes(cfg))] == [
        ("MSIX", 0x40),
        ("PM", 0x60),
        ("EXP", 0x80),
    ]
    cfg[0x81] = 0x40  # a loop back to the first capability ends the walk
    assert len(walk_capabilities(bytes(cfg))) == 3
    ext = bytes(cfg) + bytes(4096 - 256)
    ext = ext[:0x100] + (0x00010001 | 0x140 << 20).to_bytes(4, "little") + ext[0x104:]
    ext = ext[:0x140] + (0x0003 | 1 << 16).to_bytes(4, "little") + ext[0x144:]
    names = [c.name for c in walk_capabilities(ext) if c.extended]
    assert names == ["ERR", "DSN"]
    assert walk_capabilities(bytes(64)) == ()
    assert walk_capabilities(b"") == ()


def test_functions_and_groups(fake: FakeKernel) -> None:
    sysfs = Sysfs(fake.roots)
    nvme = sysfs.function(NVME)
    assert (nvme.ids.vendor, nvme.ids.device, nvme.ids.class_code) == (0x1B36, 0x10, 0x010802)
    assert (nvme.driver, nvme.iommu_group, nvme.driver_override) == ("nvme", 5, None)
    assert sysfs.function(EDU).driver == "vfio-pci"
    assert sysfs.group(4).viable
    assert not sysfs.group(5).viable
    group6 = sysfs.group(6)
    assert [m.address for m in group6.members] == [ICH9_LPC, ICH9_SATA, ICH9_SMBUS]
    assert [o.driver for o in group6.offenders] == ["lpc_ich", "ahci", "i801_smbus"]
    assert sysfs.groups() == (0, 4, 5, 6)
    assert sysfs.reset_methods(NVME) == ("flr", "pm")
    assert sysfs.reset_methods(EDU) == ()
    assert [b.size for b in sysfs.bars(EDU)] == [1 << 20]
    with pytest.raises(DeviceNotFound):
        sysfs.function("0000:00:09.0")
    with pytest.raises(DeviceNotFound, match="aiovfio ls"):
        sysfs.resolve("09.0")


def test_no_sysfs(tmp_path: Path) -> None:
    sysfs = Sysfs(Roots(sysfs=tmp_path))
    with pytest.raises(SetupError, match="is sysfs mounted"):
        sysfs.addresses()


def test_in_use(fake: FakeKernel) -> None:
    sysfs = Sysfs(fake.roots)
    assert sysfs.in_use(NVME) == ()
    with (fake.proc / "self" / "mounts").open("a") as f:
        f.write("/dev/nvme0n1 /mnt/data ext4 rw 0 0\n")
    assert sysfs.in_use(NVME) == ("block device nvme0n1 is mounted on /mnt/data",)
    fake.add_net(ICH9_SATA, "eth0", up=True)
    fake.add_net(ICH9_SMBUS, "eth1", up=False)
    assert sysfs.in_use(ICH9_SATA) == ("network interface eth0 is up",)
    assert sysfs.in_use(ICH9_SMBUS) == ()


def test_in_use_by_a_vfio_user(fake: FakeKernel) -> None:
    fd_dir = fake.proc / "4242" / "fd"
    fd_dir.mkdir(parents=True)
    (fake.proc / "4242" / "comm").write_text("mydriver\n")
    (fd_dir / "7").symlink_to("/dev/vfio/4")
    assert Sysfs(fake.roots).in_use(EDU) == ("process 4242 (mydriver) has /dev/vfio/4 open",)
    with pytest.raises(DeviceInUse, match="4242"):
        Binder.from_roots(fake.roots).unbind(EDU)


def test_state_file_round_trip(tmp_path: Path) -> None:
    state = DriverState(tmp_path / "sub" / "drivers.json")
    assert state.get(NVME) is None
    state.put(NVME, SavedBinding("nvme"))
    state.put(EDU, SavedBinding(None, "pci-stub"))
    assert state.get(NVME) == SavedBinding("nvme")
    assert state.get(EDU) == SavedBinding(None, "pci-stub")
    data = json.loads(state.path.read_text())
    assert data["devices"][NVME] == {"driver": "nvme", "driver_override": None}
    state.forget(NVME)
    assert state.get(NVME) is None
    state.path.write_text("not json")
    assert state.get(EDU) is None


def test_bind_unbind_round_trip(fake: FakeKernel) -> None:
    binder = Binder.from_roots(fake.roots)
    result = binder.bind(NVME)
    assert (result.before, result.after, result.changed) == ("nvme", "vfio-pci", True)
    assert fake.driver_of(NVME) == "vfio-pci"
    assert binder.state.get(NVME) is not None
    assert [w[0].split("/")[-1] for w in fake.writes] == [
        "driver_override",
        "unbind",
        "drivers_probe",
    ]
    again = binder.bind(NVME)
    assert not again.changed
    back = binder.unbind(NVME)
    assert (back.before, back.after) == ("vfio-pci", "nvme")
    assert fake.driver_of(NVME) == "nvme"
    assert Sysfs(fake.roots).function(NVME).driver_override is None
    assert binder.state.get(NVME) is None
    nothing = binder.unbind(NVME)
    assert not nothing.changed
    assert "nothing to do" in nothing.describe()


def test_unbind_without_record_lets_the_kernel_choose(fake: FakeKernel) -> None:
    binder = Binder.from_roots(fake.roots)
    binder.bind(NVME)
    binder.state.forget(NVME)
    assert binder.unbind(NVME).after == "nvme"
    # edu has no native driver: it ends unbound, and the result says so
    result = binder.unbind(EDU)
    assert result.after is None
    assert "no driver claimed it" in result.describe()


def test_unbind_to_a_driver_that_is_not_loaded(fake: FakeKernel) -> None:
    binder = Binder.from_roots(fake.roots)
    binder.bind(NVME)
    fake.remove_driver("nvme")
    result = binder.unbind(NVME)
    assert result.after is None
    assert "nvme is not loaded: `modprobe nvme` binds it" in result.describe()


def test_unbind_load_runs_modprobe(fake: FakeKernel) -> None:
    binder = Binder.from_roots(fake.roots)
    binder.bind(NVME)
    fake.remove_driver("nvme")
    assert binder.unbind(NVME, load=True).after == "nvme"
    assert fake.commands == [["modprobe", "nvme"]]


def test_unbind_leave_unbound_and_to(fake: FakeKernel) -> None:
    binder = Binder.from_roots(fake.roots)
    binder.bind(NVME)
    assert binder.unbind(NVME, leave_unbound=True).after is None
    assert fake.driver_of(NVME) is None
    binder.bind(NVME)
    fake.add_driver("pci-stub")
    assert binder.unbind(NVME, to="pci-stub").after == "pci-stub"
    assert Sysfs(fake.roots).function(NVME).driver_override == "pci-stub"


def test_bind_refuses_in_use(fake: FakeKernel) -> None:
    with (fake.proc / "self" / "mounts").open("a") as f:
        f.write("/dev/nvme0n1 /srv ext4 rw 0 0\n")
    binder = Binder.from_roots(fake.roots)
    with pytest.raises(DeviceInUse, match=r"nvme0n1 is mounted on /srv.*--force"):
        binder.bind(NVME)
    assert fake.driver_of(NVME) == "nvme"
    assert fake.writes == []
    assert binder.bind(NVME, force=True).after == "vfio-pci"


def test_bind_needs_vfio_pci_loaded(fake: FakeKernel) -> None:
    for attr in ("bind", "unbind", "new_id"):
        (fake.pci / "drivers" / "vfio-pci" / attr).unlink()
    (fake.pci / "drivers" / "vfio-pci" / "0000:00:04.0").unlink()
    (fake.pci / "drivers" / "vfio-pci").rmdir()
    binder = Binder.from_roots(fake.roots)
    with pytest.raises(VfioUnavailable, match=r"`modprobe vfio-pci`.*--load"):
        binder.bind(NVME)
    assert binder.bind(NVME, load=True).after == "vfio-pci"
    assert fake.commands == [["modprobe", "vfio-pci"]]


def test_bind_without_iommu_group(fake: FakeKernel) -> None:
    fake.add_function(
        "0000:00:06.0", (0x8086, 0x100E), 0x020000, group=None, driver="e1000", native="e1000"
    )
    with pytest.raises(VfioUnavailable, match=r"no IOMMU group.*intel_iommu=on"):
        Binder.from_roots(fake.roots).bind("0000:00:06.0")


def test_bind_without_permission(fake: FakeKernel) -> None:
    def denied(path: object, value: str) -> None:
        raise PermissionError(13, "Permission denied")

    binder = Binder.from_roots(fake.roots)
    binder.writer = denied
    with pytest.raises(PermissionRequired, match="needs root"):
        binder.bind(NVME)


def test_bind_group_skips_bridges_and_warns(fake: FakeKernel) -> None:
    binder = Binder.from_roots(fake.roots)
    binder.bind(ICH9_SATA)
    note = binder.viability_note(ICH9_SATA)
    assert note is not None
    assert "group 6 is not viable yet" in note
    assert "aiovfio bind --group 0000:00:1f.2" in note
    fake.add_function("0000:00:1e.0", (0x8086, 0x244E), 0x060400, group=6, driver="pcieport")
    assert "0000:00:1e.0" not in binder.group_targets(ICH9_SATA)
    results = binder.bind_group(ICH9_SATA)
    assert [r.address for r in results] == [ICH9_LPC, ICH9_SATA, ICH9_SMBUS]
    assert Sysfs(fake.roots).group(6).viable
    assert binder.viability_note(ICH9_SATA) is None
    back = binder.unbind_group(ICH9_SMBUS)
    assert [r.after for r in back] == ["lpc_ich", "ahci", "i801_smbus"]


def test_bind_reports_a_probe_that_did_not_take(fake: FakeKernel) -> None:
    binder = Binder.from_roots(fake.roots)

    def lazy_kernel(path: object, value: str) -> None:
        if str(path).endswith("drivers_probe"):
            return  # the kernel refused to bind (as vfio-pci does for bridges)
        fake.write(path, value)  # type: ignore[arg-type]

    binder.writer = lazy_kernel
    with pytest.raises(BindError, match="bound to no driver after probing"):
        binder.bind(NVME)
