"""The nvme model's batched ring accesses: one `dma_view` per run of SQ or CQ entries.

A run the device reaches whole is read (or written) through the view; any
other run goes entry by entry through dma_read/dma_write, so a fault lands on
the entry where QEMU, which reads and posts one entry at a time, has it. What
the host sees is the same either way.
"""

from __future__ import annotations

import pytest

from aiovfio.sim.models import Nvme
from aiovfio.sim.models._nvme_spec import CQE, SQE, Csts, IoOpcode, Reg

from .fakes import PAGE, FakeContext, Mapping
from .nvme_host import NvmeHost, rw_cdw

NSID = 1


def make(*, direct: bool = True, backing: bytearray | None = None) -> tuple[FakeContext, NvmeHost]:
    model = Nvme(size=1 << 20) if backing is None else Nvme(backing=backing)
    ctx = FakeContext(model, direct=direct)
    ctx.enable_msix()
    host = NvmeHost(ctx)
    assert host.enable() == Csts.RDY
    return ctx, host


def split(ctx: FakeContext, iova: int, buffer: bytearray, *, second_writable: bool = True) -> None:
    """Map `buffer` at `iova` as two mappings (its first page, then the rest)."""
    ctx.unmap(iova)
    whole = memoryview(buffer)
    ctx.mappings.append(Mapping(iova, whole[:PAGE]))  # type: ignore[arg-type]
    ctx.mappings.append(Mapping(iova + PAGE, whole[PAGE:], writable=second_writable))  # type: ignore[arg-type]


def test_a_batch_is_one_view_of_the_sq_and_one_of_the_cq() -> None:
    ctx, host = make()
    host.io_pair(1, 16)
    views = ctx.views
    cids = [host.submit(1, IoOpcode.FLUSH, nsid=NSID, ring=False) for _ in range(10)]
    host.ring(1)
    host.run()
    assert ctx.views - views == 2
    assert [d.cid for d in host.reap(1)] == cids


def test_a_run_stops_at_the_ring_end_and_goes_on_from_its_start() -> None:
    ctx, host = make()
    host.io_pair(1, 8)
    for _ in range(5):  # move head and tail to entry 5
        host.command(1, IoOpcode.FLUSH, nsid=NSID)
    views = ctx.views
    cids = [host.submit(1, IoOpcode.FLUSH, nsid=NSID, ring=False) for _ in range(6)]
    host.ring(1)
    host.run()
    assert ctx.views - views == 0  # the rings' views, kept from the first commands
    dones = host.reap(1)
    assert [d.cid for d in dones] == cids
    assert [d.phase for d in dones] == [1, 1, 1, 0, 0, 0]
    assert [d.sqhd for d in dones] == [3] * 6


def test_the_rings_views_are_kept_while_the_dma_epoch_holds() -> None:
    ctx, host = make()
    host.io_pair(1, 16)
    host.command(1, IoOpcode.FLUSH, nsid=NSID)
    views = ctx.views
    host.command(1, IoOpcode.FLUSH, nsid=NSID)
    assert ctx.views == views  # both rings through the views kept
    ctx.map(0x4000_0000, PAGE)  # any mapping change: the next callback asks again
    host.command(1, IoOpcode.FLUSH, nsid=NSID)
    assert ctx.views - views == 2
    ctx.direct = False  # no view at all (Bus Master off, noiommu): none is used
    done = host.command(1, IoOpcode.FLUSH, nsid=NSID)
    assert done.status == 0
    assert ctx.views - views == 4  # asked (and refused) for each ring


def test_a_ring_moved_under_the_same_iova_is_read_from_its_new_memory() -> None:
    """A kept view never outlives its mapping: after an unmap and a new map at the same
    IOVA, the device reads the new memory (a stale view would read the old)."""
    ctx, host = make()
    host.io_pair(1, 16)
    host.command(1, IoOpcode.FLUSH, nsid=NSID)
    q = host.queues[1]
    old = q.sq
    ctx.unmap(q.sq_iova)
    q.sq = ctx.map(q.sq_iova, len(old))
    q.sq[:] = old  # the ring as it was, in new memory: only the new one is written to
    cid = host.submit(1, IoOpcode.FLUSH, nsid=NSID)
    host.run()
    assert [d.cid for d in host.reap(1)] == [cid]
    assert ctx.iommu_faults == []


def test_an_sq_across_two_mappings_is_read_entry_by_entry() -> None:
    ctx, host = make()
    assert host.create_cq(1, 128, vector=1).status == 0
    assert host.create_sq(1, 128, 1).status == 0
    q = host.queues[1]
    split(ctx, q.sq_iova, q.sq)
    cids = [host.submit(1, IoOpcode.FLUSH, nsid=NSID, ring=False) for _ in range(70)]
    host.ring(1)
    host.run()
    assert [d.cid for d in host.reap(1)] == cids
    assert ctx.iommu_faults == []


def test_a_fetch_fault_mid_run_is_recorded_at_its_entry() -> None:
    """QEMU reads one entry at a time: the 64 entries before the unmapped page run."""
    ctx, host = make()
    assert host.create_cq(1, 128, vector=1).status == 0
    assert host.create_sq(1, 128, 1).status == 0
    q = host.queues[1]
    split(ctx, q.sq_iova, q.sq)
    ctx.unmap(q.sq_iova + PAGE)
    cids = [host.submit(1, IoOpcode.FLUSH, nsid=NSID, ring=False) for _ in range(70)]
    host.ring(1)
    host.run()
    assert [d.cid for d in host.reap(1, doorbell=False)] == cids[:64]
    assert host.reg(Reg.CSTS) == Csts.CFS
    # (the posted completions free request slots, so the SQ is fetched once more: the
    # same entry faults again, as it did before batching)
    faults = {(f.iova, f.size, f.write) for f in ctx.iommu_faults}
    assert faults == {(q.sq_iova + 64 * SQE.size, SQE.size, False)}
    assert "fetching SQ 1 entry 64" in ctx.faults[-1]


def test_a_post_fault_mid_run_is_recorded_at_its_entry() -> None:
    """256 CQEs fill the CQ's first page; the 257th meets the read-only second page."""
    ctx, host = make()
    assert host.create_cq(1, 512, vector=1).status == 0
    assert host.create_sq(1, 300, 1).status == 0
    q = host.queues[1]
    split(ctx, q.cq_iova, q.cq, second_writable=False)
    cids = [host.submit(1, IoOpcode.FLUSH, nsid=NSID, ring=False) for _ in range(260)]
    host.ring(1)
    host.run()
    assert [d.cid for d in host.reap(1, doorbell=False)] == cids[:256]
    assert host.reg(Reg.CSTS) == Csts.CFS
    faults = {(f.iova, f.size, f.write) for f in ctx.iommu_faults}
    assert faults == {(q.cq_iova + PAGE, CQE.size, True)}
    assert "posting to CQ 1 entry 256" in ctx.faults[-1]
    assert ctx.msix[-1] == 1  # what was posted is signalled


def _overwriting_batch(direct: bool) -> tuple[list[tuple[int, int]], bytes]:
    """Entry 0 reads 512 bytes over entries 1-8 of its own (device-writable) SQ; the
    namespace holds eight Flush entries there. Each entry is read when it runs, so
    entries 1-8 are the ones the read wrote, with or without a view."""
    backing = bytearray(1 << 20)
    for k in range(8):
        SQE.pack_into(
            backing, k * SQE.size, IoOpcode.FLUSH, 0, 0xBEE0 + k, NSID, 0, 0, 0, 0, 0, 0, 0, 0, 0
        )
    ctx, host = make(direct=direct, backing=backing)
    host.io_pair(1, 16)
    q = host.queues[1]
    ctx.unmap(q.sq_iova)
    q.sq = ctx.map(q.sq_iova, PAGE)  # writable: the device may write over its own ring
    host.submit(
        1, IoOpcode.READ, nsid=NSID, prp1=q.sq_iova + SQE.size, cdw=rw_cdw(0, 1), cid=1, ring=False
    )
    for cid in range(100, 108):
        host.submit(1, IoOpcode.FLUSH, nsid=NSID, cid=cid, ring=False)
    host.ring(1)
    host.run()
    return [(d.cid, d.status) for d in host.reap(1)], bytes(q.sq)


@pytest.mark.parametrize("direct", [True, False], ids=["view", "entry-by-entry"])
def test_each_entry_is_read_when_it_runs(direct: bool) -> None:
    dones, _ = _overwriting_batch(direct)
    assert dones == [(1, 0)] + [(0xBEE0 + k, 0) for k in range(8)]


def test_the_view_and_the_entry_by_entry_paths_agree() -> None:
    assert _overwriting_batch(True) == _overwriting_batch(False)


def test_a_batch_moves_data_through_one_view_per_mapping() -> None:
    backing = bytearray(range(256)) * 4096  # 1 MiB, every block different
    ctx, host = make(backing=backing)
    host.io_pair(1, 16)
    iova, buf = host.buffer(8 * PAGE)
    out_iova, out = host.buffer(PAGE)
    out[:] = b"w" * PAGE
    views = ctx.views
    for k in range(8):  # block 8k+1 (512 bytes) into page k, at an offset
        host.submit(
            1,
            IoOpcode.READ,
            nsid=NSID,
            prp1=iova + k * PAGE + 512,
            cdw=rw_cdw(8 * k + 1, 1),
            ring=False,
        )
    host.submit(1, IoOpcode.WRITE, nsid=NSID, prp1=out_iova, cdw=rw_cdw(2040, 8), ring=False)
    host.submit(1, IoOpcode.WRITE, nsid=NSID, prp1=out_iova + 512, cdw=rw_cdw(2000, 1), ring=False)
    host.ring(1)
    host.run()
    assert [d.status for d in host.reap(1)] == [0] * 10
    assert ctx.views - views == 4  # the SQ, the reads' buffer, the writes' buffer, the CQ
    for k in range(8):
        block = (8 * k + 1) * 512
        assert buf[k * PAGE + 512 : k * PAGE + 1024] == backing[block : block + 512]
    assert backing[2040 * 512 : 2048 * 512] == b"w" * PAGE
    assert backing[2000 * 512 : 2001 * 512] == b"w" * 512


def test_a_fault_inside_a_batch_stays_with_its_command() -> None:
    """A read into a read-only mapping between two good ones: only it fails (status 4)."""
    ctx, host = make()
    host.io_pair(1, 16)
    good, _ = host.buffer(2 * PAGE)
    ro, _ = host.buffer(PAGE, writable=False)
    for prp1 in (good, ro, good + PAGE, 0x7000_0000):
        host.submit(1, IoOpcode.READ, nsid=NSID, prp1=prp1, cdw=rw_cdw(0, 8), ring=False)
    host.ring(1)
    host.run()
    assert [(d.status, d.dnr) for d in host.reap(1)] == [
        (0, False),
        (4, False),
        (0, False),
        (4, False),
    ]
    assert [(f.iova, f.write) for f in ctx.iommu_faults] == [(ro, True), (0x7000_0000, True)]
    assert host.reg(Reg.CSTS) == Csts.RDY
