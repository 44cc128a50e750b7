"""Memory Space cleared in PCI COMMAND, then a BAR touched: a RegionAccessError, never a signal.

On Linux vfio-pci zaps every BAR mmap while COMMAND.MEM is clear (a touch is
SIGBUS) and refuses trapped BAR access with EIO; the simulated machine does
the same. The public layer tracks COMMAND (every write through ConfigSpace,
and reset) and swaps a memory BAR's accessors for refusing ones while MEM is
clear, so both paths (mmap'd and trapped) raise an error that says to call
`dev.config.enable()`; set again, the same region works at full speed.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest
from api._operations import RAM, closing_machine, new_target

import aiovfio
from aiovfio.pci import Command
from aiovfio.region import Region
from aiovfio.testing import Target

pytestmark = pytest.mark.anyio

Access = Callable[[aiovfio.Region], object]

#: every accessor, at an offset `off` of the region
ACCESSES: dict[str, Callable[[int], Access]] = {
    "read8": lambda off: lambda r: r.read8(off),
    "read16": lambda off: lambda r: r.read16(off),
    "read32": lambda off: lambda r: r.read32(off),
    "read64": lambda off: lambda r: r.read64(off),
    "write8": lambda off: lambda r: r.write8(off, 1),
    "write16": lambda off: lambda r: r.write16(off, 1),
    "write32": lambda off: lambda r: r.write32(off, 1),
    "write64": lambda off: lambda r: r.write64(off, 1),
    "read": lambda off: lambda r: r.read(off, 8),
    "write": lambda off: lambda r: r.write(off, bytes(8)),
}


def clear_memory(cfg: aiovfio.ConfigSpace, how: str) -> None:
    """Clear COMMAND.MEM the way a driver might."""
    cmd = cfg.read16(4)
    off = cmd & ~int(Command.MEMORY)
    if how == "command":
        cfg.command = Command(off)
    elif how == "write16":
        cfg.write16(4, off)
    elif how == "write8":
        cfg.write8(4, off & 0xFF)
    elif how == "write32":
        cfg.write32(4, off)  # STATUS is RW1C: writing 0 there changes nothing
    elif how == "bulk":
        cfg.write(2, cfg.read(2, 2) + off.to_bytes(2, "little"))
    else:
        raise AssertionError(how)


def refusal(access: Access, region: aiovfio.Region) -> str | None:
    """None when `access` is refused as it should be, else what happened."""
    try:
        access(region)
    except aiovfio.RegionAccessError as exc:
        if "config.enable()" in str(exc) and "Memory Space" in str(exc):
            return None
        return str(exc)
    except BaseException as exc:
        return f"{type(exc).__name__}: {exc}"
    return "allowed"


def check_refused(region: aiovfio.Region, off: int) -> list[str]:
    out = ((name, refusal(make(off), region)) for name, make in ACCESSES.items())
    return [f"{name}: {what}" for name, what in out if what is not None]


@pytest.mark.parametrize("how", ["command", "write16", "write8", "write32", "bulk"])
async def test_memory_space_off_refuses_both_paths(how: str) -> None:
    with closing_machine(new_target()) as t:
        async with (
            aiovfio.open_device(t.edu, kernel=t.kernel) as edu,
            aiovfio.open_device(RAM, kernel=t.kernel) as ram,
        ):
            # (device, region, offset, path): edu BAR0 is trapped, RAM BAR0 mmap'd whole,
            # RAM BAR2 a sparse mmap (page 1) and trapped registers (page 0).
            paths = [
                (edu, edu.bar(0), 0x08, "trapped"),
                (ram, ram.bar(0), 0x10, "mmap"),
                (ram, ram.bar(2), 0x1010, "sparse mmap"),
                (ram, ram.bar(2), 0x10, "sparse trapped"),
            ]
            for dev in (edu, ram):
                dev.config.enable()
                clear_memory(dev.config, how)
            wrong = []
            for _, region, off, path in paths:
                wrong += [f"{path} {w}" for w in check_refused(region, off)]
            assert wrong == []
            for dev in (edu, ram):
                dev.config.enable()
            for _, region, off, _ in paths:
                region.write32(off, 0x5A5A5A5A)
                assert region.read32(off) == 0x5A5A5A5A
            assert ram.bar(0).mapped  # back on the fast path


async def test_a_bar_opened_while_memory_is_off_is_refused_too() -> None:
    with closing_machine(new_target()) as t:
        async with aiovfio.open_device(RAM, kernel=t.kernel) as ram:
            clear_memory(ram.config, "command")
            bar = ram.bar(0)
            assert check_refused(bar, 0) == []
            ram.config.enable()
            bar.write32(0, 7)
            assert bar.read32(0) == 7


async def test_config_space_stays_usable_and_reset_restores() -> None:
    with closing_machine(new_target()) as t:
        async with aiovfio.open_device(t.nvme, kernel=t.kernel) as nvme:
            cfg = nvme.config
            bar = nvme.bar(0)
            clear_memory(cfg, "command")
            assert cfg.vendor_id == 0x1B36  # config space is never refused
            await nvme.reset()  # FLR saves and restores COMMAND: still off
            assert not cfg.command & Command.MEMORY
            assert check_refused(bar, 0) == []
            cfg.enable()
            await nvme.reset()
            assert cfg.command & Command.MEMORY
            assert bar.read32(0x08) >= 0x10000  # VS


class _Trapped(Region):
    """The same BAR, reached through the kernel (pread/pwrite) even where mmap is allowed."""

    mmap_allowed = False


@pytest.mark.kernel
async def test_memory_space_off_on_both_paths(vfio_target: Target) -> None:
    """edu's BAR0, mmap'd (as vfio-pci offers it) and trapped: the error, not SIGBUS or EIO.

    On the real kernel the trapped path is a second Region on the same BAR made to follow
    the device's Memory Space (vfio-pci lets edu's BAR be mmap'd whole); the raw pread
    under it shows what the refusal spares the driver: EIO while MEM is clear.
    """
    t = vfio_target
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        cfg = dev.config
        cfg.enable()
        mapped = dev.bar(0)
        info = dev.region_info(0)
        trapped = _Trapped(info, dev.kernel, dev.fd, f"{dev.label} BAR0 (trapped)")
        trapped.open()
        dev._memory_space().follow(trapped)
        try:
            assert mapped.read32(0) == trapped.read32(0) == 0x010000ED
            clear_memory(cfg, "command")
            assert check_refused(mapped, 0x04) == []
            assert check_refused(trapped, 0x04) == []
            with pytest.raises(OSError) as raw:
                dev.kernel.pread(dev.fd, 4, info.offset)
            assert raw.value.errno == errno.EIO
            cfg.enable()
            mapped.write32(0x04, 0x12345678)
            assert trapped.read32(0x04) == 0xEDCBA987  # edu's liveness register inverts
            assert mapped.mapped or not t.real  # vfio-pci mmaps edu's BAR0; the sim traps it
        finally:
            trapped.close()
    assert t.leaks() == []
