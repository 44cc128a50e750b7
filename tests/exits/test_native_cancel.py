"""asyncio's own cancellation at every point of every public operation, on asyncio and uvloop.

anyio's shielded scopes do not hold against `Task.cancel()`: this sweep
cancels the way asyncio users do, natively.

* `asyncio.timeout`, due at every suspension of the operation (the deadline
  is moved to "now" there, so the loop's timer cancels the task at that
  await): the operation raises TimeoutError, or finishes first;
* `Task.cancel()` right after every kernel call (from the thread that made
  it, through the loop): the operation raises CancelledError.

After each case the simulated machine holds nothing (`leaks() == []`), the
task has no cancellation left pending, and edu opens and answers at once.
Points are sampled as `_sweep.sample` says (AIOVFIO_EXITS_FULL=1 runs all).
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import zlib
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import pytest
from api._operations import (
    OPERATIONS,
    HookedKernel,
    Operation,
    Stepper,
    assert_fresh_open_works,
    closing_machine,
    new_target,
    with_kernel,
)

import aiovfio
from aiovfio.sim import Machine
from aiovfio.testing import Target

from ._sweep import Tally, sample

each_operation = pytest.mark.parametrize("op", OPERATIONS, ids=[op.name for op in OPERATIONS])
loops = pytest.mark.parametrize(
    "options", [pytest.param({}, id="asyncio"), pytest.param({"use_uvloop": True}, id="uvloop")]
)

#: points per operation and kind in the normal suite (see _sweep.sample)
LIMIT = 12
IOMMUFD_NAMES = ("open_device", "msi", "dma_buffer", "map_dma", "edu_dma_round_trip")

EDU_MASK = (1 << 28) - 1


async def edu_round_trip(dev: aiovfio.Device) -> None:
    """edu copies 256 bytes from a DMA buffer to its memory and back."""
    dev.config.enable()
    bar = dev.bar(0)
    async with dev.interrupts("msi") as (irq,), dev.dma_buffer(4096) as buf:
        buf.view[:256] = bytes(range(256))
        for src, dst, cmd in ((buf.iova, 0x40000, 0x5), (0x40000, buf.iova + 2048, 0x7)):
            bar.write64(0x80, src)
            bar.write64(0x88, dst)
            bar.write64(0x90, 256)
            bar.write64(0x98, cmd)
            assert await irq.receive() == 1
            bar.write32(0x64, bar.read32(0x24))
        assert bytes(buf.view[2048:2304]) == bytes(range(256))


Fresh = Callable[[], Target]


def type1_target() -> Target:
    return new_target()


def iommufd_target() -> Target:
    """The same devices on a machine with /dev/iommu: open_device takes the iommufd path."""
    return new_target(Machine(clock="manual", iommufd=True))


async def profile(op: Operation, fresh: Fresh = type1_target) -> tuple[int, list[str]]:
    """(suspensions, kernel calls) of an uninterrupted run."""
    with closing_machine(fresh()) as base:
        kernel = HookedKernel(base.kernel)
        stepper = Stepper(op(with_kernel(base, kernel.as_kernel())))
        await stepper
        return stepper.yields, list(kernel.calls)


def _task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    assert task is not None
    return task


async def settled() -> None:
    """No cancellation is left over from the case: a plain await goes through."""
    task = _task()
    if sys.version_info >= (3, 11):
        assert task.cancelling() == 0, f"{task.cancelling()} cancel requests left pending"
    await asyncio.sleep(0)


async def timeout_at_suspension(op: Operation, point: int, fresh: Fresh = type1_target) -> None:
    """asyncio.timeout (3.11+; wait_for's cancel on 3.10) due at the `point`-th suspension."""
    with closing_machine(fresh()) as t:
        loop = asyncio.get_running_loop()
        task = _task()
        if sys.version_info >= (3, 11):
            try:
                async with asyncio.timeout(None) as cm:

                    def due(n: int, yielded: object, coro: Coroutine[Any, Any, Any]) -> None:
                        if n == point:
                            cm.reschedule(loop.time())

                    await Stepper(op(t), due)
            except TimeoutError:
                pass
        else:  # pragma: no cover - Python 3.10

            def due(n: int, yielded: object, coro: Coroutine[Any, Any, Any]) -> None:
                if n == point:
                    loop.call_soon(task.cancel)

            try:
                await Stepper(op(t), due)
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                pass
        await settled()
        await assert_fresh_open_works(t)


async def cancel_after_call(op: Operation, point: int, fresh: Fresh = type1_target) -> None:
    """Task.cancel() right after the `point`-th kernel call of `op`."""
    loop_thread = threading.get_ident()
    with closing_machine(fresh()) as base:
        loop = asyncio.get_running_loop()
        task = _task()
        kernel = HookedKernel(base.kernel)

        def cancel_after(n: int, method: str) -> None:
            if n != point:
                return
            if threading.get_ident() == loop_thread:
                task.cancel()
            else:
                loop.call_soon_threadsafe(task.cancel)

        kernel.after = cancel_after
        try:
            await op(with_kernel(base, kernel.as_kernel()))
            await asyncio.sleep(0)  # a cancel after the last call lands here
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            if sys.version_info >= (3, 11):
                task.uncancel()
        kernel.after = None
        await settled()
        await assert_fresh_open_works(base)


async def _case(tally: Tally, case: str, coro: Coroutine[Any, Any, None]) -> None:
    tally.cases += 1
    try:
        await coro
    except BaseException as exc:  # a failing case is counted, then the sweep goes on
        if isinstance(exc, asyncio.CancelledError) and sys.version_info >= (3, 11):
            _task().uncancel()
        tally.failed(case, exc)


@loops
@each_operation
def test_asyncio_timeout_at_every_suspension(op: Operation, options: dict[str, Any]) -> None:
    tally = Tally(f"asyncio.timeout at suspension, {op.name}")

    async def main() -> None:
        yields, _ = await profile(op)
        for point in sample(range(1, yields + 1), f"timeout {op.name}", LIMIT):
            await _case(tally, f"suspension {point}/{yields}", timeout_at_suspension(op, point))

    anyio.run(main, backend="asyncio", backend_options=options)
    tally.check()


@loops
@each_operation
def test_task_cancel_after_every_kernel_call(op: Operation, options: dict[str, Any]) -> None:
    tally = Tally(f"Task.cancel after kernel call, {op.name}")

    async def main() -> None:
        _, calls = await profile(op)
        points = list(enumerate(calls, 1))
        for point, name in sample(points, f"cancel {op.name}", LIMIT):
            await _case(
                tally, f"after call {point}/{len(calls)} ({name})", cancel_after_call(op, point)
            )

    anyio.run(main, backend="asyncio", backend_options=options)
    tally.check()


#: the operations swept again on the iommufd path (its own open, attach, detach and IOAS)
IOMMUFD_OPS = [op for op in OPERATIONS if op.name in IOMMUFD_NAMES]


@pytest.mark.parametrize("op", IOMMUFD_OPS, ids=[op.name for op in IOMMUFD_OPS])
def test_native_cancel_on_the_iommufd_path(op: Operation) -> None:
    """Both kinds of native cancel, on a machine with /dev/iommu (asyncio; sampled)."""
    tally = Tally(f"native cancel on iommufd, {op.name}")

    async def main() -> None:
        yields, calls = await profile(op, iommufd_target)
        for point in sample(range(1, yields + 1), f"iommufd timeout {op.name}", LIMIT):
            await _case(
                tally, f"suspension {point}", timeout_at_suspension(op, point, iommufd_target)
            )
        points = list(enumerate(calls, 1))
        for point, name in sample(points, f"iommufd cancel {op.name}", LIMIT):
            await _case(
                tally, f"after call {point} ({name})", cancel_after_call(op, point, iommufd_target)
            )

    anyio.run(main, backend="asyncio")
    tally.check()


#: iterations of the open_device cancel loop (per loop kind, per event loop): in the guest, on
#: the host (where the sweeps above cover every point already)
OPEN_LOOP_GUEST, OPEN_LOOP_HOST = 25, 5


@pytest.mark.kernel
@loops
def test_open_device_cancelled_natively_in_a_loop(
    vfio_target: Target, options: dict[str, Any]
) -> None:
    """asyncio.timeout and a timed Task.cancel() at random moments of open_device (on the
    sim, and on real VFIO in the guest); after each, nothing is left and the device opens
    at once, and every fifth time (and at the end) it does a DMA round trip.

    The DMA is not itself interrupted here: edu has no reset, so a transfer cut off by the
    cancel would still land after the device closed (that path is test_sigint's).
    """
    t = vfio_target
    rng = random.Random(zlib.crc32(f"open loop {options}".encode()))
    outcomes: dict[str, int] = {"interrupted": 0, "finished": 0}
    iterations = 2 * (OPEN_LOOP_GUEST if t.real else OPEN_LOOP_HOST)

    async def open_and_read() -> None:
        async with aiovfio.open_device(t.edu, kernel=t.kernel, dma_mask=EDU_MASK) as dev:
            dev.config.enable()
            assert dev.bar(0).read32(0) == 0x010000ED

    async def main() -> None:
        task = _task()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await open_and_read()
        took = loop.time() - start
        for i in range(iterations):
            delay = rng.uniform(0, took * 1.2)
            try:
                if i % 2 and sys.version_info >= (3, 11):
                    async with asyncio.timeout(delay):
                        await open_and_read()
                else:
                    handle = loop.call_later(delay, task.cancel)
                    try:
                        await open_and_read()
                        await asyncio.sleep(0)
                    finally:
                        handle.cancel()
                outcomes["finished"] += 1
            except (TimeoutError, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and sys.version_info >= (3, 11):
                    task.uncancel()
                outcomes["interrupted"] += 1
            await settled()
            assert t.leaks() == [], f"iteration {i} (delay {delay:.4f}s)"
            await open_and_read()  # opens at once
            if i % 5 == 4 or i == iterations - 1:
                async with aiovfio.open_device(t.edu, kernel=t.kernel, dma_mask=EDU_MASK) as dev:
                    await edu_round_trip(dev)
        print(f"[cases] native cancel of open_device loop, {options}: {outcomes}")

    anyio.run(main, backend="asyncio", backend_options=options)
    assert outcomes["interrupted"] > 0
