"""aiovfio.nvme's CPU per I/O on the sim, beside a hand-rolled submit/reap loop.

    python benchmarks/nvme_perf.py                 # best of 3 runs of 3 s each
    python benchmarks/nvme_perf.py --quick         # 1 run of 1 s, a smoke check
    python benchmarks/nvme_perf.py --guest         # in the guest: see nvme_guest.py

4 KiB random reads on the simulated QEMU nvme. The figure is the driver's own
CPU per I/O: the event-loop thread's CPU time (`time.thread_time`) minus the
CPU time spent inside the Kernel's pread/pwrite on the device fd (the
simulated device model runs there; a forwarding Kernel wrapper times it),
divided by the I/Os completed. The process is pinned to one CPU. Rows:

* driver QD32 (asyncio, trio): `Namespace.read_into` from 32 tasks, the
  thread clock (the model runs in the sim's clock thread);
* baseline QD32: a minimal loop through the public API alone (pack a
  submission entry, ring the doorbell, wait on the interrupt stream, reap by
  phase tag, resubmit), same device, same clock;
* driver QD1 on the manual clock, the model run inline after each doorbell
  (inside the timed pwrite, so not counted).

Total process CPU per I/O (every thread, model included) is printed beside.
Targets: QD32 <= 5 us (stretch 3) on asyncio and trio; QD1 <= 15 us.
The instruction counts of the hot path (callgrind, when valgrind is
installed) follow the table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel

import aiovfio
from aiovfio.nvme import open_controller
from aiovfio.sim import Machine
from aiovfio.sim.models import Nvme

BDF = "0000:00:05.0"
SIZE = 4096
TARGET_QD32_US = 5.0
STRETCH_QD32_US = 3.0
TARGET_QD1_US = 15.0


class TimedKernel:
    """Forwards every call to a Kernel; times the CPU spent in pread/pwrite.

    With `after_write`, calls it inside the timed pwrite (the manual clock's
    "run the model inline after each doorbell").
    """

    def __init__(self, inner: Any, after_write: Callable[[], object] | None = None) -> None:
        self._inner = inner
        self._after = after_write
        self.inside = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        t0 = time.thread_time()
        try:
            data: bytes = self._inner.pread(fd, size, offset)
            return data
        finally:
            self.inside += time.thread_time() - t0

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        t0 = time.thread_time()
        try:
            self._inner.pwrite(fd, data, offset)
            if self._after is not None:
                self._after()
        finally:
            self.inside += time.thread_time() - t0


def _machine(clock: str) -> tuple[Machine, TimedKernel]:
    machine = Machine(clock=clock)  # type: ignore[arg-type]
    machine.add_device(Nvme(size=1 << 30), name=BDF)
    inline = machine.run_until_idle if clock == "manual" else None
    return machine, TimedKernel(machine.kernel, inline)


class Sample:
    def __init__(self, ios: int, thread: float, inside: float, process: float) -> None:
        self.ios = ios
        self.own_us = (thread - inside) / ios * 1e6 if ios else float("inf")
        self.process_us = process / ios * 1e6 if ios else float("inf")


async def _driver(qd: int, seconds: float, clock: str) -> Sample:
    machine, kernel = _machine(clock)
    try:
        async with aiovfio.open_device(BDF, kernel=kernel) as dev:  # type: ignore[arg-type]
            async with open_controller(dev, queue_depth=qd) as ctrl:
                ns = ctrl.namespace()
                slots = ns.blocks // (SIZE // ns.block_size)
                per = SIZE // ns.block_size
                count = 0
                import random

                rand = random.Random(1).random  # one C call per LBA (randrange: three frames)

                async def worker(buf: aiovfio.DmaBuffer) -> None:
                    nonlocal count
                    while time.monotonic() < stop:
                        await ns.read_into(int(rand() * slots) * per, buf)
                        count += 1

                bufs = [await _enter(dev.dma_buffer(SIZE)) for _ in range(qd)]
                try:
                    await anyio.lowlevel.checkpoint()
                    kernel.inside = 0.0
                    t0, p0 = time.thread_time(), time.process_time()
                    stop = time.monotonic() + seconds
                    async with anyio.create_task_group() as tg:
                        for buf in bufs:
                            tg.start_soon(worker, buf)
                    thread, process = time.thread_time() - t0, time.process_time() - p0
                    return Sample(count, thread, kernel.inside, process)
                finally:
                    for buf in bufs:
                        await buf.aclose()
    finally:
        machine.close()


async def _driver_batch(qd: int, seconds: float, clock: str) -> Sample:
    """`Namespace.batch`: one task keeps `qd` reads in flight, no task wake per I/O."""
    machine, kernel = _machine(clock)
    try:
        async with aiovfio.open_device(BDF, kernel=kernel) as dev:  # type: ignore[arg-type]
            async with open_controller(dev, queue_depth=qd) as ctrl:
                ns = ctrl.namespace()
                per = SIZE // ns.block_size
                slots = ns.blocks // per
                import random

                rand = random.Random(1).random  # one C call per LBA (randrange: three frames)
                bufs = [await _enter(dev.dma_buffer(SIZE)) for _ in range(qd)]
                try:
                    await anyio.lowlevel.checkpoint()
                    count = 0
                    async with ns.batch(depth=qd) as batch:
                        read_into, completions = batch.read_into, batch.completions
                        kernel.inside = 0.0
                        t0, p0 = time.thread_time(), time.process_time()
                        stop = time.monotonic() + seconds
                        for buf in bufs:
                            read_into(int(rand() * slots) * per, buf)
                        while batch.inflight:
                            done = await completions()
                            count += len(done)
                            if time.monotonic() < stop:
                                for buf in done:
                                    read_into(int(rand() * slots) * per, buf)
                    thread, process = time.thread_time() - t0, time.process_time() - p0
                    return Sample(count, thread, kernel.inside, process)
                finally:
                    for buf in bufs:
                        await buf.aclose()
    finally:
        machine.close()


async def _enter(cm: Any) -> Any:
    return await cm.__aenter__()


# --- the baseline: the public API, no driver ---------------------------------------------

_SQE = struct.Struct("<BBHI8xQQQ6I")
_CC_ENABLE = 0x00460001


async def _baseline(qd: int, seconds: float, clock: str) -> Sample:
    """Bring a queue pair up by hand and keep `qd` reads in flight."""
    machine, kernel = _machine(clock)
    size = qd + 1
    try:
        async with (
            aiovfio.open_device(BDF, kernel=kernel) as dev,  # type: ignore[arg-type]
            dev.interrupts("msix", 2) as irqs,
            dev.dma_buffer(4 * 4096) as rings,
            dev.dma_buffer(qd * SIZE) as data,
        ):
            dev.config.enable()
            bar = dev.bar(0)
            mem = rings.view
            base = rings.iova
            asq, acq, iosq, iocq = base, base + 4096, base + 8192, base + 12288
            cq_words = mem[12288:16384].cast("I")
            acq_words = mem[4096:8192].cast("I")
            bar.write32(0x24, (16 - 1) << 16 | (16 - 1))
            for off, value in ((0x28, asq), (0x30, acq)):
                bar.write32(off, value & 0xFFFFFFFF)
                bar.write32(off + 4, value >> 32)
            bar.write32(0x14, _CC_ENABLE)
            admin_tail = 0

            async def admin(opcode: int, prp1: int, cdw10: int, cdw11: int) -> None:
                nonlocal admin_tail
                entry = (opcode, 0, admin_tail, 0, 0, prp1, 0, cdw10, cdw11, 0, 0, 0, 0)
                _SQE.pack_into(mem, admin_tail * 64, *entry)
                slot = admin_tail
                admin_tail += 1
                bar.write32(0x1000, admin_tail)
                while (acq_words[slot * 4 + 3] >> 16) & 1 != 1:  # noqa: ASYNC110
                    await anyio.sleep(0.0005)  # the phase tag: memory, not an event
                bar.write32(0x1004, admin_tail)

            await admin(0x05, iocq, (size - 1) << 16 | 1, 1 << 16 | 0b11)
            await admin(0x01, iosq, (size - 1) << 16 | 1, 1 << 16 | 1)
            import random

            rand = random.Random(1).random  # one C call per LBA (randrange: three frames)
            slots = (1 << 30) // SIZE
            tail = head = 0
            phase = 1
            sq = mem[8192:12288]
            irq = irqs[1]
            write32 = bar.write32

            def submit(cid: int) -> None:
                nonlocal tail
                prp1 = data.iova + cid * SIZE
                _SQE.pack_into(
                    sq,
                    tail * 64,
                    0x02,
                    0,
                    cid,
                    1,
                    0,
                    prp1,
                    0,
                    int(rand() * slots) * 8,
                    0,
                    7,
                    0,
                    0,
                    0,
                )
                tail += 1
                if tail == size:
                    tail = 0
                write32(0x1008, tail)

            await anyio.lowlevel.checkpoint()
            kernel.inside = 0.0
            t0, p0 = time.thread_time(), time.process_time()
            stop = time.monotonic() + seconds
            for cid in range(qd):
                submit(cid)
            count = 0
            inflight = qd
            while inflight:
                await irq.receive()
                while True:
                    w3 = cq_words[head * 4 + 3]
                    if (w3 >> 16) & 1 != phase:
                        break
                    head += 1
                    if head == size:
                        head, phase = 0, phase ^ 1
                    count += 1
                    inflight -= 1
                    if time.monotonic() < stop:
                        submit(w3 & 0xFFFF)
                        inflight += 1
                write32(0x100C, head)
            thread, process = time.thread_time() - t0, time.process_time() - p0
            bar.write32(0x14, 0)
            for view in (sq, cq_words, acq_words):
                view.release()  # before the DmaBuffer frees its memory
            return Sample(count, thread, kernel.inside, process)
    finally:
        machine.close()


def _best(fn: Callable[..., Any], backend: str, runs: int, *args: Any) -> Sample:
    options = {"use_uvloop": True} if backend == "uvloop" else {}
    name = "asyncio" if backend == "uvloop" else backend
    samples = [anyio.run(fn, *args, backend=name, backend_options=options) for _ in range(runs)]
    return min(samples, key=lambda s: s.own_us)


def _row(name: str, s: Sample, tail: str) -> str:
    return f"{name:<34} {s.ios:>8} {s.own_us:>10.2f} {s.process_us:>14.2f} {tail}"


def _verdict(value: float, target: float, stretch: float | None = None) -> str:
    if stretch is not None and value <= stretch:
        return "ok (stretch)"
    return "ok" if value <= target else "MISS"


def bench_instructions(n: int) -> None:
    """Callgrind instruction counts of the hot path: build an SQE, ring, reap."""
    if shutil.which("valgrind") is None:
        print("\n(valgrind not installed: no instruction counts)")
        return
    code = f"""
import itertools, sys, types
from aiovfio.nvme.queue import QueuePair
mem = bytearray(64 * 64 + 64 * 16)
view = memoryview(mem)
sq, cq = view[: 64 * 64], view[64 * 64 :].cast("I")
q = QueuePair.__new__(QueuePair)
QueuePair.__init__(q, qid=1, size=64, sq=sq, cq=cq, sq_doorbell=0x1008, cq_doorbell=0x100C,
    write32=lambda o, v: None, page=4096, prp_view=None, prp_iova=0, prp_pages=0, trio=True)
done = []
q._reschedule = lambda task, value: done.append(value)  # trio's reschedule, stubbed
q._value_of = int
@types.coroutine
def checkpoint():
    return None
    yield
@types.coroutine
def wait(abort):
    return (yield)
q._checkpoint_if_cancelled, q._wait_rescheduled = checkpoint, wait
# trio's task and runner as the command path reads them: not cancelled, no KI pending
task = types.SimpleNamespace(_cancel_status=types.SimpleNamespace(effectively_cancelled=False))
q._current_task = itertools.repeat(task).__next__
q._trio_run = types.SimpleNamespace(ki_pending=False)
def main():  # a function: module-level code would add a dict look-up per name
    run = q.run
    for i in range({n}):
        cid = q.try_take()
        prp1, prp2 = q.prp(cid, 0x100000, 4096)
        command = run(cid, 2, 1, prp1, prp2, i, 0, 7)
        command.send(None)  # submitted; the task sleeps
        slot = q._head * 4
        cq[slot] = 0
        cq[slot + 3] = cid | (q._phase << 16)
        q.reap()
        try:
            command.send(done.pop())  # the task wakes with the completion
        except StopIteration:
            pass
main()
"""
    what = "take CID, PRP, run: pack SQE, ring, sleep; reap CQE, wake, release, resume"
    _callgrind(code, n, f"hot path, a task per command ({what})")
    whole = n - n % 32
    batch_script = _BATCH_SCRIPT.replace("N_IOS", str(whole))
    _callgrind(batch_script, whole, f"hot path, a batch of 32 ({_BATCH_WHAT})")


_BATCH_WHAT = "submit: checks, CID, PRP, pack SQE; one ring per 32; reap CQE; hand the tag over"
_BATCH_SCRIPT = """
import types
from aiovfio._resource import State
from aiovfio.dma import DmaBuffer
from aiovfio.nvme.batch import Batch
from aiovfio.nvme.queue import QueuePair
mem = bytearray(64 * 64 + 64 * 16)
view = memoryview(mem)
sq, cq = view[: 64 * 64], view[64 * 64 :].cast("I")
q = QueuePair.__new__(QueuePair)
QueuePair.__init__(q, qid=1, size=64, sq=sq, cq=cq, sq_doorbell=0x1008, cq_doorbell=0x100C,
    write32=lambda o, v: None, page=4096, prp_view=None, prp_iova=0, prp_pages=0, trio=True)
info = types.SimpleNamespace(block_size=512, nsze=1 << 21)
ctrl = types.SimpleNamespace(max_transfer=1 << 19)
ns = types.SimpleNamespace(info=info, nsid=1, controller=ctrl)
batch = Batch(ns, 32)  # entered by hand: its CIDs, its sink on the queue
batch._q, batch.depth, batch._max_transfer, batch._open = q, 32, ctrl.max_transfer, True
batch._free = [q.try_take() for _ in range(32)]
batch._ring_at = 16  # as entering sets it (half the depth: read_into rings at 16 and 32)
batch._tags = [None] * q.depth
q.sinks.append(batch._sink)
bufs = []
for i in range(32):  # open DmaBuffers without a DMA space (their IOVA is all the path asks)
    b = DmaBuffer.__new__(DmaBuffer)
    m = types.SimpleNamespace(_state=State.OPEN, _iova=0x100000 + i * 4096)
    object.__setattr__(b, "_state", State.OPEN)
    object.__setattr__(b, "_mapping", m)
    object.__setattr__(b, "size", 4096)
    object.__setattr__(b, "readonly", False)
    bufs.append(b)
def main():  # a function: module-level code would add a dict look-up per name
    read_into, take, reap = batch.read_into, batch._take, q.reap
    done = bufs
    lba = 0
    for _ in range(N_IOS // 32):
        for buf in done:
            lba = (lba + 8) & 0xFFFFF
            read_into(lba, buf)
        batch.ring()
        head, phase = q.head, q.phase  # the device: 32 completions
        for i in range(32):
            slot = ((head + i) % 64) * 4
            if (head + i) % 64 == 0 and i:
                phase ^= 1
            cq[slot] = 0
            cq[slot + 3] = (31 - i) | phase << 16
        reap()
        done = take()
main()
"""


def _callgrind(code: str, n: int, what: str) -> None:
    counts = []
    for loops in (0, n):
        script = code.replace(f"range({n})", f"range({loops})").replace(
            f"range({n} // 32)", f"range({loops} // 32)"
        )
        out = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                "-c",
                script,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            check=False,
        ).stderr
        total = [line for line in out.splitlines() if "Collected" in line]
        counts.append(int(total[-1].split()[-1]) if total else 0)
    per = (counts[1] - counts[0]) / n
    print(f"\n{what}: {per:,.0f} instructions per I/O (callgrind, {n} I/Os)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 run of 1 s per row")
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU (default: the last)")
    args = parser.parse_args()
    runs, seconds = (1, 1.0) if args.quick else (3, 3.0)
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(f"4 KiB random reads on the simulated nvme; best of {runs} x {seconds:g} s; CPU {cpu}")
    header = (
        f"{'row':<34} {'I/Os':>8} {'own us/IO':>10} {'process us/IO':>14} "
        f"{'vs baseline':>12}  target"
    )
    print(header)
    for qd, clock, target, stretch in (
        (32, "thread", TARGET_QD32_US, STRETCH_QD32_US),
        (1, "manual", TARGET_QD1_US, None),
    ):
        for backend in ("asyncio", "trio"):
            label = f"QD{qd} {clock} clock {backend}"
            base = _best(_baseline, backend, runs, qd, seconds, clock)
            drv = _best(_driver, backend, runs, qd, seconds, clock)
            print(_row(f"baseline {label}", base, ""))
            verdict = _verdict(drv.own_us, target, stretch)
            ratio = f"{drv.own_us / base.own_us:.2f}x"
            print(_row(f"driver   {label}", drv, f"{ratio:>11}  <= {target:g} us: {verdict}"))
            bat = _best(_driver_batch, backend, runs, qd, seconds, clock)
            verdict = _verdict(bat.own_us, target, stretch)
            ratio = f"{bat.own_us / base.own_us:.2f}x"
            print(_row(f"batch    {label}", bat, f"{ratio:>11}  <= {target:g} us: {verdict}"))
    bench_instructions(2000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
