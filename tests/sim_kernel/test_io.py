"""Regions: info, trapped pread/pwrite at the exact width, mmap areas, config space."""

from __future__ import annotations

import os
import struct
import tempfile

import pytest

from aiovfio._uapi import caps
from aiovfio._uapi.pci import CapId
from aiovfio._uapi.vfio import RegionCap, RegionFlag
from aiovfio.sim import Machine

from .rig import CONFIG, GROUP, MSIX_TABLE, NAME, PAGE, Rig, Toy


def test_region_info_trapped_bar(rig: Rig) -> None:
    _, _, d = rig.device()
    info, _ = rig.region_info(d, 0)
    assert (info.size, info.offset, info.flags, info.cap_offset) == (
        0x1000,
        0,
        RegionFlag.READ | RegionFlag.WRITE,
        0,
    )


def test_region_info_sparse_mmap_two_calls(rig: Rig) -> None:
    _, _, d = rig.device()
    info, _ = rig.region_info(d, 2)
    assert info.flags == RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP | RegionFlag.CAPS
    assert (info.offset, info.size, info.cap_offset) == (2 << 40, 4 * PAGE, 0)
    assert info.argsz == 32 + 16 + 16  # the header, the cap, one area
    info, raw = rig.region_info(d, 2, info.argsz)
    assert info.cap_offset == 32
    (cap,) = caps.walk(raw, info.cap_offset, start=32)
    assert cap.id == RegionCap.SPARSE_MMAP
    assert caps.sparse_mmap_areas(cap) == [(PAGE, 2 * PAGE)]


def test_region_info_absent_rom_config(rig: Rig) -> None:
    _, _, d = rig.device()
    absent, _ = rig.region_info(d, 1)  # the upper half of 64-bit BAR2... here BAR1 is empty
    assert (absent.size, absent.flags, absent.offset) == (0, 0, 1 << 40)
    rom, _ = rig.region_info(d, 6)
    assert (rom.size, rom.flags) == (0x800, RegionFlag.READ)
    config, _ = rig.region_info(d, 7)
    assert (config.size, config.flags, config.offset) == (
        256,
        RegionFlag.READ | RegionFlag.WRITE,
        CONFIG,
    )


def test_pcie_config_space_is_4k(machine: Machine) -> None:
    machine.add_device(Toy(pcie=True), name=NAME, group=GROUP)
    rig = Rig(machine, Toy())
    _, _, d = rig.device()
    assert rig.region_info(d, 7)[0].size == 4096
    assert rig.k.pread(d, 4, CONFIG + 0x100) == b"\0" * 4


@pytest.mark.parametrize(
    ("io_width", "offset", "size", "widths"),
    [
        (8, 0x10, 8, [8]),
        (4, 0x10, 8, [4, 4]),
        (8, 0x10, 4, [4]),
        (8, 0x12, 2, [2]),
        (8, 0x13, 1, [1]),
        (8, 0x11, 3, [1, 2]),
        (8, 0x10, 16, [8, 8]),
        (8, 0x14, 12, [4, 8]),
        (4, 0x14, 12, [4, 4, 4]),
    ],
)
def test_bar_access_widths(
    toy: Toy, io_width: int, offset: int, size: int, widths: list[int]
) -> None:
    with Machine(clock="manual", io_width=io_width) as m:
        m.add_device(toy, name=NAME, group=GROUP)
        rig = Rig(m, toy)
        _, _, d = rig.device()
        toy.accesses.clear()
        rig.k.pread(d, size, offset)
        assert [a[3] for a in toy.accesses] == widths
        toy.accesses.clear()
        rig.k.pwrite(d, bytes(range(size)), offset)
        assert [a[3] for a in toy.accesses] == widths
        assert all(a[0] == "w" for a in toy.accesses)


@pytest.mark.parametrize("io_width", [4, 8])
def test_bar_accesses_do_not_depend_on_the_ones_before(toy: Toy, io_width: int) -> None:
    """pread/pwrite remember which offsets passed the register rules (per offset, for one
    width): every access, after any others at the same offsets, reaches the model as on a
    fresh machine, in the same pieces, with the same answer or the same refusal."""
    accesses = [
        (offset, size, write)
        for offset in (0x10, 0x12, 0x14, 0x18, MSIX_TABLE - 4, MSIX_TABLE, 0xFFC, 0xFF8)
        for size in (1, 2, 4, 8, 3)
        for write in (False, True)
    ]

    def one(rig: Rig, d: int, offset: int, size: int, write: bool) -> object:
        toy = rig.toy
        toy.accesses.clear()
        try:
            if write:
                rig.k.pwrite(d, bytes(range(1, size + 1)), offset)
                got: object = None
            else:
                got = rig.k.pread(d, size, offset)
        except OSError as exc:
            got = exc.errno
        return got, list(toy.accesses)

    with Machine(clock="manual", io_width=io_width) as m:
        m.add_device(toy, name=NAME, group=GROUP)
        warm = Rig(m, toy)
        _, _, wd = warm.device()
        for access in accesses:  # judged once
            one(warm, wd, *access)
        for access in reversed(accesses):
            with Machine(clock="manual", io_width=io_width) as fresh_machine:
                fresh_toy = Toy()
                fresh_machine.add_device(fresh_toy, name=NAME, group=GROUP)
                fresh = Rig(fresh_machine, fresh_toy)
                _, _, fd = fresh.device()
                fresh_toy.regs.update(toy.regs)
                assert one(warm, wd, *access) == one(fresh, fd, *access), access


def test_bar_values_are_little_endian(rig: Rig) -> None:
    _, _, d = rig.device()
    rig.k.pwrite(d, struct.pack("<Q", 0x1122334455667788), 0x20)
    assert rig.toy.regs[(0, 0x20)] == 0x1122334455667788
    rig.toy.regs[(0, 0x28)] = 0xAABBCCDD
    assert rig.k.pread(d, 4, 0x28) == struct.pack("<I", 0xAABBCCDD)


def test_msix_table_is_hidden_from_read_write(rig: Rig) -> None:
    _, _, d = rig.device()
    rig.toy.accesses.clear()
    assert rig.k.pread(d, 16, MSIX_TABLE) == b"\xff" * 16
    rig.k.pwrite(d, b"\0" * 16, MSIX_TABLE)
    assert rig.toy.accesses == []
    data = rig.k.pread(d, 8, MSIX_TABLE - 4)  # straddles: the register half reaches the model
    assert data == b"\0" * 4 + b"\xff" * 4
    assert [a[2:4] for a in rig.toy.accesses] == [(MSIX_TABLE - 4, 4)]


def test_mmap_area_is_the_models_ram(rig: Rig) -> None:
    _, _, d = rig.device()
    m = rig.k.mmap(d, 2 * PAGE, (2 << 40) + PAGE, writable=True)
    assert rig.toy.ctx is not None
    ram = rig.toy.ctx.ram(2)
    m[0:4] = b"abcd"
    assert bytes(ram[PAGE : PAGE + 4]) == b"abcd"
    ram[PAGE + 8 : PAGE + 12] = b"wxyz"
    assert m[8:12] == b"wxyz"
    # pread inside the area reads the same memory, not the model's registers.
    rig.toy.accesses.clear()
    assert rig.k.pread(d, 4, (2 << 40) + PAGE) == b"abcd"
    assert rig.toy.accesses == []
    ram.release()
    m.close()


def test_mmap_part_of_an_area(rig: Rig) -> None:
    _, _, d = rig.device()
    m = rig.k.mmap(d, PAGE, (2 << 40) + 2 * PAGE, writable=False)
    assert len(m) == PAGE
    m.close()


def test_config_reads_show_identity(rig: Rig) -> None:
    _, _, d = rig.device()
    assert rig.cfg_read(d, 0, 4) == 0x10F0_1AF4
    assert rig.cfg_read(d, 8, 4) == 0x0580_0001
    assert rig.cfg_read(d, 0x2C, 4) == 0x1100_1AF4
    assert rig.cfg_read(d, 0x3D, 1) == 1
    assert rig.cfg_read(d, 6, 2) & 0x10  # capability list


def test_config_read_only_fields_ignore_writes(rig: Rig) -> None:
    _, _, d = rig.device()
    rig.cfg_write(d, 0, 4, 0xFFFFFFFF)
    assert rig.cfg_read(d, 0, 4) == 0x10F0_1AF4


def test_config_bar_sizing(rig: Rig) -> None:
    _, _, d = rig.device()
    original = rig.cfg_read(d, 0x10, 4)
    rig.cfg_write(d, 0x10, 4, 0xFFFFFFFF)
    assert rig.cfg_read(d, 0x10, 4) == 0xFFFFF000  # a 4 KiB, 32-bit memory BAR
    rig.cfg_write(d, 0x10, 4, original)
    assert rig.cfg_read(d, 0x10, 4) == original
    rig.cfg_write(d, 0x18, 4, 0xFFFFFFFF)
    rig.cfg_write(d, 0x1C, 4, 0xFFFFFFFF)
    bar2 = rig.cfg_read(d, 0x18, 4) | rig.cfg_read(d, 0x1C, 4) << 32
    assert bar2 == (~(4 * PAGE - 1) & 0xFFFF_FFFF_FFFF_FFF0) | 0xC  # 64-bit, prefetchable
    rig.cfg_write(d, 0x30, 4, 0xFFFFFFFF)
    assert rig.cfg_read(d, 0x30, 4) == 0xFFFFF801  # a 2 KiB ROM, enable bit virtual


def test_config_command_reaches_the_device(rig: Rig) -> None:
    _, _, d = rig.device()
    rig.bus_master(d)
    assert rig.toy.ctx is not None
    assert rig.toy.ctx.config_read(4, 2) & 0x4
    rig.cfg_write(d, 4, 2, 0xFFFF)
    assert rig.cfg_read(d, 4, 2) == 0x547


def test_config_capabilities_are_linked(rig: Rig) -> None:
    _, _, d = rig.device()
    found = []
    pointer = rig.cfg_read(d, 0x34, 1)
    while pointer:
        found.append((rig.cfg_read(d, pointer, 1), pointer))
        pointer = rig.cfg_read(d, pointer + 1, 1)
    assert found == [(CapId.MSI, 0x40), (CapId.MSIX, 0x50)]


def test_config_msi_message_is_virtual(rig: Rig) -> None:
    _, _, d = rig.device()
    rig.cfg_write(d, 0x44, 4, 0xFEE0_0000)
    assert rig.cfg_read(d, 0x44, 4) == 0xFEE0_0000
    assert rig.toy.ctx is not None
    assert rig.toy.ctx.config_read(0x44, 4) == 0


def test_config_unaligned_access_is_split(rig: Rig) -> None:
    _, _, d = rig.device()
    whole = rig.k.pread(d, 16, CONFIG)
    assert rig.k.pread(d, 3, CONFIG + 1) == whole[1:4] == bytes([0x1A, 0xF0, 0x10])
    assert rig.k.pread(d, 13, CONFIG + 3) == whole[3:16]


def test_foreign_fds_get_the_real_syscall(rig: Rig) -> None:
    fd, path = tempfile.mkstemp()
    try:
        rig.k.pwrite(fd, b"hello", 0)
        assert rig.k.pread(fd, 5, 0) == b"hello"
        with pytest.raises(OSError, match="short read"):
            rig.k.pread(fd, 6, 0)
    finally:
        os.close(fd)
        os.unlink(path)
