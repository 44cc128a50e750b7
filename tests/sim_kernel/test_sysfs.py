"""Machine.write_sysfs: a tree LinuxKernel(sysfs=root) reads like the real /sys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aiovfio.kernel.linux import LinuxKernel
from aiovfio.kernel.protocol import PciIds
from aiovfio.sim import Machine

from .rig import Toy


@pytest.fixture
def machine_with_devices(machine: Machine) -> Machine:
    machine.add_device(Toy(), name="0000:00:04.0")
    machine.add_device(Toy(pcie=True), name="0000:01:00.0", group=20)
    machine.add_device(Toy(), name="0000:01:00.1", group=20, driver="e1000e")
    machine.add_device(Toy(), name="0000:00:1f.3", driver=None)
    return machine


def test_linux_kernel_reads_the_tree(machine_with_devices: Machine, tmp_path: Path) -> None:
    m = machine_with_devices
    root = m.write_sysfs(tmp_path)
    linux = LinuxKernel(sysfs=root)
    sim = m.kernel
    assert linux.pci_devices() == sim.pci_devices()
    for bdf in sim.pci_devices():
        assert linux.iommu_group(bdf) == sim.iommu_group(bdf)
        assert linux.driver(bdf) == sim.driver(bdf)
        assert linux.pci_ids(bdf) == sim.pci_ids(bdf)
        assert linux.device_cdev(bdf) is None
    assert linux.group_devices(20) == sim.group_devices(20) == ("0000:01:00.0", "0000:01:00.1")
    assert sim.pci_ids("0000:00:04.0") == PciIds(0x1AF4, 0x10F0, 0x1AF4, 0x1100, 0x058000, 1)


def test_tree_layout(machine_with_devices: Machine, tmp_path: Path) -> None:
    root = machine_with_devices.write_sysfs(tmp_path)
    dev = root / "bus/pci/devices/0000:00:04.0"
    assert os.readlink(dev) == "../../../devices/pci0000:00/0000:00:04.0"
    assert (dev / "vendor").read_text() == "0x1af4\n"
    assert (dev / "class").read_text() == "0x058000\n"
    assert (dev / "driver_override").read_text() == "(null)\n"
    assert (dev / "config").read_bytes()[:4] == bytes.fromhex("f41af010")
    assert os.path.basename(os.readlink(dev / "iommu_group")) == "10"
    assert (root / "bus/pci/drivers/vfio-pci/0000:00:04.0").resolve() == dev.resolve()
    assert (root / "bus/pci/drivers/vfio-pci/bind").exists()
    assert not (root / "bus/pci/devices/0000:00:1f.3/driver").exists()
    assert (root / "kernel/iommu_groups/20/devices/0000:01:00.1").exists()
    limit = root / "module/vfio_iommu_type1/parameters/dma_entry_limit"
    assert limit.read_text() == "65535\n"
    resource = (dev / "resource").read_text().splitlines()
    assert len(resource) == 13
    start, end, flags = (int(x, 16) for x in resource[2].split())
    assert end - start + 1 == 4 * os.sysconf("SC_PAGE_SIZE") and flags & 0x100000


def test_rewrite_after_set_driver(machine_with_devices: Machine, tmp_path: Path) -> None:
    m = machine_with_devices
    (tmp_path / "mine").write_text("kept")
    m.write_sysfs(tmp_path)
    m.set_driver("0000:00:1f.3", "snd_hda_intel")
    m.set_driver("0000:00:04.0", None)
    m.write_sysfs(tmp_path)
    linux = LinuxKernel(sysfs=tmp_path)
    assert linux.driver("0000:00:1f.3") == "snd_hda_intel"
    assert linux.driver("0000:00:04.0") is None
    assert (tmp_path / "mine").read_text() == "kept"


def test_unknown_device_is_file_not_found(machine_with_devices: Machine) -> None:
    with pytest.raises(FileNotFoundError):
        machine_with_devices.kernel.driver("0000:09:00.0")
    with pytest.raises(FileNotFoundError):
        machine_with_devices.kernel.group_devices(99)
