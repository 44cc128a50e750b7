"""Cancellation and KeyboardInterrupt-like exceptions at every point of every public operation.

Each operation of the catalogue (`_operations.py`) runs once uninterrupted to
learn its suspension points and kernel calls; then once per point from a
fresh simulated machine, interrupted there. After each run the machine must
hold nothing (`leaks() == []`) and a fresh open must work.

The points, all enumerated (not sampled):

* every suspension (`Stepper`): cancel the enclosing scope there;
* after each kernel call (`HookedKernel`, from whatever thread made it):
  cancel, delivered at the next checkpoint;
* before each kernel call, and after each one that does not hand out a new
  resource: raise `Interrupt` (a BaseException, as KeyboardInterrupt);
* at each plain checkpoint: throw `Interrupt` in instead of suspending (where
  trio delivers a pending KeyboardInterrupt).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

import anyio
import pytest
from attrs import define

from ._operations import (
    ACQUIRING,
    OPERATIONS,
    HookedKernel,
    Interrupt,
    Operation,
    Stepper,
    assert_fresh_open_works,
    await_chain,
    call_in_loop,
    closing_machine,
    is_pure_checkpoint,
    new_target,
    with_kernel,
)

pytestmark = pytest.mark.anyio

each_operation = pytest.mark.parametrize("op", OPERATIONS, ids=[op.name for op in OPERATIONS])


@define
class Profile:
    """What an uninterrupted run of an operation does."""

    #: for each suspension, in order: whether it is a plain checkpoint
    suspensions: list[bool]
    #: the Kernel methods called, in order
    calls: list[str]
    #: the numbers (from 1) of the calls that failed, as the operation expected
    failed: set[int]


async def profile(op: Operation) -> Profile:
    with closing_machine(new_target()) as base:
        kernel = HookedKernel(base.kernel)
        pure: list[bool] = []

        def record(n: int, yielded: object, coro: Coroutine[Any, Any, Any]) -> None:
            pure.append(is_pure_checkpoint(yielded, coro))

        await Stepper(op(with_kernel(base, kernel.as_kernel())), record)
        assert base.machine is not None
        assert base.machine.leaks() == []
        assert kernel.calls, f"{op.name} makes no kernel call"
        return Profile(pure, list(kernel.calls), set(kernel.failed))


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def count(what: str, op: Operation, cases: int) -> None:
    """Say how many cases ran (shown with `pytest -s`)."""
    print(f"[cases] {what} {op.name}: {cases}")


async def cancel_at_suspension(op: Operation, point: int) -> None:
    """Cancel the scope around `op` at its `point`-th suspension (0: before it starts)."""
    with closing_machine(new_target(), f"cancel at suspension {point}") as t:
        reached = point == 0

        def cancel_at(n: int, yielded: object, coro: Coroutine[Any, Any, Any]) -> None:
            nonlocal reached
            if n == point:
                reached = True
                scope.cancel()

        with anyio.CancelScope() as scope:
            if point == 0:
                scope.cancel()
            await Stepper(op(t), cancel_at)
        assert reached, f"{op.name} did not reach suspension {point} again"
        await assert_fresh_open_works(t)


async def cancel_after_call(op: Operation, point: int, name: str) -> None:
    """Cancel the scope around `op` right after its `point`-th kernel call, from its thread."""
    loop_thread = threading.get_ident()
    with closing_machine(new_target(), f"cancel after call {point} ({name})") as base:
        kernel = HookedKernel(base.kernel)

        def cancel_after(n: int, method: str) -> None:
            if n == point:
                call_in_loop(scope.cancel, loop_thread)

        kernel.after = cancel_after
        with anyio.CancelScope() as scope:
            await op(with_kernel(base, kernel.as_kernel()))
        assert kernel.calls[point - 1] == name
        await assert_fresh_open_works(base)


async def interrupt_around_call(op: Operation, point: int, name: str, when: str) -> None:
    """Raise Interrupt `when` ("before" or "after") the `point`-th kernel call of `op`."""
    with closing_machine(new_target(), f"Interrupt {when} call {point} ({name})") as base:
        kernel = HookedKernel(base.kernel)

        def interrupt(n: int, method: str) -> None:
            if n == point:
                raise Interrupt(f"{when} {method} (call {n})")

        setattr(kernel, when, interrupt)
        with pytest.raises(Interrupt):
            await op(with_kernel(base, kernel.as_kernel()))
        setattr(kernel, when, None)
        await assert_fresh_open_works(base)


async def interrupt_at_checkpoint(op: Operation, point: int) -> None:
    """Throw Interrupt into `op` at its `point`-th suspension, a plain checkpoint."""
    with closing_machine(new_target(), f"Interrupt at suspension {point}") as t:

        def interrupt_at(n: int, yielded: object, coro: Coroutine[Any, Any, Any]) -> Any:
            if n == point:
                assert is_pure_checkpoint(yielded, coro)
                return Interrupt(f"checkpoint {n}")
            return None

        with pytest.raises(Interrupt):
            await Stepper(op(t), interrupt_at)
        await assert_fresh_open_works(t)


@each_operation
async def test_cancel_at_every_suspension(op: Operation) -> None:
    prof = await profile(op)
    points = range(len(prof.suspensions) + 1)
    for point in points:
        await cancel_at_suspension(op, point)
    count("cancel at suspension", op, len(points))


@each_operation
async def test_cancel_after_every_kernel_call(op: Operation) -> None:
    prof = await profile(op)
    for point, name in enumerate(prof.calls, 1):
        await cancel_after_call(op, point, name)
    count("cancel after call", op, len(prof.calls))


def interrupt_points(prof: Profile) -> list[tuple[int, str, str]]:
    """(call number, method, "before"/"after") where raising Interrupt is meaningful."""
    points = []
    for point, name in enumerate(prof.calls, 1):
        # Raised before close, nothing could close the fd: Python itself loses
        # it. Raised after a call that hands out an fd or a count, that result
        # is lost the same way. A call that fails has no "after".
        if name != "close":
            points.append((point, name, "before"))
        if name not in ACQUIRING and name != "eventfd_read" and point not in prof.failed:
            points.append((point, name, "after"))
    if _on_asyncio():
        # There eventfd_read runs in the loop's reader callback, where the
        # loop itself swallows a BaseException.
        points = [p for p in points if p[1] != "eventfd_read"]
    return points


@each_operation
async def test_interrupt_around_every_kernel_call(op: Operation) -> None:
    points = interrupt_points(await profile(op))
    for point, name, when in points:
        await interrupt_around_call(op, point, name, when)
    count("Interrupt around call", op, len(points))


@each_operation
async def test_interrupt_at_every_checkpoint(op: Operation) -> None:
    prof = await profile(op)
    points = [j for j, pure in enumerate(prof.suspensions, 1) if pure]
    assert points, f"{op.name} passes no checkpoint"
    for point in points:
        await interrupt_at_checkpoint(op, point)
    count("Interrupt at checkpoint", op, len(points))


# --- the bug this suite found, pinned ----------------------------------------------------------


async def test_interrupt_as_the_device_fd_closes_still_closes_it(anyio_backend: Any) -> None:
    """Device.aclose hands close() to a worker thread, whose start is a checkpoint.

    A BaseException delivered there (trio delivers a pending KeyboardInterrupt
    at it, even in a shielded scope) skipped the close: the device fd leaked
    and the group's VFIO_GROUP_UNSET_CONTAINER then failed with EBUSY, hiding
    the interrupt.
    """
    hit = False

    def interrupt_in_close(n: int, yielded: object, coro: Coroutine[Any, Any, Any]) -> Any:
        nonlocal hit
        chain = await_chain(coro)
        closing = any(
            c.co_name == "_close_fd" and c.co_filename.endswith("device.py") for c in chain
        )
        in_thread_call = any(c.co_name == "kcall_thread" for c in chain)
        if not hit and closing and in_thread_call and is_pure_checkpoint(yielded, coro):
            hit = True
            return Interrupt("as the device fd closes")
        return None

    with closing_machine(new_target()) as t:
        if anyio_backend[0] == "trio":
            # trio's worker-thread start yields only when already cancelled or
            # interrupted: there is no plain checkpoint to interrupt at.
            await Stepper(OPERATIONS[0](t), interrupt_in_close)
            assert not hit
        else:
            with pytest.raises(Interrupt):
                await Stepper(OPERATIONS[0](t), interrupt_in_close)
            assert hit
        await assert_fresh_open_works(t)
