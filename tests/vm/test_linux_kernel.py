"""`aiovfio.kernel.linux.LinuxKernel` against real VFIO: edu and nvme in the guest.

One test per kernel interaction, in the order a driver makes them: container,
group, IOMMU, device, regions, config space, MSI, DMA mappings, and edu DMA
both ways through the emulated Intel IOMMU. Facts checked here are the ones
the simulated machine must reproduce (see shared DEVICES.md).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import select
import struct
import time
from collections.abc import Iterator

import pytest

from aiovfio._uapi import caps
from aiovfio._uapi import vfio as uapi
from aiovfio._uapi.pci import Cfg, Command
from aiovfio.kernel.linux import LinuxKernel

pytestmark = pytest.mark.needs_iommu(
    "raw type1 container ioctls: without an IOMMU the container takes VFIO_NOIOMMU_IOMMU only"
)

PAGE = mmap.PAGESIZE
MIB = 1 << 20

# edu registers (QEMU hw/misc/edu.c)
EDU_ID, EDU_LIVENESS, EDU_IRQ_STATUS, EDU_IRQ_RAISE, EDU_IRQ_ACK = 0x00, 0x04, 0x24, 0x60, 0x64
EDU_DMA_SRC, EDU_DMA_DST, EDU_DMA_COUNT, EDU_DMA_CMD = 0x80, 0x88, 0x90, 0x98
EDU_DMA_RUN, EDU_DMA_TO_RAM = 0x1, 0x2
EDU_BUFFER = 0x40000
# QEMU 7.2's edu aborts the VM on a transfer that ends at 0x41000: stay one byte short.
EDU_DMA_MAX = 4095
# edu's DMA mask is 28 bits: IOVAs below 256 MiB.
IOVA = 0x100000


# --- fixtures ----------------------------------------------------------------------


@pytest.fixture
def container(linux: LinuxKernel) -> Iterator[int]:
    fd = linux.open_container()
    try:
        yield fd
    finally:
        linux.close(fd)


def _open_group(linux: LinuxKernel, bdf: str) -> int:
    group = linux.iommu_group(bdf)
    assert group is not None, f"{bdf} has no IOMMU group"
    return linux.open_group(group)


@pytest.fixture
def edu_group(linux: LinuxKernel, edu_bdf: str) -> Iterator[int]:
    fd = _open_group(linux, edu_bdf)
    try:
        yield fd
    finally:
        linux.close(fd)


@pytest.fixture
def attached(linux: LinuxKernel, container: int, edu_group: int) -> int:
    """The container with edu's group attached and the Type1v2 IOMMU set."""
    linux.group_set_container(edu_group, container)
    linux.set_iommu(container, uapi.Extension.TYPE1v2_IOMMU)
    return container


@pytest.fixture
def edu(linux: LinuxKernel, attached: int, edu_group: int, edu_bdf: str) -> Iterator[int]:
    """edu's device fd, with Memory Space and Bus Master enabled."""
    fd = linux.group_get_device_fd(edu_group, edu_bdf)
    try:
        config = _region(linux, fd, uapi.PciRegion.CONFIG).offset
        (command,) = struct.unpack("<H", linux.pread(fd, 2, config + Cfg.COMMAND))
        command |= Command.MEMORY | Command.MASTER
        linux.pwrite(fd, struct.pack("<H", command), config + Cfg.COMMAND)
        yield fd
    finally:
        linux.close(fd)


@pytest.fixture
def edu_bar0(linux: LinuxKernel, edu: int) -> Iterator[memoryview]:
    """BAR0 of edu, mmap'd, as 32-bit registers."""
    info = _region(linux, edu, uapi.PciRegion.BAR0)
    bar = linux.mmap(edu, info.size, info.offset, writable=True)
    regs = memoryview(bar).cast("I")
    try:
        yield regs
    finally:
        regs.release()
        bar.close()


@pytest.fixture
def dma_buffer() -> Iterator[mmap.mmap]:
    """Four anonymous pages to map for DMA."""
    buf = mmap.mmap(-1, 4 * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        yield buf
    finally:
        buf.close()


# --- helpers -----------------------------------------------------------------------


def _region(linux: LinuxKernel, device: int, index: int) -> uapi.vfio_region_info:
    info = uapi.vfio_region_info(argsz=ctypes.sizeof(uapi.vfio_region_info), index=index)
    buf = bytearray(info)
    linux.device_get_region_info(device, buf)
    return uapi.vfio_region_info.from_buffer_copy(buf)


def _address(buf: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def _dma_map(iova: int, vaddr: int, size: int) -> uapi.vfio_iommu_type1_dma_map:
    return uapi.vfio_iommu_type1_dma_map(
        argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_map),
        flags=uapi.DmaMapFlag.READ | uapi.DmaMapFlag.WRITE,
        vaddr=vaddr,
        iova=iova,
        size=size,
    )


def _dma_unmap(iova: int, size: int) -> uapi.vfio_iommu_type1_dma_unmap:
    return uapi.vfio_iommu_type1_dma_unmap(
        argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_unmap), iova=iova, size=size
    )


def _irq_set(index: int, flags: int, fds: list[int]) -> bytearray:
    head = uapi.vfio_irq_set(
        argsz=ctypes.sizeof(uapi.vfio_irq_set) + 4 * len(fds),
        flags=flags,
        index=index,
        start=0,
        count=len(fds),
    )
    return bytearray(head) + struct.pack(f"<{len(fds)}i", *fds)


def _edu_dma(regs: memoryview, src: int, dst: int, count: int, cmd: int) -> None:
    regs[EDU_DMA_SRC // 4] = src
    regs[EDU_DMA_DST // 4] = dst
    regs[EDU_DMA_COUNT // 4] = count
    regs[EDU_DMA_CMD // 4] = cmd | EDU_DMA_RUN
    deadline = time.monotonic() + 10.0
    while regs[EDU_DMA_CMD // 4] & EDU_DMA_RUN:  # 100 ms of guest virtual time
        assert time.monotonic() < deadline, "edu DMA did not complete"
        time.sleep(0.01)


# --- container ---------------------------------------------------------------------


def test_container_speaks_api_0_with_type1v2(linux: LinuxKernel, container: int) -> None:
    assert linux.get_api_version(container) == uapi.VFIO_API_VERSION
    assert linux.check_extension(container, uapi.Extension.TYPE1v2_IOMMU) == 1
    assert linux.check_extension(container, uapi.Extension.TYPE1_IOMMU) == 1


@pytest.mark.needs_type1("iommufd's emulation answers ENODEV (no compat IOAS before a group)")
def test_set_iommu_before_any_group_is_einval(linux: LinuxKernel, container: int) -> None:
    with pytest.raises(OSError) as caught:
        linux.set_iommu(container, uapi.Extension.TYPE1v2_IOMMU)
    assert caught.value.errno == errno.EINVAL


# --- group -------------------------------------------------------------------------


def test_group_is_viable_and_gets_its_container(
    linux: LinuxKernel, container: int, edu_group: int
) -> None:
    status = uapi.vfio_group_status(argsz=ctypes.sizeof(uapi.vfio_group_status))
    linux.group_get_status(edu_group, status)
    assert status.flags & uapi.GroupFlag.VIABLE
    assert not status.flags & uapi.GroupFlag.CONTAINER_SET

    linux.group_set_container(edu_group, container)
    linux.group_get_status(edu_group, status)
    assert status.flags & uapi.GroupFlag.CONTAINER_SET

    linux.group_unset_container(edu_group)
    linux.group_get_status(edu_group, status)
    assert not status.flags & uapi.GroupFlag.CONTAINER_SET


def test_group_has_one_opener(linux: LinuxKernel, edu_bdf: str, edu_group: int) -> None:
    with pytest.raises(OSError) as caught:
        _open_group(linux, edu_bdf)
    assert caught.value.errno == errno.EBUSY


def test_sysfs_names_the_group_and_driver(linux: LinuxKernel, edu_bdf: str) -> None:
    group = linux.iommu_group(edu_bdf)
    assert group is not None
    assert edu_bdf in linux.group_devices(group)
    assert linux.driver(edu_bdf) == "vfio-pci"
    ids = linux.pci_ids(edu_bdf)
    assert (ids.vendor, ids.device, ids.class_code) == (0x1234, 0x11E8, 0x00FF00)


# --- IOMMU -------------------------------------------------------------------------


@pytest.mark.needs_type1("iommufd's emulation reports U32_MAX DMA entries, not dma_entry_limit")
def test_iommu_info_reports_pages_ranges_and_dma_avail(linux: LinuxKernel, attached: int) -> None:
    size = ctypes.sizeof(uapi.vfio_iommu_type1_info)
    buf = bytearray(uapi.vfio_iommu_type1_info(argsz=size))
    linux.iommu_get_info(attached, buf)
    info = uapi.vfio_iommu_type1_info.from_buffer_copy(buf)
    assert info.flags & uapi.IommuInfoFlag.PGSIZES
    assert info.iova_pgsizes & PAGE
    assert info.argsz > size, "the kernel asks for room for its capability chain"

    buf = bytearray(uapi.vfio_iommu_type1_info(argsz=info.argsz)) + bytes(info.argsz - size)
    linux.iommu_get_info(attached, buf)
    info = uapi.vfio_iommu_type1_info.from_buffer_copy(buf)
    assert info.flags & uapi.IommuInfoFlag.CAPS
    chain = {c.id: c for c in caps.walk(buf, info.cap_offset, start=size)}
    ranges = caps.iova_ranges(chain[uapi.IommuInfoCap.IOVA_RANGE])
    assert ranges[0][0] == 0
    assert any(start <= IOVA and end >= IOVA + MIB for start, end in ranges)
    assert caps.dma_avail(chain[uapi.IommuInfoCap.DMA_AVAIL]) == 65535


# --- device ------------------------------------------------------------------------


def test_device_fd_and_info(linux: LinuxKernel, edu: int) -> None:
    assert edu >= 0
    size = ctypes.sizeof(uapi.vfio_device_info)
    buf = bytearray(uapi.vfio_device_info(argsz=size))
    linux.device_get_info(edu, buf)
    info = uapi.vfio_device_info.from_buffer_copy(buf)
    assert info.flags & uapi.DeviceFlag.PCI
    assert info.num_regions >= uapi.PciRegion.NUM_REGIONS
    assert info.num_irqs == uapi.PciIrq.NUM_IRQS


def test_unknown_device_name_is_refused(linux: LinuxKernel, attached: int, edu_group: int) -> None:
    with pytest.raises(OSError) as caught:
        linux.group_get_device_fd(edu_group, "0000:00:1f.7")
    assert caught.value.errno in (errno.ENODEV, errno.EINVAL)


def test_edu_bar0_is_one_mib_and_mappable(linux: LinuxKernel, edu: int) -> None:
    info = _region(linux, edu, uapi.PciRegion.BAR0)
    assert info.size == MIB
    flags = uapi.RegionFlag(info.flags)
    assert flags & (uapi.RegionFlag.READ | uapi.RegionFlag.WRITE | uapi.RegionFlag.MMAP)
    assert _region(linux, edu, uapi.PciRegion.BAR1).size == 0


def test_config_space_reads_edu_identity(linux: LinuxKernel, edu: int) -> None:
    config = _region(linux, edu, uapi.PciRegion.CONFIG)
    assert config.size >= 256
    head = linux.pread(edu, 12, config.offset)
    vendor, device = struct.unpack_from("<HH", head, Cfg.VENDOR_ID)
    assert (vendor, device) == (0x1234, 0x11E8)
    assert head[Cfg.REVISION_ID] == 0x10
    (command,) = struct.unpack("<H", linux.pread(edu, 2, config.offset + Cfg.COMMAND))
    assert command & (Command.MEMORY | Command.MASTER) == Command.MEMORY | Command.MASTER


def test_bar0_registers_through_mmap_and_pread(
    linux: LinuxKernel, edu: int, edu_bar0: memoryview
) -> None:
    assert edu_bar0[EDU_ID // 4] == 0x010000ED
    offset = _region(linux, edu, uapi.PciRegion.BAR0).offset
    assert struct.unpack("<I", linux.pread(edu, 4, offset + EDU_ID)) == (0x010000ED,)
    edu_bar0[EDU_LIVENESS // 4] = 0x12345678
    assert edu_bar0[EDU_LIVENESS // 4] == 0xEDCBA987
    linux.pwrite(edu, struct.pack("<I", 0), offset + EDU_LIVENESS)
    assert edu_bar0[EDU_LIVENESS // 4] == 0xFFFFFFFF


@pytest.fixture
def nvme(linux: LinuxKernel, attached: int, nvme_bdf: str) -> Iterator[int]:
    """nvme's device fd, its group on the same container as edu's."""
    group = _open_group(linux, nvme_bdf)
    try:
        linux.group_set_container(group, attached)
        device = linux.group_get_device_fd(group, nvme_bdf)
        try:
            yield device
        finally:
            linux.close(device)
    finally:
        linux.close(group)


def _device_flags(linux: LinuxKernel, device: int) -> uapi.DeviceFlag:
    buf = bytearray(uapi.vfio_device_info(argsz=ctypes.sizeof(uapi.vfio_device_info)))
    linux.device_get_info(device, buf)
    return uapi.DeviceFlag(uapi.vfio_device_info.from_buffer_copy(buf).flags)


def test_nvme_bar0_has_a_capability_chain(linux: LinuxKernel, nvme: int) -> None:
    size = ctypes.sizeof(uapi.vfio_region_info)
    first = _region(linux, nvme, uapi.PciRegion.BAR0)
    assert first.size == 16 * 1024
    assert first.flags & uapi.RegionFlag.CAPS
    assert first.argsz > size, "the kernel asks for room for the chain"
    buf = bytearray(uapi.vfio_region_info(argsz=first.argsz, index=0)) + bytes(first.argsz - size)
    linux.device_get_region_info(nvme, buf)
    info = uapi.vfio_region_info.from_buffer_copy(buf)
    ids = {c.id for c in caps.walk(buf, info.cap_offset, start=size)}
    assert uapi.RegionCap.MSIX_MAPPABLE in ids


def test_nvme_msix_vectors(linux: LinuxKernel, nvme: int) -> None:
    irq = uapi.vfio_irq_info(argsz=ctypes.sizeof(uapi.vfio_irq_info), index=uapi.PciIrq.MSIX)
    linux.device_get_irq_info(nvme, irq)
    assert irq.count == 65  # QEMU's msix_qsize
    assert irq.flags & uapi.IrqInfoFlag.EVENTFD
    msi = uapi.vfio_irq_info(argsz=ctypes.sizeof(uapi.vfio_irq_info), index=uapi.PciIrq.MSI)
    linux.device_get_irq_info(nvme, msi)
    assert msi.count == 0  # nvme has MSI-X only


def test_reset_where_the_device_says_it_can(linux: LinuxKernel, edu: int, nvme: int) -> None:
    assert _device_flags(linux, nvme) & uapi.DeviceFlag.RESET  # FLR
    linux.device_reset(nvme)
    assert not _device_flags(linux, edu) & uapi.DeviceFlag.RESET  # no FLR, no PM reset
    with pytest.raises(OSError) as caught:
        linux.device_reset(edu)
    assert caught.value.errno == errno.EINVAL


def test_intx_is_maskable_and_automasked(linux: LinuxKernel, edu: int) -> None:
    irq = uapi.vfio_irq_info(argsz=ctypes.sizeof(uapi.vfio_irq_info), index=uapi.PciIrq.INTX)
    linux.device_get_irq_info(edu, irq)
    assert irq.count == 1
    want = uapi.IrqInfoFlag.EVENTFD | uapi.IrqInfoFlag.MASKABLE | uapi.IrqInfoFlag.AUTOMASKED
    assert irq.flags & want == want


# --- interrupts --------------------------------------------------------------------


def test_msi_through_an_eventfd(linux: LinuxKernel, edu: int, edu_bar0: memoryview) -> None:
    irq = uapi.vfio_irq_info(argsz=ctypes.sizeof(uapi.vfio_irq_info), index=uapi.PciIrq.MSI)
    linux.device_get_irq_info(edu, irq)
    assert irq.count == 1
    assert irq.flags & uapi.IrqInfoFlag.EVENTFD

    efd = linux.eventfd()
    trigger = uapi.IrqSetFlag.DATA_EVENTFD | uapi.IrqSetFlag.ACTION_TRIGGER
    try:
        linux.device_set_irqs(edu, _irq_set(uapi.PciIrq.MSI, trigger, [efd]))
        with pytest.raises(BlockingIOError):
            linux.eventfd_read(efd)
        edu_bar0[EDU_IRQ_RAISE // 4] = 0xCAFE0000
        readable, _, _ = select.select([efd], [], [], 10.0)
        assert readable, "no MSI within 10 s"
        assert linux.eventfd_read(efd) >= 1
        assert edu_bar0[EDU_IRQ_STATUS // 4] == 0xCAFE0000
        edu_bar0[EDU_IRQ_ACK // 4] = 0xCAFE0000
        assert edu_bar0[EDU_IRQ_STATUS // 4] == 0
    finally:
        off = uapi.IrqSetFlag.DATA_NONE | uapi.IrqSetFlag.ACTION_TRIGGER
        linux.device_set_irqs(edu, _irq_set(uapi.PciIrq.MSI, off, []))
        linux.close(efd)


# --- DMA ---------------------------------------------------------------------------


@pytest.mark.needs_type1(
    "iommufd's emulation: U32_MAX DMA entries, and ENOENT for an unmap of nothing"
)
def test_map_and_unmap_dma(linux: LinuxKernel, attached: int, dma_buffer: mmap.mmap) -> None:
    size = len(dma_buffer)
    linux.map_dma(attached, _dma_map(IOVA, _address(dma_buffer), size))

    with pytest.raises(OSError) as caught:
        linux.map_dma(attached, _dma_map(IOVA + PAGE, _address(dma_buffer), PAGE))
    assert caught.value.errno == errno.EEXIST

    assert _dma_avail(linux, attached) == 65535 - 1

    unmap = _dma_unmap(IOVA, size)
    linux.unmap_dma(attached, unmap)
    assert unmap.size == size
    again = _dma_unmap(IOVA, size)
    linux.unmap_dma(attached, again)
    assert again.size == 0, "nothing is left to unmap"
    assert _dma_avail(linux, attached) == 65535


def _dma_avail(linux: LinuxKernel, container: int) -> int:
    size = ctypes.sizeof(uapi.vfio_iommu_type1_info)
    buf = bytearray(uapi.vfio_iommu_type1_info(argsz=4096)) + bytes(4096 - size)
    linux.iommu_get_info(container, buf)
    info = uapi.vfio_iommu_type1_info.from_buffer_copy(buf)
    chain = {c.id: c for c in caps.walk(buf, info.cap_offset, start=size)}
    return caps.dma_avail(chain[uapi.IommuInfoCap.DMA_AVAIL])


@pytest.mark.needs_type1(
    "iommufd's emulation has no IOMMU domain until a device fd is open, and an IOAS "
    "without a domain takes any IOVA alignment (test_iommufd_container_aligns_once_a_device_opens)"
)
def test_unaligned_map_is_einval(linux: LinuxKernel, attached: int, dma_buffer: mmap.mmap) -> None:
    with pytest.raises(OSError) as caught:
        linux.map_dma(attached, _dma_map(IOVA + 1, _address(dma_buffer), PAGE))
    assert caught.value.errno == errno.EINVAL


@pytest.mark.needs_iommufd("the legacy container served by iommufd (CONFIG_IOMMUFD_VFIO_CONTAINER)")
def test_iommufd_container_aligns_once_a_device_opens(
    linux: LinuxKernel, attached: int, edu_group: int, edu_bdf: str, dma_buffer: mmap.mmap
) -> None:
    # No device fd yet: the IOAS has no domain, so it takes an unaligned IOVA.
    linux.map_dma(attached, _dma_map(IOVA + 1, _address(dma_buffer), PAGE))
    unmap = _dma_unmap(IOVA + 1, PAGE)
    linux.unmap_dma(attached, unmap)
    assert unmap.size == PAGE
    # GET_DEVICE_FD attaches the device to the IOAS: its domain sets the alignment,
    # and narrows the IOVA ranges to the domain's aperture.
    before = _iova_ranges(linux, attached)
    fd = linux.group_get_device_fd(edu_group, edu_bdf)
    try:
        with pytest.raises(OSError) as caught:
            linux.map_dma(attached, _dma_map(IOVA + 1, _address(dma_buffer), PAGE))
        assert caught.value.errno == errno.EINVAL
        after = _iova_ranges(linux, attached)
        assert after != before and max(e for _, e in after) < max(e for _, e in before)
    finally:
        linux.close(fd)


def _iova_ranges(linux: LinuxKernel, container: int) -> list[tuple[int, int]]:
    size = ctypes.sizeof(uapi.vfio_iommu_type1_info)
    buf = bytearray(uapi.vfio_iommu_type1_info(argsz=4096)) + bytes(4096 - size)
    linux.iommu_get_info(container, buf)
    info = uapi.vfio_iommu_type1_info.from_buffer_copy(buf)
    chain = {c.id: c for c in caps.walk(buf, info.cap_offset, start=size)}
    return list(caps.iova_ranges(chain[uapi.IommuInfoCap.IOVA_RANGE]))


def test_edu_dma_both_ways(
    linux: LinuxKernel, attached: int, edu_bar0: memoryview, dma_buffer: mmap.mmap
) -> None:
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(EDU_DMA_MAX))
    dma_buffer[:EDU_DMA_MAX] = pattern
    out = 2 * PAGE  # the device writes back into the buffer's third page
    linux.map_dma(attached, _dma_map(IOVA, _address(dma_buffer), len(dma_buffer)))
    try:
        _edu_dma(edu_bar0, IOVA, EDU_BUFFER, EDU_DMA_MAX, 0)
        _edu_dma(edu_bar0, EDU_BUFFER, IOVA + out, EDU_DMA_MAX, EDU_DMA_TO_RAM)
        assert dma_buffer[out : out + EDU_DMA_MAX] == pattern
        assert dma_buffer[out + EDU_DMA_MAX] == 0
    finally:
        linux.unmap_dma(attached, _dma_unmap(IOVA, len(dma_buffer)))
