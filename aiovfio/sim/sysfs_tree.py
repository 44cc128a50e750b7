"""A sysfs-like tree of a simulated machine, for `LinuxKernel(sysfs=root)` and the CLI.

`write_tree(root, machine)` writes what Linux shows under /sys for the
machine's PCI functions, laid out as the kernel lays it out (real
directories under devices/, symlinks everywhere else):

    devices/pci0000:00/0000:00:04.0/{vendor,device,class,subsystem_vendor,
        subsystem_device,revision,config,resource,irq,driver_override,
        reset_method,reset, driver -> bus/pci/drivers/<drv>,
        iommu_group -> kernel/iommu_groups/<n>}
    bus/pci/devices/<bdf> -> devices/pci0000:00/<bdf>
    bus/pci/drivers/<drv>/{bind,unbind,new_id,remove_id,<bdf> -> ...}
    kernel/iommu_groups/<n>/{type,devices/<bdf> -> ...}
    module/{vfio,vfio_pci,vfio_iommu_type1}/parameters/...

It is a snapshot: after `Machine.set_driver`, write it again (the parts it
owns are replaced; anything else under `root` is left alone).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .._uapi.vfio import PciRegion

if TYPE_CHECKING:
    from .topology import SimDevice, Topology

__all__ = ["write_tree"]

_OWNED = ("devices", "bus", "kernel", "module")
_IORESOURCE_MEM = 0x200
_IORESOURCE_PREFETCH = 0x2000
_IORESOURCE_MEM_64 = 0x100000
_IORESOURCE_READONLY = 0x4000
#: lines in a type-0 function's `resource` file (BARs, ROM, SR-IOV BARs)
_RESOURCE_LINES = 13
_DRIVER_FILES = ("bind", "unbind", "new_id", "remove_id")


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(target, link.parent), link)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_tree(root: Path, machine: Topology) -> Path:
    """Write the tree; return `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for name in _OWNED:
        shutil.rmtree(root / name, ignore_errors=True)
    drivers = root / "bus" / "pci" / "drivers"
    for drv in ("vfio-pci", "pci-stub"):
        _driver_dir(drivers / drv)
    for device in machine.iter_devices():
        _device(root, device)
    for group in machine.iter_groups():
        base = root / "kernel" / "iommu_groups" / str(group.number)
        _write(base / "type", "DMA\n")
        (base / "devices").mkdir(parents=True, exist_ok=True)
        for device in group.devices:
            _link(base / "devices" / device.name, _device_dir(root, device))
    _write(root / "bus" / "pci" / "drivers_probe", "")
    _write(root / "bus" / "pci" / "rescan", "")
    module = root / "module"
    _write(module / "vfio" / "parameters" / "enable_unsafe_noiommu_mode", "N\n")
    _write(module / "vfio_pci" / "parameters" / "nointxmask", "N\n")
    _write(module / "vfio_pci" / "parameters" / "disable_idle_d3", "N\n")
    params = module / "vfio_iommu_type1" / "parameters"
    _write(params / "dma_entry_limit", f"{machine.dma_entry_limit}\n")
    _write(params / "allow_unsafe_interrupts", "N\n")
    _write(params / "disable_hugepages", "N\n")
    return root


def _driver_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name in _DRIVER_FILES:
        (path / name).touch()


def _device_dir(root: Path, device: SimDevice) -> Path:
    return root / "devices" / f"pci{device.domain:04x}:{device.bus:02x}" / device.name


def _device(root: Path, device: SimDevice) -> None:
    path = _device_dir(root, device)
    path.mkdir(parents=True)
    ids = device.ids()
    _write(path / "vendor", f"0x{ids.vendor:04x}\n")
    _write(path / "device", f"0x{ids.device:04x}\n")
    _write(path / "subsystem_vendor", f"0x{ids.subsystem_vendor:04x}\n")
    _write(path / "subsystem_device", f"0x{ids.subsystem_device:04x}\n")
    _write(path / "class", f"0x{ids.class_code:06x}\n")
    _write(path / "revision", f"0x{ids.revision:02x}\n")
    _write(path / "irq", f"{device.config.phys[0x3C] if device.config.interrupt_pin else 0}\n")
    _write(path / "driver_override", "(null)\n")
    _write(path / "numa_node", "-1\n")
    (path / "config").write_bytes(bytes(device.config.phys))
    _write(path / "resource", _resource(device))
    if device.model.supports_reset:
        _write(path / "reset_method", "flr\n")
        (path / "reset").touch()
    _link(root / "bus" / "pci" / "devices" / device.name, path)
    _link(path / "iommu_group", root / "kernel" / "iommu_groups" / str(device.group.number))
    if device.driver is not None:
        drv = root / "bus" / "pci" / "drivers" / device.driver
        _driver_dir(drv)
        _link(path / "driver", drv)
        _link(drv / device.name, path)


def _resource(device: SimDevice) -> str:
    lines = []
    for index in range(_RESOURCE_LINES):
        bar = device.bars.get(index) if index <= PciRegion.ROM else None
        if bar is None:
            lines.append(f"0x{0:016x} 0x{0:016x} 0x{0:016x}")
            continue
        flags = _IORESOURCE_MEM
        if bar.prefetchable:
            flags |= _IORESOURCE_PREFETCH
        if bar.is_64bit:
            flags |= _IORESOURCE_MEM_64
        if index == PciRegion.ROM:
            flags |= _IORESOURCE_READONLY
        end = bar.address + bar.size - 1
        lines.append(f"0x{bar.address:016x} 0x{end:016x} 0x{flags:016x}")
    return "\n".join(lines) + "\n"
