"""The child of test_sigint.py: open, DMA, interrupt and close in a loop until SIGINT.

`python _sigint_child.py BACKEND` (asyncio, uvloop or trio). For each line
`go` on stdin it builds a fresh simulated machine (inside the aiovfio guest:
it takes Linux itself and its edu), prints `ready` from
inside the event loop and loops over the public API until the parent's
SIGINT stops it; then it opens the device again at once, and prints one JSON
line: how the run ended, the machine's leaks() and the fds this process has
beyond the ones it had before the first run (/proc/self/fd).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from typing import Any

import anyio

import aiovfio
from aiovfio.kernel import Kernel
from aiovfio.sim import Machine
from aiovfio.sim.models import Edu
from aiovfio.testing.target import in_guest, real_target

EDU = "0000:00:04.0"
EDU_MASK = (1 << 28) - 1
_LIVENESS, _IRQ_STATUS, _IRQ_ACK = 0x04, 0x24, 0x64
_DMA_SRC, _DMA_DST, _DMA_CNT, _DMA_CMD = 0x80, 0x88, 0x90, 0x98
_EDU_BUF = 0x40000


def fds() -> set[str]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd of the listing itself is gone
            out.add(f"{name} -> {os.readlink(f'/proc/self/fd/{name}')}")
    return out


async def dma(
    bar: aiovfio.Region, irq: aiovfio.InterruptStream, src: int, dst: int, up: bool
) -> None:
    bar.write64(_DMA_SRC, src)
    bar.write64(_DMA_DST, dst)
    bar.write64(_DMA_CNT, 256)
    bar.write64(_DMA_CMD, 0x1 | 0x4 | (0x2 if up else 0))
    assert await irq.receive() == 1
    bar.write32(_IRQ_ACK, bar.read32(_IRQ_STATUS))


async def work(k: Kernel, bdf: str, announce: bool) -> None:
    if announce:
        print("ready", flush=True)
    n = 0
    while True:
        n += 1
        async with aiovfio.open_device(bdf, kernel=k, dma_mask=EDU_MASK) as dev:
            dev.config.enable()
            bar = dev.bar(0)
            bar.write32(_LIVENESS, n)
            async with dev.interrupts("msi") as (irq,):
                async with dev.dma_buffer(4096) as buf:
                    buf.view[:256] = bytes((n + i) & 0xFF for i in range(256))
                    await dma(bar, irq, buf.iova, _EDU_BUF, up=False)
                    await dma(bar, irq, _EDU_BUF, buf.iova + 2048, up=True)
                    assert bytes(buf.view[2048:2304]) == bytes(buf.view[:256])
                irq.trigger()
                assert await irq.receive() == 1
        if not announce:
            return


async def reopen(k: Kernel, bdf: str) -> None:
    async with aiovfio.open_device(bdf, kernel=k) as dev:
        assert dev.bar(0).read32(0) == 0x010000ED


def run(backend: str, fn: Any, *args: Any) -> None:
    if backend == "trio":
        anyio.run(fn, *args, backend="trio")
    else:
        anyio.run(fn, *args, backend="asyncio", backend_options={"use_uvloop": backend == "uvloop"})


class Place:
    """Where a run happens: a fresh simulated machine, or Linux in the guest."""

    def __init__(self) -> None:
        self.machine: Machine | None = None
        if in_guest():
            target = real_target()
            self.kernel, self.bdf = target.kernel, target.edu
        else:
            self.machine = Machine()
            self.machine.add_device(Edu(), name=EDU)
            self.kernel, self.bdf = self.machine.kernel, EDU

    def leaks(self) -> list[str]:
        return self.machine.leaks() if self.machine is not None else []

    def close(self) -> None:
        if self.machine is not None:
            self.machine.close()


_stray: list[int] = []


def _count_stray(signum: int, frame: object) -> None:
    """Between runs: a SIGINT the event loop's runner delivered late (seen with uvloop)."""
    _stray.append(signum)


def main() -> None:
    backend = sys.argv[1]
    warm = Place()
    run(backend, work, warm.kernel, warm.bdf, False)
    warm.close()
    baseline = fds()
    signal.signal(signal.SIGINT, _count_stray)
    print("started", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        place = Place()
        outcome = "finished"
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            run(backend, work, place.kernel, place.bdf, True)
        except KeyboardInterrupt:
            outcome = "KeyboardInterrupt"
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        finally:
            signal.signal(signal.SIGINT, _count_stray)
        result: dict[str, Any] = {"outcome": outcome, "stray": len(_stray)}
        try:
            run(backend, reopen, place.kernel, place.bdf)
            result["reopen"] = "ok"
        except BaseException as exc:
            result["reopen"] = f"{type(exc).__name__}: {exc}"
        result["leaks"] = place.leaks()
        place.close()
        result["fds"] = sorted(fds() - baseline)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
