"""The IOMMU: device DMA translated through the container's mappings, or faulted."""

from __future__ import annotations

import ctypes
import mmap

import pytest
import structlog
from structlog.testing import capture_logs

from aiovfio._uapi.vfio import DmaMapFlag, DmaUnmapFlag, Extension
from aiovfio.kernel import lent
from aiovfio.sim import IommuFault, Machine

from .rig import GROUP, NAME, PAGE, Rig, Toy, buffer

#: These tests cause IOMMU, Bus Master and device faults on purpose and count them.
_FAULTS_ON_PURPOSE = pytest.mark.filterwarnings("ignore::aiovfio.sim.SimFaultWarning")

IOVA = 0x10_0000


@pytest.fixture
def dma(rig: Rig) -> tuple[Rig, int, mmap.mmap]:
    """The device open with Bus Master on, and two pages mapped at IOVA."""
    c, _, d = rig.device()
    rig.bus_master(d)
    buf, addr = buffer(2)
    rig.map(c, addr, IOVA, 2 * PAGE)
    return rig, c, buf


def ctx(rig: Rig):  # type: ignore[no-untyped-def]
    assert rig.toy.ctx is not None
    return rig.toy.ctx


def test_device_reads_and_writes_process_memory(dma: tuple[Rig, int, mmap.mmap]) -> None:
    rig, _, buf = dma
    buf[PAGE - 2 : PAGE + 2] = b"abcd"
    assert ctx(rig).dma_read(IOVA + PAGE - 2, 4) == b"abcd"  # across a page
    ctx(rig).dma_write(IOVA + 10, b"device")
    assert buf[10:16] == b"device"
    assert ctx(rig).dma_read(IOVA, 0) == b""
    assert rig.machine.faults.count() == 0


def test_access_across_two_mappings(rig: Rig) -> None:
    c, _, d = rig.device()
    rig.bus_master(d)
    a, addr_a = buffer()
    b, addr_b = buffer()
    rig.map(c, addr_a, IOVA, PAGE)
    rig.map(c, addr_b, IOVA + PAGE, PAGE)
    ctx(rig).dma_write(IOVA + PAGE - 3, b"abcdef")
    assert (a[PAGE - 3 :], b[:3]) == (b"abc", b"def")


@_FAULTS_ON_PURPOSE
def test_unmapped_iova_faults_and_writes_nothing(dma: tuple[Rig, int, mmap.mmap]) -> None:
    rig, _, buf = dma
    with pytest.raises(IommuFault) as info:
        ctx(rig).dma_write(IOVA + 2 * PAGE - 4, b"12345678")  # runs off the end
    assert buf[2 * PAGE - 4 :] == b"\0" * 4  # the mapped half was not written
    assert info.value.write is True
    assert "not mapped" in info.value.reason
    (record,) = rig.machine.faults.of("iommu")
    assert (record.iova, record.size, record.write) == (IOVA + 2 * PAGE - 4, 8, True)
    with pytest.raises(IommuFault):
        ctx(rig).dma_read(0, 4)
    assert rig.machine.faults.count("iommu") == 2


@_FAULTS_ON_PURPOSE
def test_permissions(rig: Rig) -> None:
    c, _, d = rig.device()
    rig.bus_master(d)
    ro_buf, ro = buffer()
    wo_buf, wo = buffer()
    rig.map(c, ro, IOVA, PAGE, DmaMapFlag.READ)  # the device may read it
    rig.map(c, wo, IOVA + PAGE, PAGE, DmaMapFlag.WRITE)  # the device may write it
    ctx(rig).dma_read(IOVA, 4)
    ctx(rig).dma_write(IOVA + PAGE, b"x")
    with pytest.raises(IommuFault, match="without WRITE"):
        ctx(rig).dma_write(IOVA, b"x")
    with pytest.raises(IommuFault, match="without READ"):
        ctx(rig).dma_read(IOVA + PAGE, 1)
    ro_buf.close()
    wo_buf.close()


@_FAULTS_ON_PURPOSE
def test_bus_master_off_faults(rig: Rig) -> None:
    c, _, _ = rig.device()
    _buf, addr = buffer()
    rig.map(c, addr, IOVA, PAGE)
    with pytest.raises(IommuFault, match="Bus Master"):
        ctx(rig).dma_read(IOVA, 4)


@_FAULTS_ON_PURPOSE
def test_no_container_faults(rig: Rig) -> None:
    config = rig.machine.topology.devices[NAME].config
    config.user_write(4, 2, config.command | 0x4)  # Bus Master on, as a driver left it
    with pytest.raises(IommuFault, match="not attached"):
        ctx(rig).dma_read(IOVA, 4)
    assert rig.machine.faults.count("iommu") == 1


@_FAULTS_ON_PURPOSE
def test_fault_is_logged_when_structlog_is_configured(dma: tuple[Rig, int, mmap.mmap]) -> None:
    rig, _, _ = dma
    try:
        with capture_logs() as logs, pytest.raises(IommuFault):
            ctx(rig).dma_read(0, 4)
    finally:
        structlog.reset_defaults()
    (event,) = [e for e in logs if e["event"] == "sim.fault.iommu"]
    assert event["iova"] == 0 and event["write"] is False


def test_unmap_reports_what_it_unmapped(rig: Rig) -> None:
    c, _ = rig.attached()
    _buf, addr = buffer(3)
    assert rig.unmap(c, IOVA, PAGE) == 0  # nothing there
    rig.map(c, addr, IOVA, PAGE)
    rig.map(c, addr + PAGE, IOVA + 2 * PAGE, 2 * PAGE)
    assert rig.unmap(c, IOVA, 0x10_0000) == 3 * PAGE  # both, in one range
    rig.map(c, addr, IOVA, PAGE)
    rig.map(c, addr + PAGE, 0, PAGE)
    assert rig.unmap(c, 0, 0, DmaUnmapFlag.ALL) == 2 * PAGE
    assert not any("DMA" in line for line in rig.machine.leaks())


def test_type1_v1_unmap_semantics(rig: Rig) -> None:
    c, _ = rig.attached(iommu=Extension.TYPE1_IOMMU)
    _buf, addr = buffer(4)
    rig.map(c, addr, IOVA, 4 * PAGE)
    assert rig.unmap(c, IOVA + PAGE, PAGE) == 0  # offset into a mapping: nothing, no error
    assert rig.unmap(c, IOVA, PAGE) == 4 * PAGE  # covering its first page: all of it


def test_vaddr_update(dma: tuple[Rig, int, mmap.mmap]) -> None:
    rig, c, _ = dma
    assert rig.unmap(c, IOVA, 2 * PAGE, DmaUnmapFlag.VADDR) == 2 * PAGE
    new, addr = buffer(2)
    new[:3] = b"new"
    rig.map(c, addr, IOVA, 2 * PAGE, DmaMapFlag.VADDR)
    assert ctx(rig).dma_read(IOVA, 3) == b"new"


@_FAULTS_ON_PURPOSE
def test_memory_unmapped_by_the_process_reads_zeros(rig: Rig) -> None:
    c, _, d = rig.device()
    rig.bus_master(d)
    buf, addr = buffer()
    buf[:4] = b"gone"
    rig.map(c, addr, IOVA, PAGE)
    buf.close()
    assert ctx(rig).dma_read(IOVA, 4) == b"\0" * 4  # never a crash
    ctx(rig).dma_write(IOVA, b"lost")
    assert rig.machine.faults.count("device") == 2


def test_memlock_is_shared_by_containers(rig: Rig) -> None:
    rig.machine._memlock.limit = 3 * PAGE
    rig.machine.add_device(type(rig.toy)(), name="0000:00:05.0", group=11)
    c1, _ = rig.attached()
    c2, _ = rig.attached(11)
    _buf, addr = buffer(4)
    rig.map(c1, addr, 0, 2 * PAGE)
    with pytest.raises(OSError, match="map_memlock"):
        rig.map(c2, addr, 0, 2 * PAGE)
    rig.map(c2, addr, 0, PAGE)
    assert rig.machine._memlock.locked == 3 * PAGE
    assert GROUP == 10


# --- memory lent by the map call's caller (aiovfio.kernel.lent) -------------------------------


def _no_syscalls(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the copy went through /proc/self/mem")

    monkeypatch.setattr(rig.machine.topology.memory, "read", refuse)
    monkeypatch.setattr(rig.machine.topology.memory, "write", refuse)


@_FAULTS_ON_PURPOSE
def test_lent_memory_is_copied_without_a_syscall_until_released(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    c, _, d = rig.device()
    rig.bus_master(d)
    buf, addr = buffer(2)
    view = memoryview(buf)
    with lent.lend(addr, 2 * PAGE, view):
        rig.map(c, addr, IOVA, 2 * PAGE)
    with monkeypatch.context() as patch:
        _no_syscalls(rig, patch)
        buf[PAGE - 2 : PAGE + 2] = b"abcd"
        assert ctx(rig).dma_read(IOVA + PAGE - 2, 4) == b"abcd"  # across a page
        ctx(rig).dma_write(IOVA + 10, b"device")
        assert buf[10:16] == b"device"
        with pytest.raises(IommuFault, match="not mapped"):  # past the end: the checked path
            ctx(rig).dma_read(IOVA + 2 * PAGE - 2, 4)
    view.release()  # the lender lets go: the machine reads by address again
    assert ctx(rig).dma_read(IOVA + 10, 6) == b"device"
    buf.close()  # nothing holds the memory now; the device must not crash the process
    assert ctx(rig).dma_read(IOVA, 4) == bytes(4)
    assert rig.machine.faults.count("device") == 1
    assert rig.machine.faults.count("iommu") == 1


@_FAULTS_ON_PURPOSE
def test_lent_memory_keeps_the_mapping_permissions(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    c, _, d = rig.device()
    rig.bus_master(d)
    buf, addr = buffer()
    buf[:4] = b"keep"
    with lent.lend(addr, PAGE, memoryview(buf)):
        rig.map(c, addr, IOVA, PAGE, DmaMapFlag.READ)
    with pytest.raises(IommuFault, match="without WRITE"):
        ctx(rig).dma_write(IOVA, b"over")
    assert buf[:4] == b"keep"
    rig.cfg_write(d, 4, 2, rig.cfg_read(d, 4, 2) & ~0x4)  # Bus Master off
    with pytest.raises(IommuFault, match="Bus Master"):
        ctx(rig).dma_read(IOVA, 4)
    assert rig.machine.faults.counts == {"iommu": 1, "bus_master": 1}


def test_a_view_of_other_memory_is_not_used(rig: Rig) -> None:
    c, _, d = rig.device()
    rig.bus_master(d)
    buf, addr = buffer()
    other, _ = buffer()
    buf[:4], other[:4] = b"real", b"fake"
    with lent.lend(addr, PAGE, memoryview(other)):  # lent under buf's address: refused
        rig.map(c, addr, IOVA, PAGE)
    assert ctx(rig).dma_read(IOVA, 4) == b"real"
    assert rig.machine.topology.containers[0].iommu.mappings[0].view is None  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_the_public_layer_lends_its_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DmaBuffer's and a map_dma pin's memory reach the device without a syscall."""
    import aiovfio
    from aiovfio.sim.models import Edu

    with Machine(clock="manual") as machine:
        machine.add_device(Edu(), name=NAME)
        async with aiovfio.open_device(NAME, kernel=machine.kernel) as dev:
            dev.config.enable()
            own = mmap.mmap(-1, PAGE)
            async with dev.dma_buffer(PAGE) as buf, dev.map_dma(own) as mapping:
                memory = machine.topology.memory
                monkeypatch.setattr(memory, "read", None)  # any use is a TypeError
                monkeypatch.setattr(memory, "write", None)
                ctx = machine.model(NAME)._ctx  # type: ignore[attr-defined]
                buf.view[:5] = b"lent!"
                assert ctx.dma_read(buf.iova, 5) == b"lent!"
                ctx.dma_write(mapping.iova + 7, b"pin")
                assert own[7:10] == b"pin"
                monkeypatch.undo()
            own.close()  # the pin went with the mapping
        assert machine.leaks() == []


# --- the 6.1 personality: a read-only pin of never-written memory is the zero page ----------


def _private(pages: int = 1) -> tuple[mmap.mmap, int]:
    m = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(m)  # touches no page
    address = ctypes.addressof(anchor)
    del anchor
    return m, address


@pytest.mark.parametrize("linux", ["6.1", "6.12"])
def test_a_read_only_pin_of_never_written_memory(linux: str) -> None:
    with Machine(clock="manual", linux=linux) as machine:
        rig = Rig(machine, Toy())
        machine.add_device(rig.toy, name=NAME, group=GROUP)
        c, _, d = rig.device()
        rig.bus_master(d)
        mem, address = _private(3)
        mem[PAGE : PAGE + 4] = b"old!"  # page 1 written before the pin: a real page
        mem[2 * PAGE - 4 : 2 * PAGE] = b"tail"
        rig.map(c, address, IOVA, 3 * PAGE, DmaMapFlag.READ)
        mem[:4] = b"new!"  # pages 0 and 2 were never written when pinned
        mem[PAGE : PAGE + 4] = b"new!"
        mem[2 * PAGE : 2 * PAGE + 4] = b"new!"
        got = [ctx(rig).dma_read(IOVA + i * PAGE, 4) for i in range(3)]
        across = ctx(rig).dma_read(IOVA + 2 * PAGE - 4, 8)  # the end of page 1, start of 2
        if linux == "6.1":  # vaddr_get_pfns pinned the zero page: the device reads zeros
            assert got == [bytes(4), b"new!", bytes(4)]
            assert across == b"tail" + bytes(4)
        else:  # the R/O long-term pin unshared (6.2+): device and process agree
            assert got == [b"new!"] * 3
            assert across == b"tailnew!"
        rig.unmap(c, IOVA, 3 * PAGE)
        mem.close()


@pytest.mark.anyio
async def test_the_public_layer_populates_read_only_mappings_on_6_1() -> None:
    """map_dma(readonly=True) faults the pages in for writing first (populate_write), so a
    driver on 6.1 does not hand its device the zero page."""
    import aiovfio
    from aiovfio.sim.models import Edu

    with Machine(clock="manual", linux="6.1") as machine:
        machine.add_device(Edu(), name=NAME)
        async with aiovfio.open_device(NAME, kernel=machine.kernel) as dev:
            dev.config.enable()
            mem, _ = _private()
            async with dev.map_dma(mem, readonly=True) as mapping:
                mem[:4] = b"seen"
                assert machine.model(NAME)._ctx.dma_read(mapping.iova, 4) == b"seen"  # type: ignore[attr-defined]
            mem.close()


# --- dma_view: direct access for batched ring accesses --------------------------------------


def _in_device_work(rig: Rig, work):  # type: ignore[no-untyped-def]
    """Run `work()` as a clock callback of the (manual) machine; returns what it returned."""
    out = []
    ctx(rig).schedule(0, lambda: out.append(work()))
    rig.machine.run_until_idle()
    return out[0]


def test_dma_view_is_the_lent_memory_inside_device_work(rig: Rig) -> None:
    c, _, d = rig.device()
    rig.bus_master(d)
    buf, addr = buffer(2)
    with lent.lend(addr, 2 * PAGE, memoryview(buf)):
        rig.map(c, addr, IOVA, 2 * PAGE)
    buf[PAGE : PAGE + 4] = b"ring"
    assert ctx(rig).dma_view(IOVA + PAGE, 4) is None  # outside device work: nothing holds still

    def work() -> bytes:
        window = ctx(rig).dma_view(IOVA + PAGE, 64, True)
        assert window is not None
        view, offset = window
        seen = bytes(view[offset : offset + 4])
        view[offset + 4 : offset + 8] = b"done"  # live: the process sees it
        return seen

    assert _in_device_work(rig, work) == b"ring"
    assert buf[PAGE + 4 : PAGE + 8] == b"done"
    assert rig.machine.faults.count() == 0


@_FAULTS_ON_PURPOSE
def test_dma_view_is_none_wherever_a_copy_would_fault_and_records_nothing(rig: Rig) -> None:
    c, _, d = rig.device()
    rig.bus_master(d)
    buf, addr = buffer(2)
    whole = memoryview(buf)
    with lent.lend(addr, PAGE, whole[:PAGE]):
        rig.map(c, addr, IOVA, PAGE, DmaMapFlag.READ)  # page 1 read-only
    with lent.lend(addr + PAGE, PAGE, whole[PAGE:]):
        rig.map(c, addr + PAGE, IOVA + PAGE, PAGE)  # page 2: a second mapping
    unlent, addr3 = buffer()
    rig.map(c, addr3, IOVA + 2 * PAGE, PAGE)  # mapped, but its memory was not lent
    view = ctx(rig).dma_view

    def work() -> list[object]:
        return [
            view(IOVA, 16) is not None,  # readable
            view(IOVA, 16, True),  # no WRITE permission
            view(IOVA + PAGE - 8, 16),  # across two mappings
            view(IOVA + 3 * PAGE, 16),  # not mapped
            view(IOVA + 2 * PAGE, 16),  # not lent
            view(IOVA, 0),  # empty
        ]

    assert _in_device_work(rig, work) == [True, None, None, None, None, None]
    rig.cfg_write(d, 4, 2, rig.cfg_read(d, 4, 2) & ~0x4)  # Bus Master off
    assert _in_device_work(rig, lambda: view(IOVA, 16)) is None
    assert rig.machine.faults.count() == 0  # a view that is refused records nothing
    with pytest.raises(IommuFault):  # where the copy does
        ctx(rig).dma_read(IOVA, 16)
    assert rig.machine.faults.count("bus_master") == 1
    unlent.close()


@_FAULTS_ON_PURPOSE
def test_dma_epoch_changes_with_everything_a_kept_view_depends_on(rig: Rig) -> None:
    """A model may keep a `dma_view` while `dma_epoch` is unchanged: it must change with
    every mapping added or removed, a view dropped, or the device's IOMMU; it is None
    where no view is given (Bus Master off, outside device work)."""
    c, g, d = rig.device()
    epoch = ctx(rig).dma_epoch
    assert _in_device_work(rig, epoch) is None  # Bus Master off
    rig.bus_master(d)
    assert epoch() is None  # outside device work
    first = _in_device_work(rig, epoch)
    assert first is not None
    assert _in_device_work(rig, epoch) == first  # nothing changed
    buf, addr = buffer(2)
    with lent.lend(addr, 2 * PAGE, memoryview(buf)):
        rig.map(c, addr, IOVA, 2 * PAGE)
    mapped = _in_device_work(rig, epoch)
    assert mapped != first
    rig.map(c, addr, IOVA + 2 * PAGE, PAGE)  # any mapping, not only the one a view is of
    assert _in_device_work(rig, epoch) != mapped
    now = _in_device_work(rig, epoch)
    rig.unmap(c, IOVA + 2 * PAGE, PAGE)
    assert _in_device_work(rig, epoch) != now
    now = _in_device_work(rig, epoch)
    rig.machine._drop_view(rig.machine._topo.devices[NAME], IOVA)  # its lender released it
    assert _in_device_work(rig, epoch) != now
    now = _in_device_work(rig, epoch)
    rig.cfg_write(d, 4, 2, rig.cfg_read(d, 4, 2) & ~0x4)  # Bus Master off, then on again
    assert _in_device_work(rig, epoch) is None
    rig.bus_master(d)
    assert _in_device_work(rig, epoch) == now  # the same mappings, the same views
    # Another container (and so another IOMMU): never a number seen before.
    seen = {first, mapped, now}
    rig.k.close(d)
    rig.k.group_unset_container(g)
    assert _in_device_work(rig, epoch) is None  # no IOMMU at all
    c2 = rig.k.open_container()
    rig.k.group_set_container(g, c2)
    rig.k.set_iommu(c2, Extension.TYPE1v2_IOMMU)
    d2 = rig.k.group_get_device_fd(g, NAME)
    rig.bus_master(d2)
    assert _in_device_work(rig, epoch) not in seen | {None}
    buf.close()


def test_an_ioas_generation_changes_with_its_mappings() -> None:
    """As a type1 IOMMU's: what `dma_epoch` answers for a device attached through iommufd."""
    from aiovfio._uapi.iommufd import IoasMapFlag

    with Machine(iommufd=True) as machine:
        ioas = machine._topo.new_ioas()
        other = machine._topo.new_ioas()
        assert ioas.generation != other.generation  # one number per state, process-wide
        buf, addr = buffer(2)
        seen = {ioas.generation, other.generation}
        flags = IoasMapFlag.READABLE | IoasMapFlag.WRITEABLE | IoasMapFlag.FIXED_IOVA
        with lent.lend(addr, 2 * PAGE, memoryview(buf)):
            ioas.map(flags, addr, 2 * PAGE, IOVA)
        assert ioas.generation not in seen
        seen.add(ioas.generation)
        m = ioas.lookup(IOVA)
        assert m is not None and m.view is not None
        ioas.drop_view(m)
        assert m.view is None and ioas.generation not in seen
        seen.add(ioas.generation)
        ioas.unmap(IOVA, 2 * PAGE)
        assert ioas.generation not in seen
        buf.close()
