"""`_threads.run_sync`: a worker-thread call is never abandoned, whatever cancels the task.

Each test holds the thread inside `fn` on a `threading.Event`, cancels the
task natively (Task.cancel, asyncio.timeout, wait_for) while it waits, and
checks that `fn`'s result reached `then` before the cancellation was
delivered, and that the cancellation is the one asyncio's tools expect.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import pytest
from api._operations import Stepper

from aiovfio._threads import run_sync

BACKENDS = [pytest.param({}, id="asyncio"), pytest.param({"use_uvloop": True}, id="uvloop")]


def run_asyncio(fn: Callable[[], Coroutine[Any, Any, None]], options: dict[str, Any]) -> None:
    anyio.run(fn, backend="asyncio", backend_options=options)


class Gate:
    """`fn` for run_sync: waits in the thread until released, then returns `value`."""

    def __init__(self, value: int = 7) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.value = value
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        self.entered.set()
        assert self.go.wait(10)
        return self.value


async def until(flag: threading.Event) -> None:
    """Wait until a thread sets `flag`, without blocking the loop."""
    while not flag.is_set():  # noqa: ASYNC110 - a thread's flag, no loop primitive to wait on
        await asyncio.sleep(0.001)


@pytest.mark.parametrize("options", BACKENDS)
def test_task_cancel_while_the_thread_runs(options: dict[str, Any]) -> None:
    owned: list[int] = []
    log: list[str] = []

    async def work(gate: Gate) -> None:
        try:
            await run_sync(gate, then=owned.append)
        except asyncio.CancelledError:
            log.append("cancelled after the thread")
            raise
        log.append("not reached")

    async def main() -> None:
        gate = Gate()
        task = asyncio.ensure_future(work(gate))
        await until(gate.entered)
        task.cancel()
        await asyncio.sleep(0.01)
        task.cancel()  # a second cancel while waiting: still one cancellation
        await asyncio.sleep(0.01)
        assert not task.done()
        gate.go.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        if sys.version_info >= (3, 11):
            assert task.cancelling() == 2  # exactly the two requests made

    run_asyncio(main, options)
    assert owned == [7]
    assert log == ["cancelled after the thread"]


def release_after_deadline(loop: asyncio.AbstractEventLoop, gate: Gate, fire: Any) -> None:
    """Once the thread is inside `fn`, `fire()` (the deadline), then release `fn` a bit later:
    so the cancellation lands while the thread runs, whatever the machine's load."""

    def check() -> None:
        if gate.entered.is_set():
            fire()
            loop.call_later(0.02, gate.go.set)
        else:
            loop.call_later(0.001, check)

    loop.call_soon(check)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is 3.11+")
@pytest.mark.parametrize("options", BACKENDS)
def test_asyncio_timeout_becomes_timeout_error(options: dict[str, Any]) -> None:
    owned: list[int] = []

    async def main() -> None:
        gate = Gate()
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as cm:
                release_after_deadline(loop, gate, lambda: cm.reschedule(loop.time()))
                await run_sync(gate, then=owned.append)
                raise AssertionError("the timeout did not interrupt the await")
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0

    run_asyncio(main, options)
    assert owned == [7]


@pytest.mark.parametrize("options", BACKENDS)
def test_wait_for_becomes_timeout_error(options: dict[str, Any]) -> None:
    """wait_for's own timeout: `fn` ran and was owned, or never ran (it may not have
    started by the deadline on a loaded machine); the caller sees TimeoutError."""
    owned: list[int] = []
    gate = Gate()

    async def work() -> None:
        await run_sync(gate, then=owned.append)
        await asyncio.sleep(1)

    async def main() -> None:
        threading.Timer(0.05, gate.go.set).start()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(work(), 0.01)

    run_asyncio(main, options)
    assert owned == [7] * gate.calls


@pytest.mark.parametrize("options", BACKENDS)
def test_cancel_before_the_thread_starts(options: dict[str, Any]) -> None:
    """An acquisition cancelled before its thread started never runs; a release always does."""

    async def main() -> None:
        for release in (False, True):
            gate = Gate()
            gate.go.set()
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # lands at run_sync's first suspension
            with pytest.raises(asyncio.CancelledError):
                await run_sync(gate, release=release)
                await asyncio.sleep(0)
            if sys.version_info >= (3, 11):
                task.uncancel()
            assert gate.calls == (1 if release else 0)

    run_asyncio(main, options)


@pytest.mark.parametrize("options", BACKENDS)
def test_fn_error_is_the_context_of_the_cancellation(options: dict[str, Any]) -> None:
    def fail() -> None:
        gate()
        raise OSError(5, "EIO")

    gate = Gate()

    async def work() -> None:
        with pytest.raises(asyncio.CancelledError) as caught:
            await run_sync(fail)
        assert isinstance(caught.value.__context__, OSError)
        raise caught.value

    async def main() -> None:
        task = asyncio.ensure_future(work())
        await until(gate.entered)
        task.cancel()
        await asyncio.sleep(0.01)
        gate.go.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_asyncio(main, options)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_anyio_cancel_waits_for_the_thread(backend: str) -> None:
    owned: list[int] = []
    gate = Gate()

    async def main() -> None:
        with anyio.move_on_after(0.01) as scope:
            threading.Timer(0.05, gate.go.set).start()
            await run_sync(gate, then=owned.append)
            await anyio.sleep(1)
        assert scope.cancelled_caught

    anyio.run(main, backend=backend)
    assert owned == [7]  # anyio's own cancellation never withdraws: the shield holds


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_interrupt_at_the_first_suspension(backend: str) -> None:
    """A KeyboardInterrupt-like exception thrown in at the first suspension (trio delivers a
    pending one at the thread's starting checkpoint): an acquisition ran and was owned, or
    never ran; a release always runs."""

    class Interrupt(BaseException):
        pass

    def interrupt_first(n: int, yielded: object, coro: object) -> BaseException | None:
        return Interrupt() if n == 1 else None

    for release in (False, True):
        gate = Gate()
        gate.go.set()
        owned: list[int] = []

        async def main(gate: Gate, owned: list[int], release: bool) -> None:
            stepped = Stepper(run_sync(gate, then=owned.append, release=release), interrupt_first)
            with pytest.raises(Interrupt):
                await stepped

        anyio.run(main, gate, owned, release, backend=backend)
        assert gate.calls == (1 if release else len(owned))
        assert owned == [7] * gate.calls
