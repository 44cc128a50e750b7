"""One NVMe queue pair: the submission and completion rings, their CIDs and waiters.

A command takes a free CID (or waits for one), is written into the SQ and
the tail doorbell rung; its task then sleeps until the queue's reaper, woken
by the CQ's interrupt (or polling), finds the completion by its phase tag,
wakes the task with the status and hands the CID to the next waiter.

The waits use each backend's own primitives (an asyncio Future; trio's
`wait_task_rescheduled`): this is the hot path, measured per I/O.

A command rung alone looks at the CQ once first: a quick device may have
answered already (the sim's model run inline after the doorbell does). It
then returns with no event-loop turn, except one at least every
`TURN_EVERY` such commands so other tasks run and deadlines, Task.cancel
and trio's KeyboardInterrupt arrive; and it reads the interrupt that completion raised
(`drain`), which would otherwise wake the loop for nothing later.

Cancelling a task whose command is in flight does not abandon the command:
the device still owns the buffer, so the task waits (shielded) for the
completion, which the controller's watchdog bounds with its command
timeout, and is cancelled after. A controller failure wakes every waiter
with the error.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from attrs import define, field

from .. import _ki
from .._log import logger
from .prp import build_prp
from .spec import IO_SQE, SQE_SIZE

__all__ = ["POLL_SPIN", "POLL_SPIN_MAX", "TURN_EVERY", "QueuePair", "Sink", "running_trio"]

_U16 = 0xFFFF
#: Polled and hybrid modes: seconds a poller watches the CQ between event-loop turns (at
#: least; a batch polling its own queue spins as long as its last turn took, up to
#: POLL_SPIN_MAX: `QueuePair.spin_for`).
POLL_SPIN = 50e-6
#: The longest a batch polling its own queue spins between turns (seconds).
POLL_SPIN_MAX = 1e-3
#: A task whose completion is already there when it looks (a quick device; the sim's
#: inline model) goes on without an event-loop turn, but gives the loop one at least every
#: this many such commands (a batch: completions handed over): other tasks run and
#: cancellation (deadlines, Task.cancel, trio's KeyboardInterrupt) arrives at least that
#: often (~3-8 ms at the sim's QD1, ~1-2 ms for its QD32 batch). A count, not a time: the
#: same run takes its turns at the same points (the exhaustive exit-path sweeps replay
#: runs point by point), and no clock is read per command. Each turn costs a QD1 command
#: about as much as the device does in a TCG guest.
TURN_EVERY = 256
#: the waiter of a command while `start` runs (its task looks at the CQ itself)
_HERE: Any = object()


def running_trio() -> bool:
    """Whether the current task runs on trio (else asyncio, or uvloop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


@define(eq=False, repr=False)
class Sink:
    """Where a batch's completions go (`aiovfio.nvme.batch`): no task per command.

    The reap loop appends the CID of each successful completion to `done`
    and (CID, status) of each error to `errors`, keeping the CID out of the
    free list (the batch owns it); after the loop it wakes the batch's one
    `waiter` (an asyncio Future or a trio task), if any.
    """

    done: list[int] = field(factory=list)
    #: (CID, status) of an error status; (CID, exception) of a command that timed out
    errors: list[tuple[int, int | BaseException]] = field(factory=list)
    waiter: Any = None
    failure: BaseException | None = None


@define(eq=False, repr=False)
class QueuePair:
    """Submission queue `qid` (`size` entries) and its completion queue `qid` (`cq_size`).

    At most `size - 1` commands are in flight, so neither ring can overflow
    (SQ full is tail + 1 == head; the CQ has at least as many entries). A CQ
    larger than that lets the head doorbell wait while nothing is in flight
    (`reap`): the device cannot fill it, and whoever next sleeps on the
    interrupt rings it first (`flush`), so the device sees every entry consumed.
    """

    qid: int
    size: int
    sq: memoryview  # size * 64 bytes, the device reads it
    cq: memoryview  # size * 16 bytes as 32-bit words, the device writes it
    sq_doorbell: int
    cq_doorbell: int
    write32: Callable[[int, int], None]
    page: int
    #: PRP list pages: `prp_pages` pages per CID at `prp_iova`
    prp_view: memoryview | None
    prp_iova: int
    prp_pages: int
    trio: bool
    #: poll for completions instead of sleeping on the interrupt
    polled: bool = False
    #: the SQ exists on the controller (shutdown deletes it)
    sq_created: bool = False
    #: CQ entries (0: `size`)
    cq_size: int = 0
    #: makes a writer for one register offset (`Region.writer32`); without it the
    #: doorbells go through `write32`
    writer: Callable[[int], Callable[[int], None]] | None = None
    #: write the SQ tail doorbell, the CQ head doorbell (from `writer`, else `write32`)
    ring_sq: Callable[[int], None] = field(init=False)
    ring_cq: Callable[[int], None] = field(init=False)
    inflight: int = field(default=0, init=False)
    failure: BaseException | None = field(default=None, init=False)
    submitted: int = field(default=0, init=False)
    _tail: int = field(default=0, init=False)
    _head: int = field(default=0, init=False)
    #: the CQ head last written to its doorbell
    _rung_head: int = field(default=0, init=False)
    #: consumed CQ entries that may stay unrung while nothing is in flight
    _lazy: int = field(default=0, init=False)
    _phase: int = field(default=1, init=False)
    _free: list[int] = field(init=False)
    _waiters: list[Any] = field(init=False)
    #: the submission number of the command in flight with each CID (for the watchdog)
    _seq: list[int] = field(init=False)
    _slot_waiters: deque[Any] = field(factory=deque, init=False)
    _idle: Any = field(default=None, init=False)
    _ring_pending: bool = field(default=False, init=False)
    #: trio: the parked ringer task (`ringer`), None while it runs or when there is none
    _ringer: Any = field(default=None, init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)
    #: sleep until the completion of a command `start` could not answer (this backend's)
    wait: Callable[[int], Awaitable[int]] = field(init=False)
    wake: Callable[[Any, int], None] = field(init=False)
    _current_task: Callable[[], Any] = field(init=False)
    _wait_rescheduled: Callable[..., Any] = field(init=False)
    _checkpoint_if_cancelled: Callable[[], Any] = field(init=False)
    #: trio's reschedule and outcome.Value (the reap loop calls them directly)
    _reschedule: Callable[[Any, Any], None] | None = field(default=None, init=False)
    _value_of: Any = field(default=None, init=False)
    #: the batches submitting on this queue (their sinks)
    sinks: list[Sink] = field(factory=list, init=False)
    #: CID -> the error its command ends with (it timed out and was aborted)
    expired: dict[int, BaseException] = field(factory=dict, init=False)
    #: commands answered without an event-loop turn left before the next forced turn
    #: (TURN_EVERY after each; lower is safe: it only makes the next turn come sooner)
    turn_in: int = field(default=0, init=False)
    #: read the CQ's interrupt eventfd without blocking (set by the interrupt-mode reaper):
    #: a task that reaped its completion itself consumes the interrupt it raised, so it
    #: wakes nobody later
    drain: Callable[[], None] | None = field(default=None, init=False)
    #: the value of the command whose task reaped it itself (`_HERE`)
    _here: int = field(default=0, init=False)
    _checkpoint: Callable[[], Any] = field(init=False)
    #: trio: the run's runner, whose `ki_pending` (with the task's cancel status) says
    #: whether checkpoint_if_cancelled must be asked (`_trio_run_flags`)
    _trio_run: Any = field(default=None, init=False)
    #: polled mode: batches polling this queue in their own task now (`Batch._sleep`);
    #: while there is one, the reaper task does not poll too (a second spin every turn)
    self_polling: int = field(default=0, init=False)
    #: an SQ doorbell write raised (a dead device; an interrupt inside the write): the
    #: entries written before it may never reach the controller, so nobody waits for
    #: them (shutdown, a batch leaving): the controller is failed (disabled) instead
    ring_failed: bool = field(default=False, init=False)
    #: polled mode: how long a batch's own poll spins between event-loop turns: at least
    #: POLL_SPIN, and as long as its last turn took (at most POLL_SPIN_MAX), so turns take
    #: at most about half the wait however dear a turn is (an epoll call and every ready
    #: task: ~10 us on a host, ~250 us in a TCG guest)
    spin_for: float = field(default=POLL_SPIN, init=False)

    def __attrs_post_init__(self) -> None:
        if self.writer is not None:
            self.ring_sq = self.writer(self.sq_doorbell)
            self.ring_cq = self.writer(self.cq_doorbell)
        else:
            self.ring_sq = functools.partial(self.write32, self.sq_doorbell)
            self.ring_cq = functools.partial(self.write32, self.cq_doorbell)
        depth = self.size - 1
        self.turn_in = TURN_EVERY
        if self.cq_size < self.size:
            self.cq_size = self.size
        self._lazy = self.cq_size - self.size
        self._free = list(range(depth - 1, -1, -1))
        self._waiters = [None] * depth
        self._seq = [0] * depth
        if self.trio:
            import outcome
            import trio

            reschedule, value_of = trio.lowlevel.reschedule, outcome.Value

            def wake(task: Any, value: int) -> None:
                reschedule(task, value_of(value))

            self._current_task = trio.lowlevel.current_task
            self._trio_run = _trio_run_flags()
            self._wait_rescheduled = trio.lowlevel.wait_task_rescheduled
            self._checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
            self._checkpoint = trio.lowlevel.checkpoint
            self.wait = self._wait_trio
            self.wake = wake
            self._reschedule, self._value_of = reschedule, value_of
        else:
            self._loop = asyncio.get_running_loop()
            self._checkpoint = _sleep0
            self.wait = self._wait_asyncio
            self.wake = _wake_asyncio

    def __repr__(self) -> str:
        return (
            f"<QueuePair {self.qid} size={self.size} inflight={self.inflight} "
            f"free={len(self._free)}>"
        )

    @property
    def depth(self) -> int:
        """Commands that may be in flight at once."""
        return self.size - 1

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def head(self) -> int:
        """The CQ head: the next completion entry to look at."""
        return self._head

    @property
    def phase(self) -> int:
        """The phase tag a new entry at `head` carries."""
        return self._phase

    # --- CIDs ----------------------------------------------------------------------

    def try_take(self) -> int | None:
        """A free CID, or None when every one is in flight."""
        free = self._free
        return free.pop() if free else None

    async def take(self) -> int:
        """A free CID, waiting for one when every one is in flight."""
        free = self._free
        if free:
            return free.pop()
        if self.failure is not None:
            raise self.failure
        if self.trio:
            return await self._take_trio()
        return await self._take_asyncio()

    async def _take_asyncio(self) -> int:
        assert self._loop is not None
        fut = self._loop.create_future()
        self._slot_waiters.append(fut)
        try:
            cid: int = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())  # handed over just as we were cancelled
            raise
        return cid

    async def _take_trio(self) -> int:
        import trio

        task = trio.lowlevel.current_task()
        self._slot_waiters.append(task)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._slot_waiters.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        cid: int = await trio.lowlevel.wait_task_rescheduled(abort)
        return cid

    def release(self, cid: int) -> None:
        """Give a CID back: to the first task waiting for one, else to the free list."""
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if self.trio:
                self.wake(waiter, cid)
                return
            if not waiter.done():
                waiter.set_result(cid)
                return
        self._free.append(cid)

    def prp(self, cid: int, iova: int, length: int) -> tuple[int, int]:
        """PRP1/PRP2 for a transfer by command `cid` (its own PRP list pages)."""
        page = self.page
        first = page - (iova & (page - 1))
        if length <= first:
            return iova, 0
        if length - first <= page:
            return iova, iova + first
        assert self.prp_view is not None
        span = self.prp_pages * page
        offset = cid * span
        return build_prp(
            iova,
            length,
            self.page,
            self.prp_view[offset : offset + span],
            self.prp_iova + offset,
        )

    # --- submission -------------------------------------------------------------------

    def _ring(self) -> None:
        """The deferred SQ tail doorbell (a loop callback: it must not raise)."""
        self._ring_pending = False
        if self.failure is None:
            try:
                self.ring_sq(self._tail)
            except Exception as exc:  # a closed region, a dead device: the watchdog sees it
                self.ring_failed = True
                logger.warning("nvme.doorbell_failed", qid=self.qid, error=str(exc))

    def put(
        self,
        waiter: Any,
        cid: int,
        opcode: int,
        nsid: int,
        prp1: int,
        prp2: int,
        cdw10: int,
        cdw11: int,
        cdw12: int,
        cdw13: int = 0,
    ) -> int:
        """Write an entry at the tail for `waiter` without ringing; returns the new tail.

        A batch's entries (`Batch._put`; its hot path inlines this); a single command
        goes through `start`, which also rings and looks.
        """
        self._waiters[cid] = waiter
        tail = self._tail
        IO_SQE.pack_into(
            self.sq,
            tail * SQE_SIZE,
            opcode | cid << 16,
            nsid,
            prp1,
            prp2,
            cdw10 | cdw11 << 32,
            cdw12 | cdw13 << 32,
        )
        tail += 1
        if tail == self.size:
            tail = 0
        self._tail = tail
        self.inflight += 1
        seq = self.submitted + 1
        self.submitted = seq
        self._seq[cid] = seq
        idle = self._idle
        if idle is not None:
            self._idle = None
            self.wake(idle, 0)
        return tail

    def wake_idle(self) -> None:
        """Wake the polled reaper sleeping until a command is submitted (`wait_work`)."""
        idle = self._idle
        if idle is not None:
            self._idle = None
            self.wake(idle, 0)

    def ring(self) -> None:
        """Ring the SQ tail doorbell now (after `put`); a write that raises marks the
        queue (`ring_failed`)."""
        try:
            self.ring_sq(self._tail)
        except BaseException:
            self.ring_failed = True
            raise

    def start(
        self, cid: int, opcode: int, nsid: int, prp1: int, prp2: int, cdw10_11: int, cdw12_13: int
    ) -> int:
        """Submit with `cid`; the completion's status << 32 | DW0 if it is there already,
        else -1: then the caller must `wait(cid)` before anything else.

        Writes the entry at the tail and rings, or, with others in flight, leaves
        the ring to the tasks submitting now (asyncio: a call_soon callback; trio:
        the ringer task). Rung alone (not polled) it looks at the CQ at once: a
        quick device (the sim's model run inline) may have answered already. Its
        own entry at the head is consumed here, without the general reap loop, and
        the interrupt it raised read (`drain`), not left to wake the loop later.
        The caller has checked `failure` and (trio) cancellation: see `run`.
        """
        waiters = self._waiters
        waiters[cid] = _HERE  # until `wait` installs the task's own waiter
        tail = self._tail
        IO_SQE.pack_into(
            self.sq, tail * SQE_SIZE, opcode | cid << 16, nsid, prp1, prp2, cdw10_11, cdw12_13
        )
        tail += 1
        if tail == self.size:
            tail = 0
        self._tail = tail
        inflight = self.inflight + 1
        self.inflight = inflight
        seq = self.submitted + 1
        self.submitted = seq
        self._seq[cid] = seq
        if self._idle is not None:
            self.wake_idle()
        if inflight > 1:
            if not self.trio:
                if not self._ring_pending:
                    # tasks woken by one completion batch submit in the same loop
                    # iteration; ring once, after them
                    self._ring_pending = True
                    assert self._loop is not None
                    self._loop.call_soon(self._ring)
            elif self._ring_pending:
                pass  # the ringer is woken already
            elif self._ringer is not None:
                # trio: tasks woken by one reap submit in the same scheduler batch;
                # the ringer task rings once, in the next one (`ringer`)
                self._ring_pending = True
                ringer, self._ringer = self._ringer, None
                self.wake(ringer, 0)
            else:
                try:
                    self.ring_sq(tail)
                except BaseException:
                    self.ring_failed = True
                    raise
            return -1
        try:
            self.ring_sq(tail)
        except BaseException:
            self.ring_failed = True
            raise
        if self.polled:
            return -1
        cq = self.cq
        head = self._head
        slot = head * 4
        w3 = cq[slot + 3]
        if (w3 >> 16) & 1 != self._phase:  # not answered (yet): sleep on the interrupt
            if head != self._rung_head:
                self.flush()
            return -1
        try:
            if w3 & _U16 != cid or self.expired:  # not (only) ours: the general loop
                self.reap()
                if waiters[cid] is not None:
                    self.flush()
                    return -1
                value = self._here
            else:  # its own: consumed here (the QD1 case)
                value = (w3 >> 17) << 32 | cq[slot]
                head += 1
                if head == self.cq_size:
                    head = 0
                    self._phase ^= 1
                self._head = head
                waiters[cid] = None
                self.inflight = inflight - 1
                if self._slot_waiters:
                    self.release(cid)
                else:
                    self._free.append(cid)
                # nothing in flight: the head doorbell may wait (`reap`, `flush`)
                if (head - self._rung_head) % self.cq_size > self._lazy:
                    self._rung_head = head
                    self.ring_cq(head)
        except Exception as exc:  # a failing CQ doorbell: the watchdog sees a dead device
            logger.warning("nvme.reap_failed", qid=self.qid, error=str(exc))
            if waiters[cid] is not None:
                return -1
            value = self._here
        drain = self.drain
        if drain is not None:
            drain()
        return value

    async def run(
        self,
        cid: int,
        opcode: int,
        nsid: int,
        prp1: int,
        prp2: int,
        cdw10: int,
        cdw11: int,
        cdw12: int,
        cdw13: int = 0,
    ) -> int:
        """Submit with `cid` and wait: the completion's status << 32 | DW0.

        `start`, then `wait` unless it was answered at once; answered commands
        give the loop a turn at least every TURN_EVERY of them (`turn`). On trio a
        cancelled task starts nothing (checkpoint_if_cancelled, asked only when its
        flags say so: `_trio_run_flags`). Namespace.read_into/write_from inline this.
        """
        if self.failure is not None:
            self.release(cid)
            raise self.failure
        if self.trio and (
            self._trio_run.ki_pending or self._current_task()._cancel_status.effectively_cancelled
        ):
            try:
                await self._checkpoint_if_cancelled()
            except BaseException:
                self.release(cid)
                raise
        value = self.start(cid, opcode, nsid, prp1, prp2, cdw10 | cdw11 << 32, cdw12 | cdw13 << 32)
        if value < 0:
            value = await self.wait(cid)
        else:
            self.turn_in -= 1
            if self.turn_in <= 0:
                await self.turn()
        return value

    async def turn(self) -> None:
        """The event-loop turn a task whose commands are answered at once takes at least
        every TURN_EVERY: other tasks run, cancellation arrives (the commands are done)."""
        await self._checkpoint()
        self.turn_in = TURN_EVERY

    async def _wait_asyncio(self, cid: int) -> int:
        """Sleep until the reap loop sets our future (after `start` returned -1)."""
        assert self._loop is not None
        fut = self._loop.create_future()
        self._waiters[cid] = fut
        try:
            value: int = await fut
        except asyncio.CancelledError:
            await self._settle_asyncio(cid, fut)
            raise
        return value

    async def _wait_trio(self, cid: int) -> int:
        """Sleep until the reap loop reschedules us (after `start` returned -1).

        Abort.FAILED: a cancelled task stays until the completion (or the controller's
        failure) arrives; trio delivers the cancel after that.
        """
        self._waiters[cid] = self._current_task()
        value: int = await self._wait_rescheduled(_abort_failed)
        return value

    async def _settle_asyncio(self, cid: int, fut: asyncio.Future[int]) -> None:
        """A cancelled task waits for its command to complete (the device owns its buffer)."""
        assert self._loop is not None
        with anyio.CancelScope(shield=True):  # anyio's cancellation waits
            while self._waiters[cid] is fut:
                fut = self._loop.create_future()
                self._waiters[cid] = fut
                try:
                    await fut
                except asyncio.CancelledError:  # asyncio's own Task.cancel: wait on
                    continue
                except BaseException:  # the controller failed: the command is gone
                    return

    # --- completion -------------------------------------------------------------------

    def reap(self) -> int:
        """Consume every new completion (phase tag), wake its task; return how many."""
        cq = self.cq
        first = slot = self._head * 4  # the entry's first word; its phase is in word 3
        phase = self._phase
        w3 = cq[slot + 3]
        if (w3 >> 16) & 1 != phase:
            return 0  # nothing new (a poll, a look before sleeping): no more work
        end = self.cq_size * 4
        waiters = self._waiters
        reschedule, value_of = self._reschedule, self._value_of
        free = self._free
        slot_waiters = self._slot_waiters
        expired = self.expired
        skipped = 0  # consumed, not completing a command of ours
        while (w3 >> 16) & 1 == phase:
            cid = w3 & _U16
            status = w3 >> 17
            at = slot
            slot += 4
            if slot == end:
                slot = 0
                phase ^= 1
            w3 = cq[slot + 3]  # the next entry's: the loop's test
            try:
                waiter = waiters[cid]
            except IndexError:  # not a CID we used: a controller bug; the watchdog sees the rest
                skipped += 1
                continue
            if waiter is None:
                skipped += 1
                continue  # failed and released already
            waiters[cid] = None
            if expired and cid in expired:  # timed out: it ends with the watchdog's error
                self._expire(waiter, cid, expired.pop(cid))
                continue
            if type(waiter) is Sink:  # a batch's: it keeps the CID
                if status:
                    waiter.errors.append((cid, status))
                else:
                    waiter.done.append(cid)
                continue
            value = status << 32 | cq[at]
            if waiter is _HERE:  # its task is the one reaping
                self._here = value
            elif reschedule is not None:  # trio
                reschedule(waiter, value_of(value))
            elif not waiter.done():  # asyncio
                waiter.set_result(value)
            if slot_waiters:
                self.release(cid)
            else:
                free.append(cid)
        n = ((slot - first) % end or end) >> 2  # (a whole ring: a device bug)
        inflight = self.inflight - n + skipped
        self.inflight = inflight
        head = slot >> 2
        self._head = head
        self._phase = phase
        # With nothing in flight nobody waits on the interrupt and the device cannot fill
        # the CQ (consumed + in flight < cq_size): the doorbell may wait (`flush`). A
        # failed queue (nothing in flight) rings nothing: its CQ may be gone (shutdown
        # disables the controller after failing the queues; a reaper may look once more).
        if inflight or (
            (head - self._rung_head) % self.cq_size > self._lazy and self.failure is None
        ):
            self._rung_head = head
            self.ring_cq(head)
        for sink in self.sinks:
            if sink.waiter is not None and (sink.done or sink.errors):
                self._wake_sink(sink)
        return n

    def reap_own(self, sink: Sink) -> int:
        """`reap` when one command is in flight and it is a batch's (depth 1): the CID of
        its successful completion, consumed without the general loop; -1 if there is
        none (anything else new, an error status included, went through `reap`).

        The batch hands the completion over itself: nothing goes through `sink`.
        """
        cq = self.cq
        head = self._head
        w3 = cq[head * 4 + 3]
        if (w3 >> 16) & 1 != self._phase:
            return -1
        cid = w3 & _U16
        waiters = self._waiters
        if w3 >> 17 or self.expired or cid >= len(waiters) or waiters[cid] is not sink:
            self.reap()
            return -1
        waiters[cid] = None
        head += 1
        if head == self.cq_size:
            head = 0
            self._phase ^= 1
        self._head = head
        inflight = self.inflight - 1
        self.inflight = inflight
        if inflight or (
            (head - self._rung_head) % self.cq_size > self._lazy and self.failure is None
        ):
            self._rung_head = head
            self.ring_cq(head)
        return cid

    def flush(self) -> None:
        """Ring the CQ head doorbell if entries were consumed since (before sleeping on the
        interrupt: a device may signal only while it sees entries unconsumed)."""
        head = self._head
        if head != self._rung_head and self.failure is None:
            self._rung_head = head
            self.ring_cq(head)

    def _expire(self, waiter: Any, cid: int, exc: BaseException) -> None:
        if type(waiter) is Sink:
            waiter.errors.append((cid, exc))
            return
        _throw(waiter, exc, trio=self.trio)
        self.release(cid)

    def _wake_sink(self, sink: Sink) -> None:
        waiter, sink.waiter = sink.waiter, None
        if self.trio:
            self.wake(waiter, 0)
        elif not waiter.done():
            waiter.set_result(0)

    def spin(self, until: float) -> bool:
        """Watch the next CQE's phase tag until `until` (perf_counter): whether it arrived.

        A poller spins this long between event-loop turns: each turn is an epoll
        call and a pass over every ready callback, dearer than a completion that
        is a few microseconds away.
        """
        cq, slot, phase = self.cq, self._head * 4 + 3, self._phase
        clock = time.perf_counter
        while (cq[slot] >> 16) & 1 != phase:
            if clock() >= until:
                return False
        return True

    def still_in_flight(self, cid: int, seq: int) -> bool:
        """Whether submission number `seq` is the command in flight with `cid`."""
        return self._waiters[cid] is not None and self._seq[cid] == seq

    def in_flight(self) -> set[tuple[int, int]]:
        """(CID, submission number) of every command in flight (the watchdog's view)."""
        seq = self._seq
        return {(cid, seq[cid]) for cid, w in enumerate(self._waiters) if w is not None}

    def fail(self, exc: BaseException) -> None:
        """The controller died: wake every waiter with `exc`; later commands raise it."""
        self.failure = exc
        self.expired.clear()
        for cid, waiter in enumerate(self._waiters):
            if waiter is not None:
                self._waiters[cid] = None
                if type(waiter) is Sink:
                    continue  # the batch keeps its CIDs; it sees `failure` below
                if waiter is _HERE:  # its task raised in `start` (a doorbell write failed)
                    self._free.append(cid)
                    continue
                _throw(waiter, exc, trio=self.trio)
                self._free.append(cid)
        self.inflight = 0
        for sink in self.sinks:
            if sink.failure is None:
                sink.failure = exc
            if sink.waiter is not None:
                self._wake_sink(sink)
        slots, self._slot_waiters = self._slot_waiters, deque()
        for waiter in slots:
            _throw(waiter, exc, trio=self.trio)
        idle, self._idle = self._idle, None
        if idle is not None:  # the reaper: it carries on (there is nothing to reap)
            self.wake(idle, 0)

    # --- the reaper ---------------------------------------------------------------------

    async def ringer(self) -> None:
        """trio: ring the SQ doorbell once for the commands submitted in one scheduler batch.

        asyncio defers the doorbell with call_soon; trio has no callbacks, so a task
        parks here and the first command submitted while others are in flight wakes
        it; it runs after the tasks of that batch (trio runs a batch's tasks before
        the tasks they wake) and rings once for them all. Leaving (shutdown), it
        rings what is pending.
        """
        import trio

        def abort(_: object) -> trio.lowlevel.Abort:
            self._ringer = None
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            while True:
                self._ringer = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(abort)
                self._ring()
        finally:
            self._ringer = None
            if self._ring_pending:
                self._ring()

    async def wait_work(self) -> None:
        """Polled mode: sleep until a command is submitted."""
        if self.inflight:
            return
        if self.trio:
            import trio

            task = trio.lowlevel.current_task()
            self._idle = task

            def abort(_: object) -> trio.lowlevel.Abort:
                self._idle = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        else:
            assert self._loop is not None
            fut = self._loop.create_future()
            self._idle = fut
            try:
                await fut
            finally:
                if self._idle is fut:
                    self._idle = None


class _AskTrio:
    """A stand-in runner whose flag is always up: every check asks trio itself."""

    ki_pending = True


def _trio_run_flags() -> Any:
    """What `trio.lowlevel.checkpoint_if_cancelled` tests, without its coroutine.

    It raises only if the task's cancel status is `effectively_cancelled` or a
    KeyboardInterrupt is pending (the runner's `ki_pending`); the command paths
    read those two flags (trio's own, private names) and await it only when one
    is set, so a cancelled scope still raises at once. A trio without them gets
    a stand-in whose flag is always set: every command asks trio, as before.
    """
    import trio

    try:
        task = trio.lowlevel.current_task()
    except RuntimeError:  # outside a run (a stubbed queue): ask trio every time
        return _AskTrio()
    runner = getattr(task, "_runner", None)
    status = getattr(task, "_cancel_status", None)
    if isinstance(getattr(runner, "ki_pending", None), bool) and isinstance(
        getattr(status, "effectively_cancelled", None), bool
    ):
        return runner
    return _AskTrio()


# On trio a KeyboardInterrupt inside `start` would land between an entry and its
# doorbell (the entry unrung: the shutdown waits the command timeout for it, and a later
# doorbell could expose it after its buffer is gone): it is delivered at the task's next
# checkpoint instead, as in the public layer (`aiovfio._ki`). The same for every plain
# method that moves a CID, an entry or a completion between the rings, the free list and
# the waiters (a reaper task runs them too): half done, a completion is lost and whoever
# waits for it waits for ever.
for _method in (
    QueuePair.start,
    QueuePair.put,
    QueuePair.ring,
    QueuePair._ring,
    QueuePair.release,
    QueuePair.reap,
    QueuePair.reap_own,
    QueuePair.flush,
    QueuePair.fail,
    QueuePair._expire,
    QueuePair._wake_sink,
):
    _ki.protect(_method)


def _abort_failed(_: object) -> Any:
    import trio

    return trio.lowlevel.Abort.FAILED


async def _sleep0() -> None:
    await asyncio.sleep(0)


def _wake_asyncio(fut: asyncio.Future[int], value: int) -> None:
    if not fut.done():
        fut.set_result(value)


def _throw(waiter: Any, exc: BaseException, *, trio: bool) -> None:
    if trio:
        import outcome
        import trio as trio_

        trio_.lowlevel.reschedule(waiter, outcome.Error(exc))
    elif not waiter.done():
        waiter.set_exception(exc)
