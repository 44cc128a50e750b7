"""A driver author's tour of aiovfio.nvme: identify, write, read back, many readers, a batch.

    python examples/nvme.py                   # a simulated QEMU nvme controller
    python examples/nvme.py 0000:01:00.0      # a real one, bound to vfio-pci
    python examples/nvme.py --backend trio

On a real device this WRITES to the first blocks of namespace 1.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator

import anyio

import aiovfio
from aiovfio.nvme import open_controller

SIM_BDF = "0000:00:05.0"


@contextlib.asynccontextmanager
async def nvme_device(bdf: str | None) -> AsyncIterator[aiovfio.Device]:
    """The device at `bdf`, or a simulated QEMU nvme controller."""
    if bdf is not None:
        async with aiovfio.open_device(bdf) as dev:
            yield dev
        return
    from aiovfio.sim import Machine
    from aiovfio.sim.models import Nvme

    with Machine() as machine:
        machine.add_device(Nvme(serial="example"), name=SIM_BDF)
        async with aiovfio.open_device(SIM_BDF, kernel=machine.kernel) as dev:
            yield dev
        assert machine.leaks() == [], machine.leaks()


async def main(bdf: str | None = None) -> None:
    async with nvme_device(bdf) as dev, open_controller(dev, io_queues=2) as ctrl:
        ident = ctrl.identify
        print(f"{ident.model} serial {ident.serial} firmware {ident.firmware}")
        ns = ctrl.namespace(1)
        print(f"namespace 1: {ns.blocks} blocks of {ns.block_size} bytes")

        # Plain bytes in and out (copied through the driver's DMA pool).
        message = b"hello from user space".ljust(ns.block_size, b"\0")
        await ns.write(0, message)
        assert await ns.read(0, 1) == message

        # Zero copy: the device moves data straight into a DMA buffer.
        async with dev.dma_buffer(64 * 1024) as buf:
            buf.view[:] = bytes(range(256)) * 256
            await ns.write_from(8, buf)
            buf.view[:] = bytes(len(buf.view))
            await ns.read_into(8, buf)
            assert bytes(buf.view[:256]) == bytes(range(256))

        # Many tasks at once: commands spread over the queues, each queue
        # reaped by its own task woken by its MSI-X interrupt.
        blocks = 0

        async def reader(start: int) -> None:
            nonlocal blocks
            for lba in range(start, start + 64, 8):
                await ns.read(lba, 8)
                blocks += 8

        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(reader, i * 64)
        print(f"16 readers read {blocks} blocks; per queue: {[q.submitted for q in ctrl.queues]}")

        # One task, many commands in flight: a batch submits without awaiting and
        # collects every completion per wake (the fast path for a full queue).
        async with contextlib.AsyncExitStack() as stack:
            bufs = [await stack.enter_async_context(dev.dma_buffer(4096)) for _ in range(8)]
            done = 0
            async with ns.batch(depth=len(bufs)) as batch:
                for i, b in enumerate(bufs):
                    batch.read_into(i * 8, b)
                while batch.inflight:
                    for b in await batch.completions():
                        done += 1
                        if done <= 56:  # 64 reads in all, 8 at a time
                            batch.read_into(done * 8 % 1024, b)
            print(f"a batch of {batch.depth} read {done} x 4 KiB from one task")
    print("controller shut down cleanly:", ctrl.shutdown_clean)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bdf", nargs="?", help="a real controller's PCI address")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()
    anyio.run(main, args.bdf, backend=args.backend)
    sys.exit(0)
