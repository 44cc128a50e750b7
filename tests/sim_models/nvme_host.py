"""A minimal NVMe host driver over `FakeContext`, for testing the nvme model.

It does what a user-space driver does (DEVICES.md 2.3-2.5): programs the
admin queues, enables, submits entries and rings doorbells, reaps
completions by phase tag, and allocates page-aligned, mapped buffers. The
clock is manual: `run()` lets the device process what was submitted.
"""

from __future__ import annotations

import struct

from attrs import define, field, frozen

from aiovfio.sim.models._nvme_spec import CQE, SQE, AdminOpcode, Reg

from .fakes import PAGE, FakeContext

CC_ENABLE_4K = 0x00460001  # EN, MPS 0, IOSQES 6, IOCQES 4
IOVA_BASE = 0x10_0000


@frozen
class Completion:
    dw0: int
    sqhd: int
    sqid: int
    cid: int
    phase: int
    status: int  # 15 bits: DNR << 14 | SCT << 8 | SC

    @property
    def sc(self) -> int:
        return self.status & 0xFF

    @property
    def sct(self) -> int:
        return self.status >> 8 & 0x7

    @property
    def dnr(self) -> bool:
        return bool(self.status & 0x4000)


@define(eq=False)
class HostQueue:
    qid: int
    size: int
    sq_iova: int
    sq: bytearray
    cq_iova: int
    cq: bytearray
    cq_size: int
    tail: int = 0
    head: int = 0
    phase: int = 1


@define(eq=False)
class NvmeHost:
    ctx: FakeContext
    admin_depth: int = 16
    queues: dict[int, HostQueue] = field(factory=dict)
    next_iova: int = IOVA_BASE
    next_cid: int = 1

    # --- memory ---------------------------------------------------------------
    def buffer(
        self, size: int, *, writable: bool = True, gap: bool = True
    ) -> tuple[int, bytearray]:
        """A mapped, page-aligned, zeroed buffer; an unmapped page follows it."""
        size = -(-size // PAGE) * PAGE
        iova = self.next_iova
        self.next_iova += size + (PAGE if gap else 0)
        return iova, self.ctx.map(iova, size, writable=writable)

    # --- registers ------------------------------------------------------------
    def reg(self, offset: int, size: int = 4) -> int:
        return self.ctx.read(offset, size)

    def set_reg(self, offset: int, value: int, size: int = 4) -> None:
        self.ctx.write(offset, value, size)

    def enable(self, cc: int = CC_ENABLE_4K) -> int:
        """Program the admin queues and set CC; returns CSTS."""
        depth = self.admin_depth
        sq_iova, sq = self.buffer(depth * SQE.size, writable=False)
        cq_iova, cq = self.buffer(depth * CQE.size)
        self.queues[0] = HostQueue(0, depth, sq_iova, sq, cq_iova, cq, depth)
        self.set_reg(Reg.AQA, (depth - 1) << 16 | (depth - 1))
        self.set_reg(Reg.ASQ, sq_iova, 8)
        self.set_reg(Reg.ACQ, cq_iova, 8)
        self.set_reg(Reg.CC, cc)
        return self.reg(Reg.CSTS)

    def disable(self) -> int:
        self.set_reg(Reg.CC, 0)
        self.queues.clear()
        return self.reg(Reg.CSTS)

    # --- submission and completion ---------------------------------------------
    def submit(
        self,
        qid: int,
        opcode: int,
        *,
        nsid: int = 0,
        prp1: int = 0,
        prp2: int = 0,
        cdw: tuple[int, ...] = (),
        flags: int = 0,
        cid: int | None = None,
        ring: bool = True,
    ) -> int:
        q = self.queues[qid]
        if cid is None:
            cid, self.next_cid = self.next_cid, (self.next_cid + 1) & 0xFFFF
        cdws = (*cdw, 0, 0, 0, 0, 0, 0)[:6]
        SQE.pack_into(q.sq, q.tail * SQE.size, opcode, flags, cid, nsid, 0, prp1, prp2, *cdws)
        q.tail = (q.tail + 1) % q.size
        if ring:
            self.ring(qid)
        return cid

    def ring(self, qid: int) -> None:
        self.set_reg(Reg.DOORBELLS + 8 * qid, self.queues[qid].tail)

    def reap(self, qid: int, *, doorbell: bool = True) -> list[Completion]:
        """Consume every new CQE (phase tag) of queue `qid`."""
        q = self.queues[qid]
        out = []
        while True:
            dw0, _, sqhd, sqid, cid, status = CQE.unpack_from(q.cq, q.head * CQE.size)
            if status & 1 != q.phase:
                break
            out.append(Completion(dw0, sqhd, sqid, cid, status & 1, status >> 1))
            q.head += 1
            if q.head == q.cq_size:
                q.head, q.phase = 0, q.phase ^ 1
        if out and doorbell:
            self.set_reg(Reg.DOORBELLS + 8 * qid + 4, q.head)
        return out

    def run(self) -> None:
        self.ctx.run_all()

    def command(self, qid: int, opcode: int, **kwargs: object) -> Completion:
        cid = self.submit(qid, opcode, **kwargs)  # type: ignore[arg-type]
        self.run()
        (done,) = self.reap(qid)
        assert done.cid == cid
        return done

    def admin(self, opcode: int, **kwargs: object) -> Completion:
        return self.command(0, opcode, **kwargs)

    # --- common admin commands ---------------------------------------------------
    def identify(self, cns: int, nsid: int = 0) -> tuple[Completion, bytes]:
        iova, buf = self.buffer(4096)
        done = self.admin(AdminOpcode.IDENTIFY, nsid=nsid, prp1=iova, cdw=(cns,))
        return done, bytes(buf)

    def create_cq(
        self, qid: int, size: int, *, vector: int = 0, ien: bool = True, pc: bool = True
    ) -> Completion:
        iova, buf = self.buffer(size * CQE.size)
        done = self.admin(
            AdminOpcode.CREATE_CQ,
            prp1=iova,
            cdw=((size - 1) << 16 | qid, vector << 16 | int(ien) << 1 | int(pc)),
        )
        if done.status == 0:
            self.queues[qid] = HostQueue(qid, 0, 0, bytearray(), iova, buf, size)
        return done

    def create_sq(self, qid: int, size: int, cqid: int, *, pc: bool = True) -> Completion:
        iova, buf = self.buffer(size * SQE.size, writable=False)
        done = self.admin(
            AdminOpcode.CREATE_SQ, prp1=iova, cdw=((size - 1) << 16 | qid, cqid << 16 | int(pc))
        )
        if done.status == 0:
            if cqid == qid:  # the usual pair: one HostQueue for both
                q = self.queues[qid]
                q.size, q.sq_iova, q.sq = size, iova, buf
            else:  # a second SQ on a CQ: reap through the CQ's own qid
                cq = self.queues[cqid]
                self.queues[qid] = HostQueue(qid, size, iova, buf, cq.cq_iova, cq.cq, cq.cq_size)
        return done

    def io_pair(self, qid: int = 1, size: int = 16, vector: int | None = None) -> None:
        assert self.create_cq(qid, size, vector=qid if vector is None else vector).status == 0
        assert self.create_sq(qid, size, qid).status == 0


def rw_cdw(slba: int, nlb: int) -> tuple[int, int, int]:
    """CDW10-12 of a Read or Write: SLBA and the 0-based block count."""
    return slba & 0xFFFF_FFFF, slba >> 32, nlb - 1


def prp_list(entries: list[int]) -> bytes:
    return struct.pack(f"<{len(entries)}Q", *entries)
