"""Memory Space off in COMMAND: what vfio-pci does (issue 11, the sim's side).

Trapped BAR accesses are EIO (`__vfio_pci_memory_enabled`), except inside the
MSI-X table; every mmap of the device's BARs is zapped, so a touch is SIGBUS
(`vfio_pci_mmap_fault`), until Memory Space is set again. A SIGBUS would kill
the test process, so the touch runs in a child process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

from aiovfio.sim import rules

from .rig import PAGE, Rig, refused

BAR2 = 2 << 40


def _memory(rig: Rig, d: int, on: bool) -> None:
    command = rig.cfg_read(d, 4, 2)
    rig.cfg_write(d, 4, 2, command | 0x2 if on else command & ~0x2)


def test_trapped_access_is_eio_while_memory_is_off(rig: Rig) -> None:
    _, _, d = rig.device()
    _memory(rig, d, False)
    refused(rules.IO_MEMORY_DISABLED, rig.k.pread, d, 4, 0)
    refused(rules.IO_MEMORY_DISABLED, rig.k.pwrite, d, b"\0" * 4, 0)
    refused(rules.IO_MEMORY_DISABLED, rig.k.pread, d, 4, BAR2 + PAGE)  # an mmap area, by pread
    assert rig.toy.accesses == []
    _memory(rig, d, True)
    rig.k.pwrite(d, b"\1\0\0\0", 0)
    assert rig.toy.accesses != []


def test_msix_table_answers_while_memory_is_off(rig: Rig) -> None:
    """vfio_pci_core_do_io_rw fills MSI-X table reads with ones before any Memory test."""
    _, _, d = rig.device()
    _memory(rig, d, False)
    assert rig.k.pread(d, 16, 0x800) == b"\xff" * 16
    rig.k.pwrite(d, b"\0" * 16, 0x800)  # dropped, not refused


def test_mmap_comes_back_when_memory_is_on_again(rig: Rig) -> None:
    _, _, d = rig.device()
    m = rig.k.mmap(d, 2 * PAGE, BAR2 + PAGE, writable=True)
    m[0:4] = b"abcd"
    _memory(rig, d, False)
    _memory(rig, d, True)
    assert m[0:4] == b"abcd"  # the same memory, mapped again
    m[4:8] = b"efgh"
    assert rig.toy.ctx is not None
    ram = rig.toy.ctx.ram(2)
    assert bytes(ram[PAGE : PAGE + 8]) == b"abcdefgh"
    ram.release()
    m.close()


_CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from sim_kernel.rig import PAGE, Rig, Toy
    from aiovfio.sim import Machine

    machine = Machine(clock="manual")
    toy = Toy()
    machine.add_device(toy, name="0000:00:04.0", group=10)
    rig = Rig(machine, toy)
    _, _, d = rig.device()
    m = rig.k.mmap(d, PAGE, (2 << 40) + PAGE, writable={writable})
    m[0:1]
    command = rig.cfg_read(d, 4, 2)
    rig.cfg_write(d, 4, 2, command & ~0x2)
    print("zapped", flush=True)
    m[0:1]
    print("survived", flush=True)
    """
)


def _touch_in_child(writable: bool) -> subprocess.CompletedProcess[str]:
    import pathlib

    tests = str(pathlib.Path(__file__).parent.parent)
    code = _CHILD.format(tests=tests, writable=writable)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_mmap_touch_while_memory_is_off_is_sigbus() -> None:
    for writable in (True, False):
        done = _touch_in_child(writable)
        assert done.returncode == -signal.SIGBUS, (done.returncode, done.stdout, done.stderr)
        assert done.stdout.split() == ["zapped"]


def test_an_access_judged_before_is_judged_again_after_memory_goes_off(rig: Rig) -> None:
    """pread/pwrite remember which offsets pass the register rules; Memory Space is not
    remembered: the same accesses, made fast once, are EIO while it is off."""
    _, _, d = rig.device()
    for _ in range(2):  # the second time from what pread/pwrite remember
        rig.k.pwrite(d, b"\1\0\0\0", 0x10)
        assert rig.k.pread(d, 4, 0x10) == b"\1\0\0\0"
    _memory(rig, d, False)
    refused(rules.IO_MEMORY_DISABLED, rig.k.pread, d, 4, 0x10)
    refused(rules.IO_MEMORY_DISABLED, rig.k.pwrite, d, b"\0" * 4, 0x10)
    _memory(rig, d, True)
    assert rig.k.pread(d, 4, 0x10) == b"\1\0\0\0"
