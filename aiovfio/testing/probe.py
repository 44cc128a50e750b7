"""Ask a kernel, row by row, how it behaves where Linux versions differ.

`probe(kernel, msix_device=..., edu=...)` answers every row of
`aiovfio.sim.rules.PERSONALITY` by doing what the row describes through the
raw `Kernel` boundary (no public objects): on the real kernel inside the
aiovfio guest, or on a simulated machine. The guest test
tests/vm/test_personality.py compares the running kernel's answers with the
sim's personality of that kernel; a driver's own suite can use it to see
which kernel it is on. `msix_device` must have MSI-X with at least 3 vectors
(QEMU's nvme); `edu` is QEMU's edu (the BAR access-width row).

Every probe opens its own container, group and device and closes them again,
so a probe leaks nothing, and leaves the device as it found it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterator

from .._uapi import caps
from .._uapi import vfio as uapi
from .._uapi.vfio import Extension, IrqInfoFlag, IrqSetFlag, PciIrq
from ..kernel.protocol import Kernel

__all__ = ["ROW_PROBES", "probe"]

_CONFIG = 7 << 40
_BAR0 = 0


@contextlib.contextmanager
def _opened(kernel: Kernel, bdf: str) -> Iterator[tuple[int, int]]:
    """(container fd, device fd) for `bdf`, with a type1v2 IOMMU; all closed after."""
    group = kernel.iommu_group(bdf)
    if group is None:
        raise RuntimeError(f"{bdf} has no IOMMU group")
    container = kernel.open_container()
    fds = [container]
    try:
        g = kernel.open_group(group)
        fds.append(g)
        kernel.group_set_container(g, container)
        kernel.set_iommu(container, Extension.TYPE1v2_IOMMU)
        d = kernel.group_get_device_fd(g, bdf)
        fds.append(d)
        yield container, d
    finally:
        for fd in reversed(fds):
            kernel.close(fd)


def _irq_set(kernel: Kernel, d: int, flags: int, index: int, start: int, data: list[int]) -> None:
    fmt = {IrqSetFlag.DATA_EVENTFD: "i", IrqSetFlag.DATA_BOOL: "B"}.get(
        IrqSetFlag(flags & IrqSetFlag.DATA_TYPE_MASK), ""
    )
    payload = struct.pack(f"<{len(data)}{fmt}", *data) if fmt else b""
    count = len(data) if fmt else (data[0] if data else 0)
    head = uapi.vfio_irq_set(
        argsz=ctypes.sizeof(uapi.vfio_irq_set) + len(payload),
        flags=flags | IrqSetFlag.ACTION_TRIGGER,
        index=index,
        start=start,
        count=count,
    )
    kernel.device_set_irqs(d, bytearray(bytes(head) + payload))


def _hook(kernel: Kernel, d: int, start: int, fds: list[int]) -> None:
    _irq_set(kernel, d, IrqSetFlag.DATA_EVENTFD, PciIrq.MSIX, start, fds)


def _loopback(kernel: Kernel, d: int, start: int) -> None:
    _irq_set(kernel, d, IrqSetFlag.DATA_NONE, PciIrq.MSIX, start, [1])


def _disable(kernel: Kernel, d: int) -> None:
    _irq_set(kernel, d, IrqSetFlag.DATA_NONE, PciIrq.MSIX, 0, [0])


def _fired(kernel: Kernel, fd: int) -> bool:
    try:
        return kernel.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


@contextlib.contextmanager
def _eventfds(kernel: Kernel, n: int) -> Iterator[list[int]]:
    fds = [kernel.eventfd() for _ in range(n)]
    try:
        yield fds
    finally:
        for fd in fds:
            kernel.close(fd)


def _errno_or_zero(call: Callable[[], None]) -> object:
    try:
        call()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return 0


# --- one probe per row ------------------------------------------------------------------


def msix_noresize(kernel: Kernel, msix_device: str, edu: str) -> object:
    with _opened(kernel, msix_device) as (_, d):
        info = uapi.vfio_irq_info(argsz=ctypes.sizeof(uapi.vfio_irq_info), index=PciIrq.MSIX)
        kernel.device_get_irq_info(d, info)
        return bool(info.flags & IrqInfoFlag.NORESIZE)


def msix_dynamic(kernel: Kernel, msix_device: str, edu: str) -> object:
    with _opened(kernel, msix_device) as (_, d), _eventfds(kernel, 2) as (e0, e1):
        _hook(kernel, d, 0, [e0])
        try:
            _hook(kernel, d, 1, [e1])
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return False
        finally:
            _disable(kernel, d)
        return True


def msix_loopback_unallocated(kernel: Kernel, msix_device: str, edu: str) -> object:
    with _opened(kernel, msix_device) as (_, d), _eventfds(kernel, 1) as (e0,):
        _hook(kernel, d, 0, [e0])
        try:
            return _errno_or_zero(lambda: _loopback(kernel, d, 2))
        finally:
            _disable(kernel, d)


def iommu_info_cap_align(kernel: Kernel, msix_device: str, edu: str) -> object:
    with _opened(kernel, edu) as (c, _):
        size = ctypes.sizeof(uapi.vfio_iommu_type1_info)
        buf = bytearray(size)
        struct.pack_into("<I", buf, 0, size)
        kernel.iommu_get_info(c, buf)
        argsz = struct.unpack_from("<I", buf, 0)[0]
        buf = bytearray(argsz)
        struct.pack_into("<I", buf, 0, argsz)
        kernel.iommu_get_info(c, buf)
        info = uapi.vfio_iommu_type1_info.from_buffer_copy(buf)
        offsets = [cap.offset for cap in caps.walk(buf, info.cap_offset, start=size)]
        return 8 if all(off % 8 == 0 for off in offsets) and argsz % 8 == 0 else 1


def bar_io_width(kernel: Kernel, msix_device: str, edu: str) -> object:
    """edu's DMA source register (0x80) takes 8-byte writes; 0x84 alone hits nothing."""
    value = 0x1_2345_6000
    with _opened(kernel, edu) as (_, d):
        kernel.pwrite(d, struct.pack("<Q", 0), _BAR0 + 0x80)
        kernel.pwrite(d, struct.pack("<Q", value), _BAR0 + 0x80)
        got = struct.unpack("<Q", kernel.pread(d, 8, _BAR0 + 0x80))[0]
        kernel.pwrite(d, struct.pack("<Q", 0), _BAR0 + 0x80)
        return 8 if got == value else 4


def type1_nesting(kernel: Kernel, msix_device: str, edu: str) -> object:
    c = kernel.open_container()
    try:
        return kernel.check_extension(c, Extension.TYPE1_NESTING_IOMMU)
    finally:
        kernel.close(c)


def update_vaddr_before_set_iommu(kernel: Kernel, msix_device: str, edu: str) -> object:
    c = kernel.open_container()
    try:
        return kernel.check_extension(c, Extension.UPDATE_VADDR)
    finally:
        kernel.close(c)


def command_after_open(kernel: Kernel, msix_device: str, edu: str) -> object:
    with _opened(kernel, edu) as (_, d):
        return struct.unpack("<H", kernel.pread(d, 2, _CONFIG + 4))[0]


def _edu_dma(kernel: Kernel, d: int, src: int, dst: int, count: int, cmd: int) -> None:
    """One edu DMA (4-byte register writes: 6.1 splits wider ones), waited for."""
    for reg, value in ((0x80, src), (0x88, dst), (0x90, count), (0x98, cmd)):
        kernel.pwrite(d, struct.pack("<I", value), _BAR0 + reg)
    deadline = time.monotonic() + 30
    while struct.unpack("<I", kernel.pread(d, 4, _BAR0 + 0x98))[0] & 1:  # RUN
        if time.monotonic() > deadline:
            raise TimeoutError("edu's DMA did not finish in 30 s")
        time.sleep(0.001)


def _map(kernel: Kernel, c: int, address: int, iova: int, size: int, flags: int) -> None:
    arg = uapi.vfio_iommu_type1_dma_map(
        argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_map),
        flags=flags,
        vaddr=address,
        iova=iova,
        size=size,
    )
    kernel.map_dma(c, arg)


def _unmap(kernel: Kernel, c: int, iova: int, size: int) -> None:
    arg = uapi.vfio_iommu_type1_dma_unmap(
        argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_unmap), iova=iova, size=size
    )
    kernel.unmap_dma(c, arg)


def ro_pin_zero_page(kernel: Kernel, msix_device: str, edu: str) -> object:
    """Pin a never-written private page READ-only, write it, let edu DMA it out and back."""
    page = mmap.PAGESIZE
    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    pinned, landing = mmap.mmap(-1, page, flags=private), mmap.mmap(-1, page, flags=private)
    try:
        landing[:4] = b"\xee" * 4  # written: a real page
        addresses = []
        for m in (pinned, landing):  # from_buffer touches no page
            anchor = ctypes.c_char.from_buffer(m)
            addresses.append(ctypes.addressof(anchor))
            del anchor
        with _opened(kernel, edu) as (c, d):
            read, both = uapi.DmaMapFlag.READ, uapi.DmaMapFlag.READ | uapi.DmaMapFlag.WRITE
            _map(kernel, c, addresses[0], 0x10_0000, page, read)
            _map(kernel, c, addresses[1], 0x20_0000, page, both)
            try:
                pinned[:4] = b"seen"  # after the pin: 6.1 copies the page away from the device
                command = struct.unpack("<H", kernel.pread(d, 2, _CONFIG + 4))[0]
                kernel.pwrite(d, struct.pack("<H", command | 0x4), _CONFIG + 4)  # Bus Master
                _edu_dma(kernel, d, 0x10_0000, 0x40000, 4, 0x1)  # RAM -> edu's buffer
                _edu_dma(kernel, d, 0x40000, 0x20_0000, 4, 0x3)  # edu's buffer -> RAM
                got = bytes(landing[:4])
            finally:
                _unmap(kernel, c, 0x20_0000, page)
                _unmap(kernel, c, 0x10_0000, page)
        if got == b"seen":
            return "coherent"
        if got == bytes(4):
            return "zero page"
        return f"read {got!r}"
    finally:
        pinned.close()
        landing.close()


def msix_rehook_failure(kernel: Kernel, msix_device: str, edu: str) -> object:
    """Hook 3 vectors, re-hook them with a bad fd in the middle, see which still fire."""
    with _opened(kernel, msix_device) as (_, d), _eventfds(kernel, 5) as fds:
        old, new = fds[:3], fds[3:]
        _hook(kernel, d, 0, old)
        spare = os.dup(0)
        os.close(spare)  # a closed fd number: EBADF
        try:
            result = _errno_or_zero(lambda: _hook(kernel, d, 0, [new[0], spare, new[1]]))
            fired = []
            for vector in range(3):
                _loopback(kernel, d, vector)
                fired.append([i for i, fd in enumerate(fds) if _fired(kernel, fd)])
        finally:
            _disable(kernel, d)
        if result != "EBADF":
            return f"re-hook returned {result}"
        if fired == [[], [], [2]]:
            return "unhooked"  # vectors 0 and 1 (start up to the failing one) lost theirs
        if fired == [[0], [1], [2]]:
            return "kept"
        return f"fired {fired}"


#: row name -> probe(kernel, msix_device, edu)
ROW_PROBES: dict[str, Callable[[Kernel, str, str], object]] = {
    "msix_noresize": msix_noresize,
    "msix_dynamic": msix_dynamic,
    "msix_loopback_unallocated": msix_loopback_unallocated,
    "iommu_info_cap_align": iommu_info_cap_align,
    "bar_io_width": bar_io_width,
    "type1_nesting": type1_nesting,
    "update_vaddr_before_set_iommu": update_vaddr_before_set_iommu,
    "command_after_open": command_after_open,
    "ro_pin_zero_page": ro_pin_zero_page,
    "msix_rehook_failure": msix_rehook_failure,
}


def probe(kernel: Kernel, *, msix_device: str, edu: str) -> dict[str, object]:
    """Every row's answer from `kernel`."""
    return {name: fn(kernel, msix_device, edu) for name, fn in ROW_PROBES.items()}
