"""The nvme model's inline Read/Write path (`Nvme._run_io`) against its general one.

`_run_io` finishes the commonest I/O commands itself and sends every other entry
through `_io`; a subclass that changes an I/O hook gets the general path for every
entry. Both must give the host exactly the same: completions (CID, status, SQ head,
phase), data, namespace contents, faults, interrupts and SMART counters, batch by
batch, over random commands that hit every check (NSID, fused and SGL flags, MDTS, LBA
range, PRP offsets and lists, read-only and unmapped memory, the ring's end) and with
the memory the batch's views came from released in the middle of a batch.
"""

from __future__ import annotations

import random

import pytest
from attrs import asdict, define

from aiovfio.sim.models import Nvme
from aiovfio.sim.models._nvme_spec import Csts, IoOpcode, Reg

from .fakes import PAGE, FakeContext
from .nvme_host import NvmeHost, prp_list, rw_cdw

SIZE = 1 << 20  # 2048 blocks of 512 bytes


@define(eq=False, kw_only=True)
class General(Nvme):
    """The same model with an I/O hook of its own: every entry takes the general path."""

    def _io(self, command: object) -> object:
        return super()._io(command)  # type: ignore[arg-type]


class Releasing(FakeContext):
    """A context whose views are released after `budget` namespace accesses, as an owner
    closing its buffer in the middle of a batch would. As the machine's: a mapping's
    view is lent once; once released, it is still handed out until a dma_read or
    dma_write of that mapping notices (the model copies entry by entry), then none is."""

    budget: int = -1
    lent: dict[int, memoryview]
    dropped: set[int]

    def dma_view(self, iova: int, size: int, write: bool = False) -> tuple[memoryview, int] | None:
        got = super().dma_view(iova, size, write)
        if got is None:
            return None
        base = iova - got[1]
        if base in self.dropped:
            return None
        view = self.lent.get(base)
        if view is None:
            view = self.lent[base] = memoryview(got[0])
        return view, got[1]

    def _notice(self, iova: int) -> None:
        for m in self.mappings:
            if m.iova <= iova < m.iova + m.size:
                view = self.lent.get(m.iova)
                if view is not None and _released(view) and m.iova not in self.dropped:
                    self.dropped.add(m.iova)
                    self.epoch += 1  # as the machine's drop_view

    def dma_read(self, iova: int, size: int) -> bytes:
        self._notice(iova)
        return super().dma_read(iova, size)

    def dma_write(self, iova: int, data: bytes) -> None:
        self._notice(iova)
        super().dma_write(iova, data)

    def tick(self) -> None:
        self.budget -= 1
        if self.budget == 0:
            for view in self.lent.values():
                view.release()


def _released(view: memoryview) -> bool:
    try:
        view.nbytes  # noqa: B018
    except ValueError:
        return True
    return False


class CountingStore:
    """The model's namespace, calling `ctx.tick()` on each access."""

    def __init__(self, inner: object, ctx: Releasing) -> None:
        self.inner, self.ctx = inner, ctx
        self.size = inner.size  # type: ignore[attr-defined]

    def read(self, offset: int, length: int) -> bytes:
        self.ctx.tick()
        return self.inner.read(offset, length)  # type: ignore[attr-defined, no-any-return]

    def write(self, offset: int, data: bytes) -> None:
        self.ctx.tick()
        self.inner.write(offset, data)  # type: ignore[attr-defined]

    def flush(self) -> None:
        self.inner.flush()  # type: ignore[attr-defined]


def _rig(cls: type[Nvme], seed: int) -> tuple[Releasing, NvmeHost, dict[str, int], bytearray]:
    backing = bytearray(random.Random(seed).randbytes(SIZE))
    model = cls(backing=backing)
    ctx = Releasing(model)
    ctx.lent, ctx.dropped = {}, set()
    ctx.enable_msix()
    host = NvmeHost(ctx)
    assert host.enable() == Csts.RDY
    host.io_pair(1, 64)
    model._store = CountingStore(model._store, ctx)  # type: ignore[assignment]
    places = {}
    places["data"], _ = host.buffer(8 * PAGE)
    places["ro"], _ = host.buffer(PAGE, writable=False)
    places["list"], lst = host.buffer(PAGE)
    lst[:24] = prp_list([places["data"] + 2 * PAGE, places["data"] + 3 * PAGE, 0])
    places["unmapped"] = host.next_iova + 16 * PAGE
    return ctx, host, places, backing


def _command(rand: random.Random, places: dict[str, int]) -> dict[str, object]:
    opcode = rand.choice([IoOpcode.READ] * 5 + [IoOpcode.WRITE] * 4 + [0x00, 0x08, 0x7F])
    nlb = rand.choice([1, 1, 2, 8, 8, 9, 16, 24, 0x10000])
    slba = rand.choice([0, rand.randrange(2048), max(0, 2048 - nlb), 2047, 2048])
    where = rand.choice(["data"] * 8 + ["ro", "unmapped", "list"])
    prp1 = places[where] + rand.choice([0, 0, 512, 4096 - 512, rand.randrange(0, 8 * PAGE, 4)])
    if where != "data":
        prp1 = places[where]
    prp2 = rand.choice([0, places["list"], places["data"] + PAGE, places["list"] + 4])
    return {
        "opcode": opcode,
        "nsid": rand.choice([1] * 12 + [0, 2, 0xFFFF_FFFF]),
        "flags": rand.choice([0] * 12 + [1, 0x40, 0x3C]),
        "prp1": prp1,
        "prp2": prp2,
        "cdw": rw_cdw(slba, nlb),  # 0x10000 blocks: past MDTS
    }


def _play(cls: type[Nvme], seed: int, release_after: int) -> list[object]:
    ctx, host, places, backing = _rig(cls, seed)
    rand = random.Random(seed)
    seen: list[object] = []
    for batch in range(12):
        if batch == 6:
            ctx.budget = release_after  # released inside the next batch
        cids = [
            host.submit(1, ring=False, **_command(rand, places))  # type: ignore[arg-type]
            for _ in range(rand.randrange(1, 40))
        ]
        host.ring(1)
        host.run()
        dones = host.reap(1)
        assert [d.cid for d in dones] == cids  # each command completes once, in order
        assert {d.sqhd for d in dones} == {host.queues[1].tail}  # the head after the batch
        seen.append([(d.cid, d.status, d.sqhd, d.sqid, d.phase, d.dw0) for d in dones])
        seen.append([bytes(m.buffer) for m in ctx.mappings])
    seen += [
        bytes(backing),
        [(f.iova, f.size, f.write) for f in ctx.iommu_faults],
        list(ctx.faults),
        list(ctx.msix),
        asdict(host.ctx.model._usage),  # type: ignore[attr-defined]
        host.reg(Reg.CSTS),
    ]
    assert ctx.model._sqs[1].outstanding == 0  # type: ignore[attr-defined]
    if release_after > 0:
        assert ctx.dropped  # the release was noticed
    return seen


def test_the_inline_path_is_taken_only_with_nvme_s_own_hooks() -> None:
    assert Nvme()._fast_io
    assert not General()._fast_io


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("release_after", [-1, 1, 5])
def test_the_inline_and_the_general_paths_agree(seed: int, release_after: int) -> None:
    inline = _play(Nvme, seed, release_after)
    general = _play(General, seed, release_after)
    assert inline == general
    assert any(status for batch in inline[:24:2] for _, status, *_ in batch)  # some fail
    assert any(not status for batch in inline[:24:2] for _, status, *_ in batch)


@pytest.mark.parametrize("direct", [True, False], ids=["view", "entry-by-entry"])
def test_two_sqs_on_one_cq_keep_their_request_slots(direct: bool) -> None:
    """Completions of two SQs wait in one small CQ and are posted in mixed runs: each SQ
    gets its request slots back (an 8-entry SQ holds 8 outstanding commands), so neither
    stalls, round after round, and each CQE reports its own SQ's ID and a head."""
    model = Nvme(size=SIZE)
    ctx = FakeContext(model, direct=direct)
    ctx.enable_msix()
    host = NvmeHost(ctx)
    assert host.enable() == Csts.RDY
    assert host.create_cq(1, 5, vector=1).status == 0  # holds 4
    assert host.create_sq(1, 8, 1).status == 0
    assert host.create_sq(2, 8, 1).status == 0
    data, _ = host.buffer(PAGE)
    mixed = 0
    for _ in range(12):
        cids: dict[int, list[int]] = {1: [], 2: []}
        for qid in (1, 2):
            for _ in range(7):
                cid = host.submit(
                    qid, IoOpcode.READ, nsid=1, prp1=data, cdw=rw_cdw(0, 1), ring=False
                )
                cids[qid].append(cid)
            host.ring(qid)
        dones = []
        for _ in range(20):
            host.run()
            got = host.reap(1)
            mixed += len({d.sqid for d in got}) > 1
            dones += got
        for qid in (1, 2):
            mine = [d for d in dones if d.sqid == qid]
            assert [d.cid for d in mine] == cids[qid]
            assert {d.status for d in mine} == {0}
    assert mixed  # some runs held both SQs' completions
