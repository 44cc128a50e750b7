"""Block I/O on one namespace: read, write, the zero-copy pair, flush.

`read` and `write` take and return plain bytes, bounced through the
controller's DMA pool. `read_into` and `write_from` move data straight
between the device and a `DmaBuffer` (or a slice of its `view`): the
buffer's IOVA must be dword aligned (NVMe's rule for PRP1) and its length a
whole number of blocks; anything else is refused, not bounced. Transfers
longer than the controller's MDTS are split into commands of at most MDTS,
all in flight at once (as many as the queue has free CIDs and, for
read/write, the bounce pool has room): the first error status is raised
once every piece in flight has completed, and a cancelled transfer waits
for its pieces in flight (the device owns their memory) before it raises.

Every range is checked against the namespace before anything is submitted
(`TransferOutOfRange`); `command()` sends a raw I/O command unchecked, to
see what the controller itself answers.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from attrs import define

from .. import errors
from ..dma import DmaBuffer
from .batch import Batch
from .errors import NvmeStatusError, TransferOutOfRange
from .spec import IdentifyNamespace, IoOpcode

if TYPE_CHECKING:
    from .controller import Controller

__all__ = ["DmaTarget", "Namespace"]

#: What `read_into` / `write_from` take: a DmaBuffer, or a slice of its `view`.
DmaTarget = DmaBuffer | memoryview

_U32 = 0xFFFF_FFFF
#: DmaBuffer.iova's getter, called as a function on the hot path (the buffer's type is
#: checked to be DmaBuffer first): in CPython 3.11 a property read re-enters the eval
#: loop from C, ~1k instructions more than this call
_iova: Callable[[DmaBuffer], int] = vars(DmaBuffer)["iova"].fget
_READ, _WRITE = int(IoOpcode.READ), int(IoOpcode.WRITE)
_NAMES: dict[int, str] = {IoOpcode.READ: "Read", IoOpcode.WRITE: "Write", IoOpcode.FLUSH: "Flush"}


@define(eq=False, repr=False)
class Namespace:
    """Namespace `nsid` of a controller: `block_size` bytes per LBA, `blocks` LBAs."""

    controller: Controller
    nsid: int
    info: IdentifyNamespace

    def __repr__(self) -> str:
        return (
            f"<nvme.Namespace {self.nsid} of {self.controller.device.name}: "
            f"{self.blocks} x {self.block_size} B>"
        )

    @property
    def block_size(self) -> int:
        return self.info.block_size

    @property
    def blocks(self) -> int:
        return self.info.nsze

    @property
    def size(self) -> int:
        """Bytes in the namespace."""
        return self.blocks * self.block_size

    # --- checks -----------------------------------------------------------------------

    def _check_range(self, lba: object, count: object) -> None:
        if not isinstance(lba, int) or isinstance(lba, bool) or lba < 0:
            raise errors.InvalidArgument(f"lba must be an int >= 0, not {lba!r}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise TransferOutOfRange(f"a transfer moves at least one block, not {count!r}")
        if lba + count > self.blocks:
            raise TransferOutOfRange(
                f"blocks {lba}..{lba + count - 1} reach past the end of namespace {self.nsid} "
                f"({self.blocks} blocks of {self.block_size} B: the last LBA is {self.blocks - 1})"
            )

    def _blocks_of(self, nbytes: int, what: str) -> int:
        count, rest = divmod(nbytes, self.block_size)
        if rest or not count:
            raise errors.InvalidArgument(
                f"{what} is {nbytes} bytes: give a whole number of {self.block_size}-byte blocks"
            )
        return count

    def _resolve(self, buffer: object, *, device_writes: bool) -> tuple[int, int]:
        """(IOVA, length) of a DmaBuffer or of a slice of one's view."""
        if isinstance(buffer, DmaBuffer):
            if device_writes and buffer.readonly:
                raise errors.InvalidArgument(
                    f"{buffer!r} is mapped read-only for the device; a read needs a writable one"
                )
            iova, nbytes = buffer.iova, buffer.size
        elif isinstance(buffer, memoryview):
            iova, nbytes = self._resolve_view(buffer, device_writes=device_writes)
        else:
            raise errors.InvalidArgument(
                f"cannot DMA to or from a {type(buffer).__name__}: pass a DmaBuffer "
                f"(`device.dma_buffer(n)`) or a slice of its `.view`, or use read()/write(), "
                f"which copy"
            )
        if iova & 3:
            raise errors.AlignmentError(
                f"the buffer's IOVA {iova:#x} is not dword aligned (NVMe PRP1 rule): slice the "
                f"DmaBuffer at a multiple of 4, or use read()/write(), which copy"
            )
        return iova, nbytes

    def _resolve_view(self, view: memoryview, *, device_writes: bool) -> tuple[int, int]:
        if not view.c_contiguous or view.readonly:
            raise errors.InvalidArgument(
                "a memoryview for DMA must be a writable, contiguous slice of a DmaBuffer's view"
            )
        nbytes = view.nbytes
        if not nbytes:
            raise errors.InvalidArgument("the buffer is empty")
        anchor = (ctypes.c_char * nbytes).from_buffer(view)
        address = ctypes.addressof(anchor)
        del anchor
        found = self.controller.device.dma_space.translate(address, nbytes)
        if found is not None:
            iova, readonly = found
            if device_writes and readonly:
                raise errors.InvalidArgument(
                    "the buffer is mapped read-only for the device; a read needs a writable one"
                )
            return iova, nbytes
        raise errors.InvalidArgument(
            "the memoryview is not DMA-able: it is not inside any DMA mapping of the "
            f"controller's container; allocate it with `device.dma_buffer({nbytes})`"
        )

    # --- I/O --------------------------------------------------------------------------

    async def read(self, lba: int, count: int) -> bytes:
        """`count` blocks from `lba`, copied out of the DMA pool."""
        self._check_range(lba, count)
        ctrl = self.controller
        ctrl._check_usable()
        pool = ctrl._pool
        assert pool is not None
        bs = self.block_size
        step = ctrl.max_transfer // bs
        if count <= step:
            nbytes = count * bs
            offset = pool.try_alloc(nbytes)
            if offset is None:
                offset = await pool.alloc(nbytes)
            try:
                await self._io(IoOpcode.READ, lba, count, pool.iova + offset, nbytes)
                return bytes(pool.view[offset : offset + nbytes])
            finally:
                pool.free(offset, nbytes)
        out = bytearray(count * bs)
        await self._split(IoOpcode.READ, lba, count, None, memoryview(out))
        return bytes(out)

    async def write(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` (a whole number of blocks) at `lba`, copied into the DMA pool."""
        src = memoryview(data).cast("B")
        count = self._blocks_of(src.nbytes, "the data")
        self._check_range(lba, count)
        ctrl = self.controller
        ctrl._check_usable()
        pool = ctrl._pool
        assert pool is not None
        bs = self.block_size
        nbytes = count * bs
        if nbytes > ctrl.max_transfer:
            await self._split(IoOpcode.WRITE, lba, count, None, src)
            return
        offset = pool.try_alloc(nbytes)
        if offset is None:
            offset = await pool.alloc(nbytes)
        try:
            pool.view[offset : offset + nbytes] = src
            await self._io(IoOpcode.WRITE, lba, count, pool.iova + offset, nbytes)
        finally:
            pool.free(offset, nbytes)

    def _quick_count(self, lba: int, iova: int, nbytes: int) -> int:
        """The hot path's checks: the block count of a plain transfer, or 0.

        0 (a bad range, an unaligned IOVA, a long transfer, a closed or failed
        controller) sends the caller to `_direct`, which checks and explains. A plain
        call, not a coroutine: read_into and write_from stay one coroutine deep.
        """
        ctrl = self.controller
        info = self.info
        count, rest = divmod(nbytes, info.block_size)
        if (
            rest
            or iova & 3
            or nbytes > ctrl.max_transfer
            or type(lba) is not int
            or lba < 0
            or not 0 < count <= info.nsze - lba
            or ctrl._failure is not None
            or ctrl._closed
        ):
            return 0
        return count

    async def read_into(self, lba: int, buffer: DmaTarget) -> None:
        """Fill `buffer` (a DmaBuffer or a slice of its view) from `lba`, no copy."""
        if type(buffer) is not DmaBuffer or buffer.readonly:
            iova, nbytes = self._resolve(buffer, device_writes=True)
            await self._direct(_READ, lba, iova, nbytes)
            return
        # The hot path, one coroutine deep: `_quick_count` checks; anything unusual takes
        # `_direct`, which checks and explains.
        iova, nbytes = _iova(buffer), buffer.size
        count = self._quick_count(lba, iova, nbytes)
        if not count:
            await self._direct(_READ, lba, iova, nbytes)
            return
        ctrl = self.controller
        q = ctrl._only_queue or ctrl.pick_queue()
        free = q._free
        cid = free.pop() if free else await q.take()
        page = q.page
        if nbytes <= page - (iova & (page - 1)):  # one page: PRP1 alone
            prp1, prp2 = iova, 0
        else:
            prp1, prp2 = q.prp(cid, iova, nbytes)
        # q.run inline (one coroutine less per command)
        if q.failure is None and not (
            q.trio
            and (q._trio_run.ki_pending or q._current_task()._cancel_status.effectively_cancelled)
        ):
            value = q.start(cid, _READ, self.nsid, prp1, prp2, lba, count - 1)
            if value < 0:
                value = await q.wait(cid)
            else:
                q.turn_in -= 1
                if q.turn_in <= 0:
                    await q.turn()
        else:  # a failed queue, a cancelled trio task: run raises
            value = await q.run(cid, _READ, self.nsid, prp1, prp2, lba & _U32, lba >> 32, count - 1)
        if value >> 32:
            raise self._status_error(_READ, count, lba, value)

    async def write_from(self, lba: int, buffer: DmaTarget) -> None:
        """Write `buffer` (a DmaBuffer or a slice of its view) at `lba`, no copy."""
        if type(buffer) is not DmaBuffer:
            iova, nbytes = self._resolve(buffer, device_writes=False)
            await self._direct(_WRITE, lba, iova, nbytes)
            return
        iova, nbytes = _iova(buffer), buffer.size  # the hot path, as in read_into
        count = self._quick_count(lba, iova, nbytes)
        if not count:
            await self._direct(_WRITE, lba, iova, nbytes)
            return
        ctrl = self.controller
        q = ctrl._only_queue or ctrl.pick_queue()
        free = q._free
        cid = free.pop() if free else await q.take()
        page = q.page
        if nbytes <= page - (iova & (page - 1)):  # one page: PRP1 alone
            prp1, prp2 = iova, 0
        else:
            prp1, prp2 = q.prp(cid, iova, nbytes)
        # q.run inline (one coroutine less per command)
        if q.failure is None and not (
            q.trio
            and (q._trio_run.ki_pending or q._current_task()._cancel_status.effectively_cancelled)
        ):
            value = q.start(cid, _WRITE, self.nsid, prp1, prp2, lba, count - 1)
            if value < 0:
                value = await q.wait(cid)
            else:
                q.turn_in -= 1
                if q.turn_in <= 0:
                    await q.turn()
        else:  # a failed queue, a cancelled trio task: run raises
            value = await q.run(
                cid, _WRITE, self.nsid, prp1, prp2, lba & _U32, lba >> 32, count - 1
            )
        if value >> 32:
            raise self._status_error(_WRITE, count, lba, value)

    def _status_error(self, opcode: int, count: int, lba: int, value: int) -> NvmeStatusError:
        return NvmeStatusError(
            value >> 32,
            f"{_NAMES.get(opcode, hex(opcode))} of {count} block(s) at LBA {lba} "
            f"on namespace {self.nsid}",
        )

    async def _direct(self, opcode: int, lba: int, iova: int, nbytes: int) -> None:
        count = self._blocks_of(nbytes, "the buffer")
        self._check_range(lba, count)
        ctrl = self.controller
        ctrl._check_usable()
        max_transfer = ctrl.max_transfer
        if nbytes <= max_transfer:
            await self._io(opcode, lba, count, iova, nbytes)
            return
        await self._split(opcode, lba, count, iova, None)

    async def _split(
        self, opcode: int, lba: int, count: int, iova: int | None, data: memoryview | None
    ) -> None:
        """A transfer past MDTS as MDTS pieces, in flight together on one queue.

        Zero copy (`iova` given) or bounced through the pool (`data`: the bytes
        to write, or the buffer a read fills). The pieces go through a batch, so
        leaving (an error status, a cancellation) first waits for those in flight.
        """
        ctrl = self.controller
        bs = self.block_size
        step = ctrl.max_transfer // bs
        #: (first LBA, byte offset in the transfer, bytes) of each piece
        pieces = [(lba + d, d * bs, min(step, count - d) * bs) for d in range(0, count, step)]
        pool = ctrl._pool
        assert pool is not None
        held: dict[int, int] = {}  # piece -> its bounce pool offset
        error: NvmeStatusError | None = None
        read = opcode == IoOpcode.READ
        try:
            async with Batch(self, min(len(pieces), ctrl.queue_depth), greedy=True) as batch:
                nxt = 0
                while nxt < len(pieces) or batch.inflight:
                    while nxt < len(pieces) and batch._free:
                        first, start, nbytes = pieces[nxt]
                        if iova is not None:
                            batch._put(opcode, first, iova + start, nbytes, nxt)
                        else:
                            assert data is not None
                            offset = pool.try_alloc(nbytes)
                            if offset is None:
                                if batch.inflight:
                                    break  # room comes back as pieces complete
                                offset = await pool.alloc(nbytes)
                            held[nxt] = offset
                            if not read:
                                pool.view[offset : offset + nbytes] = data[start : start + nbytes]
                            batch._put(opcode, first, pool.iova + offset, nbytes, nxt)
                        nxt += 1
                    try:
                        done = await batch.completions()
                    except NvmeStatusError as exc:  # the first error; the rest drain
                        first, _, nbytes = pieces[cast(int, exc.tag)]
                        error = error or NvmeStatusError(
                            exc.status,
                            f"{_NAMES.get(opcode, hex(opcode))} of {nbytes // bs} block(s) "
                            f"at LBA {first} on namespace {self.nsid}",
                        )
                        nxt = len(pieces)
                        continue
                    for piece in done:
                        offset = held.pop(piece, -1)
                        if offset >= 0:
                            _, start, nbytes = pieces[piece]
                            if read:
                                assert data is not None
                                data[start : start + nbytes] = pool.view[offset : offset + nbytes]
                            pool.free(offset, nbytes)
        finally:  # the batch has waited: the device is done with every piece
            for piece, offset in held.items():
                pool.free(offset, pieces[piece][2])
        if error is not None:
            raise error

    def batch(self, depth: int | None = None) -> Batch:
        """`async with ns.batch(depth) as batch:` many commands in flight from one task.

        `depth` commands at most (default: the queue's depth) on one I/O queue;
        see `aiovfio.nvme.batch`.
        """
        return Batch(self, depth)

    async def flush(self) -> None:
        """Make written data durable (NVM Flush)."""
        ctrl = self.controller
        ctrl._check_usable()
        q = ctrl.pick_queue()
        cid = q.try_take()
        if cid is None:
            cid = await q.take()
        value: int = await q.run(cid, IoOpcode.FLUSH, self.nsid, 0, 0, 0, 0, 0)
        if value >> 32:
            raise NvmeStatusError(value >> 32, f"Flush of namespace {self.nsid}")

    async def command(
        self,
        opcode: int,
        *,
        buffer: DmaTarget | None = None,
        cdw10: int = 0,
        cdw11: int = 0,
        cdw12: int = 0,
        cdw13: int = 0,
    ) -> int:
        """Send a raw I/O command to this namespace, unchecked; return its DW0.

        The transfer (if any) is `buffer`; for Read and Write, the device
        decides what is valid. An error status raises NvmeStatusError.
        """
        ctrl = self.controller
        ctrl._check_usable()
        iova = nbytes = 0
        if buffer is not None:
            iova, nbytes = self._resolve(buffer, device_writes=True)
            if nbytes > ctrl.max_transfer:
                raise errors.InvalidArgument(
                    f"a raw command moves at most MDTS = {ctrl.max_transfer} bytes, not {nbytes}"
                )
        q = ctrl.pick_queue()
        cid = q.try_take()
        if cid is None:
            cid = await q.take()
        prp1, prp2 = q.prp(cid, iova, nbytes) if nbytes else (0, 0)
        value: int = await q.run(cid, opcode, self.nsid, prp1, prp2, cdw10, cdw11, cdw12, cdw13)
        if value >> 32:
            raise NvmeStatusError(
                value >> 32, f"I/O command {opcode:#04x} on namespace {self.nsid}"
            )
        return value & _U32

    async def _io(self, opcode: int, lba: int, count: int, iova: int, nbytes: int) -> None:
        """One Read or Write of at most MDTS: the hot path."""
        q = self.controller.pick_queue()
        cid = q.try_take()
        if cid is None:
            cid = await q.take()
        prp1, prp2 = q.prp(cid, iova, nbytes)
        value: int = await q.run(
            cid, opcode, self.nsid, prp1, prp2, lba & _U32, lba >> 32, count - 1
        )
        if value >> 32:
            raise NvmeStatusError(
                value >> 32,
                f"{_NAMES.get(opcode, hex(opcode))} of {count} block(s) at LBA {lba} "
                f"on namespace {self.nsid}",
            )
