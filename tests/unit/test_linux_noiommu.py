"""LinuxKernel's helpers for DMA without an IOMMU: pagemap, mlock, noiommu groups."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from aiovfio.kernel.linux import LinuxKernel

PAGE = mmap.PAGESIZE


def _address(buf: mmap.mmap) -> int:
    import ctypes

    anchor = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def test_physical_pages_of_locked_memory() -> None:
    k = LinuxKernel()
    buf = mmap.mmap(-1, 2 * PAGE)
    try:
        addr = _address(buf)
        assert k.physical_pages(addr, 2 * PAGE) == (0, 0)  # not touched: not present
        buf[0] = buf[PAGE] = 1
        k.mlock(addr, 2 * PAGE)
        try:
            if os.geteuid() != 0:
                with pytest.raises(PermissionError, match="CAP_SYS_ADMIN"):
                    k.physical_pages(addr, 2 * PAGE)
                return
            phys = k.physical_pages(addr, 2 * PAGE)
            assert len(phys) == 2
            assert all(p and p % PAGE == 0 for p in phys)
            assert k.physical_pages(addr + 5, 1) == phys[:1]
        finally:
            k.munlock(addr, 2 * PAGE)
    finally:
        buf.close()


def test_mlock_errors_keep_their_errno() -> None:
    with pytest.raises(OSError) as caught:
        LinuxKernel().munlock(PAGE, 1 << 62)  # nothing is mapped there
    assert caught.value.errno is not None


def test_noiommu_group_from_sysfs(tmp_path: Path) -> None:
    groups = tmp_path / "kernel" / "iommu_groups"
    (groups / "3").mkdir(parents=True)
    (groups / "3" / "name").write_text("vfio-noiommu\n")
    (groups / "4").mkdir()
    k = LinuxKernel(sysfs=tmp_path, dev=tmp_path / "dev")
    assert k.noiommu_group(3)
    assert not k.noiommu_group(4)  # no name: a real IOMMU group
    assert not k.noiommu_group(5)
    with pytest.raises(FileNotFoundError):
        k.open_noiommu_group(3)  # no /dev/vfio/noiommu-3 under this root
