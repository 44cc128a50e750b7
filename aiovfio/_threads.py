"""Worker-thread calls that are never abandoned, whatever cancels the task.

`run_sync(fn, *args)` runs `fn` in an anyio worker thread inside a shielded
cancel scope. anyio's shield holds against anyio's own cancellation (and
trio's), but not against asyncio's native `Task.cancel()` (asyncio.timeout,
wait_for, TaskGroup, the runner's Ctrl-C): that throws CancelledError into
the await and anyio drops the thread's result. So the call here goes through
a `_Call` slot of its own, and an interruption is handled by what it hit:

* before the thread started `fn`: `fn` is withdrawn (it will never run). An
  acquisition then lets the interruption propagate: nothing was acquired. A
  release (`release=True`) starts `fn` again: a release is never skipped.
* while `fn` runs: keep waiting for it (further cancels are absorbed too).

Once `fn` has returned, `then(result)` runs in the event loop's thread (the
bookkeeping that owns or forgets what `fn` did), and only then is the
interruption raised, from this same await: a KeyboardInterrupt-like one in
preference to a cancellation; `fn`'s own exception becomes its context.

Why the interruption is raised here rather than re-armed for the next
suspension (as anyio does for its shielded scopes): asyncio.timeout and
TaskGroup count cancel requests (`uncancel()`), and a timeout that leaves
its block with no CancelledError seen drops its request; a cancellation
re-armed past that point would then escape the block that asked for it.
Raised here, it is exactly one CancelledError per interrupted await, at
the await asyncio cancelled, only later: the counts stay the cancellers'.
What must happen between `fn` returning and the result being owned happens
in `then`, where nothing can interrupt it (synchronous, KI-protected).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
import anyio.to_thread

from . import _ki

__all__ = ["run_sync"]

T = TypeVar("T")

_PENDING, _RUNNING, _DONE, _WITHDRAWN = range(4)


class _Call(Generic[T]):
    """One call of `fn` handed to a worker thread, with its own completion signal."""

    __slots__ = ("args", "error", "fn", "lock", "result", "state", "wake")

    def __init__(self, fn: Callable[..., T], args: tuple[object, ...]) -> None:
        self.fn = fn
        self.args = args
        self.lock = threading.Lock()
        self.state = _PENDING
        self.result: T | None = None
        self.error: BaseException | None = None
        self.wake: Callable[[], object] | None = None

    def run(self) -> None:
        """In the worker thread: run `fn` unless withdrawn; never raises."""
        with self.lock:
            if self.state == _WITHDRAWN:
                return
            self.state = _RUNNING
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:
            self.error = exc
        with self.lock:
            self.state = _DONE
            wake = self.wake
        if wake is not None:
            wake()

    def withdraw(self) -> bool:
        """Make sure `fn` never runs, if it has not started; False when it has."""
        with self.lock:
            if self.state == _PENDING:
                self.state = _WITHDRAWN
                return True
            return False


async def _wait_done(call: _Call[T], interruptions: list[BaseException]) -> None:
    """Wait until `fn` returned; interruptions that arrive meanwhile are collected."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is None:
        # Not asyncio: trio's thread wait cannot be interrupted once the
        # thread has started, so this is never reached; block rather than
        # abandon if it ever is (the thread is already in its syscall).
        done = threading.Event()
        with call.lock:
            if call.state != _DONE:
                call.wake = done.set
        if call.wake is not None:
            done.wait()
        return
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        loop.call_soon_threadsafe(_resolve, fut)

    with call.lock:
        if call.state == _DONE:
            fut.set_result(None)
        else:
            call.wake = wake
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except BaseException as exc:  # noqa: PERF203 - rare: a cancel during the wait
            interruptions.append(exc)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _deliver(interruptions: list[BaseException]) -> None:
    """Raise the interruption: a KeyboardInterrupt-like one before a cancellation."""
    others = [e for e in interruptions if not isinstance(e, asyncio.CancelledError)]
    raise (others or interruptions)[0]


@_ki.protect
async def run_sync(
    fn: Callable[..., T],
    *args: object,
    then: Callable[[T], object] | None = None,
    release: bool = False,
) -> T:
    """`fn(*args)` in a worker thread, never abandoned (see the module docstring).

    `then(result)` runs in the loop's thread as soon as `fn` returned, before
    any interruption is delivered: put there what owns the result. With
    `release=True`, `fn` runs even when the task is interrupted before the
    thread starts.
    """
    interruptions: list[BaseException] = []
    call = _Call(fn, args)
    with anyio.CancelScope(shield=True):
        while True:
            try:
                await anyio.to_thread.run_sync(call.run)
            except BaseException as exc:
                if call.withdraw():
                    if not release:
                        if interruptions:  # pragma: no cover - only releases retry
                            _deliver(interruptions)
                        raise
                    interruptions.append(exc)
                    call = _Call(fn, args)
                    continue
                interruptions.append(exc)
                await _wait_done(call, interruptions)
            break
    result, error = call.result, call.error
    call.result = call.error = None
    try:
        if error is not None:
            raise error
        if then is not None:
            then(result)  # type: ignore[arg-type]
    finally:
        del error
        if interruptions:
            _deliver(interruptions)
    return result  # type: ignore[return-value]
