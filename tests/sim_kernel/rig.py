"""Helpers for the simulated kernel's tests: a tiny device model and a VFIO rig.

These tests talk to `Machine().kernel` directly, synchronously, with the same
structures the public layer passes, and assert the errno Linux gives.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Callable, Sequence

import pytest

from aiovfio._uapi import vfio as uapi
from aiovfio._uapi.pci import CapId, MsiCtrl
from aiovfio._uapi.vfio import IrqSetFlag, RegionFlag
from aiovfio.sim import DeviceContext, DeviceModel, IrqSpec, Machine, RegionSpec, Rule
from aiovfio.sim.kernel import SimKernel

NAME = "0000:00:04.0"
GROUP = 10
CONFIG = 7 << 40
PAGE = mmap.PAGESIZE

#: Toy BAR0 layout: registers below 0x800, the MSI-X table at 0x800, the PBA at 0xC00.
MSIX_TABLE = 0x800
MSIX_PBA = 0xC00
MSIX_VECTORS = 8
MSI_VECTORS = 4


class Toy(DeviceModel):
    """A small device: BAR0 trapped registers, BAR2 with an mmap area, a ROM.

    Registers are a dict; every trapped access is recorded in `accesses`.
    MSI (4 vectors), MSI-X (8, table in BAR0), INTx, optional PCIe and reset.
    """

    vendor_id = 0x1AF4
    device_id = 0x10F0
    revision = 0x01
    class_code = 0x058000

    def __init__(self, *, pcie: bool = False, reset: bool = True, pin: int = 1) -> None:
        self.supports_reset = reset
        self.interrupt_pin = pin
        self.pcie = pcie
        self.regs: dict[tuple[int, int], int] = {}
        self.accesses: list[tuple[str, int, int, int, int]] = []
        self.resets = 0
        self.ctx: DeviceContext | None = None
        #: called after each trapped write (a test's hook)
        self.on_write: Callable[[], None] | None = None

    def regions(self) -> Sequence[RegionSpec]:
        return (
            RegionSpec(index=0, size=0x1000),
            RegionSpec(
                index=2,
                size=4 * PAGE,
                mmap_areas=((PAGE, 2 * PAGE),),
                is_64bit=True,
                prefetchable=True,
            ),
            RegionSpec(index=6, size=0x800, flags=RegionFlag.READ),
        )

    def irqs(self) -> Sequence[IrqSpec]:
        return (IrqSpec(0, 1 if self.interrupt_pin else 0), IrqSpec(1, MSI_VECTORS))

    def capabilities(self) -> Sequence[tuple[int, bytes]]:
        msi_ctrl = MsiCtrl.ADDR64 | (2 << 1)  # 4 vectors
        caps: list[tuple[int, bytes]] = [
            (CapId.MSI, struct.pack("<HIIH", msi_ctrl, 0, 0, 0)),
            (CapId.MSIX, struct.pack("<HII", MSIX_VECTORS - 1, MSIX_TABLE, MSIX_PBA)),
        ]
        if self.pcie:
            caps.append((CapId.EXP, bytes(58)))
        return caps

    def attach(self, ctx: DeviceContext) -> None:
        self.ctx = ctx

    def read(self, region: int, offset: int, size: int) -> int:
        value = self.regs.get((region, offset), 0) & ((1 << (8 * size)) - 1)
        self.accesses.append(("r", region, offset, size, value))
        return value

    def write(self, region: int, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", region, offset, size, value))
        self.regs[(region, offset)] = value
        if self.on_write is not None:
            self.on_write()

    def reset(self) -> None:
        self.resets += 1
        self.regs.clear()


class Rig:
    """A machine with a Toy at 0000:00:04.0 (group 10) and VFIO shortcuts."""

    def __init__(self, machine: Machine, toy: Toy) -> None:
        self.machine = machine
        self.k: SimKernel = machine.kernel
        self.toy = toy

    # --- set-up ------------------------------------------------------------------------

    def container(self) -> int:
        return self.k.open_container()

    def attached(self, group: int = GROUP, *, iommu: int | None = 3) -> tuple[int, int]:
        """A container with `group` attached (and SET_IOMMU done unless iommu is None)."""
        c = self.k.open_container()
        g = self.k.open_group(group)
        self.k.group_set_container(g, c)
        if iommu is not None:
            self.k.set_iommu(c, iommu)
        return c, g

    def device(self, name: str = NAME, group: int = GROUP) -> tuple[int, int, int]:
        """Container, group and device fds, ready to use."""
        c, g = self.attached(group)
        return c, g, self.k.group_get_device_fd(g, name)

    # --- ioctl structures --------------------------------------------------------------

    @staticmethod
    def status() -> uapi.vfio_group_status:
        return uapi.vfio_group_status(argsz=ctypes.sizeof(uapi.vfio_group_status))

    def group_flags(self, g: int) -> int:
        st = self.status()
        self.k.group_get_status(g, st)
        return int(st.flags)

    def map(self, c: int, vaddr: int, iova: int, size: int, flags: int = 3) -> None:
        arg = uapi.vfio_iommu_type1_dma_map(
            argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_map),
            flags=flags,
            vaddr=vaddr,
            iova=iova,
            size=size,
        )
        self.k.map_dma(c, arg)

    def unmap(self, c: int, iova: int, size: int, flags: int = 0) -> int:
        arg = uapi.vfio_iommu_type1_dma_unmap(
            argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_unmap), flags=flags, iova=iova, size=size
        )
        self.k.unmap_dma(c, arg)
        return int(arg.size)

    def irq_set(
        self,
        d: int,
        flags: int,
        index: int,
        start: int,
        count: int,
        data: bytes = b"",
        argsz: int | None = None,
    ) -> None:
        head = ctypes.sizeof(uapi.vfio_irq_set)
        size = head + len(data) if argsz is None else argsz
        buf = bytearray(max(size, head + len(data)))
        struct.pack_into("<IIIII", buf, 0, size, flags, index, start, count)
        buf[head : head + len(data)] = data
        self.k.device_set_irqs(d, buf)

    def eventfds(self, d: int, index: int, fds: Sequence[int], start: int = 0) -> None:
        data = struct.pack(f"<{len(fds)}i", *fds)
        flags = IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER
        self.irq_set(d, flags, index, start, len(fds), data)

    def disable(self, d: int, index: int) -> None:
        self.irq_set(d, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, index, 0, 0)

    def unmask(self, d: int) -> None:
        self.irq_set(d, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK, 0, 0, 1)

    def region_info(
        self, d: int, index: int, argsz: int = 32
    ) -> tuple[uapi.vfio_region_info, bytearray]:
        buf = bytearray(max(argsz, 32))
        struct.pack_into("<II I", buf, 0, argsz, 0, index)
        self.k.device_get_region_info(d, buf)
        return uapi.vfio_region_info.from_buffer_copy(buf), buf

    def irq_info(self, d: int, index: int) -> uapi.vfio_irq_info:
        info = uapi.vfio_irq_info(argsz=ctypes.sizeof(uapi.vfio_irq_info), index=index)
        self.k.device_get_irq_info(d, info)
        return info

    # --- config space ------------------------------------------------------------------

    def cfg_read(self, d: int, offset: int, size: int) -> int:
        return int.from_bytes(self.k.pread(d, size, CONFIG + offset), "little")

    def cfg_write(self, d: int, offset: int, size: int, value: int) -> None:
        self.k.pwrite(d, value.to_bytes(size, "little"), CONFIG + offset)

    def bus_master(self, d: int) -> None:
        self.cfg_write(d, 4, 2, self.cfg_read(d, 4, 2) | 0x4)


def buffer(pages: int = 1) -> tuple[mmap.mmap, int]:
    """An anonymous, page-aligned, read-write buffer and its address."""
    m = mmap.mmap(-1, pages * PAGE)
    view = (ctypes.c_char * 1).from_buffer(m)
    addr = ctypes.addressof(view)
    del view
    return m, addr


def protect(addr: int, size: int, prot: int) -> None:
    """mprotect(2), to make a buffer read-only (or inaccessible)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(size), prot) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")


def refused(rule: Rule, call: Callable[..., object], *args: object, **kwargs: object) -> OSError:
    """Assert that `call` fails with `rule`'s errno and names the rule."""
    with pytest.raises(OSError) as info:
        call(*args, **kwargs)
    assert info.value.errno == rule.errno, f"{info.value} is not {rule.name}"
    assert f"sim rule {rule.name};" in str(info.value), str(info.value)
    return info.value
