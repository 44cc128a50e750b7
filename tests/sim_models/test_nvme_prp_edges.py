"""PRP lists at page ends: an NVMe status, never a Python exception, on both clocks.

A PRP2 list pointer in the last 7 bytes of a page used to raise IndexError in
the model (`_map_prp`), and on the thread clock the command then never
completed. PRP list pointers are qword aligned (NVMe 1.4, 4.3): the
controller answers Invalid PRP Offset, and the command completes.
"""

from __future__ import annotations

import pytest

from aiovfio.sim import Machine
from aiovfio.sim.models import Nvme
from aiovfio.sim.models._nvme_spec import Csts, IoOpcode, Status

from .fakes import PAGE, FakeContext
from .machine_host import MachineContext
from .nvme_host import NvmeHost, prp_list, rw_cdw

NSID = 1


def _read_three_pages(host: NvmeHost, list_offset: int) -> int:
    data_iova, _ = host.buffer(3 * PAGE)
    list_iova, lst = host.buffer(PAGE)
    entries = prp_list([data_iova + PAGE, data_iova + 2 * PAGE])
    lst[list_offset : list_offset + len(entries)] = entries[: PAGE - list_offset]
    done = host.command(
        1,
        IoOpcode.READ,
        nsid=NSID,
        prp1=data_iova,
        prp2=list_iova + list_offset,
        cdw=rw_cdw(0, 24),
    )
    return done.status & 0xFF


@pytest.mark.parametrize("tail", [1, 4, 7])
def test_list_pointer_in_the_last_bytes_of_a_page_manual(tail: int) -> None:
    ctx = FakeContext(Nvme(size=1 << 20))
    ctx.enable_msix()
    host = NvmeHost(ctx)
    assert host.enable() == Csts.RDY
    host.io_pair(1, 16)
    assert _read_three_pages(host, PAGE - tail) == Status.INVALID_PRP_OFFSET
    assert _read_three_pages(host, 0) == Status.SUCCESS  # the same read, well formed


@pytest.mark.parametrize("tail", [1, 7])
def test_list_pointer_in_the_last_bytes_of_a_page_thread_clock(tail: int) -> None:
    with Machine(clock="thread") as machine:
        ctx = MachineContext(machine)
        host = NvmeHost(ctx)  # type: ignore[arg-type]
        assert host.enable() == Csts.RDY
        host.io_pair(1, 16, vector=0)
        assert _read_three_pages(host, PAGE - tail) == Status.INVALID_PRP_OFFSET  # it completes
        assert _read_three_pages(host, 0) == Status.SUCCESS
        assert machine.errors == []
        ctx.close()
