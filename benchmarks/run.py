"""aiovfio's speed figures, each beside its raw baseline, measured in one run.

    python benchmarks/run.py            # or: nox -s bench
    python benchmarks/run.py --quick    # fewer rounds, for a smoke check

Figures (best of several rounds, the API and its baseline interleaved so
that both see the same machine; the best round is the least disturbed one):

* interrupt wake round trip: a peer process pinned to our CPU waits on a
  "ping" eventfd and writes the device's interrupt eventfd; we time
  ping -> `await stream.receive()` against a raw persistent add_reader +
  Future (asyncio, uvloop) and trio.lowlevel.wait_readable (trio).
* read32 / write32 through `device.bar(n)` on an mmap'd region, against a raw
  `memoryview.cast("I")` index on the same mmap.
* a fixed-struct ioctl through the Kernel boundary, against a raw
  fcntl.ioctl with the same buffer (this kernel has no VFIO, so the same code
  path runs FIONREAD on a pipe).
* a 1 MiB copy into a DmaBuffer's view, against memoryview slice assignment.
* in the guest (`aiovfio vm -- python benchmarks/run.py --vfio-only`): a real
  VFIO ioctl (GROUP_GET_STATUS), and a one-page DMA map+unmap on each DMA
  backend the kernel has (the legacy container; an iommufd IOAS), through the
  Kernel boundary against raw fcntl.ioctl calls.

Targets: wake <= 1.15x raw, read32/write32 <= 2x raw, ioctl and map <= 1.3x raw,
copy >= 0.95x raw (throughput). A figure that misses its target is printed
as MISS; the script exits 0 either way (benchmarks inform, tests decide).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import ctypes
import fcntl
import mmap
import os
import shutil
import subprocess
import sys
import termios
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

import aiovfio
from aiovfio._uapi import vfio as uapi
from aiovfio.dma import allocate_memory, buffer_address
from aiovfio.kernel import LinuxKernel
from aiovfio.kernel.linux import _ioctl
from aiovfio.region import MappedRegion, RegionInfo

ROUNDS = 7

_PEER = """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[3])})
ping, irq = int(sys.argv[1]), int(sys.argv[2])
while True:
    n = os.eventfd_read(ping)
    if n > 1:
        break
    os.eventfd_write(irq, 1)
"""


class Row:
    def __init__(self, name: str, unit: str, target: str, better: str) -> None:
        self.name, self.unit, self.target, self.better = name, unit, target, better
        self.api: list[float] = []
        self.raw: list[float] = []

    def best(self, values: list[float]) -> float:
        """The least disturbed round: the fastest time, or the highest throughput."""
        return min(values) if self.better == "lower" else max(values)

    def ratio(self) -> float:
        return self.best(self.api) / self.best(self.raw)

    def verdict(self) -> str:
        limit = float(self.target.strip("<=>x "))
        r = self.ratio()
        ok = r <= limit if self.better == "lower" else r >= limit
        return "ok" if ok else "MISS"


def _timeit(fn: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / n


# --- register access ------------------------------------------------------------------


def bench_mmio(rows: list[Row], n: int) -> None:
    size = 1 << 20
    fd = os.memfd_create("aiovfio-bench-bar", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    info = RegionInfo(
        index=0,
        flags=uapi.RegionFlag.READ | uapi.RegionFlag.WRITE | uapi.RegionFlag.MMAP,
        size=size,
        offset=0,
        mmap_areas=((0, size),),
    )
    region = MappedRegion(info, LinuxKernel(), fd, "bench BAR0")
    region.map()
    raw_mm = mmap.mmap(fd, size)
    raw = memoryview(raw_mm).cast("I")
    offsets = [(i * 64) % size for i in range(n)]
    read32, write32 = region.read32, region.write32

    def api_read() -> None:
        for off in offsets:
            read32(off)

    def raw_read() -> None:
        for off in offsets:
            raw[off >> 2]

    def api_write() -> None:
        for off in offsets:
            write32(off, off)

    def raw_write() -> None:
        for off in offsets:
            raw[off >> 2] = off

    r_read = Row("read32 via bar(n)", "ns", "<= 2x", "lower")
    r_write = Row("write32 via bar(n)", "ns", "<= 2x", "lower")
    for _ in range(ROUNDS):
        r_read.api.append(_timeit(api_read, n))
        r_read.raw.append(_timeit(raw_read, n))
        r_write.api.append(_timeit(api_write, n))
        r_write.raw.append(_timeit(raw_write, n))
    rows += [r_read, r_write]
    raw.release()
    raw_mm.close()
    region.close()
    os.close(fd)


# --- ioctl ------------------------------------------------------------------------------


def bench_ioctl(rows: list[Row], n: int) -> None:
    r, w = os.pipe()
    os.write(w, b"x" * 100)
    buf = bytearray(4)
    call = _ioctl  # the path every struct ioctl takes (map_dma, region_info, ...)

    def api() -> None:
        for _ in range(n):
            call("FIONREAD", r, termios.FIONREAD, buf)

    def raw() -> None:
        for _ in range(n):
            fcntl.ioctl(r, termios.FIONREAD, buf, True)

    row = Row("struct ioctl via Kernel", "ns", "<= 1.3x", "lower")
    for _ in range(ROUNDS):
        row.api.append(_timeit(api, n))
        row.raw.append(_timeit(raw, n))
    assert array.array("i", buf)[0] == 100
    rows.append(row)
    os.close(r)
    os.close(w)


def bench_vfio_ioctl(rows: list[Row], n: int) -> None:
    """A real VFIO ioctl (GROUP_GET_STATUS, fixed struct) through LinuxKernel vs raw.

    Only where the kernel has VFIO (inside `aiovfio vm`): the group of the
    first edu device (AIOVFIO_VM_EDU) or of the BDF in AIOVFIO_BENCH_BDF.
    """
    kernel = LinuxKernel()
    bdf = (os.environ.get("AIOVFIO_BENCH_BDF") or os.environ.get("AIOVFIO_VM_EDU", "")).split()
    if not kernel.vfio_available() or not bdf:
        print("(no VFIO device here: the VFIO ioctl figure needs `aiovfio vm`)")
        return
    group = kernel.iommu_group(bdf[0])
    assert group is not None
    opener = kernel.open_noiommu_group if kernel.noiommu_group(group) else kernel.open_group
    fd = opener(group)
    arg = uapi.vfio_group_status(argsz=8)
    status = kernel.group_get_status
    request = uapi.Ioctl.GROUP_GET_STATUS

    def api() -> None:
        for _ in range(n):
            status(fd, arg)

    def raw() -> None:
        for _ in range(n):
            fcntl.ioctl(fd, request, arg, True)

    row = Row("VFIO_GROUP_GET_STATUS via Kernel", "ns", "<= 1.3x", "lower")
    for _ in range(ROUNDS):
        row.api.append(_timeit(api, n))
        row.raw.append(_timeit(raw, n))
    assert arg.flags & uapi.GroupFlag.VIABLE
    rows.append(row)
    kernel.close(fd)


def bench_dma_map(rows: list[Row], n: int) -> None:
    """Map and unmap one page through the Kernel boundary vs raw ioctls, on each DMA backend.

    The legacy container (type1, or iommufd's emulation of it) with the first
    edu device's group, and an iommufd IOAS where /dev/iommu exists (a map
    needs no attached device). Only inside `aiovfio vm`, and not under noiommu.
    """
    from aiovfio._uapi import iommufd as iuapi

    kernel = LinuxKernel()
    bdf = (os.environ.get("AIOVFIO_BENCH_BDF") or os.environ.get("AIOVFIO_VM_EDU", "")).split()
    if not kernel.vfio_available() or not bdf or os.environ.get("AIOVFIO_VM_IOMMU") == "none":
        print("(no IOMMU-backed VFIO device here: the DMA map figures need `aiovfio vm`)")
        return
    mem = allocate_memory(mmap.PAGESIZE)
    mem[0] = 1
    vaddr, _ = buffer_address(mem)
    iova = 0x100000

    def measure(name: str, fd: int, calls: tuple[Any, Any], requests: tuple[int, int]) -> None:
        """One row: map then unmap `n` times via the Kernel's two calls, and raw."""
        (do_map, map_arg), (do_unmap, unmap_arg) = calls
        map_request, unmap_request = requests

        def api() -> None:
            for _ in range(n):
                do_map(fd, map_arg)
                do_unmap(fd, unmap_arg)

        def raw() -> None:
            for _ in range(n):
                fcntl.ioctl(fd, map_request, map_arg, True)
                fcntl.ioctl(fd, unmap_request, unmap_arg, True)

        row = Row(name, "ns", "<= 1.3x", "lower")
        for _ in range(ROUNDS):
            row.api.append(_timeit(api, n))
            row.raw.append(_timeit(raw, n))
        rows.append(row)

    number = kernel.iommu_group(bdf[0])
    assert number is not None, f"{bdf[0]} has no IOMMU group"
    container = kernel.open_container()
    group = kernel.open_group(number)
    try:
        kernel.group_set_container(group, container)
        kernel.set_iommu(container, uapi.Extension.TYPE1v2_IOMMU)
        m = uapi.vfio_iommu_type1_dma_map(
            argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_map),
            flags=uapi.DmaMapFlag.READ | uapi.DmaMapFlag.WRITE,
            vaddr=vaddr,
            iova=iova,
            size=mmap.PAGESIZE,
        )
        u = uapi.vfio_iommu_type1_dma_unmap(
            argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_unmap), iova=iova, size=mmap.PAGESIZE
        )

        measure(
            "DMA map+unmap 4 KiB, container",
            container,
            ((kernel.map_dma, m), (kernel.unmap_dma, u)),
            (uapi.Ioctl.IOMMU_MAP_DMA, uapi.Ioctl.IOMMU_UNMAP_DMA),
        )
    finally:
        kernel.close(group)
        kernel.close(container)
    if not os.path.exists("/dev/iommu"):
        print("(no /dev/iommu: this kernel has no iommufd, so no IOAS figure)")
        mem.close()
        return
    fd = kernel.open_iommufd()
    try:
        alloc = iuapi.iommu_ioas_alloc(size=ctypes.sizeof(iuapi.iommu_ioas_alloc))
        kernel.ioas_alloc(fd, alloc)
        im = iuapi.iommu_ioas_map(
            size=ctypes.sizeof(iuapi.iommu_ioas_map),
            flags=iuapi.IoasMapFlag.FIXED_IOVA
            | iuapi.IoasMapFlag.READABLE
            | iuapi.IoasMapFlag.WRITEABLE,
            ioas_id=alloc.out_ioas_id,
            user_va=vaddr,
            length=mmap.PAGESIZE,
            iova=iova,
        )
        iu = iuapi.iommu_ioas_unmap(
            size=ctypes.sizeof(iuapi.iommu_ioas_unmap),
            ioas_id=alloc.out_ioas_id,
            iova=iova,
            length=mmap.PAGESIZE,
        )

        measure(
            "DMA map+unmap 4 KiB, iommufd IOAS",
            fd,
            ((kernel.ioas_map, im), (kernel.ioas_unmap, iu)),
            (iuapi.IommufdIoctl.IOAS_MAP, iuapi.IommufdIoctl.IOAS_UNMAP),
        )
    finally:
        kernel.close(fd)
        mem.close()


# --- DMA buffer copy ----------------------------------------------------------------------


async def bench_copy(rows: list[Row], n: int) -> None:
    from aiovfio.testing.target import sim_target

    size = 1024 * 1024  # bandwidth-bound: a 256 KiB copy swung by 10% with the caches
    src = os.urandom(size)
    target = sim_target()
    try:
        async with aiovfio.open_device(target.edu, kernel=target.kernel) as dev:
            async with dev.dma_buffer(size) as buf:
                view = buf.view
                raw_mem = allocate_memory(size)
                raw = memoryview(raw_mem)

                def api() -> None:
                    for _ in range(n):
                        view[:] = src

                def baseline() -> None:
                    for _ in range(n):
                        raw[:] = src

                row = Row("1 MiB copy into DmaBuffer", "GB/s", ">= 0.95x", "higher")
                for _ in range(ROUNDS):
                    row.api.append(size / _timeit(api, n))
                    row.raw.append(size / _timeit(baseline, n))
                rows.append(row)
                raw.release()
                raw_mem.close()
    finally:
        target.close()


# --- interrupt wake ---------------------------------------------------------------------


def _peer(ping: int, irq: int, cpu: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _PEER, str(ping), str(irq), str(cpu)], pass_fds=(ping, irq)
    )


async def _wake_rounds(backend: str, n: int) -> tuple[list[float], list[float]]:
    from aiovfio.testing.target import sim_target

    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    target = sim_target()
    api_t: list[float] = []
    raw_t: list[float] = []
    try:
        async with aiovfio.open_device(target.edu, kernel=target.kernel) as dev:
            async with dev.interrupts("msi") as (stream,):
                ping = os.eventfd(0, os.EFD_CLOEXEC)
                raw_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                peer_api = _peer(ping, stream.fd, cpu)
                ping2 = os.eventfd(0, os.EFD_CLOEXEC)
                peer_raw = _peer(ping2, raw_fd, cpu)
                try:
                    raw_wait = _raw_waiter(backend, raw_fd)
                    for _ in range(ROUNDS):
                        t0 = time.perf_counter_ns()
                        for _ in range(n):
                            os.eventfd_write(ping, 1)
                            await stream.receive()
                        api_t.append((time.perf_counter_ns() - t0) / n / 1000)
                        t0 = time.perf_counter_ns()
                        for _ in range(n):
                            os.eventfd_write(ping2, 1)
                            await raw_wait()
                        raw_t.append((time.perf_counter_ns() - t0) / n / 1000)
                finally:
                    for p, fd in ((peer_api, ping), (peer_raw, ping2)):
                        os.eventfd_write(fd, 2)
                        p.wait()
                        os.close(fd)
                    _raw_close(backend, raw_fd)
                    os.close(raw_fd)
    finally:
        target.close()
    return api_t, raw_t


def _raw_waiter(backend: str, fd: int) -> Callable[[], Awaitable[None]]:
    if backend == "trio":
        import trio

        async def trio_wait() -> None:
            while True:
                try:
                    os.eventfd_read(fd)
                    return
                except BlockingIOError:  # noqa: PERF203 - the raw baseline, as written by hand
                    await trio.lowlevel.wait_readable(fd)

        return trio_wait
    loop = asyncio.get_running_loop()
    state: dict[str, asyncio.Future[None] | int] = {"pending": 0}

    def on_readable() -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        fut = state.get("fut")
        if isinstance(fut, asyncio.Future) and not fut.done():
            fut.set_result(None)
        else:
            state["pending"] = 1

    loop.add_reader(fd, on_readable)

    async def asyncio_wait() -> None:
        if state["pending"]:
            state["pending"] = 0
            return
        fut = loop.create_future()
        state["fut"] = fut
        await fut

    return asyncio_wait


def _raw_close(backend: str, fd: int) -> None:
    if backend != "trio":
        asyncio.get_running_loop().remove_reader(fd)


def bench_wake(rows: list[Row], n: int) -> None:
    backends: list[tuple[str, str, dict[str, object]]] = [("asyncio", "asyncio", {})]
    try:
        import uvloop  # noqa: F401

        backends.append(("uvloop", "asyncio", {"use_uvloop": True}))
    except ImportError:
        print("(uvloop not installed: no uvloop figure)")
    try:
        import trio  # noqa: F401

        backends.append(("trio", "trio", {}))
    except ImportError:
        print("(trio not installed: no trio figure)")
    affinity = os.sched_getaffinity(0)
    for label, backend, options in backends:
        api_t, raw_t = anyio.run(_wake_rounds, backend, n, backend=backend, backend_options=options)
        row = Row(f"interrupt wake round trip ({label})", "us", "<= 1.15x", "lower")
        row.api, row.raw = api_t, raw_t
        rows.append(row)
        os.sched_setaffinity(0, affinity)


# --- instruction counts (callgrind) ------------------------------------------------------
#
# Wall-clock ratios of 50 ns operations swing by 30% on a shared VM; callgrind
# counts instructions, which repeat exactly. Each figure runs a child under
# valgrind three times (setup only, the API loop, the raw loop); the setup's
# count is subtracted.


def _op_loop(op: str, mode: str, n: int) -> None:
    """The child's body: set up `op`, then run `n` iterations of `mode`."""
    size = 1 << 20
    fd = os.memfd_create("aiovfio-bench", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    info = RegionInfo(
        index=0,
        flags=uapi.RegionFlag.READ | uapi.RegionFlag.WRITE | uapi.RegionFlag.MMAP,
        size=size,
        offset=0,
        mmap_areas=((0, size),),
    )
    region = MappedRegion(info, LinuxKernel(), fd, "bench BAR0")
    region.map()
    raw = memoryview(mmap.mmap(fd, size)).cast("I")
    offsets = [(i * 64) % size for i in range(n)]
    r, _w = os.pipe()
    buf = bytearray(4)
    call = _ioctl
    if mode == "none":
        return
    if op == "read32":
        if mode == "api":
            read32 = region.read32
            for off in offsets:
                read32(off)
        else:
            for off in offsets:
                raw[off >> 2]
    elif op == "write32":
        if mode == "api":
            write32 = region.write32
            for off in offsets:
                write32(off, off)
        else:
            for off in offsets:
                raw[off >> 2] = off
    elif op == "ioctl":
        if mode == "api":
            for _ in offsets:
                call("FIONREAD", r, termios.FIONREAD, buf)
        else:
            for _ in offsets:
                fcntl.ioctl(r, termios.FIONREAD, buf, True)


def callgrind_argv(op: str, mode: str, n: int) -> list[str]:
    """valgrind running this file's child loop with this very interpreter.

    `sys.executable`, not its resolved path: in a virtualenv (nox's, a user's)
    the resolved target is the base interpreter, which cannot import aiovfio.
    """
    return [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        op,
        mode,
        str(n),
    ]


def _instructions(op: str, mode: str, n: int) -> int:
    out = subprocess.run(
        callgrind_argv(op, mode, n),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dicts, the same count
    ).stderr
    for line in out.splitlines():
        if "Collected :" in line:
            return int(line.split(":")[-1])
    raise RuntimeError(f"no callgrind total in: {out[-500:]}")


def bench_instructions(n: int) -> None:
    if shutil.which("valgrind") is None:
        print("(valgrind not installed: no instruction counts; apt-get install valgrind)")
        return
    print(f"\ninstructions per operation (callgrind, {n} iterations; exact, repeatable)")
    print(f"{'figure':<40} {'aiovfio':>10} {'raw':>10} {'ratio':>7} {'target':>9}")
    targets = {"read32": 2.0, "write32": 2.0, "ioctl": 1.3}
    for op, limit in targets.items():
        base = _instructions(op, "none", n)
        api = (_instructions(op, "api", n) - base) / n
        raw = (_instructions(op, "raw", n) - base) / n
        verdict = "ok" if api / raw <= limit else "MISS"
        print(
            f"{op + ' (instructions)':<40} {api:>10.0f} {raw:>10.0f} {api / raw:>6.2f}x "
            f"{'<= ' + str(limit) + 'x':>9}  {verdict}"
        )


def _print(rows: list[Row]) -> None:
    print(
        f"aiovfio {aiovfio.__version__} on Python {sys.version.split()[0]}, "
        f"best of {ROUNDS} interleaved rounds"
    )
    print(
        f"{'figure':<40} {'aiovfio':>10} {'raw':>10} {'unit':>5} {'ratio':>7} "
        f"{'target':>9}  verdict"
    )
    for row in rows:
        api, raw = row.best(row.api), row.best(row.raw)
        print(
            f"{row.name:<40} {api:>10.3f} {raw:>10.3f} {row.unit:>5} {row.ratio():>6.2f}x "
            f"{row.target:>9}  {row.verdict()}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument(
        "--vfio-only", action="store_true", help="only the real VFIO ioctl figure (in a guest)"
    )
    parser.add_argument("--child", nargs=3, metavar=("OP", "MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        op, mode, count = args.child
        _op_loop(op, mode, int(count))
        return 0
    scale = 10 if args.quick else 1
    rows: list[Row] = []
    if not args.vfio_only:
        bench_mmio(rows, 200_000 // scale)
        bench_ioctl(rows, 200_000 // scale)
        anyio.run(bench_copy, rows, 2000 // scale)
        bench_wake(rows, 5000 // scale)
    bench_vfio_ioctl(rows, 20_000 // scale)
    bench_dma_map(rows, 2_000 // scale)
    _print(rows)
    if not args.vfio_only:
        bench_instructions(100_000 // scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
