"""Bring an NVMe controller up, keep it watched, and shut it down on every exit.

    async with aiovfio.open_device(bdf) as dev, open_controller(dev, io_queues=2) as ctrl:
        ns = ctrl.namespace(1)
        data = await ns.read(0, 8)

Bring-up (NVMe 1.4 7.6.1): Memory Space and Bus Master on; MSI-X, one vector
per queue (the admin CQ on vector 0, I/O CQ n on vector n); disable if
enabled and wait for CSTS.RDY=0; admin queues; CC.EN=1 and CSTS.RDY=1, both
within CAP.TO; Identify Controller; Set Features Number of Queues; one I/O
CQ/SQ pair per queue; the active namespaces and their Identify data.

While open, each queue's completions are reaped by its own task (woken by
its interrupt, or polling), and a watchdog fails every in-flight command and
disables the controller when CSTS.CFS is set or the device reads as gone. An
I/O command that exceeds `command_timeout` is aborted (NVMe Abort) and fails
with CommandTimeout, the controller going on; if the Abort does not end it
within min(timeout, 5 s), or a late command is an admin one, the controller
is failed.

Completion modes (`poll=`), measured with benchmarks/nvme_guest.py: 4 KiB
random reads on QEMU's nvme in the aiovfio guest (TCG, 6.12, the host's
exclusive lock), IOPS, best of two rounds interleaved with the kernel's
driver (fio, io_uring: 4461 at QD1, 11159 at QD32 in the same boot); "batch":
one task keeping the queue full with `Namespace.batch`, "tasks": one task per
command (`await ns.read_into`):

    mode                    QD1 batch  QD1 tasks  QD32 batch  QD32 tasks
    poll=False (irq)             1431       1185        5697        3937
    poll=True                    3701       1380        9831        3849
    poll=200e-6 (hybrid)         1181       1045        7539        3786

Interrupts cost least CPU when idle; each wake is an epoll sleep and an
eventfd read (and, per command, a task wake), which at QD1 every I/O pays.
Polling skips them: a poller watches the CQ's phase tag for up to
`POLL_SPIN` (50 us) between event-loop turns, and a batch on a polled queue
polls in its own task, so a completion needs no wake at all; it wins at both
depths here, at the price of a busy core (which the device emulation, or
other work, may need). Hybrid polls after each completion only briefly,
which suits bursts. On a real device: poll for latency at low queue depth,
interrupts for CPU, hybrid in between; batch whenever one task can keep the
commands in flight.

Leaving the block, however it is left: wait for commands still in flight
(bounded), delete the I/O queues, CC.SHN normal shutdown and wait for SHST
complete (bounded by CAP.TO), CC.EN=0 and wait for RDY=0; only then are the
queues' DMA buffers unmapped and the vectors disabled.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from attrs import define, field

from .. import _ki, errors
from .._log import logger
from .errors import (
    CommandTimeout,
    ControllerFailed,
    ControllerNotReady,
    NvmeStatusError,
    QueueLimitExceeded,
)
from .pool import BouncePool
from .prp import list_pages_needed
from .queue import POLL_SPIN, QueuePair, running_trio
from .spec import (
    CQE_SIZE,
    IDENTIFY_SIZE,
    SQE_SIZE,
    AdminOpcode,
    Cap,
    Cc,
    Cns,
    Csts,
    FeatureId,
    IdentifyController,
    IdentifyNamespace,
    Reg,
    doorbell_offsets,
)

if TYPE_CHECKING:
    from ..device import Device
    from ..irq import InterruptStream
    from ..region import Region
    from .namespace import Namespace

__all__ = ["Controller", "open_controller"]

#: Admin queue entries (one command at a time is all bring-up and shutdown need).
ADMIN_DEPTH = 16
#: Default I/O queue depth: commands in flight per queue.
DEFAULT_QUEUE_DEPTH = 64
#: The largest transfer when the controller sets no limit (MDTS 0).
NO_MDTS_LIMIT = 2 * 1024 * 1024
#: Default seconds a command may take before the controller is declared dead.
DEFAULT_TIMEOUT = 30.0
#: Bounce pool bounds.
_POOL_MIN, _POOL_MAX = 1 << 20, 8 << 20
_ALL_ONES = 0xFFFF_FFFF
_U16 = 0xFFFF


def _ceil_pages(nbytes: int, page: int) -> int:
    return -(-nbytes // page) * page


@define(eq=False, repr=False)
class Controller:
    """An enabled NVMe controller with its queues: made by `open_controller`."""

    device: Device
    io_queue_count: int
    queue_depth: int
    #: False: interrupts; True: poll; seconds: poll that long, then sleep on the interrupt
    poll: bool | float
    command_timeout: float
    cap: Cap = field(init=False)
    version: int = field(init=False, default=0)
    page: int = field(init=False, default=4096)
    #: the largest transfer one command moves (MDTS); longer ones are split
    max_transfer: int = field(init=False, default=0)
    #: I/O queues the controller granted (Set Features Number of Queues)
    granted_queues: int = field(init=False, default=0)
    #: True after a normal shutdown (SHST complete), False if it was abrupt
    shutdown_clean: bool | None = field(init=False, default=None)
    _identify: IdentifyController | None = field(init=False, default=None)
    _namespaces: dict[int, Namespace] = field(factory=dict, init=False)
    _admin: QueuePair | None = field(init=False, default=None)
    _queues: list[QueuePair] = field(factory=list, init=False)
    _next: Callable[[], QueuePair] | None = field(init=False, default=None)
    #: the I/O queue when there is one (`pick_queue` has nothing to choose): the hot path
    _only_queue: QueuePair | None = field(init=False, default=None)
    _pool: BouncePool | None = field(init=False, default=None)
    _scratch: memoryview | None = field(init=False, default=None)
    _scratch_iova: int = field(init=False, default=0)
    _write32: Callable[[int, int], None] | None = field(init=False, default=None)
    _read32: Callable[[int], int] | None = field(init=False, default=None)
    _trio: bool = field(init=False, default=False)
    _enabled: bool = field(init=False, default=False)
    _failure: BaseException | None = field(init=False, default=None)
    _closed: bool = field(init=False, default=False)
    _task_scopes: list[anyio.CancelScope] = field(factory=list, init=False)
    _admin_lock: anyio.Lock = field(factory=anyio.Lock, init=False)

    def __repr__(self) -> str:
        state = "failed" if self._failure else ("closed" if self._closed else "ready")
        model = self._identify.model if self._identify else "?"
        return (
            f"<nvme.Controller {self.device.name} {model!r} queues={len(self._queues)}"
            f"x{self.queue_depth} {state}>"
        )

    # --- what users read ----------------------------------------------------------------

    @property
    def identify(self) -> IdentifyController:
        """Identify Controller: `.model`, `.serial`, `.firmware` (stripped), `.mdts`..."""
        assert self._identify is not None
        return self._identify

    @property
    def namespaces(self) -> tuple[int, ...]:
        """The active namespace ids."""
        return tuple(self._namespaces)

    def namespace(self, nsid: int = 1) -> Namespace:
        """Namespace `nsid`, for I/O."""
        self._check_usable()
        ns = self._namespaces.get(nsid)
        if ns is None:
            raise errors.DeviceNotFound(
                f"controller {self.device.name} has no active namespace {nsid!r}; "
                f"active: {', '.join(map(str, self._namespaces)) or 'none'}"
            )
        return ns

    @property
    def queues(self) -> tuple[QueuePair, ...]:
        """The I/O queue pairs (qid 1..n)."""
        return tuple(self._queues)

    @property
    def failure(self) -> BaseException | None:
        """Why the controller was declared dead, or None."""
        return self._failure

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise errors.ClosedResourceError(
                f"controller {self.device.name} was shut down; open it again"
            )

    def pick_queue(self) -> QueuePair:
        """The next I/O queue for a command: round robin, skipping full ones."""
        assert self._next is not None
        q = self._next()
        if q._free or len(self._queues) == 1:  # the list, not the `free` property: hot path
            return q
        for other in self._queues:
            if other.free:
                return other
        return q

    # --- registers ------------------------------------------------------------------------

    def _reg32(self, offset: int) -> int:
        assert self._read32 is not None
        return self._read32(offset)

    def _set32(self, offset: int, value: int) -> None:
        assert self._write32 is not None
        self._write32(offset, value)

    def _reg64(self, offset: int) -> int:
        # Two 32-bit halves: Linux before ~6.11 splits an 8-byte pread anyway.
        return self._reg32(offset) | self._reg32(offset + 4) << 32

    def _set64(self, offset: int, value: int) -> None:
        self._set32(offset, value & _ALL_ONES)
        self._set32(offset + 4, value >> 32)

    async def _wait_csts(self, mask: int, want: int, what: str, *, limit: float) -> int:
        """Poll CSTS until `csts & mask == want`, within `limit` seconds."""
        deadline = time.monotonic() + limit
        delay = 0.0
        while True:
            csts = self._reg32(Reg.CSTS)
            if csts == _ALL_ONES:
                raise ControllerFailed(
                    f"controller {self.device.name} reads all-ones while waiting for {what}: "
                    f"the device is gone or its BAR is off"
                )
            if csts & mask == want:
                return csts
            if what == "CSTS.RDY=1" and csts & Csts.CFS:
                raise ControllerFailed(
                    f"controller {self.device.name} set CSTS.CFS when enabled (CSTS={csts:#x}): "
                    f"it refused the admin queue or CC settings"
                )
            if time.monotonic() >= deadline:
                raise ControllerNotReady(
                    f"controller {self.device.name} did not reach {what} within {limit:g} s "
                    f"(CAP.TO; CSTS={csts:#x}); reset the device (`await device.reset()`) "
                    f"or check that it is an NVMe controller"
                )
            await anyio.sleep(delay)
            delay = min(max(delay * 2, 0.0005), 0.02)

    @property
    def _ready_limit(self) -> float:
        return max(self.cap.timeout, 0.5)

    # --- bring-up -------------------------------------------------------------------------

    async def _start(self, stack: contextlib.AsyncExitStack, tg: anyio.abc.TaskGroup) -> None:
        dev = self.device
        self._trio = running_trio()
        dev.config.enable(bus_master=True)
        bar = dev.bar(0)
        self._read32, self._write32 = bar.read32, bar.write32
        self.cap = Cap.decode(self._reg64(Reg.CAP))
        self.version = self._reg32(Reg.VS)
        cap = self.cap
        if cap.mpsmin != 0:
            raise errors.NotOffered(
                f"controller {dev.name} needs pages of at least {4096 << cap.mpsmin} bytes "
                f"(CAP.MPSMIN {cap.mpsmin}); aiovfio.nvme drives 4 KiB pages"
            )
        if not cap.css & 1:
            raise errors.NotOffered(
                f"controller {dev.name} does not offer the NVM command set (CAP.CSS {cap.css:#x})"
            )
        if self.queue_depth == 0:  # the default: as deep as allowed, up to 64
            self.queue_depth = min(DEFAULT_QUEUE_DEPTH, cap.mqes)
        if self.queue_depth > cap.mqes:
            raise QueueLimitExceeded(
                f"queue_depth {self.queue_depth} is more than controller {dev.name} allows: "
                f"CAP.MQES gives {cap.mqes + 1} entries, so at most {cap.mqes} commands in flight"
            )
        vectors = self.io_queue_count + 1
        msix = dev.irq_info("msix").count
        if vectors > msix:
            raise QueueLimitExceeded(
                f"{self.io_queue_count} I/O queues need {vectors} MSI-X vectors; controller "
                f"{dev.name} has {msix}: ask for at most {msix - 1} queues"
            )
        streams = await stack.enter_async_context(dev.interrupts("msix", vectors))

        # Disable first: a previous user may have left it running.
        if self._reg32(Reg.CC) & Cc.EN or self._reg32(Reg.CSTS) & Csts.RDY:
            stack.push_async_callback(self._quiesce)
            self._set32(Reg.CC, 0)
            await self._wait_csts(Csts.RDY, 0, "CSTS.RDY=0", limit=self._ready_limit)

        page = self.page
        sq_bytes = _ceil_pages(ADMIN_DEPTH * SQE_SIZE, page)
        cq_bytes = _ceil_pages(ADMIN_DEPTH * CQE_SIZE, page)
        admin_mem = await stack.enter_async_context(
            dev.dma_buffer(sq_bytes + cq_bytes + IDENTIFY_SIZE)
        )
        cut = _views(stack, admin_mem.view)
        stack.push_async_callback(self._quiesce)  # runs before any buffer is unmapped
        base = admin_mem.iova
        self._scratch = cut(sq_bytes + cq_bytes, None)
        self._scratch_iova = base + sq_bytes + cq_bytes
        sq_db, cq_db = doorbell_offsets(0, cap.doorbell_stride)
        self._admin = QueuePair(
            qid=0,
            size=ADMIN_DEPTH,
            sq=cut(0, sq_bytes),
            cq=cut(sq_bytes, sq_bytes + cq_bytes, True),
            sq_doorbell=sq_db,
            cq_doorbell=cq_db,
            write32=bar.write32,
            writer=bar.writer32,
            page=page,
            prp_view=None,
            prp_iova=0,
            prp_pages=0,
            trio=self._trio,
        )
        self._set32(Reg.AQA, (ADMIN_DEPTH - 1) << 16 | (ADMIN_DEPTH - 1))
        self._set64(Reg.ASQ, base)
        self._set64(Reg.ACQ, base + sq_bytes)
        self._enabled = True
        self._set32(Reg.CC, Cc.enable(0))
        await self._wait_csts(Csts.RDY, Csts.RDY, "CSTS.RDY=1", limit=self._ready_limit)
        self._spawn(tg, self._reap_admin, streams[0])
        self._spawn(tg, self._watchdog)

        self._identify = IdentifyController.decode(
            await self._identify_data(Cns.CONTROLLER, 0, "Identify Controller")
        )
        ident = self._identify
        mdts_limit = page << ident.mdts if ident.mdts else NO_MDTS_LIMIT
        self.max_transfer = min(mdts_limit, NO_MDTS_LIMIT)

        want = self.io_queue_count - 1
        result = await self.admin_command(
            AdminOpcode.SET_FEATURES,
            cdw10=FeatureId.NUMBER_OF_QUEUES,
            cdw11=want << 16 | want,
            what="Set Features (Number of Queues)",
        )
        self.granted_queues = min(result & _U16, result >> 16) + 1
        if self.io_queue_count > self.granted_queues:
            raise QueueLimitExceeded(
                f"controller {dev.name} granted {self.granted_queues} I/O queue pair(s); "
                f"{self.io_queue_count} were asked for: ask for at most {self.granted_queues}"
            )
        await self._create_io_queues(stack, tg, streams, bar)
        await self._find_namespaces()
        depth_total = self.io_queue_count * self.queue_depth
        pool_bytes = max(2 * self.max_transfer, min(depth_total * page, _POOL_MAX), _POOL_MIN)
        pool_mem = await stack.enter_async_context(dev.dma_buffer(pool_bytes))
        cut = _views(stack, pool_mem.view)
        stack.push_async_callback(self._quiesce)
        self._pool = BouncePool(cut(0, None), pool_mem.iova, page)
        logger.debug(
            "nvme.ready",
            device=dev.name,
            model=ident.model,
            queues=self.io_queue_count,
            depth=self.queue_depth,
            max_transfer=self.max_transfer,
        )

    async def _create_io_queues(
        self,
        stack: contextlib.AsyncExitStack,
        tg: anyio.abc.TaskGroup,
        streams: tuple[InterruptStream, ...],
        bar: Region,
    ) -> None:
        page = self.page
        size = self.queue_depth + 1
        # The CQ fills its pages (up to MQES): entries past `size` let the head doorbell
        # wait while nothing is in flight (QueuePair.reap), one MMIO write less per command.
        cq_size = min(self.cap.mqes + 1, max(size, page // CQE_SIZE))
        sq_bytes = _ceil_pages(size * SQE_SIZE, page)
        cq_bytes = _ceil_pages(cq_size * CQE_SIZE, page)
        prp_pages = list_pages_needed(self.max_transfer, page)
        prp_bytes = self.queue_depth * prp_pages * page
        polled = self.poll is True
        for qid in range(1, self.io_queue_count + 1):
            mem = await stack.enter_async_context(
                self.device.dma_buffer(sq_bytes + cq_bytes + prp_bytes)
            )
            cut = _views(stack, mem.view)
            stack.push_async_callback(self._quiesce)
            base = mem.iova
            sq_db, cq_db = doorbell_offsets(qid, self.cap.doorbell_stride)
            q = QueuePair(
                qid=qid,
                size=size,
                sq=cut(0, sq_bytes),
                cq=cut(sq_bytes, sq_bytes + cq_bytes, True),
                sq_doorbell=sq_db,
                cq_doorbell=cq_db,
                write32=bar.write32,
                writer=bar.writer32,
                page=page,
                prp_view=cut(sq_bytes + cq_bytes, None) if prp_bytes else None,
                prp_iova=base + sq_bytes + cq_bytes,
                prp_pages=prp_pages,
                trio=self._trio,
                polled=polled,
                cq_size=cq_size,
            )
            ien = 0 if polled else 1
            await self.admin_command(
                AdminOpcode.CREATE_CQ,
                prp1=base + sq_bytes,
                cdw10=(cq_size - 1) << 16 | qid,
                cdw11=qid << 16 | ien << 1 | 1,
                what=f"Create I/O CQ {qid}",
            )
            self._queues.append(q)  # from here, shutdown deletes it
            await self.admin_command(
                AdminOpcode.CREATE_SQ,
                prp1=base,
                cdw10=(size - 1) << 16 | qid,
                cdw11=qid << 16 | 1,
                what=f"Create I/O SQ {qid}",
            )
            q.sq_created = True
            self._spawn(tg, self._reap_io, q, streams[qid])
            if self._trio:
                self._spawn(tg, q.ringer)
        self._next = itertools.cycle(self._queues).__next__
        if len(self._queues) == 1:
            self._only_queue = self._queues[0]

    async def _find_namespaces(self) -> None:
        from .namespace import Namespace

        raw = await self._identify_data(Cns.ACTIVE_NS_LIST, 0, "Identify Active Namespace List")
        ids = [n for n in memoryview(raw).cast("I") if n]
        for nsid in ids:
            data = IdentifyNamespace.decode(
                await self._identify_data(Cns.NAMESPACE, nsid, f"Identify Namespace {nsid}")
            )
            if not data.block_size or data.metadata_size:
                logger.warning("nvme.namespace_skipped", nsid=nsid, reason="metadata or no size")
                continue
            self._namespaces[nsid] = Namespace(self, nsid, data)

    async def _identify_data(self, cns: int, nsid: int, what: str) -> bytes:
        assert self._scratch is not None
        async with self._admin_lock:
            self._scratch[:IDENTIFY_SIZE] = bytes(IDENTIFY_SIZE)
            await self._admin_unlocked(
                AdminOpcode.IDENTIFY, nsid=nsid, prp1=self._scratch_iova, cdw10=cns, what=what
            )
            return bytes(self._scratch[:IDENTIFY_SIZE])

    # --- admin commands -------------------------------------------------------------------

    async def admin_command(
        self,
        opcode: int,
        *,
        nsid: int = 0,
        prp1: int = 0,
        prp2: int = 0,
        cdw10: int = 0,
        cdw11: int = 0,
        cdw12: int = 0,
        what: str = "",
    ) -> int:
        """Run one admin command; return its DW0 (NvmeStatusError on an error status)."""
        async with self._admin_lock:
            return await self._admin_unlocked(
                opcode,
                nsid=nsid,
                prp1=prp1,
                prp2=prp2,
                cdw10=cdw10,
                cdw11=cdw11,
                cdw12=cdw12,
                what=what,
            )

    async def _admin_unlocked(
        self,
        opcode: int,
        *,
        nsid: int = 0,
        prp1: int = 0,
        prp2: int = 0,
        cdw10: int = 0,
        cdw11: int = 0,
        cdw12: int = 0,
        what: str = "",
    ) -> int:
        q = self._admin
        assert q is not None
        if self._failure is not None:
            raise self._failure
        cid = await q.take()
        value: int = await q.run(cid, opcode, nsid, prp1, prp2, cdw10, cdw11, cdw12)
        status = value >> 32
        if status:
            raise NvmeStatusError(status, what or f"admin command {opcode:#04x}")
        return value & _ALL_ONES

    # --- the tasks ------------------------------------------------------------------------

    def _spawn(self, tg: anyio.abc.TaskGroup, fn: Callable[..., object], *args: object) -> None:
        """Start a queue task in a shielded scope that only shutdown cancels.

        Commands whose tasks were cancelled still wait for their completion,
        so reaping must outlive any cancellation of the `async with` block.
        """
        scope = anyio.CancelScope(shield=True)
        self._task_scopes.append(scope)

        async def run() -> None:
            with scope:
                await fn(*args)  # type: ignore[misc]

        tg.start_soon(run)

    async def _reap_admin(self, stream: InterruptStream) -> None:
        q = self._admin
        assert q is not None
        while True:
            q.reap()
            if not q.inflight:
                await q.wait_work()
                continue
            # An admin command is rare: also look now and then, should an interrupt be lost.
            with anyio.move_on_after(0.05):
                await stream.receive()

    async def _reap_io(self, q: QueuePair, stream: InterruptStream) -> None:
        poll = self.poll
        if poll is False and not self._trio:
            await self._reap_in_reader(q, stream)
            return
        if poll is False:
            await self._reap_trio(q, stream)
            return
        checkpoint = _checkpoint_for(self._trio)
        clock = time.perf_counter
        if poll is True:
            while True:
                if q.self_polling > 0:  # a batch polls this queue in its own task: not twice
                    await checkpoint()
                    continue
                if not q.reap():
                    if not q.inflight:
                        await q.wait_work()
                        continue
                    if q.spin(clock() + POLL_SPIN):
                        continue  # reap it now, before giving the loop its turn
                await checkpoint()
        # Hybrid: after the last completion, poll for `poll` seconds, then sleep.
        window = float(poll)
        last = clock()
        while True:
            if q.reap():
                last = clock()
            elif not q.inflight or clock() - last > window:
                await stream.receive()
                last = clock()
                continue
            elif q.spin(min(clock() + POLL_SPIN, last + window)):
                continue
            await checkpoint()

    async def _reap_in_reader(self, q: QueuePair, stream: InterruptStream) -> None:
        """asyncio, interrupt mode: reap inside the loop's reader callback of the eventfd.

        The same readiness wait `InterruptStream.receive` uses (a persistent
        `add_reader`), without a reaper task to wake in between: completions
        reach their tasks one loop iteration after the interrupt. This task
        only owns the registration; the stream itself is never received from.
        """
        import asyncio

        loop = asyncio.get_running_loop()
        fd = stream.fd
        read = self.device.kernel.eventfd_read
        reap = q.reap

        def on_interrupt() -> None:
            try:
                read(fd)
            except BlockingIOError:
                return
            except OSError as exc:  # not seen on Linux: fail loudly rather than hang
                self.fail(f"reading the interrupt eventfd of queue {q.qid} failed: {exc}")
                return
            reap()

        loop.add_reader(fd, on_interrupt)
        q.drain = _drainer(read, fd)
        try:
            reap()  # anything that completed before the reader was registered
            await anyio.sleep_forever()
        finally:
            q.drain = None  # the fd is the stream's: not read once this reaper is gone
            loop.remove_reader(fd)

    async def _reap_trio(self, q: QueuePair, stream: InterruptStream) -> None:
        """trio, interrupt mode: wait for the eventfd to be readable, read it once, reap.

        `InterruptStream.receive` tries a read first (an EAGAIN most of the
        time); a reaper that reaps anyway needs only the wait and one read.
        """
        import trio

        wait = trio.lowlevel.wait_readable
        fd = stream.fd
        read = self.device.kernel.eventfd_read
        reap = q.reap
        q.drain = _drainer(read, fd)
        try:
            while True:
                reap()
                await wait(fd)
                try:
                    read(fd)
                except BlockingIOError:
                    continue
                except OSError as exc:  # not seen on Linux: fail loudly rather than hang
                    self.fail(f"reading the interrupt eventfd of queue {q.qid} failed: {exc}")
                    return
        finally:
            q.drain = None  # the fd is the stream's: not read once this reaper is gone

    async def _watchdog(self) -> None:
        """CSTS.CFS, a device gone, and commands late: an I/O command past the timeout is
        aborted (NVMe Abort) and fails with CommandTimeout; the controller is failed only
        when that does not end it (or a late command is an admin one)."""
        tick = min(0.25, self.command_timeout / 4)
        grace = min(self.command_timeout, 5.0)
        #: (qid, cid, submission number) -> when the watchdog first saw it in flight
        seen: dict[tuple[int, int, int], float] = {}
        #: the late commands an Abort was sent for -> when
        aborted: dict[tuple[int, int, int], float] = {}
        while self._failure is None:
            await anyio.sleep(tick)
            csts = self._reg32(Reg.CSTS)
            if csts == _ALL_ONES:
                self.fail(f"controller {self.device.name} reads all-ones: the device is gone")
                return
            if csts & Csts.CFS:
                self.fail(
                    f"controller {self.device.name} reported a fatal status (CSTS.CFS, "
                    f"CSTS={csts:#x})"
                )
                return
            now = time.monotonic()
            current = {
                (q.qid, cid, seq)
                for q in (self._admin, *self._queues)
                if q is not None
                for cid, seq in q.in_flight()
            }
            seen = {key: seen.get(key, now) for key in current}
            aborted = {key: when for key, when in aborted.items() if key in seen}
            late = [key for key, first in seen.items() if now - first > self.command_timeout]
            for key in late:
                qid = key[0]
                where = f"a command on queue {qid} of controller {self.device.name}"
                if qid == 0:  # an admin command: the admin queue itself is stuck
                    self.fail(f"{where} did not complete within {self.command_timeout:g} s")
                    return
                if key not in aborted:
                    aborted[key] = now
                    if not await self._abort(key, where, grace):
                        return
                elif now - aborted[key] > grace:
                    self.fail(
                        f"{where} did not complete within {self.command_timeout:g} s, "
                        f"nor {grace:g} s after an NVMe Abort"
                    )
                    return

    async def _abort(self, key: tuple[int, int, int], where: str, limit: float) -> bool:
        """Send an Abort for a late I/O command; False when the controller was failed."""
        qid, cid, seq = key
        q = self._queues[qid - 1]
        if not q.still_in_flight(cid, seq):
            return True  # it completed just now
        q.expired[cid] = CommandTimeout(
            f"{where} (CID {cid}) did not complete within {self.command_timeout:g} s: it was "
            f"aborted (NVMe Abort) and failed; the controller goes on"
        )
        logger.warning("nvme.command_timeout", device=self.device.name, qid=qid, cid=cid)
        with anyio.move_on_after(limit) as scope:
            try:
                await self.admin_command(
                    AdminOpcode.ABORT,
                    cdw10=qid | cid << 16,
                    what=f"Abort of command {cid} on SQ {qid}",
                )
            except NvmeStatusError as exc:  # e.g. Abort Command Limit Exceeded: wait on
                logger.warning("nvme.abort_refused", device=self.device.name, error=str(exc))
        if scope.cancelled_caught and self._failure is None:
            self.fail(
                f"{where} did not complete within {self.command_timeout:g} s, and the "
                f"Abort sent for it did not complete within {limit:g} s"
            )
        return self._failure is None

    def fail(self, why: str) -> None:
        """Declare the controller dead: fail every command, disable it (CC.EN=0)."""
        if self._failure is not None:
            return
        exc = ControllerFailed(f"{why}; every command in flight failed and it was disabled")
        self._failure = exc
        logger.error("nvme.failed", device=self.device.name, reason=why)
        for q in (self._admin, *self._queues):
            if q is not None:
                q.fail(exc)
        if self._enabled:
            with contextlib.suppress(errors.VfioError):
                self._set32(Reg.CC, 0)  # stops the controller's DMA; RDY=0 is awaited later

    # --- shutdown -------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """The normal exit: drain, delete the queues, CC.SHN, then CC.EN=0 (shielded)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._enabled and self._failure is None:
                await self._orderly_shutdown()
        except (errors.VfioError, OSError) as exc:
            logger.warning("nvme.shutdown_incomplete", device=self.device.name, error=str(exc))
            self.shutdown_clean = False
        finally:
            for scope in self._task_scopes:
                scope.cancel()
            closed = errors.ClosedResourceError(f"controller {self.device.name} was shut down")
            for q in (self._admin, *self._queues):
                if q is not None and q.failure is None:
                    q.fail(closed)
            await self._quiesce()

    async def _orderly_shutdown(self) -> None:
        # Commands still in flight (tasks that outlived their block) finish first.
        deadline = time.monotonic() + self.command_timeout
        while any(q.inflight for q in self._queues) and self._failure is None:
            if any(q.ring_failed for q in self._queues):
                self.fail("an SQ doorbell write failed: commands in flight may never be seen")
                return
            if time.monotonic() >= deadline:
                self.fail("commands still in flight at shutdown did not complete")
                return
            await anyio.sleep(0.001)
        for q in reversed(self._queues):
            if q.sq_created:
                await self.admin_command(
                    AdminOpcode.DELETE_SQ, cdw10=q.qid, what=f"Delete I/O SQ {q.qid}"
                )
        for q in reversed(self._queues):
            await self.admin_command(
                AdminOpcode.DELETE_CQ, cdw10=q.qid, what=f"Delete I/O CQ {q.qid}"
            )
        cc = self._reg32(Reg.CC)
        self._set32(Reg.CC, (cc & ~Cc.SHN_MASK) | Cc.SHN_NORMAL)
        await self._wait_csts(
            Csts.SHST_MASK, Csts.SHST_COMPLETE, "CSTS.SHST=complete", limit=self._ready_limit
        )
        self.shutdown_clean = True

    async def _quiesce(self) -> None:
        """CC.EN=0 and wait for RDY=0 (bounded): the device stops touching our memory.

        Runs before any queue memory is unmapped; idempotent, shielded.
        """
        if not self._enabled:
            return
        self._enabled = False
        with anyio.CancelScope(shield=True):
            try:
                self._set32(Reg.CC, 0)
                await self._wait_csts(Csts.RDY, 0, "CSTS.RDY=0", limit=self._ready_limit)
            except (errors.VfioError, OSError) as exc:
                # Still running, or gone: reset the function so it stops DMA for sure.
                logger.warning("nvme.disable_failed", device=self.device.name, error=str(exc))
                if self.device.info.can_reset:
                    with contextlib.suppress(errors.VfioError, OSError):
                        await self.device.reset()
            if self.shutdown_clean is None:
                self.shutdown_clean = False


def _views(stack: contextlib.AsyncExitStack, view: memoryview) -> Callable[..., memoryview]:
    """A cutter of slices of a DMA buffer's view, all released before the buffer is.

    (A live slice keeps the buffer's memory from being freed.)
    """
    made: list[memoryview] = []

    def release() -> None:
        for v in reversed(made):
            v.release()

    stack.callback(release)

    def cut(start: int, stop: int | None, words: bool = False) -> memoryview:
        part = view[start:stop]
        made.append(part)
        if words:  # 32-bit words: a CQE's phase tag is read in one load
            part = part.cast("I")
            made.append(part)
        return part

    return cut


def _drainer(read: Callable[[int], int], fd: int) -> Callable[[], None]:
    """`QueuePair.drain`: read the interrupt eventfd's count, if any, without blocking."""

    def drain() -> None:
        # not contextlib.suppress: two Python-level calls on every command that uses it
        try:  # noqa: SIM105
            read(fd)
        except OSError:  # EAGAIN: nothing pending (any other error: the reaper reports it)
            pass

    return drain


def _checkpoint_for(trio: bool) -> Callable[[], Awaitable[object]]:
    if trio:
        import trio as trio_

        return trio_.lowlevel.checkpoint
    import asyncio

    return lambda: asyncio.sleep(0)


def _unwrap(exc: BaseException) -> BaseException:
    """The one exception of a task group's group of one (the body's own)."""
    while True:
        inner = getattr(exc, "exceptions", None)
        if not isinstance(inner, tuple) or len(inner) != 1:
            return exc
        exc = inner[0]


def _check_args(io_queues: object, queue_depth: object, poll: object, timeout: object) -> None:
    """Types and ranges, before anything touches the device."""
    for name, value in (("io_queues", io_queues), ("queue_depth", queue_depth)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise errors.InvalidArgument(f"{name} must be a positive int, not {value!r}")
    if not (isinstance(poll, bool) or (isinstance(poll, (int, float)) and 0 < poll < math.inf)):
        raise errors.InvalidArgument(
            f"poll must be False (interrupts), True (poll) or a number of seconds to poll "
            f"before sleeping on the interrupt, not {poll!r}"
        )
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise errors.InvalidArgument(
            f"command_timeout must be a positive number of seconds, not {timeout!r}"
        )


@contextlib.asynccontextmanager
async def open_controller(
    device: Device,
    *,
    io_queues: int = 1,
    queue_depth: int | None = None,
    poll: bool | float = False,
    command_timeout: float = DEFAULT_TIMEOUT,
) -> AsyncIterator[Controller]:
    """Bring the NVMe controller of an open `device` up; shut it down on leaving.

    `io_queues` I/O queue pairs of `queue_depth` commands each (default: 64,
    or CAP.MQES if smaller), each with its own MSI-X vector and reaper task.
    `poll`: False sleeps on the interrupt (least CPU); True polls while
    commands are in flight (lowest latency, one busy core); a number of
    seconds polls that long after each completion before sleeping on the
    interrupt (hybrid). `command_timeout`: seconds a command may take before
    the controller is declared dead.
    """
    _check_args(io_queues, 1 if queue_depth is None else queue_depth, poll, command_timeout)
    depth = 0 if queue_depth is None else queue_depth
    ctrl = Controller(device, io_queues, depth, poll, float(command_timeout))
    try:
        async with contextlib.AsyncExitStack() as stack, anyio.create_task_group() as tg:
            try:
                await ctrl._start(stack, tg)
                yield ctrl
            finally:
                with anyio.CancelScope(shield=True):
                    await ctrl._shutdown()
    except BaseException as exc:
        inner = _unwrap(exc)
        if inner is exc:
            raise
        context = inner.__context__
        try:
            raise inner  # the body's own exception, as it was raised
        finally:
            inner.__context__ = context


# The admin lock is taken and released in these two: on trio a KeyboardInterrupt landing
# between the lock's acquisition and the `async with` body (or in its exit) would leave the
# lock held by the task, and the shutdown's own admin commands would then fail with
# "Attempted to acquire an already held Lock". Protected, the interrupt arrives at the
# command's wait, inside the body, and the lock is released on the way out.
_ki.protect(Controller.admin_command)
_ki.protect(Controller._identify_data)
