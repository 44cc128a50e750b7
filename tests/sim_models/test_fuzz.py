"""Models as hostile as hardware: property-based fuzz of the nvme and edu models.

Random admin and I/O commands (any opcode, any fields), doorbells with any
value, queue sizes, PRP1/PRP2 at page ends, chained PRP lists and unmapped
IOVAs for nvme; random register traffic at every width for edu. Properties:

* no Python exception escapes a model (hypothesis fails the example);
* nothing hangs: the device's scheduled work runs out (manual clock) or the
  machine goes idle within a timeout (thread clock);
* every anomaly shows: a command the controller accepted and never
  completed means CSTS.CFS is set or a fault was recorded.

Example counts are fixed (`_NVME_EXAMPLES` ...), so the suite's wall time
stays modest; raise them with HYPOTHESIS_PROFILE=fuzz-long.
"""

from __future__ import annotations

import os
import struct
import traceback

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from aiovfio.sim import Machine
from aiovfio.sim.models import Edu, Nvme
from aiovfio.sim.models._nvme_spec import Csts, Reg

from .fakes import PAGE, FakeContext
from .machine_host import MachineContext
from .nvme_host import IOVA_BASE, NvmeHost

_LONG = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz-long"
_NVME_EXAMPLES = 2000 if _LONG else 250
_EDU_EXAMPLES = 2000 if _LONG else 250
_THREAD_EXAMPLES = 200 if _LONG else 25
#: where the 16-page data area of each example sits (after the admin queues)
_MAPPED = 0x10_4000
_SETTINGS = {
    "deadline": None,
    "phases": [Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
    "derandomize": not _LONG,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}

#: what the examples did, for the closing note (pytest -s prints it)
COUNTS: dict[str, int] = {"nvme": 0, "nvme_thread": 0, "edu": 0, "commands": 0}

_HOST_FILE = __file__.replace("test_fuzz.py", "nvme_host.py")
_U32 = st.integers(0, 0xFFFF_FFFF)
_U64 = st.integers(0, (1 << 64) - 1)


def _address(mapped: int) -> st.SearchStrategy[int]:
    """IOVAs where PRPs go wrong: page ends, odd offsets, unmapped pages, anything."""
    return st.one_of(
        st.integers(0, 15).map(lambda page: mapped + page * PAGE),
        st.tuples(st.integers(0, 15), st.integers(1, 8)).map(
            lambda pk: mapped + pk[0] * PAGE + PAGE - pk[1]  # the last bytes of a page
        ),
        st.integers(0, 0xFFFF).map(lambda off: mapped + off),
        st.just(0),
        st.integers(0, 1 << 40).map(lambda a: a & ~3),
        _U64,
    )


def _command(mapped: int) -> st.SearchStrategy[tuple[object, ...]]:
    return st.tuples(
        st.just("cmd"),
        st.sampled_from([0, 0, 1, 1, 2, 3, 4]),  # queue: mostly ones that exist
        st.one_of(
            st.sampled_from([0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0A, 0x0C, 0x18]),
            st.integers(0, 0xFF),
        ),
        st.one_of(st.just(1), _U32),  # nsid
        _address(mapped),
        _address(mapped),
        st.tuples(_U32, _U32, st.integers(0, 0x3FF), _U32, _U32, _U32),
    )


def _actions(mapped: int) -> st.SearchStrategy[list[tuple[object, ...]]]:
    action = st.one_of(
        _command(mapped),
        _command(mapped),
        st.tuples(st.just("pair"), st.integers(1, 4), st.integers(1, 70), st.integers(0, 3)),
        st.tuples(st.just("doorbell"), st.integers(0, 6), st.booleans(), st.integers(0, 0x1_0000)),
        st.tuples(
            st.just("reg"),
            st.sampled_from(
                [0x0, 0x8, 0xC, 0x10, 0x14, 0x1C, 0x20, 0x24, 0x28, 0x30, 0x38, 0x50, 0xE00]
            ),
            st.sampled_from([4, 8]),
            _U64,
        ),
        st.tuples(
            st.just("list"),
            st.integers(0, 15),
            st.integers(0, PAGE // 8),
            st.lists(_address(mapped), max_size=4),
        ),
    )
    pairs = st.lists(
        st.tuples(st.just("pair"), st.integers(1, 2), st.integers(1, 70), st.integers(0, 3)),
        max_size=2,
    )
    return st.tuples(pairs, st.lists(action, min_size=2, max_size=12)).map(lambda t: t[0] + t[1])


def _faults(ctx: object) -> int:
    machine = getattr(ctx, "machine", None)
    return machine.faults.count() if machine is not None else 0


def _drive(host: NvmeHost, actions: list[tuple[object, ...]], memory: object) -> None:
    """Play the actions; check the controller's answers as we go."""
    ctx = host.ctx
    accepted = 0
    for action in actions:
        kind = action[0]
        if kind == "cmd":
            _, qid, opcode, nsid, prp1, prp2, cdw = action
            q = host.queues.get(int(qid))  # type: ignore[call-overload]
            if q is None or not q.size:
                continue
            host.submit(
                int(qid),
                int(opcode),
                nsid=int(nsid),
                prp1=int(prp1),
                prp2=int(prp2),  # type: ignore[call-overload]
                cdw=tuple(cdw),
            )  # type: ignore[arg-type]
            if not (qid == 0 and opcode == 0x0C):  # an AER completes only on an event
                accepted += 1
            COUNTS["commands"] += 1
        elif kind == "pair":
            _, qid, size, vector = action
            try:
                host.create_cq(int(qid), int(size), vector=int(vector))  # type: ignore[call-overload]
                if int(qid) in host.queues:  # type: ignore[call-overload]
                    host.create_sq(int(qid), int(size), int(qid))  # type: ignore[call-overload]
            except ValueError as exc:
                # The host helper expects exactly one completion; after hostile
                # doorbells the admin CQ may hold none. Only that is tolerated.
                if traceback.extract_tb(exc.__traceback__)[-1].filename != _HOST_FILE:
                    raise
        elif kind == "doorbell":
            _, qid, head, value = action
            host.set_reg(Reg.DOORBELLS + 8 * int(qid) + (4 if head else 0), int(value))  # type: ignore[call-overload]
        elif kind == "reg":
            _, offset, width, value = action
            if offset == Reg.CC:
                value = int(value) & 0xFFFF_FFFF  # type: ignore[call-overload]
            host.set_reg(int(offset), int(value) & ((1 << (8 * int(width))) - 1), int(width))  # type: ignore[call-overload]
        elif kind == "list":
            _, page, slot, entries = action
            base = int(page) * PAGE + int(slot) * 8  # type: ignore[call-overload]
            data = struct.pack(f"<{len(entries)}Q", *entries)  # type: ignore[arg-type]
            buf = memory  # the data area: PRP lists live there too
            end = min(len(buf), base + len(data))  # type: ignore[arg-type]
            buf[base:end] = data[: end - base]  # type: ignore[index]
        ctx.run_all()
        for qid in list(host.queues):
            if host.queues[qid].cq_size:
                COUNTS["_completed"] = COUNTS.get("_completed", 0) + len(host.reap(qid))
    ctx.run_all()
    csts = host.reg(Reg.CSTS)
    completed = COUNTS.pop("_completed", 0)
    if accepted > completed and csts & Csts.RDY and not csts & Csts.CFS and host.queues:
        # commands the controller took and never completed must have left a trace
        assert ctx.faults or _faults(ctx), (accepted, completed, hex(csts))


@settings(max_examples=_NVME_EXAMPLES, **_SETTINGS)  # type: ignore[arg-type]
@given(_actions(_MAPPED))
def test_nvme_model_survives_anything_manual_clock(actions: list[tuple[object, ...]]) -> None:
    model = Nvme(size=1 << 20, max_ioqpairs=4, msix_qsize=8)
    ctx = FakeContext(model)
    ctx.enable_msix()
    host = NvmeHost(ctx)
    assert host.enable() == Csts.RDY
    memory_iova, memory = host.buffer(16 * PAGE)
    assert memory_iova == _MAPPED
    _drive(host, actions, memory)
    COUNTS["nvme"] += 1


@pytest.mark.filterwarnings("ignore::aiovfio.sim.SimFaultWarning")  # the fuzz's point
@settings(max_examples=_THREAD_EXAMPLES, **_SETTINGS)  # type: ignore[arg-type]
@given(_actions(_MAPPED))
def test_nvme_model_survives_anything_thread_clock(actions: list[tuple[object, ...]]) -> None:
    with Machine(clock="thread") as machine:
        ctx = MachineContext(machine, Nvme(size=1 << 20, max_ioqpairs=4, msix_qsize=8))
        host = NvmeHost(ctx)  # type: ignore[arg-type]
        assert host.enable() == Csts.RDY
        memory_iova, memory = host.buffer(16 * PAGE)
        assert memory_iova == _MAPPED
        _drive(host, actions, memory)
        machine.run_until_idle(timeout=10)  # nothing hangs
        assert machine.errors == []  # no exception escaped into the clock thread
        ctx.close()
    COUNTS["nvme_thread"] += 1


_EDU_OFFSETS = st.one_of(
    st.sampled_from([0x00, 0x04, 0x08, 0x20, 0x24, 0x60, 0x64, 0x80, 0x84, 0x88, 0x90, 0x98]),
    st.integers(0, 0xFFFFF),
)


@settings(max_examples=_EDU_EXAMPLES, **_SETTINGS)  # type: ignore[arg-type]
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["r", "w", "advance"]),
            _EDU_OFFSETS,
            st.sampled_from([1, 2, 4, 8]),
            _U64,
        ),
        max_size=40,
    )
)
def test_edu_model_survives_any_register_traffic(
    ops: list[tuple[str, int, int, int]],
) -> None:
    model = Edu()
    ctx = FakeContext(model)
    ctx.map(IOVA_BASE, 4 * PAGE)
    for op, offset, width, value in ops:
        offset = min(offset, 0x100000 - width)
        if op == "r":
            got = ctx.read(offset, width)
            assert 0 <= got < 1 << (8 * width)
        elif op == "w":
            ctx.write(offset, value & ((1 << (8 * width)) - 1), width)
        else:
            ctx.advance((value % 1000) / 1000)
    ctx.run_all()  # nothing reschedules forever
    COUNTS["edu"] += 1


def test_fuzz_ran_what_it_says(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints what the fuzz ran (it runs after the fuzz tests of this module)."""
    with capsys.disabled():
        print(f"\nfuzz examples: {COUNTS}")
    if COUNTS["nvme"]:  # the module ran whole, not one test picked with -k
        assert COUNTS["nvme"] >= min(_NVME_EXAMPLES, 10)
        # commands really were submitted (how many per example depends on what
        # hypothesis drew, which shifts with the tests collected beside it)
        assert COUNTS["commands"] >= COUNTS["nvme"] // 2
