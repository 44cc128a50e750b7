"""A sysfs-like tree in tmp_path, and a fake kernel that reacts to binding writes.

A regular file tree does not react when `driver_override`, `unbind`, `bind` or
`drivers_probe` is written, so `FakeKernel.write` plays the kernel's part (as
`aiovfio.cli.binding.Binder.writer`), and `FakeKernel.run` plays `modprobe`.

The machine laid out is the QEMU guest's: edu (group 4, vfio-pci), nvme
(group 5, the nvme driver, a namespace block device) and the ICH9 functions
sharing group 6.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

import aiovfio.cli.binding
from aiovfio.cli.sysfs import Roots

#: The real single-write writer; the fake calls it first, then reacts.
_write_attribute = aiovfio.cli.binding.write_attribute

EDU = "0000:00:04.0"
NVME = "0000:00:05.0"
ICH9_LPC = "0000:00:1f.0"
ICH9_SATA = "0000:00:1f.2"
ICH9_SMBUS = "0000:00:1f.3"


def _config(vendor: int, device: int, class_code: int, caps: Sequence[int]) -> bytes:
    """A 256-byte config space with a linked standard capability list."""
    cfg = bytearray(256)
    cfg[0:2] = vendor.to_bytes(2, "little")
    cfg[2:4] = device.to_bytes(2, "little")
    cfg[9:12] = class_code.to_bytes(3, "little")
    if caps:
        cfg[6] = 0x10
        cfg[0x34] = 0x40
        for i, cap in enumerate(caps):
            off = 0x40 + 0x20 * i
            cfg[off] = cap
            cfg[off + 1] = off + 0x20 if i + 1 < len(caps) else 0
    return bytes(cfg)


def write_dev_and_proc(roots: Roots) -> None:
    """What a healthy VFIO host shows outside the PCI tree: an IOMMU, /dev/vfio, /proc."""
    for name in ("block", "net"):
        (roots.sysfs / "class" / name).mkdir(parents=True, exist_ok=True)
    (roots.sysfs / "class" / "iommu" / "dmar0").mkdir(parents=True, exist_ok=True)
    (roots.dev / "vfio").mkdir(parents=True)
    (roots.dev / "vfio" / "vfio").write_text("")
    (roots.proc / "self").mkdir(parents=True)
    (roots.proc / "cmdline").write_text("console=ttyS0 intel_iommu=on iommu=pt\n")
    (roots.proc / "self" / "mounts").write_text("proc /proc proc rw 0 0\n")
    (roots.proc / "self" / "limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units\n"
        "Max locked memory         unlimited            unlimited            bytes\n"
    )
    (roots.proc / "self" / "status").write_text("Name:\tpython\nCapEff:\t0000000000000000\n")


class FakeKernel:
    """Writes a sysfs tree and reacts to writes into it like Linux's PCI core."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sysfs = root / "sys"
        self.dev = root / "dev"
        self.proc = root / "proc"
        self.roots = Roots(
            sysfs=self.sysfs, dev=self.dev, proc=self.proc, state=root / "run" / "drivers.json"
        )
        self.native: dict[str, str] = {}
        self.writes: list[tuple[str, str]] = []
        self.commands: list[list[str]] = []
        self.pci = self.sysfs / "bus" / "pci"
        (self.pci / "devices").mkdir(parents=True)
        (self.pci / "drivers").mkdir()
        (self.pci / "drivers_probe").write_text("")
        (self.sysfs / "kernel" / "iommu_groups").mkdir(parents=True)
        for module in ("vfio", "vfio_pci", "vfio_iommu_type1"):
            (self.sysfs / "module" / module).mkdir(parents=True)
        params = self.sysfs / "module" / "vfio" / "parameters"
        params.mkdir()
        (params / "enable_unsafe_noiommu_mode").write_text("N\n")
        huge = self.sysfs / "kernel" / "mm" / "hugepages" / "hugepages-2048kB"
        huge.mkdir(parents=True)
        (huge / "nr_hugepages").write_text("0\n")
        (huge / "free_hugepages").write_text("0\n")
        write_dev_and_proc(self.roots)
        self.add_driver("vfio-pci")

    # --- building ---------------------------------------------------------------

    def device_dir(self, bdf: str) -> Path:
        return self.sysfs / "devices" / "pci0000:00" / bdf

    def add_driver(self, name: str) -> None:
        d = self.pci / "drivers" / name
        d.mkdir(exist_ok=True)
        for attr in ("bind", "unbind", "new_id"):
            (d / attr).touch()

    def remove_driver(self, name: str) -> None:
        d = self.pci / "drivers" / name
        for entry in d.iterdir():
            if entry.is_symlink():
                self._unbind(entry.name)
            else:
                entry.unlink()
        d.rmdir()

    def add_function(
        self,
        bdf: str,
        ids: tuple[int, int],
        class_code: int,
        *,
        group: int | None,
        driver: str | None = None,
        native: str | None = None,
        revision: int = 0,
        reset_method: str | None = None,
        caps: Sequence[int] = (),
    ) -> None:
        d = self.device_dir(bdf)
        d.mkdir(parents=True)
        (d / "vendor").write_text(f"{ids[0]:#06x}\n")
        (d / "device").write_text(f"{ids[1]:#06x}\n")
        (d / "subsystem_vendor").write_text("0x1af4\n")
        (d / "subsystem_device").write_text("0x1100\n")
        (d / "class").write_text(f"{class_code:#08x}\n")
        (d / "revision").write_text(f"{revision:#04x}\n")
        (d / "driver_override").write_text("(null)\n")
        (d / "irq").write_text("11\n")
        (d / "resource").write_text(
            "0x00000000fea00000 0x00000000feafffff 0x0000000000040200\n"
            + "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 6
        )
        (d / "config").write_bytes(_config(ids[0], ids[1], class_code, caps))
        if reset_method is not None:
            (d / "reset_method").write_text(reset_method + "\n")
        os.symlink(os.path.relpath(d, self.pci / "devices"), self.pci / "devices" / bdf)
        if group is not None:
            g = self.sysfs / "kernel" / "iommu_groups" / str(group) / "devices"
            g.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(d, g), g / bdf)
            os.symlink(os.path.relpath(g.parent, d), d / "iommu_group")
        if native:
            self.native[bdf] = native
        if driver:
            self.add_driver(driver)
            self._bind(bdf, driver)

    def add_block(self, bdf: str, name: str, *, mounted_on: str | None = None) -> None:
        blk = self.device_dir(bdf) / "nvme" / "nvme0" / name
        blk.mkdir(parents=True)
        (blk / "holders").mkdir()
        os.symlink(
            os.path.relpath(blk, self.sysfs / "class" / "block"),
            self.sysfs / "class" / "block" / name,
        )
        if mounted_on:
            with (self.proc / "self" / "mounts").open("a") as f:
                f.write(f"/dev/{name} {mounted_on} ext4 rw 0 0\n")

    def add_net(self, bdf: str, name: str, *, up: bool) -> None:
        iface = self.device_dir(bdf) / "net" / name
        iface.mkdir(parents=True)
        (iface / "flags").write_text("0x1003\n" if up else "0x1002\n")
        os.symlink(
            os.path.relpath(iface, self.sysfs / "class" / "net"),
            self.sysfs / "class" / "net" / name,
        )

    def driver_of(self, bdf: str) -> str | None:
        link = self.device_dir(bdf) / "driver"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    # --- the kernel's reactions ------------------------------------------------------

    def _group(self, bdf: str) -> int | None:
        link = self.device_dir(bdf) / "iommu_group"
        return int(os.path.basename(os.readlink(link))) if link.is_symlink() else None

    def _bind(self, bdf: str, driver: str) -> None:
        d = self.device_dir(bdf)
        drv = self.pci / "drivers" / driver
        os.symlink(os.path.relpath(drv, d), d / "driver")
        os.symlink(os.path.relpath(d, drv), drv / bdf)
        group = self._group(bdf)
        if driver == "vfio-pci" and group is not None:
            (self.dev / "vfio" / str(group)).touch()

    def _unbind(self, bdf: str) -> None:
        d = self.device_dir(bdf)
        driver = self.driver_of(bdf)
        assert driver is not None
        (d / "driver").unlink()
        (self.pci / "drivers" / driver / bdf).unlink()

    def _override(self, bdf: str) -> str | None:
        text = (self.device_dir(bdf) / "driver_override").read_text().strip()
        return None if text == "(null)" else text

    def _matches(self, bdf: str, driver: str) -> bool:
        override = self._override(bdf)
        return driver == override if override else self.native.get(bdf) == driver

    def _probe(self, bdf: str) -> None:
        if self.driver_of(bdf) is not None:
            return
        for driver in sorted(p.name for p in (self.pci / "drivers").iterdir()):
            if self._matches(bdf, driver):
                self._bind(bdf, driver)
                return

    def write(self, path: Path, value: str) -> None:
        """The Binder's writer: apply a sysfs write as Linux would."""
        real = Path(os.path.realpath(path))
        rel = real.relative_to(os.path.realpath(self.sysfs))
        self.writes.append((str(rel), value))
        _write_attribute(path, value)
        parts = rel.parts
        if parts == ("bus", "pci", "drivers_probe"):
            self._probe(value.strip())
        elif parts[:3] == ("bus", "pci", "drivers") and parts[-1] in ("bind", "unbind"):
            driver, bdf = parts[3], value.strip()
            if parts[-1] == "unbind":
                if self.driver_of(bdf) != driver:
                    raise OSError(errno.ENODEV, "No such device")
                self._unbind(bdf)
            else:
                if self.driver_of(bdf) is not None:
                    raise OSError(errno.EBUSY, "Device or resource busy")
                if not self._matches(bdf, driver):
                    raise OSError(errno.ENODEV, "No such device")
                self._bind(bdf, driver)
        elif parts[-1] == "driver_override":
            text = value.strip()
            real.write_text((text or "(null)") + "\n")
        else:
            raise AssertionError(f"unexpected sysfs write {rel} = {value!r}")

    def run(self, argv: Sequence[str]) -> None:
        """The Binder's runner: `modprobe NAME` registers the driver and probes."""
        self.commands.append(list(argv))
        assert argv[0] == "modprobe", argv
        self.add_driver(argv[1])
        for bdf in sorted(p.name for p in (self.pci / "devices").iterdir()):
            self._probe(bdf)


def guest_like(root: Path) -> FakeKernel:
    """The QEMU guest's PCI functions, laid out as Linux shows them."""
    k = FakeKernel(root)
    k.add_function("0000:00:00.0", (0x8086, 0x29C0), 0x060000, group=0)
    k.add_function(
        EDU, (0x1234, 0x11E8), 0x00FF00, group=4, driver="vfio-pci", revision=0x10, caps=[0x05]
    )
    k.add_function(
        NVME,
        (0x1B36, 0x0010),
        0x010802,
        group=5,
        driver="nvme",
        native="nvme",
        revision=2,
        reset_method="flr pm",
        caps=[0x11, 0x01, 0x10],
    )
    k.add_block(NVME, "nvme0n1")
    k.add_function(
        ICH9_LPC, (0x8086, 0x2918), 0x060100, group=6, driver="lpc_ich", native="lpc_ich"
    )
    k.add_function(ICH9_SATA, (0x8086, 0x2922), 0x010601, group=6, driver="ahci", native="ahci")
    k.add_function(
        ICH9_SMBUS, (0x8086, 0x2930), 0x0C0500, group=6, driver="i801_smbus", native="i801_smbus"
    )
    (k.dev / "vfio" / "4").touch()
    return k


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    """The guest-like tree; the CLI sees it through AIOVFIO_* and writes through the fake."""
    k = guest_like(tmp_path)
    for name in ("sysfs", "dev", "proc", "state"):
        monkeypatch.setenv(f"AIOVFIO_{name.upper()}", str(getattr(k.roots, name)))
    monkeypatch.setattr(aiovfio.cli.binding, "write_attribute", k.write)
    monkeypatch.setattr(aiovfio.cli.binding, "run_command", k.run)
    return k


#: A few vendors and devices and the whole class section of the real pci.ids.
PCI_IDS = Path(__file__).with_name("pci.ids")


@pytest.fixture(autouse=True)
def pci_ids(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Names come from tests/cli/pci.ids, never from whatever the machine has installed."""
    monkeypatch.setenv("AIOVFIO_PCI_IDS", str(PCI_IDS))
    return PCI_IDS
