"""Many commands in flight from one task: submit without awaiting, collect completions.

    async with ns.batch(depth=32) as batch:
        for buf in buffers:
            batch.read_into(next_lba(), buf)           # queued, no await
        while batch.inflight:
            for buf in await batch.completions():      # one wake for all that completed
                batch.read_into(next_lba(), buf)

The per-command path (`await ns.read_into(...)`) costs a task, a sleep and a
wake per command; a batch costs none of them: submitting writes the entry
into the SQ and returns, the doorbell is rung when the task waits
(`completions()`), and the queue's reaper appends every completion it finds
to the batch and wakes its one task once. It is the queue-depth-N loop of a
benchmark or a bulk copier.

A batch of depth 4 or more also rings when half its depth has been written
since the last ring, so the device starts on the first half while the task
writes the second: two doorbells for a full refill instead of one, the SQ
still written at submit time. In the TCG guest, where the device answers a
whole refill at once and the task's Python is the bound, that overlap is
worth 10-28 % IOPS at QD32 (benchmarks/nvme_guest.py; notes of issue 15).

A batch takes `depth` CIDs of one I/O queue when entered (all at once,
waiting while other tasks hold them) and gives them back when left. Commands move at
most MDTS and take a DmaBuffer or a slice of one's view, checked as
`Namespace.read_into`/`write_from` check them. An error status is raised
by `completions()` as `NvmeStatusError` with the command's `tag`; the
completions beside it are handed over first. Leaving the block (an
exception or a cancellation included) rings what was queued and waits,
shielded, until every command in flight has completed: the device owns
their buffers until then (bounded by the controller's command timeout).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
import anyio.lowlevel

from .. import _ki, errors
from ..dma import DmaBuffer
from .errors import NvmeStatusError
from .queue import POLL_SPIN, POLL_SPIN_MAX, TURN_EVERY, Sink
from .spec import IO_SQE, SQE_SIZE, IoOpcode

if TYPE_CHECKING:
    from types import TracebackType

    from .namespace import DmaTarget, Namespace
    from .queue import QueuePair

__all__ = ["Batch"]

_U32 = 0xFFFF_FFFF
#: DmaBuffer.iova's getter, called as a function on the hot path (the buffer's type is
#: checked to be DmaBuffer first): in CPython 3.11 a property read re-enters the eval
#: loop from C, ~1k instructions more than this call
_iova: Callable[[DmaBuffer], int] = vars(DmaBuffer)["iova"].fget
_READ, _WRITE = int(IoOpcode.READ), int(IoOpcode.WRITE)


class Batch:
    """Commands on one namespace and one I/O queue, from one task: made by `Namespace.batch`."""

    def __init__(self, ns: Namespace, depth: int | None, *, greedy: bool = False) -> None:
        self.ns = ns
        self._depth_asked = depth
        #: take at least one CID and whatever else is free up to `depth` (the MDTS splitter)
        self._greedy = greedy
        self.depth = 0
        self._q: QueuePair | None = None
        self._sink = Sink()
        self._free: list[int] = []
        self._cids: list[int] = []
        self._tags: list[Any] = []
        # the namespace's facts the fast path checks (fixed while the controller is open)
        self._block_size = block_size = ns.info.block_size
        # a power of two (1 << LBADS): the hot path shifts and masks instead of divmod
        self._block_shift = max(block_size.bit_length() - 1, 0)
        self._block_mask = block_size - 1 if block_size else -1
        self._blocks = ns.info.nsze
        self._nsid = ns.nsid
        self._max_transfer = 0
        #: submitted and not yet handed out by completions()
        self.inflight = 0
        #: entries written since the last doorbell, and how many make `read_into` ring
        self._queued = 0
        self._ring_at = 1 << 30
        self._open = False

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<nvme.Batch ns {self.ns.nsid} depth={self.depth} inflight={self.inflight} {state}>"

    # --- entering and leaving ---------------------------------------------------------

    async def __aenter__(self) -> Batch:
        ctrl = self.ns.controller
        ctrl._check_usable()
        q = ctrl.pick_queue()
        depth = q.depth if self._depth_asked is None else self._depth_asked
        if type(depth) is not int or not 0 < depth <= q.depth:
            raise errors.InvalidArgument(
                f"a batch's depth must be an int from 1 to the queue depth {q.depth}, not {depth!r}"
            )
        cids = self._cids
        try:
            if self._greedy:
                cid = q.try_take()
                cids.append(await q.take() if cid is None else cid)
                while len(cids) < depth and (cid := q.try_take()) is not None:
                    cids.append(cid)
            else:
                # All `depth` at once, none held while waiting: two batches that each
                # hold part of a queue's CIDs and wait for the rest would wait forever.
                while q.free < depth and q.failure is None:  # noqa: ASYNC110 (no event for it)
                    await anyio.sleep(0.001)  # commands in flight give theirs back
                cids.extend(q.try_take() for _ in range(min(depth, q.free)))  # type: ignore[misc]
            await anyio.lowlevel.checkpoint()
            ctrl._check_usable()
        except BaseException:
            for cid in cids:
                q.release(cid)
            cids.clear()
            raise
        depth = len(cids)
        self._q, self.depth = q, depth
        self._max_transfer = ctrl.max_transfer
        self._ring_at = depth // 2 if depth >= 4 else 1 << 30
        self._tags = [None] * q.depth
        self._free = cids[::-1]
        q.sinks.append(self._sink)
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Ring what is queued, wait (shielded) for what is in flight, give the CIDs back."""
        if not self._open:
            return
        self._open = False
        q = self._q
        assert q is not None
        sink = self._sink
        native_cancel = False
        try:
            if self._queued and q.failure is None:
                self._queued = 0
                try:
                    q.ring()
                except BaseException:
                    self._doorbell_failed()  # stop the device before the buffers go
                    raise
            with anyio.CancelScope(shield=True):
                while sink.failure is None and self.inflight > len(sink.done) + len(sink.errors):
                    if q.ring_failed:  # commands that may never be seen: not waited for
                        self._doorbell_failed()
                        break
                    try:
                        await self._sleep()
                    except asyncio.CancelledError:  # asyncio's own Task.cancel: wait on
                        native_cancel = True
        finally:
            q.sinks.remove(sink)
            sink.done.clear()
            sink.errors.clear()
            self._tags = []
            self.inflight = 0
            for cid in self._cids:
                q.release(cid)
            self._cids.clear()
            self._free.clear()
        if native_cancel:
            raise asyncio.CancelledError

    def _doorbell_failed(self) -> None:
        """An SQ doorbell write raised: the controller is failed (CC.EN=0, no more DMA)
        rather than waited on for commands it may never have seen."""
        ctrl = self.ns.controller
        if ctrl.failure is None:
            ctrl.fail("an SQ doorbell write failed: commands in flight may never be seen")

    # --- submitting ---------------------------------------------------------------------

    def read_into(self, lba: int, buffer: DmaTarget, tag: object = None) -> None:
        """Queue a read of `buffer`'s length from `lba`; `tag` (default: `buffer`) comes back."""
        # `_put` inline for a whole DmaBuffer (one frame less per command): the hot path.
        if type(buffer) is not DmaBuffer or buffer.readonly:
            self._slow(_READ, lba, buffer, tag)
            return
        iova, nbytes = _iova(buffer), buffer.size
        count = nbytes >> self._block_shift
        q = self._q
        free = self._free
        if (
            nbytes & self._block_mask
            or iova & 3
            or not free
            or q is None
            or nbytes > self._max_transfer
            or type(lba) is not int
            or lba < 0
            or not 0 < count <= self._blocks - lba
            or q.failure is not None
        ):
            self._explain(lba, iova, nbytes)
        cid = free.pop()
        page = q.page
        if nbytes <= page - (iova & (page - 1)):  # one page: PRP1 alone
            prp1, prp2 = iova, 0
        else:
            prp1, prp2 = q.prp(cid, iova, nbytes)
        self._tags[cid] = buffer if tag is None else tag
        # q.put inline (one frame less per command)
        q._waiters[cid] = self._sink
        tail = q._tail
        IO_SQE.pack_into(
            q.sq, tail * SQE_SIZE, _READ | cid << 16, self._nsid, prp1, prp2, lba, count - 1
        )
        tail += 1
        if tail == q.size:
            tail = 0
        q._tail = tail
        q.inflight += 1
        seq = q.submitted + 1
        q.submitted = seq
        q._seq[cid] = seq
        if q._idle is not None:
            q.wake_idle()
        self.inflight += 1
        queued = self._queued + 1
        if queued < self._ring_at:
            self._queued = queued
        else:  # half the depth unrung: the device starts on these now
            self._queued = 0
            q.ring()

    def write_from(self, lba: int, buffer: DmaTarget, tag: object = None) -> None:
        """Queue a write of `buffer` at `lba`; `tag` (default: `buffer`) comes back."""
        if type(buffer) is not DmaBuffer:
            self._slow(_WRITE, lba, buffer, tag)
            return
        self._put(_WRITE, lba, _iova(buffer), buffer.size, buffer if tag is None else tag)

    def _put(self, opcode: int, lba: int, iova: int, nbytes: int, tag: object) -> None:
        """The hot path: checks inline, the entry written, no doorbell (one per batch)."""
        count = nbytes >> self._block_shift
        q = self._q
        free = self._free
        if (
            nbytes & self._block_mask
            or iova & 3
            or not free
            or q is None
            or nbytes > self._max_transfer
            or type(lba) is not int
            or lba < 0
            or not 0 < count <= self._blocks - lba
            or q.failure is not None
        ):
            self._explain(lba, iova, nbytes)
        cid = free.pop()
        page = q.page
        if nbytes <= page - (iova & (page - 1)):  # one page: PRP1 alone
            prp1, prp2 = iova, 0
        else:
            prp1, prp2 = q.prp(cid, iova, nbytes)
        self._tags[cid] = tag
        q.put(self._sink, cid, opcode, self._nsid, prp1, prp2, lba & _U32, lba >> 32, count - 1)
        self.inflight += 1
        queued = self._queued + 1
        if queued < self._ring_at:
            self._queued = queued
        else:  # half the depth unrung: the device starts on these now
            self._queued = 0
            q.ring()

    def _slow(self, opcode: int, lba: int, buffer: object, tag: object) -> None:
        """A slice of a view, or a buffer the fast path refuses: resolved and checked."""
        self._check_state()
        iova, nbytes = self.ns._resolve(buffer, device_writes=opcode == _READ)
        self._put(opcode, lba, iova, nbytes, buffer if tag is None else tag)

    def _check_state(self) -> None:
        if not self._open:
            raise errors.ClosedResourceError(
                f"{self!r} is not open: use it as `async with ns.batch() as batch:`"
            )
        if self._sink.failure is not None:
            raise self._sink.failure
        if not self._free:
            raise errors.BusyResourceError(
                f"{self!r} has {self.depth} commands in flight, its depth: "
                f"take completions (`await batch.completions()`) before submitting more"
            )

    def _explain(self, lba: int, iova: int, nbytes: int) -> NoReturn:
        ns = self.ns
        self._check_state()
        count = ns._blocks_of(nbytes, "the buffer")
        ns._check_range(lba, count)
        ns.controller._check_usable()
        assert self._q is not None
        if self._q.failure is not None:
            raise self._q.failure
        if iova & 3:
            raise errors.AlignmentError(
                f"the buffer's IOVA {iova:#x} is not dword aligned (NVMe PRP1 rule)"
            )
        limit = ns.controller.max_transfer
        raise errors.InvalidArgument(
            f"a batch command moves at most MDTS = {limit} bytes, not {nbytes}: split it, "
            f"or use ns.read_into/write_from, which split"
        )

    def ring(self) -> None:
        """Send what is queued to the controller now (`completions()` does it before waiting)."""
        if self._queued and self._q is not None and self._q.failure is None:
            self._queued = 0
            self._q.ring()

    # --- completions ----------------------------------------------------------------------

    async def completions(self) -> list[Any]:
        """Wait until a command completes; return the tags of all that completed since.

        Returns [] at once (after a checkpoint) when nothing is in flight. An
        error status raises NvmeStatusError (its `tag` says which command);
        a failed controller raises its ControllerFailed.
        """
        sink = self._sink
        q = self._q
        if q is not None:
            if self._queued and q.failure is None:
                self._queued = 0
                q.ring()
            # A quick device (the sim's inline model) may have answered already: what is
            # there is taken now, and its interrupt read, not left to wake the loop later.
            if not (sink.done or sink.errors) and self.inflight and not q.polled:
                if q.inflight == 1:  # ours alone (depth 1): its completion handed over here
                    cid = q.reap_own(sink)
                    if cid >= 0:
                        if q.drain is not None:
                            q.drain()
                        if q.turn_in > 0 and not (
                            q.trio
                            and (
                                q._trio_run.ki_pending
                                or q._current_task()._cancel_status.effectively_cancelled
                            )
                        ):
                            q.turn_in -= 1
                            self._free.append(cid)
                            self.inflight -= 1
                            return [self._tags[cid]]
                        sink.done.append(cid)  # a turn or a cancellation first: below
                    elif (sink.done or sink.errors) and q.drain is not None:
                        q.drain()
                elif q.reap() and q.drain is not None:
                    q.drain()
            if (sink.done or sink.errors) and q.turn_in > 0:
                # Completions already there: no event-loop turn for them (one at least
                # every TURN_EVERY completions, below); trio still raises a cancellation here
                # (checkpoint_if_cancelled, asked only when its flags say so: queue.py).
                if q.trio and (
                    q._trio_run.ki_pending or q._current_task()._cancel_status.effectively_cancelled
                ):
                    await q._checkpoint_if_cancelled()
                return self._take()
        if sink.done or sink.errors or not self.inflight or sink.failure is not None:
            await anyio.lowlevel.checkpoint()
            if q is not None:
                q.turn_in = TURN_EVERY
        else:
            await anyio.lowlevel.checkpoint_if_cancelled()
            await self._sleep()
        return self._take()

    async def _sleep(self) -> None:
        """Sleep until the reap loop wakes us (cancellable; nothing to undo).

        On a polled queue the task polls itself (reap, spin, a checkpoint): no
        hop through the reaper task and back.
        """
        q = self._q
        assert q is not None
        sink = self._sink
        if q.polled:
            checkpoint = _checkpoint_for(q.trio)
            clock = time.perf_counter
            yielded = False
            try:
                q.self_polling += 1  # the reaper task leaves the polling to us meanwhile
                while not (sink.done or sink.errors or sink.failure is not None):
                    if not q.reap() and not q.spin(clock() + q.spin_for):
                        start = clock()
                        await checkpoint()
                        # spin as long as a turn costs: turns stay at most half the wait
                        q.spin_for = min(max(POLL_SPIN, clock() - start), POLL_SPIN_MAX)
                        yielded = True
            finally:
                q.self_polling -= 1
            if yielded:
                q.turn_in = TURN_EVERY
            elif q.turn_in <= 0:
                # A device this quick never makes the wait yield: a schedule point at
                # least every TURN_EVERY completions, not one per call (a loop turn each).
                await checkpoint()
                q.turn_in = TURN_EVERY
            return
        q.flush()  # the device sees every entry consumed before we sleep on its interrupt
        if q.trio:
            import trio

            sink.waiter = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                sink.waiter = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
            q.turn_in = TURN_EVERY
            return
        assert q._loop is not None
        fut = q._loop.create_future()
        sink.waiter = fut
        try:
            await fut
        finally:
            if sink.waiter is fut:
                sink.waiter = None
        q.turn_in = TURN_EVERY

    def _take(self) -> list[Any]:
        sink = self._sink
        done = sink.done
        if done:
            sink.done = []
            self._free += done
            n = len(done)
            self.inflight -= n
            q = self._q
            if q is not None:  # answered commands: the next forced turn comes closer
                q.turn_in -= n
            tags = self._tags
            if len(done) == 1:  # QD1: no comprehension (a frame in CPython 3.11)
                return [tags[done[0]]]
            return list(map(tags.__getitem__, done))  # no Python step per completion
        if sink.errors:  # after the successes: they are handed over first
            cid, status = sink.errors.pop(0)
            self._free.append(cid)
            self.inflight -= 1
            if isinstance(status, BaseException):  # it timed out and was aborted
                status.tag = self._tags[cid]  # type: ignore[attr-defined]
                raise status
            error = NvmeStatusError(status, f"a batch command on namespace {self._nsid}")
            error.tag = self._tags[cid]
            raise error
        if sink.failure is not None:
            raise sink.failure
        return []


def _checkpoint_for(trio: bool) -> Callable[[], Awaitable[object]]:
    if trio:
        import trio as trio_

        return trio_.lowlevel.checkpoint
    return _sleep0


async def _sleep0() -> None:
    await asyncio.sleep(0)


# On trio a KeyboardInterrupt half way through these would leave the batch's books (its
# free CIDs, tags, what is in flight or done) out of step with the queue's: `aclose`
# would then wait for ever for a completion already taken. It is delivered at the
# task's next checkpoint instead (`aiovfio._ki`; the queue's methods are marked alike).
for _method in (
    Batch.read_into,
    Batch.write_from,
    Batch._put,
    Batch._slow,
    Batch.ring,
    Batch._take,
    Batch._doorbell_failed,
):
    _ki.protect(_method)
