"""fork() with a device, interrupts and a DMA buffer open.

The child touches everything it inherited: every handle is closed in the
child (ClosedResourceError, not a signal), the child's copies of the VFIO
fds and eventfds are gone (so the parent's group is never held busy by a
child), a view of the DMA buffer it kept reads zeros (MADV_WIPEONFORK: the
parent's data is not there) and leaving the `async with` blocks does
nothing; it exits 0. The parent's buffer, mapping, interrupt and device are
untouched: its next DMA round trip is right and nothing leaks.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable

import anyio
import pytest

import aiovfio
from aiovfio.testing import Target

pytestmark = pytest.mark.anyio

EDU_MASK = (1 << 28) - 1
EDU_BUF = 0x40000
IRQ_STATUS, IRQ_ACK = 0x24, 0x64
DMA_SRC, DMA_DST, DMA_CNT, DMA_CMD = 0x80, 0x88, 0x90, 0x98


async def edu_dma(
    bar: aiovfio.Region, irq: aiovfio.InterruptStream, src: int, dst: int, to_ram: bool
) -> None:
    bar.write64(DMA_SRC, src)
    bar.write64(DMA_DST, dst)
    bar.write64(DMA_CNT, 256)
    bar.write64(DMA_CMD, 0x1 | 0x4 | (0x2 if to_ram else 0))
    assert await irq.receive() == 1
    bar.write32(IRQ_ACK, bar.read32(IRQ_STATUS))


def refused(what: str, fn: Callable[[], object], problems: list[str]) -> None:
    try:
        fn()
    except aiovfio.ClosedResourceError:
        return
    except BaseException as exc:
        problems.append(f"{what}: {type(exc).__name__}: {exc}")
        return
    problems.append(f"{what}: allowed in the child")


def fork_quietly() -> int:
    with warnings.catch_warnings():  # 3.12+: "multi-threaded, use of fork() may deadlock"
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


@pytest.mark.kernel
async def test_child_touches_what_it_inherited(vfio_target: Target) -> None:
    t = vfio_target
    async with aiovfio.open_device(t.edu, kernel=t.kernel, dma_mask=EDU_MASK) as dev:
        dev.config.enable()
        bar = dev.bar(0)
        async with dev.interrupts("msi") as (irq,), dev.dma_buffer(4096) as buf:
            view = buf.view
            view[:256] = bytes(range(256))
            fds = {"device": dev.fd, "eventfd": irq.fd}
            read_end, write_end = os.pipe()
            pid = fork_quietly()
            if pid == 0:  # the child: no event loop from here on, and no pytest
                os.close(read_end)
                problems: list[str] = []
                try:
                    if bytes(view[:256]) != bytes(256):
                        problems.append("the inherited view does not read zeros")
                    view[:4] = b"\xff" * 4  # its own memory: allowed, and not the parent's
                    refused("buf.view", lambda: buf.view, problems)
                    refused("bar.read32", lambda: bar.read32(0), problems)
                    refused("bar.write32", lambda: bar.write32(0x04, 1), problems)
                    refused("dev.config", lambda: dev.config.vendor_id, problems)
                    refused("dev.bar(0)", lambda: dev.bar(0), problems)
                    refused("dev.fd", lambda: dev.fd, problems)
                    refused("irq.trigger", irq.trigger, problems)
                    refused("dev.dma_buffer", lambda: dev.dma_buffer(4096), problems)
                    for name, fd in fds.items():
                        with contextlib.suppress(OSError):
                            os.fstat(fd)
                            problems.append(f"the child still has the {name} fd {fd}")
                except BaseException as exc:
                    problems.append(f"{type(exc).__name__}: {exc}")
                os.write(write_end, "\n".join(problems).encode() or b"ok")
                os._exit(0)
            os.close(write_end)
            with os.fdopen(read_end, "rb") as f:
                report = f.read().decode()
            _, status = await anyio.to_thread.run_sync(os.waitpid, pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child: {status:#x}"
            assert report == "ok", report
            # The parent: its data, its mapping, its interrupt, its device.
            assert bytes(view[:256]) == bytes(range(256))
            await edu_dma(bar, irq, buf.iova, EDU_BUF, to_ram=False)
            await edu_dma(bar, irq, EDU_BUF, buf.iova + 2048, to_ram=True)
            assert bytes(view[2048:2304]) == bytes(range(256))
            del view
    assert t.leaks() == []


@pytest.mark.kernel
async def test_child_leaves_inherited_blocks_quietly(vfio_target: Target) -> None:
    """A child that unwinds the blocks it inherited (as a forked worker does) exits 0, and
    the parent closes everything afterwards as usual.

    The parent waits for the child's word before leaving: until the child's at-fork hook
    has closed its copies (before os.fork() returns in the child), the child holds the same
    open files, and a group closed in that window is still busy (EBUSY).
    """
    t = vfio_target
    async with aiovfio.open_device(t.edu, kernel=t.kernel, dma_mask=EDU_MASK) as dev:
        async with dev.interrupts("msi"), dev.dma_buffer(4096):
            read_end, write_end = os.pipe()
            pid = fork_quietly()
            if pid == 0:
                os.close(read_end)
                code = b"ok"
                try:
                    await dev.aclose()  # what leaving every block does, closed already
                except BaseException as exc:
                    code = f"{type(exc).__name__}: {exc}".encode()
                os.write(write_end, code)
                os._exit(0)
            os.close(write_end)
            with os.fdopen(read_end, "rb") as f:
                report = await anyio.to_thread.run_sync(f.read)
    _, status = await anyio.to_thread.run_sync(os.waitpid, pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert report.decode() == "ok"
    assert t.leaks() == []
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        assert dev.bar(0).read32(0) == 0x010000ED
