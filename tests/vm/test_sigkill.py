"""A driver process killed with SIGKILL in the middle of a DMA leaves nothing
behind: the kernel releases its group, container, mappings and interrupts, and
a fresh process opens the device and uses it at once."""

from __future__ import annotations

import signal
import subprocess
import sys

import anyio
import pytest

import aiovfio
from aiovfio.testing.target import Target, real_target

pytestmark = pytest.mark.anyio

_CHILD = """
import os, signal, sys, anyio, aiovfio

async def main(bdf):
    async with aiovfio.open_device(bdf, dma_mask=(1 << 28) - 1) as dev:
        dev.config.enable()
        bar = dev.bar(0)
        async with dev.interrupts("msi"), dev.dma_buffer(8192) as buf:
            buf.view[:4095] = b"\\x5a" * 4095
            bar.write64(0x80, buf.iova)       # src: RAM
            bar.write64(0x88, 0x40000)        # dst: edu's buffer
            bar.write64(0x90, 4095)
            bar.write64(0x98, 0x1 | 0x4)      # RUN | IRQ: ~100 ms of guest time
            print("dma started", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

anyio.run(main, sys.argv[1])
"""


@pytest.fixture
def target() -> Target:
    return real_target()


async def test_sigkill_mid_dma_then_a_fresh_process_uses_the_device(target: Target) -> None:
    child = await anyio.run_process(
        [sys.executable, "-c", _CHILD, target.edu], check=False, stderr=subprocess.STDOUT
    )
    assert child.returncode == -signal.SIGKILL, child.stdout
    assert b"dma started" in child.stdout
    # A fresh opener (this process) gets the group at once and drives the device.
    # The dead process's transfer found its IOVA unmapped (the kernel dropped
    # its container), so it moved nothing; ours must move everything.
    async with aiovfio.open_device(target.edu, dma_mask=(1 << 28) - 1) as dev:
        dev.config.enable()
        bar = dev.bar(0)
        assert bar.read32(0) == 0x010000ED
        async with dev.interrupts("msi") as (irq,), dev.dma_buffer(8192) as buf:
            with anyio.fail_after(30):
                # The killed process's transfer may still be running: nothing
                # to wait on but the RUN bit.
                while bar.read64(0x98) & 1:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            bar.write32(0x64, bar.read32(0x24))
            pattern = bytes(range(256)) * 15 + bytes(range(255))
            buf.view[:4095] = pattern
            for src, dst, cmd in ((buf.iova, 0x40000, 0x5), (0x40000, buf.iova + 4096, 0x7)):
                bar.write64(0x80, src)
                bar.write64(0x88, dst)
                bar.write64(0x90, 4095)
                bar.write64(0x98, cmd)  # RUN | IRQ (| to RAM)
                # The dead transfer's completion may also signal once, after
                # our vector was enabled: done is RUN clear, not any interrupt.
                with anyio.fail_after(30):
                    while True:
                        await irq.receive()
                        bar.write32(0x64, bar.read32(0x24))
                        if not bar.read64(0x98) & 1:
                            break
            assert bytes(buf.view[4096 : 4096 + 4095]) == pattern
    assert target.leaks() == []
