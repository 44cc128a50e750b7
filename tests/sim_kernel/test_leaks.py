"""Machine.leaks(): everything still open, mapped or enabled, and [] when clean."""

from __future__ import annotations

import os

import pytest

from aiovfio._uapi.vfio import PciIrq
from aiovfio.sim import Machine

from .rig import NAME, PAGE, Rig, Toy, buffer


def test_clean_machine(machine: Machine) -> None:
    assert machine.leaks() == []
    machine.add_device(Toy(), name=NAME)
    assert machine.leaks() == []


def test_every_kind_of_leak_is_reported(rig: Rig) -> None:
    c, g, d = rig.device()
    e = rig.k.eventfd()
    rig.eventfds(d, PciIrq.MSIX, [e, -1])
    _buf, addr = buffer()
    rig.map(c, addr, 0x1000, PAGE)
    m = rig.k.mmap(d, PAGE, (2 << 40) + PAGE, writable=True)
    assert rig.machine.leaks() == [
        f"container fd {c} is open",
        f"group fd {g} (group 10) is open",
        f"device fd {d} ({NAME}) is open",
        f"eventfd {e} is open",
        f"group 10 is attached to container fd {c}",
        f"DMA mapping IOVA 0x1000+0x1000 -> vaddr {addr:#x} RW in container fd {c}",
        f"{NAME}: MSIX vector 0 enabled (eventfd {e})",
        f"{NAME}: MSIX vector 1 enabled (no eventfd)",
        f"mmap of {NAME} region 2 {PAGE:#x}+{PAGE:#x} is still mapped",
    ]
    m.close()
    rig.unmap(c, 0x1000, PAGE)
    rig.disable(d, PciIrq.MSIX)
    for fd in (e, d, g, c):
        rig.k.close(fd)
    assert rig.machine.leaks() == []


def test_close_releases_everything(toy: Toy) -> None:
    m = Machine(clock="manual")
    m.add_device(toy, name=NAME)
    rig = Rig(m, toy)
    c, _, d = rig.device()
    rig.eventfds(d, PciIrq.MSI, [rig.k.eventfd()])
    _buf, addr = buffer()
    rig.map(c, addr, 0, PAGE)
    m.close()
    m.close()  # idempotent
    assert m.leaks() == []
    assert m.closed
    for fd in (c, d):
        with pytest.raises(OSError):
            os.fstat(fd)
