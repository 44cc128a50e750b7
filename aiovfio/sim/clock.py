"""The machine's clock: when device work scheduled with `DeviceContext.schedule` runs.

Two kinds:

* ``"thread"`` (the default): machine time is real time. One worker thread
  runs due callbacks in order, each under the machine lock. While a device
  is open (`hold`) it waits for the next callback instead of exiting, so a
  command does not pay for a thread start; with nothing open and nothing
  pending there is no thread. The worker sleeps on a lock used as a wake-up
  token (released by `schedule` only while it sleeps), not on a Condition:
  a Condition's wait and notify are a dozen Python-level calls per wake-up,
  paid on every command. `close()` drops what is pending and joins the thread.
* ``"manual"``: machine time stands still; nothing runs until the test calls
  `advance(seconds)` or `run_until_idle()`. Deterministic tests use it.

Either way a callback never runs inside the register access that scheduled
it: the thread needs the machine lock, which the access holds, and the
manual clock only runs from `advance`. A callback that raises is recorded in
`errors` (and logged); the clock carries on with the next one.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from typing import Literal

from .. import _log
from ..errors import InvalidArgument

__all__ = ["Clock", "ClockKind"]

ClockKind = Literal["thread", "manual"]

#: run_until_idle gives up after this many callbacks (a model that reschedules forever).
_MAX_IDLE_STEPS = 1_000_000

# Bound once: schedule() and the worker run once per command.
_monotonic_ns = time.monotonic_ns
_heappush = heapq.heappush
_heappop = heapq.heappop


def _call(callback: Callable[[], None]) -> None:
    callback()


class Clock:
    """Pending callbacks ordered by due time, and the machine time."""

    def __init__(
        self,
        kind: ClockKind,
        lock: threading.RLock,
        *,
        runner: Callable[[Callable[[], None]], None] | None = None,
        after: Callable[[], None] | None = None,
    ) -> None:
        if kind not in ("thread", "manual"):
            raise InvalidArgument(f"clock must be 'thread' or 'manual', not {kind!r}")
        self.kind: ClockKind = kind
        self._thread_kind = kind == "thread"
        self._lock = lock  # the machine lock, held while a callback runs
        #: runs each callback (the machine's: marks it busy, then flushes fault warnings)
        self._runner: Callable[[Callable[[], None]], None] = runner or _call
        #: runs after each callback, once the machine lock is released (the machine's:
        #: signals the interrupts the callback sent)
        self._after = after
        #: guards the heap and the worker state; `with self._mutex` is a C-level enter,
        #: where `with self._cond` is two Python calls (wait_idle waits on the Condition)
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        #: the sleeping worker's wake-up token: held while no wake-up is pending
        self._wake = threading.Lock()
        self._wake.acquire()
        #: the worker is (about to be) blocked on `_wake`; guarded by `_cond`
        self._sleeping = False
        # Times are integer nanoseconds, so manual steps add up exactly.
        self._heap: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = 0
        self._start = time.monotonic_ns()
        self._manual_now = 0
        self._thread: threading.Thread | None = None
        #: every worker started, so close() can join the ones still finishing
        self._workers: list[threading.Thread] = []
        self._closed = False
        #: open devices keep the worker alive between commands (hold/release)
        self._holds = 0
        #: the worker has popped a callback and not finished it
        self._busy = False
        #: threads blocked in wait_idle (guarded by `_cond`)
        self._idle_waiters = 0
        #: exceptions raised by callbacks, oldest first
        self.errors: list[BaseException] = []
        #: run_until_idle gives up after this many callbacks
        self.max_idle_steps = _MAX_IDLE_STEPS

    def __repr__(self) -> str:
        return f"<Clock {self.kind} now={self.now():.6f} pending={self.pending}>"

    def now(self) -> float:
        """Machine time in seconds since the machine started."""
        return self._now_ns() / 1e9

    def _now_ns(self) -> int:
        if self.kind == "manual":
            return self._manual_now
        return time.monotonic_ns() - self._start

    @property
    def pending(self) -> int:
        with self._mutex:
            return len(self._heap)

    def schedule(self, delay: float, callback: Callable[[], None]) -> None:
        """Run `callback` `delay` seconds of machine time from now."""
        if delay < 0:
            raise InvalidArgument(f"delay must be >= 0, not {delay}")
        with self._mutex:
            if self._closed:
                return  # a closed machine does no more device work
            self._seq += 1
            if self._thread_kind:  # _now_ns, inline: every doorbell schedules
                due = _monotonic_ns() - self._start
                if delay:
                    due += round(delay * 1e9)
                _heappush(self._heap, (due, self._seq, callback))
                if self._thread is None:
                    self._start_worker()
                elif self._sleeping:  # _wake_worker, inline
                    self._sleeping = False
                    self._wake.release()
            else:
                due = self._manual_now + round(delay * 1e9)
                heapq.heappush(self._heap, (due, self._seq, callback))

    def _wake_worker(self) -> None:
        """Release the token once per sleep (the caller holds `_cond`)."""
        if self._sleeping:
            self._sleeping = False
            self._wake.release()

    # --- thread kind -----------------------------------------------------------------------

    def _worker(self) -> None:
        mutex, cond, heap, wake = self._mutex, self._cond, self._heap, self._wake
        lock, runner, after = self._lock, self._runner, self._after
        clock, start = _monotonic_ns, self._start
        while True:
            timeout = -1.0  # seconds to sleep; -1: until woken
            with mutex:
                self._sleeping = False
                if self._closed:
                    callback = None
                elif not heap:
                    if self._busy:
                        self._busy = False
                        if self._idle_waiters:  # notify_all is Python-level: only if needed
                            cond.notify_all()  # wait_idle: nothing pending now
                    callback = None
                    if self._holds:  # a device is open: stay warm for its next command
                        self._sleeping = True
                else:
                    wait = heap[0][0] - (clock() - start)
                    if wait <= 0:
                        callback = _heappop(heap)[2]
                        self._busy = True
                    else:
                        callback = None
                        timeout = min(wait / 1e9, threading.TIMEOUT_MAX)
                        self._sleeping = True
                if callback is None and not self._sleeping:
                    self._thread = None
                    self._busy = False
                    cond.notify_all()
                    return
            if callback is None:
                wake.acquire(True, timeout)
                continue
            with lock:  # _run, inline: one frame less per callback
                try:
                    runner(callback)
                except Exception as exc:
                    self._failed(callback, exc)
            if after is not None:
                after()

    def hold(self) -> None:
        """Keep the worker thread alive while idle (a device is open); pair with release()."""
        with self._mutex:
            self._holds += 1
            if self.kind == "thread" and self._thread is None and not self._closed:
                self._start_worker()

    def release(self) -> None:
        with self._mutex:
            self._holds = max(0, self._holds - 1)
            self._wake_worker()  # an idle worker exits when nothing holds it

    def _start_worker(self) -> None:
        self._thread = threading.Thread(target=self._worker, name="aiovfio-sim-clock", daemon=True)
        self._workers = [t for t in self._workers if t.is_alive()]
        self._workers.append(self._thread)
        self._thread.start()

    def _failed(self, callback: Callable[[], None], exc: Exception) -> None:
        """A thread-clock callback raised: keep it in `errors` (and log it), carry on."""
        self.errors.append(exc)
        if _log.enabled():
            _log.logger.error("sim.clock.callback_failed", callback=repr(callback), error=repr(exc))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Thread kind: block until nothing is pending; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._mutex:
            while self._heap or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle_waiters += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._idle_waiters -= 1
            return True

    # --- manual kind -----------------------------------------------------------------------

    def advance(self, seconds: float) -> int:
        """Manual kind: move time forward, running what falls due; returns how many ran."""
        self._need_manual("advance")
        if seconds < 0:
            raise InvalidArgument(f"cannot advance by {seconds} seconds")
        end = self._manual_now + round(seconds * 1e9)
        ran = 0
        while True:
            with self._mutex:
                if self._closed or not self._heap or self._heap[0][0] > end:
                    self._manual_now = max(self._manual_now, end)
                    return ran
                due, _, callback = heapq.heappop(self._heap)
                self._manual_now = max(self._manual_now, due)
            self._run_manual(callback)
            ran += 1

    def run_until_idle(self) -> int:
        """Manual kind: run everything pending, moving time to each due point."""
        self._need_manual("run_until_idle")
        ran = 0
        while True:
            with self._mutex:
                if self._closed or not self._heap:
                    return ran
                due, _, callback = heapq.heappop(self._heap)
                self._manual_now = max(self._manual_now, due)
            self._run_manual(callback)
            ran += 1
            if ran >= self.max_idle_steps:
                raise RuntimeError(
                    f"run_until_idle ran {ran} callbacks and work is still pending: "
                    "a model keeps rescheduling itself; use advance() instead"
                )

    def _run_manual(self, callback: Callable[[], None]) -> None:
        # In manual mode the test drives time, so a failing model fails the test.
        try:
            with self._lock:
                self._runner(callback)
        finally:
            if self._after is not None:
                self._after()

    def _need_manual(self, what: str) -> None:
        if self.kind != "manual":
            raise RuntimeError(f"{what}() needs Machine(clock='manual'); this clock is real time")

    # --- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """Drop pending work and join the worker thread. Idempotent."""
        with self._mutex:
            self._closed = True
            self._heap.clear()
            self._wake_worker()
            self._cond.notify_all()
            workers = list(self._workers)
        for thread in workers:
            if thread is not threading.current_thread():
                thread.join()
