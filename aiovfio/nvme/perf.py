"""A block workload in the shape of SPDK's `spdk_nvme_perf`, and its figures.

`await run_workload(dev, ns, qd=32, size=4096, pattern="randread", seconds=5)`
keeps `qd` commands in flight, each with its own DmaBuffer (the zero-copy
path is what is measured), for `seconds`, and returns IOPS, throughput,
latency percentiles and CPU time per I/O. By default one task keeps them in
flight through `Namespace.batch` (no task wake per I/O, one doorbell per
batch); `tasks=True` runs one task per command (`await ns.read_into`).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable

import anyio
from attrs import frozen

from .. import errors
from ..device import Device
from ..dma import DmaBuffer
from .namespace import Namespace

__all__ = ["PATTERNS", "PerfResult", "parse_size", "run_workload"]

PATTERNS = ("randread", "randwrite", "read", "write")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """'4k', '128K', '1m', '512' -> bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        value = int(t[: len(t) - len(unit)])
    except ValueError:
        raise errors.InvalidArgument(f"not a size: {text!r} (e.g. 4k, 128k, 1m)") from None
    if value <= 0:
        raise errors.InvalidArgument(f"a size must be positive, not {text!r}")
    return value * _UNITS[unit]


@frozen
class PerfResult:
    """What one workload run measured."""

    pattern: str
    qd: int
    size: int
    queues: int
    ios: int
    seconds: float
    #: process CPU seconds (every thread: on the sim that includes the device model)
    cpu: float
    #: CPU seconds of the event-loop thread alone
    thread_cpu: float
    latencies_ns: tuple[int, ...]  # sorted

    @property
    def iops(self) -> float:
        return self.ios / self.seconds if self.seconds else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.iops * self.size / (1 << 20)

    @property
    def cpu_per_io_us(self) -> float:
        return self.cpu / self.ios * 1e6 if self.ios else 0.0

    @property
    def thread_cpu_per_io_us(self) -> float:
        return self.thread_cpu / self.ios * 1e6 if self.ios else 0.0

    @property
    def mean_us(self) -> float:
        lat = self.latencies_ns
        return sum(lat) / len(lat) / 1e3 if lat else 0.0

    def percentile_us(self, p: float) -> float:
        lat = self.latencies_ns
        if not lat:
            return 0.0
        return lat[min(len(lat) - 1, int(len(lat) * p / 100))] / 1e3


async def run_workload(
    device: Device,
    ns: Namespace,
    *,
    qd: int,
    size: int,
    pattern: str,
    seconds: float,
    progress: Callable[[float, int], None] | None = None,
    seed: int = 0,
    tasks: bool = False,
) -> PerfResult:
    """Keep `qd` `size`-byte commands in flight on `ns` for `seconds`."""
    if pattern not in PATTERNS:
        raise errors.InvalidArgument(
            f"pattern must be one of {', '.join(PATTERNS)}, not {pattern!r}"
        )
    if size % ns.block_size or size > ns.size:
        raise errors.InvalidArgument(
            f"size {size} must be a multiple of the block size {ns.block_size} "
            f"and fit the namespace"
        )
    if not isinstance(qd, int) or qd < 1:
        raise errors.InvalidArgument(f"qd must be a positive int, not {qd!r}")
    if not seconds > 0:
        raise errors.InvalidArgument(f"seconds must be positive, not {seconds!r}")
    blocks = size // ns.block_size
    slots = ns.blocks // blocks
    write = pattern.endswith("write")
    io = ns.write_from if write else ns.read_into
    rng = random.Random(seed)
    rand = rng.random  # one C call per LBA (randrange is three Python frames)
    randomly = pattern.startswith("rand")
    sequential = [0]
    latencies: list[int] = []
    record = latencies.append
    clock = time.perf_counter_ns
    done = [0]
    deadline = 0.0

    def next_lba() -> int:
        if randomly:
            return int(rand() * slots) * blocks
        slot = sequential[0]
        sequential[0] = (slot + 1) % slots
        return slot * blocks

    async def worker(buf: object) -> None:
        stop = deadline
        while time.monotonic() < stop:
            lba = next_lba()
            t0 = clock()
            await io(lba, buf)  # type: ignore[arg-type]
            record(clock() - t0)
        done[0] += 1

    async def report() -> None:
        start = time.monotonic()
        while True:
            await anyio.sleep(1.0)
            if progress is not None:
                progress(time.monotonic() - start, len(latencies))

    async def batched(buffers: list[DmaBuffer]) -> None:
        async with ns.batch(depth=len(buffers)) as batch:
            submit = batch.write_from if write else batch.read_into
            started = [0] * len(buffers)
            for i, buf in enumerate(buffers):
                started[i] = clock()
                submit(next_lba(), buf, i)
            stop = deadline
            while batch.inflight:
                done = await batch.completions()
                now = clock()
                more = time.monotonic() < stop
                for i in done:
                    record(now - started[i])
                    if more:
                        started[i] = now
                        # next_lba() inline for random patterns: a frame less per I/O
                        lba = int(rand() * slots) * blocks if randomly else next_lba()
                        submit(lba, buffers[i], i)

    async with contextlib.AsyncExitStack() as stack:
        buffers = [await stack.enter_async_context(device.dma_buffer(size)) for _ in range(qd)]
        if write:
            for i, buf in enumerate(buffers):
                buf.view[:] = bytes([i & 0xFF]) * size
        cpu0, thread0 = time.process_time(), time.thread_time()
        t0 = time.monotonic()
        deadline = t0 + seconds
        async with anyio.create_task_group() as tg:
            tg.start_soon(report)
            if tasks:
                async with anyio.create_task_group() as workers:
                    for buf in buffers:
                        workers.start_soon(worker, buf)
            else:  # one batch per queue (each enters on the next queue, round robin)
                parts = max(1, min(len(ns.controller.queues), qd))
                async with anyio.create_task_group() as workers:
                    for part in range(parts):
                        workers.start_soon(batched, buffers[part::parts])
            tg.cancel_scope.cancel()
        elapsed = time.monotonic() - t0
        cpu, thread = time.process_time() - cpu0, time.thread_time() - thread0
    return PerfResult(
        pattern=pattern,
        qd=qd,
        size=size,
        queues=len(ns.controller.queues),
        ios=len(latencies),
        seconds=elapsed,
        cpu=cpu,
        thread_cpu=thread,
        latencies_ns=tuple(sorted(latencies)),
    )
