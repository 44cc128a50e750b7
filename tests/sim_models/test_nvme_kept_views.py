"""The nvme model keeps its rings' and data's views across clock callbacks on the machine,
and never uses one past what it was given for: a mapping removed, moved or refused (Bus
Master off) is seen at the next command, as on a fresh machine."""

from __future__ import annotations

import pytest

from aiovfio.sim import Machine
from aiovfio.sim.models import Nvme
from aiovfio.sim.models._nvme_spec import Csts, IoOpcode, Status

from .fakes import PAGE
from .machine_host import MachineContext
from .nvme_host import NvmeHost, rw_cdw

NSID = 1
_CONFIG = 7 << 40

#: these tests cause IOMMU and Bus Master faults on purpose and count them
pytestmark = pytest.mark.filterwarnings("ignore::aiovfio.sim.SimFaultWarning")


@pytest.fixture(params=["manual", "thread"])
def host(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    with Machine(clock=request.param) as machine:
        ctx = MachineContext(machine, Nvme(size=1 << 20), lend=True)
        host = NvmeHost(ctx)  # type: ignore[arg-type]
        assert host.enable() == Csts.RDY
        host.io_pair(1, 16, vector=0)
        yield host
        ctx.close()


def _read(host: NvmeHost, prp1: int, lba: int = 0) -> int:
    done = host.command(1, IoOpcode.READ, nsid=NSID, prp1=prp1, cdw=rw_cdw(lba, 8))
    return done.status & 0xFF


def _write(host: NvmeHost, iova: int, lba: int) -> None:
    done = host.command(1, IoOpcode.WRITE, nsid=NSID, prp1=iova, cdw=rw_cdw(lba, 8))
    assert done.status == 0


def test_the_views_are_the_fast_path_and_stay_correct(host: NvmeHost) -> None:
    machine = host.ctx.machine  # type: ignore[attr-defined]
    iova, buf = host.buffer(PAGE)
    buf[:] = b"\xa5" * PAGE
    _write(host, iova, 8)
    buf[:] = bytes(PAGE)
    for _ in range(3):
        assert _read(host, iova, 8) == 0
        assert bytes(buf) == b"\xa5" * PAGE
    assert machine.faults.count() == 0


def test_a_data_buffer_unmapped_between_commands_faults(host: NvmeHost) -> None:
    machine = host.ctx.machine  # type: ignore[attr-defined]
    iova, buf = host.buffer(PAGE)
    buf[:] = b"\x11" * PAGE
    _write(host, iova, 0)
    assert _read(host, iova) == 0  # its view is kept now
    buf[:] = bytes(PAGE)
    host.ctx.unmap(iova)  # type: ignore[attr-defined]
    assert _read(host, iova) == Status.DATA_TRANSFER_ERROR
    assert bytes(buf) == bytes(PAGE)  # the old memory, no longer mapped, is not written
    assert machine.faults.count("iommu") == 1


def test_a_data_buffer_moved_to_other_memory_is_written_there(host: NvmeHost) -> None:
    iova, old = host.buffer(PAGE)
    old[:] = b"\x22" * PAGE
    _write(host, iova, 0)
    assert _read(host, iova) == 0
    host.ctx.unmap(iova)  # type: ignore[attr-defined]
    new = host.ctx.map(iova, PAGE)
    old[:] = bytes(PAGE)
    assert _read(host, iova) == 0
    assert bytes(new) == b"\x22" * PAGE
    assert bytes(old) == bytes(PAGE)


def test_a_ring_moved_to_other_memory_is_fetched_from_there(host: NvmeHost) -> None:
    q = host.queues[1]
    iova, _ = host.buffer(PAGE)
    assert _read(host, iova) == 0  # the SQ's view is kept now
    host.ctx.unmap(q.sq_iova)  # type: ignore[attr-defined]
    moved = host.ctx.map(q.sq_iova, PAGE, writable=False)
    moved[:] = q.sq[:PAGE]
    q.sq = moved  # the host writes its next entries to the new memory only
    cids = [host.submit(1, IoOpcode.FLUSH, nsid=NSID) for _ in range(3)]
    host.run()
    assert [d.cid for d in host.reap(1)] == cids


def test_bus_master_off_between_commands_is_refused(host: NvmeHost) -> None:
    machine = host.ctx.machine  # type: ignore[attr-defined]
    ctx = host.ctx
    iova, _ = host.buffer(PAGE)
    assert _read(host, iova) == 0
    command = ctx.read(4, 2, region=7)  # type: ignore[call-arg]
    ctx.write(4, command & ~0x4, 2, region=7)  # type: ignore[call-arg]
    host.submit(1, IoOpcode.READ, nsid=NSID, prp1=iova, cdw=rw_cdw(0, 8))
    host.run()
    assert host.reg(0x1C) & Csts.CFS  # the fetch failed: the controller is fatal
    assert machine.faults.count("bus_master") >= 1


@pytest.mark.anyio
@pytest.mark.parametrize("iommufd", [False, True], ids=["container", "iommufd"])
async def test_buffers_freed_and_reallocated_through_the_public_api(iommufd: bool) -> None:
    """The nvme driver reads into a fresh DmaBuffer each time; each one is unmapped on
    close and the next often gets the same IOVA. Every read lands in the live buffer."""
    import aiovfio
    from aiovfio.nvme import open_controller

    with Machine(iommufd=iommufd) as machine:
        machine.add_device(Nvme(size=1 << 20), name="0000:00:05.0")
        async with aiovfio.open_device("0000:00:05.0", kernel=machine.kernel) as dev:
            async with open_controller(dev) as ctrl:
                ns = ctrl.namespace()
                per = PAGE // ns.block_size
                for lba in range(4):
                    await ns.write(lba * per, bytes([lba + 1]) * PAGE)
                iovas = set()
                for round_ in range(8):
                    lba = round_ % 4
                    async with dev.dma_buffer(PAGE) as buf:
                        iovas.add(buf.iova)
                        await ns.read_into(lba * per, buf)
                        assert bytes(buf.view) == bytes([lba + 1]) * PAGE
        assert len(iovas) < 8  # IOVAs were reused, and each read landed in the live buffer
        assert machine.faults.count() == 0
        assert machine.leaks() == []
