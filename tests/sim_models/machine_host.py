"""`NvmeHost` over a real simulated `Machine` (its Kernel), instead of `FakeContext`.

`MachineContext` gives NvmeHost what it needs from a context — register
reads and writes, mapped buffers, and `run_all` — through the sim's Kernel
boundary: BAR0 pread/pwrite on a device fd, anonymous memory mapped with
VFIO_IOMMU_MAP_DMA, and the machine's clock (manual or thread).
"""

from __future__ import annotations

import ctypes
import mmap
import struct

from aiovfio._uapi import vfio as uapi
from aiovfio._uapi.vfio import Extension
from aiovfio.kernel import lent
from aiovfio.sim import Machine
from aiovfio.sim.models import Nvme

from .fakes import PAGE

NAME = "0000:00:05.0"
_BAR0 = 0
_CONFIG = 7 << 40


class MachineContext:
    """The host side of FakeContext's API, on a Machine with an nvme at 00:05.0."""

    def __init__(self, machine: Machine, model: Nvme | None = None, *, lend: bool = False) -> None:
        self.machine = machine
        self.lend = lend
        self.views: list[memoryview] = []
        self.model = model or Nvme()
        machine.add_device(self.model, name=NAME)
        k = machine.kernel
        self.k = k
        self.container = k.open_container()
        group = k.iommu_group(NAME)
        assert group is not None
        self.group = k.open_group(group)
        k.group_set_container(self.group, self.container)
        k.set_iommu(self.container, Extension.TYPE1v2_IOMMU)
        self.device = k.group_get_device_fd(self.group, NAME)
        command = struct.unpack("<H", k.pread(self.device, 2, _CONFIG + 4))[0]
        k.pwrite(self.device, struct.pack("<H", command | 0x6), _CONFIG + 4)  # Memory, Bus Master
        self.buffers: list[mmap.mmap] = []
        self.faults: list[str] = []

    def read(self, offset: int, size: int = 4, region: int = 0) -> int:
        return int.from_bytes(self.k.pread(self.device, size, (region << 40) + offset), "little")

    def write(self, offset: int, value: int, size: int = 4, region: int = 0) -> None:
        self.k.pwrite(self.device, value.to_bytes(size, "little"), (region << 40) + offset)

    def map(
        self, iova: int, size: int, *, readable: bool = True, writable: bool = True
    ) -> mmap.mmap:
        """Fresh memory mapped at `iova`; if the context lends, its view is lent as the
        public layer lends a DmaBuffer's (the device then copies without a syscall, and
        the model may keep views of it)."""
        buf = mmap.mmap(-1, size)
        anchor = ctypes.c_char.from_buffer(buf)
        vaddr = ctypes.addressof(anchor)
        del anchor
        flags = (uapi.DmaMapFlag.READ if readable else 0) | (
            uapi.DmaMapFlag.WRITE if writable else 0
        )
        arg = uapi.vfio_iommu_type1_dma_map(
            argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_map),
            flags=flags,
            vaddr=vaddr,
            iova=iova,
            size=size,
        )
        if self.lend:
            view = memoryview(buf)
            self.views.append(view)
            with lent.lend(vaddr, size, view):
                self.k.map_dma(self.container, arg)
        else:
            self.k.map_dma(self.container, arg)
        self.buffers.append(buf)
        return buf

    def unmap(self, iova: int, size: int = 0) -> None:
        """VFIO_IOMMU_UNMAP_DMA of the mapping at `iova` (its memory stays alive)."""
        arg = uapi.vfio_iommu_type1_dma_unmap(
            argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_unmap), iova=iova, size=size or PAGE
        )
        self.k.unmap_dma(self.container, arg)

    def run_all(self, limit: int = 10_000) -> int:
        if self.machine.clock.kind == "thread":
            self.machine.run_until_idle(timeout=10)
            return 0
        return self.machine.run_until_idle()

    def close(self) -> None:
        for fd in (self.device, self.group, self.container):
            self.k.close(fd)
        for view in self.views:
            view.release()
        for buf in self.buffers:
            buf.close()
        assert PAGE == 4096
