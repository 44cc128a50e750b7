"""iommufd and the VFIO device cdev on the real kernel, one interaction per test.

Runs on the 6.12 kernel built with iommufd (`aiovfio vm --on iommufd`):
/dev/iommu, an IOAS, its IOVA ranges, the device cdev found from sysfs,
BIND_IOMMUFD, ATTACH_IOMMUFD_PT, IOAS_MAP/UNMAP (fixed and kernel-chosen
IOVAs), edu DMA through the IOAS both ways, and the cdev's ownership rules
against the group path. These are the facts the simulated machine's iommufd
reproduces (aiovfio/sim/rules.py).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import time
from collections.abc import Iterator

import pytest

import aiovfio
from aiovfio._uapi import iommufd as iuapi
from aiovfio._uapi import vfio as uapi
from aiovfio._uapi.pci import Cfg, Command
from aiovfio.kernel.linux import LinuxKernel
from aiovfio.testing.target import Target

pytestmark = [
    pytest.mark.needs_iommufd("raw iommufd ioctls"),
    pytest.mark.needs_iommu("an IOAS translates through an IOMMU; noiommu devices have no cdev"),
]

PAGE = mmap.PAGESIZE
IOVA = 0x100000
EDU_DMA_SRC, EDU_DMA_DST, EDU_DMA_COUNT, EDU_DMA_CMD = 0x80, 0x88, 0x90, 0x98
EDU_BUFFER, EDU_DMA_MAX = 0x40000, 4095
RW = iuapi.IoasMapFlag.READABLE | iuapi.IoasMapFlag.WRITEABLE


@pytest.fixture
def iommufd(linux: LinuxKernel) -> Iterator[int]:
    fd = linux.open_iommufd()
    try:
        yield fd
    finally:
        linux.close(fd)


@pytest.fixture
def ioas(linux: LinuxKernel, iommufd: int) -> int:
    arg = iuapi.iommu_ioas_alloc(size=ctypes.sizeof(iuapi.iommu_ioas_alloc))
    linux.ioas_alloc(iommufd, arg)
    return int(arg.out_ioas_id)


@pytest.fixture
def cdev(linux: LinuxKernel, edu_bdf: str) -> Iterator[int]:
    name = linux.device_cdev(edu_bdf)
    assert name is not None, f"{edu_bdf} has no vfio-dev/vfioN in sysfs"
    fd = linux.open_device_cdev(name)
    try:
        yield fd
    finally:
        linux.close(fd)


def _bind(linux: LinuxKernel, device: int, iommufd: int) -> int:
    arg = uapi.vfio_device_bind_iommufd(
        argsz=ctypes.sizeof(uapi.vfio_device_bind_iommufd), iommufd=iommufd
    )
    linux.device_bind_iommufd(device, arg)
    return int(arg.out_devid)


def _attach(linux: LinuxKernel, device: int, ioas: int) -> None:
    arg = uapi.vfio_device_attach_iommufd_pt(
        argsz=ctypes.sizeof(uapi.vfio_device_attach_iommufd_pt), pt_id=ioas
    )
    linux.device_attach_iommufd_pt(device, arg)


@pytest.fixture
def attached(linux: LinuxKernel, cdev: int, iommufd: int, ioas: int) -> int:
    """edu's cdev bound to the iommufd and attached to the IOAS."""
    _bind(linux, cdev, iommufd)
    _attach(linux, cdev, ioas)
    return cdev


@pytest.fixture
def buffer() -> Iterator[mmap.mmap]:
    buf = mmap.mmap(-1, 4 * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        yield buf
    finally:
        buf.close()


def _address(buf: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def _map(
    linux: LinuxKernel, iommufd: int, ioas: int, buf: mmap.mmap, *, iova: int | None, size: int
) -> int:
    flags = RW | (iuapi.IoasMapFlag.FIXED_IOVA if iova is not None else 0)
    arg = iuapi.iommu_ioas_map(
        size=ctypes.sizeof(iuapi.iommu_ioas_map),
        flags=flags,
        ioas_id=ioas,
        user_va=_address(buf),
        length=size,
        iova=iova or 0,
    )
    linux.ioas_map(iommufd, arg)
    return int(arg.iova)


def _unmap(linux: LinuxKernel, iommufd: int, ioas: int, iova: int, size: int) -> int:
    arg = iuapi.iommu_ioas_unmap(
        size=ctypes.sizeof(iuapi.iommu_ioas_unmap), ioas_id=ioas, iova=iova, length=size
    )
    linux.ioas_unmap(iommufd, arg)
    return int(arg.length)


def _ranges(linux: LinuxKernel, iommufd: int, ioas: int) -> tuple[list[tuple[int, int]], int]:
    arg = iuapi.iommu_ioas_iova_ranges(
        size=ctypes.sizeof(iuapi.iommu_ioas_iova_ranges), ioas_id=ioas
    )
    with pytest.raises(OSError) as caught:  # no room: the kernel says how many
        linux.ioas_iova_ranges(iommufd, arg)
    assert caught.value.errno == errno.EMSGSIZE
    table = (iuapi.iommu_iova_range * arg.num_iovas)()
    arg.allowed_iovas = ctypes.addressof(table)
    linux.ioas_iova_ranges(iommufd, arg)
    return [(r.start, r.last) for r in table], int(arg.out_iova_alignment)


def _edu(linux: LinuxKernel, device: int) -> memoryview:
    """BAR0 of edu as 32-bit registers, with Memory Space and Bus Master on."""
    regions = {}
    for index in (uapi.PciRegion.BAR0, uapi.PciRegion.CONFIG):
        info = uapi.vfio_region_info(argsz=ctypes.sizeof(uapi.vfio_region_info), index=index)
        buf = bytearray(info)
        linux.device_get_region_info(device, buf)
        regions[index] = uapi.vfio_region_info.from_buffer_copy(buf)
    config = regions[uapi.PciRegion.CONFIG].offset
    (command,) = struct.unpack("<H", linux.pread(device, 2, config + Cfg.COMMAND))
    command |= Command.MEMORY | Command.MASTER
    linux.pwrite(device, struct.pack("<H", command), config + Cfg.COMMAND)
    bar = regions[uapi.PciRegion.BAR0]
    return memoryview(linux.mmap(device, bar.size, bar.offset, writable=True)).cast("I")


def _edu_dma(regs: memoryview, src: int, dst: int, to_ram: bool) -> None:
    regs[EDU_DMA_SRC // 4] = src
    regs[EDU_DMA_DST // 4] = dst
    regs[EDU_DMA_COUNT // 4] = EDU_DMA_MAX
    regs[EDU_DMA_CMD // 4] = 0x1 | (0x2 if to_ram else 0)
    deadline = time.monotonic() + 10.0
    while regs[EDU_DMA_CMD // 4] & 0x1:
        assert time.monotonic() < deadline, "edu DMA did not complete"
        time.sleep(0.01)


# --- iommufd and the IOAS ----------------------------------------------------------


def test_ioas_reports_its_iova_ranges(linux: LinuxKernel, iommufd: int, ioas: int) -> None:
    ranges, alignment = _ranges(linux, iommufd, ioas)
    assert ranges, "an IOAS with no device attached still has ranges"
    assert alignment in (1, PAGE) or alignment % PAGE == 0
    assert any(start <= IOVA and last >= IOVA + PAGE - 1 for start, last in ranges)


def test_device_cdev_is_named_in_sysfs(linux: LinuxKernel, edu_bdf: str) -> None:
    name = linux.device_cdev(edu_bdf)
    assert name is not None and name.startswith("vfio")
    assert os.path.exists(f"/dev/vfio/devices/{name}")


def test_bind_attach_map_and_edu_dma_both_ways(
    linux: LinuxKernel, iommufd: int, ioas: int, attached: int, buffer: mmap.mmap
) -> None:
    ranges, _ = _ranges(linux, iommufd, ioas)
    # the vIOMMU reserves the x86 MSI window once a device is attached
    assert not any(start <= 0xFEE00000 <= last for start, last in ranges)
    pattern = bytes((i * 5 + 1) & 0xFF for i in range(EDU_DMA_MAX))
    buffer[:EDU_DMA_MAX] = pattern
    assert _map(linux, iommufd, ioas, buffer, iova=IOVA, size=len(buffer)) == IOVA
    regs = _edu(linux, attached)
    try:
        _edu_dma(regs, IOVA, EDU_BUFFER, to_ram=False)
        _edu_dma(regs, EDU_BUFFER, IOVA + 2 * PAGE, to_ram=True)
        assert buffer[2 * PAGE : 2 * PAGE + EDU_DMA_MAX] == pattern
    finally:
        regs.release()
        assert _unmap(linux, iommufd, ioas, IOVA, len(buffer)) == len(buffer)


def test_map_before_attach_is_allowed(
    linux: LinuxKernel, cdev: int, iommufd: int, ioas: int, buffer: mmap.mmap
) -> None:
    # an IOAS holds mappings on its own; attaching a device later applies them
    _map(linux, iommufd, ioas, buffer, iova=IOVA, size=PAGE)
    _bind(linux, cdev, iommufd)
    _attach(linux, cdev, ioas)
    assert _unmap(linux, iommufd, ioas, IOVA, PAGE) == PAGE


def test_kernel_chosen_iova_is_in_range_and_aligned(
    linux: LinuxKernel, iommufd: int, ioas: int, attached: int, buffer: mmap.mmap
) -> None:
    iova = _map(linux, iommufd, ioas, buffer, iova=None, size=2 * PAGE)
    ranges, _ = _ranges(linux, iommufd, ioas)
    assert iova % PAGE == 0
    assert any(start <= iova and iova + 2 * PAGE - 1 <= last for start, last in ranges)
    assert _unmap(linux, iommufd, ioas, iova, 2 * PAGE) == 2 * PAGE


def test_overlapping_map_is_eexist(
    linux: LinuxKernel, iommufd: int, ioas: int, attached: int, buffer: mmap.mmap
) -> None:
    _map(linux, iommufd, ioas, buffer, iova=IOVA, size=2 * PAGE)
    try:
        with pytest.raises(OSError) as caught:
            _map(linux, iommufd, ioas, buffer, iova=IOVA + PAGE, size=PAGE)
        assert caught.value.errno == errno.EEXIST
    finally:
        _unmap(linux, iommufd, ioas, IOVA, 2 * PAGE)


def test_unaligned_map_is_einval(
    linux: LinuxKernel, iommufd: int, ioas: int, attached: int, buffer: mmap.mmap
) -> None:
    with pytest.raises(OSError) as caught:
        _map(linux, iommufd, ioas, buffer, iova=IOVA + 1, size=PAGE)
    assert caught.value.errno == errno.EINVAL


def test_map_outside_the_ranges_is_refused(
    linux: LinuxKernel, iommufd: int, ioas: int, attached: int, buffer: mmap.mmap
) -> None:
    with pytest.raises(OSError) as caught:
        _map(linux, iommufd, ioas, buffer, iova=0xFEE00000, size=PAGE)
    assert caught.value.errno in (errno.EINVAL, errno.ENOSPC, errno.ERANGE)


def test_unmap_of_nothing_is_enoent(linux: LinuxKernel, iommufd: int, ioas: int) -> None:
    with pytest.raises(OSError) as caught:
        _unmap(linux, iommufd, ioas, IOVA, PAGE)
    assert caught.value.errno == errno.ENOENT


# --- ownership: the cdev against the group path -------------------------------------


def test_one_bind_per_device(linux: LinuxKernel, edu_bdf: str, attached: int, iommufd: int) -> None:
    with pytest.raises(OSError) as caught:  # the same fd, again
        _bind(linux, attached, iommufd)
    assert caught.value.errno == errno.EINVAL
    name = linux.device_cdev(edu_bdf)
    assert name is not None
    other = linux.open_device_cdev(name)  # a second open is allowed ...
    try:
        with pytest.raises(OSError) as caught:  # ... but not a second bind
            _bind(linux, other, iommufd)
        assert caught.value.errno == errno.EINVAL
    finally:
        linux.close(other)


def test_a_bound_cdev_excludes_the_group(linux: LinuxKernel, edu_bdf: str, attached: int) -> None:
    group = linux.iommu_group(edu_bdf)
    assert group is not None
    with pytest.raises(OSError) as caught:
        linux.open_group(group)
    assert caught.value.errno == errno.EBUSY


def test_an_open_group_excludes_binding_the_cdev(
    linux: LinuxKernel, edu_bdf: str, cdev: int, iommufd: int
) -> None:
    group = linux.iommu_group(edu_bdf)
    assert group is not None
    group_fd = linux.open_group(group)
    try:
        with pytest.raises(OSError) as caught:
            _bind(linux, cdev, iommufd)
        assert caught.value.errno == errno.EBUSY
    finally:
        linux.close(group_fd)
    _bind(linux, cdev, iommufd)  # once the group is closed, the bind goes through


def test_device_ioctls_before_bind_are_refused(linux: LinuxKernel, cdev: int) -> None:
    buf = bytearray(uapi.vfio_device_info(argsz=ctypes.sizeof(uapi.vfio_device_info)))
    with pytest.raises(OSError) as caught:
        linux.device_get_info(cdev, buf)
    assert caught.value.errno == errno.EINVAL


# --- the public API on this kernel: the choice, and the refusals -----------------------


@pytest.mark.anyio
async def test_open_device_picks_iommufd_here(
    vfio_target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    linux, edu_bdf = vfio_target.kernel, vfio_target.edu
    monkeypatch.delenv("AIOVFIO_BACKEND", raising=False)
    async with aiovfio.open_device(edu_bdf, kernel=linux) as dev:
        assert "backend=iommufd" in repr(dev)
        assert dev.dma_space.backend == "iommufd"
        ranges = dev.iommu_info.iova_ranges
        assert not any(lo <= 0xFEE00000 <= hi for lo, hi in ranges)  # after the attach
    async with aiovfio.open_device(edu_bdf, kernel=linux, backend="container") as dev:
        assert "backend=container" in repr(dev)  # iommufd's emulation of /dev/vfio/vfio


@pytest.mark.anyio
async def test_the_cdev_and_the_group_refuse_each_other_with_a_reason(
    vfio_target: Target,
) -> None:
    linux, edu_bdf = vfio_target.kernel, vfio_target.edu

    async with aiovfio.open_device(edu_bdf, kernel=linux, backend="container"):
        with pytest.raises(aiovfio.KernelBusy, match="exclude each other"):
            async with aiovfio.open_device(edu_bdf, kernel=linux, backend="iommufd"):
                pass
    async with aiovfio.open_device(edu_bdf, kernel=linux, backend="iommufd"):
        with pytest.raises(aiovfio.KernelBusy, match="cdev"):
            async with aiovfio.open_device(edu_bdf, kernel=linux, backend="container"):
                pass
