"""The nvme model through a minimal host driver and the fake context."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from aiovfio._uapi.pci import CapId
from aiovfio._uapi.vfio import PciIrq, PciRegion, RegionFlag
from aiovfio.errors import InvalidArgument
from aiovfio.sim.models import Nvme
from aiovfio.sim.models._nvme_spec import (
    CQE,
    SQE,
    AdminOpcode,
    Cns,
    Csts,
    FeatureId,
    IdCtrl,
    IdNs,
    IoOpcode,
    LogId,
    Reg,
    Smart,
)

from .fakes import PAGE, FakeContext
from .nvme_host import CC_ENABLE_4K, NvmeHost, prp_list, rw_cdw

MIB = 1 << 20
SIZE = 8 * MIB
BLOCKS = SIZE // 512
NSID = 1
CAP_7_2 = 0x0040_1820_0F01_07FF
CAP_10_0 = 0x0040_0820_0F01_07FF


def make(**kwargs: object) -> tuple[Nvme, FakeContext, NvmeHost]:
    kwargs.setdefault("size", SIZE)
    model = Nvme(**kwargs)  # type: ignore[arg-type]
    ctx = FakeContext(model)
    return model, ctx, NvmeHost(ctx)


@pytest.fixture
def host() -> NvmeHost:
    """An enabled controller with MSI-X on and I/O queue pair 1 (vector 1)."""
    _, ctx, host = make()
    ctx.enable_msix()
    assert host.enable() == Csts.RDY
    host.io_pair(1, 16)
    return host


def u128(data: bytes | bytearray, offset: int) -> int:
    return int.from_bytes(data[offset : offset + 16], "little")


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def write(host: NvmeHost, slba: int, data: bytes, qid: int = 1) -> int:
    iova, buf = host.buffer(len(data), writable=False)
    buf[: len(data)] = data
    prp2 = iova + PAGE if len(data) > PAGE else 0
    assert len(data) <= 2 * PAGE
    done = host.command(
        qid, IoOpcode.WRITE, nsid=NSID, prp1=iova, prp2=prp2, cdw=rw_cdw(slba, len(data) // 512)
    )
    return done.status


def read(host: NvmeHost, slba: int, nblocks: int, qid: int = 1) -> tuple[int, bytes]:
    size = nblocks * 512
    assert size <= 2 * PAGE
    iova, buf = host.buffer(size)
    prp2 = iova + PAGE if size > PAGE else 0
    done = host.command(
        qid, IoOpcode.READ, nsid=NSID, prp1=iova, prp2=prp2, cdw=rw_cdw(slba, nblocks)
    )
    return done.status, bytes(buf[:size])


# --- identity and description ---------------------------------------------------------


def test_identity() -> None:
    nvme = Nvme()
    assert (nvme.vendor_id, nvme.device_id, nvme.revision) == (0x1B36, 0x0010, 2)
    assert nvme.class_code == 0x010802
    assert (nvme.subsystem_vendor_id, nvme.subsystem_id) == (0x1AF4, 0x1100)
    assert nvme.supports_reset is True
    assert nvme.size == 64 * MIB


def test_bar0_16k_64bit_trapped() -> None:
    (bar,) = Nvme().regions()
    assert bar.index == PciRegion.BAR0
    assert bar.size == 16 * 1024
    assert bar.is_64bit
    assert not bar.prefetchable
    assert bar.mmap_areas == ()
    assert not bar.flags & RegionFlag.MMAP


def test_capabilities_msix_express_flr_pm_no_msi() -> None:
    caps = dict(Nvme().capabilities())
    assert set(caps) == {CapId.MSIX, CapId.EXP, CapId.PM}
    ctrl, table, pba = struct.unpack("<HII", caps[CapId.MSIX])
    assert ctrl == 64  # 65 vectors, 0-based; not enabled
    assert (table, pba) == (0x2000, 0x3000)  # BIR 0
    express = caps[CapId.EXP]
    assert len(express) == 0x3C - 2
    (devcap,) = struct.unpack_from("<I", express, 0x04 - 2)
    assert devcap & 1 << 28  # FLR
    (flags,) = struct.unpack_from("<H", express, 0)
    assert flags == 0x0002  # version 2, endpoint


def test_irqs_intx_msix_no_msi() -> None:
    irqs = {spec.index: spec.count for spec in Nvme().irqs()}
    assert irqs[PciIrq.INTX] == 1
    assert irqs[PciIrq.MSI] == 0
    assert irqs[PciIrq.MSIX] == 65
    assert irqs[PciIrq.ERR] == 1


def test_bar_layout_follows_qemu_for_more_vectors() -> None:
    nvme = Nvme(msix_qsize=300, max_ioqpairs=1024)
    caps = dict(nvme.capabilities())
    _, table, pba = struct.unpack("<HII", caps[CapId.MSIX])
    assert table == 0x4000  # pow2ceil(0x1000 + 2 * 1025 * 4)
    assert pba == table + 0x2000  # 300 * 16 rounded up to pages
    assert nvme.regions()[0].size == 0x8000


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lba_size": 1024},
        {"size": 1000},
        {"size": 0},
        {"serial": ""},
        {"serial": "x" * 21},
        {"msix_qsize": 0},
        {"max_ioqpairs": 0},
        {"mdts": 0},
        {"backing": bytearray(4096), "size": 8192},
    ],
)
def test_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        Nvme(**kwargs)  # type: ignore[arg-type]


# --- registers ------------------------------------------------------------------------


def test_cap_and_vs() -> None:
    _, _, host = make()
    assert host.reg(Reg.CAP, 8) == CAP_7_2
    assert host.reg(Reg.CAP) == CAP_7_2 & 0xFFFF_FFFF
    assert host.reg(Reg.CAP + 4) == CAP_7_2 >> 32
    assert host.reg(Reg.VS) == 0x00010400
    _, _, newer = make(qemu_version=(10, 0))
    assert newer.reg(Reg.CAP, 8) == CAP_10_0


def test_cap_fields() -> None:
    _, _, host = make()
    cap = host.reg(Reg.CAP, 8)
    assert cap & 0xFFFF == 0x7FF  # MQES
    assert cap >> 16 & 1 == 1  # CQR
    assert cap >> 24 & 0xFF == 0x0F  # TO
    assert cap >> 32 & 0xF == 0  # DSTRD
    assert cap >> 48 & 0xF == 0  # MPSMIN
    assert cap >> 52 & 0xF == 4  # MPSMAX


def test_registers_read_back_and_doorbells_read_zero() -> None:
    _, _, host = make()
    host.set_reg(Reg.AQA, 0x000F000F)
    host.set_reg(Reg.ASQ, 0x1234_5000, 8)
    host.set_reg(Reg.ACQ, 0x6000)
    host.set_reg(Reg.ACQ + 4, 0x1)
    assert host.reg(Reg.AQA) == 0x000F000F
    assert host.reg(Reg.ASQ, 8) == 0x1234_5000
    assert host.reg(Reg.ACQ, 8) == 0x1_0000_6000
    host.set_reg(Reg.CAP, 0)  # read-only
    host.set_reg(Reg.CSTS, 0xFF)
    assert host.reg(Reg.CAP, 8) == CAP_7_2
    assert host.reg(Reg.CSTS) == 0
    assert host.reg(Reg.DOORBELLS) == 0
    assert host.reg(0x0FFC) == 0
    assert host.reg(0x3FFC) == 0


def test_intms_intmc() -> None:
    _, _, host = make()
    host.set_reg(Reg.INTMS, 0x5)
    assert host.reg(Reg.INTMS) == host.reg(Reg.INTMC) == 0x5
    host.set_reg(Reg.INTMC, 0x1)
    assert host.reg(Reg.INTMS) == 0x4


# --- enable, disable, shutdown --------------------------------------------------------


def test_enable_sets_ready_synchronously() -> None:
    _, ctx, host = make()
    assert host.enable() == Csts.RDY
    assert host.reg(Reg.CC) == CC_ENABLE_4K
    assert ctx.faults == []


@pytest.mark.parametrize(
    ("setup", "cc", "why"),
    [
        (lambda h: h.set_reg(Reg.ASQ, 0x80, 8), CC_ENABLE_4K, "ASQ"),
        (lambda h: h.set_reg(Reg.ACQ, 0x10, 8), CC_ENABLE_4K, "ACQ"),
        (lambda h: h.set_reg(Reg.AQA, 0x000F0000), CC_ENABLE_4K, "ASQS"),
        (lambda h: h.set_reg(Reg.AQA, 0x0000000F), CC_ENABLE_4K, "ACQS"),
        (lambda h: None, CC_ENABLE_4K | 5 << 7, "MPS"),
        (lambda h: None, CC_ENABLE_4K | 1 << 4, "CSS"),
    ],
)
def test_enable_failures_set_cfs(setup: object, cc: int, why: str) -> None:
    _, ctx, host = make()
    host.set_reg(Reg.AQA, 0x000F000F)
    host.set_reg(Reg.ASQ, 0x10_0000, 8)
    host.set_reg(Reg.ACQ, 0x20_0000, 8)
    setup(host)  # type: ignore[operator]
    host.set_reg(Reg.CC, cc)
    assert host.reg(Reg.CSTS) == Csts.CFS
    assert len(ctx.faults) == 1
    assert why in ctx.faults[0]
    host.set_reg(Reg.CC, 0)  # disable clears the failure
    assert host.reg(Reg.CSTS) == 0


def test_iosqes_not_checked_at_enable_but_at_create_cq() -> None:
    _, ctx, host = make()
    ctx.enable_msix()
    assert host.enable(cc=0x1) == Csts.RDY
    assert host.create_cq(1, 4).status == 0x4102


def test_disable_frees_queues_and_clears_registers(host: NvmeHost) -> None:
    host.set_reg(Reg.INTMS, 1)
    assert host.disable() == 0
    assert host.reg(Reg.CC) == 0
    assert host.reg(Reg.INTMS) == 0
    assert host.reg(Reg.AQA) != 0  # kept, as QEMU does
    host.set_reg(Reg.DOORBELLS + 8, 1)  # SQ 1 is gone
    assert "SQ 1 does not exist" in host.ctx.faults[-1]
    assert host.ctx.pending == 0
    assert host.enable() == Csts.RDY  # and it comes back


def test_shutdown_then_disable(host: NvmeHost) -> None:
    host.set_reg(Reg.CC, CC_ENABLE_4K | 1 << 14)  # SHN = normal
    assert host.reg(Reg.CSTS) == Csts.RDY | Csts.SHST_COMPLETE
    host.set_reg(Reg.CC, CC_ENABLE_4K)  # SHN cleared
    assert host.reg(Reg.CSTS) == Csts.RDY
    host.set_reg(Reg.CC, CC_ENABLE_4K | 1 << 14)
    host.set_reg(Reg.CC, 1 << 14)  # EN = 0
    assert host.reg(Reg.CSTS) == 0
    assert host.reg(Reg.CC) == 0


def test_flr_resets_controller_keeps_data(host: NvmeHost) -> None:
    data = pattern(4096)
    assert write(host, 10, data) == 0
    host.ctx.model.reset()
    host.queues.clear()
    assert host.reg(Reg.CSTS) == 0
    assert host.reg(Reg.CC) == 0
    assert host.reg(Reg.AQA) == 0
    assert host.reg(Reg.ASQ, 8) == 0
    assert host.enable() == Csts.RDY
    host.io_pair(1, 16)
    assert read(host, 10, 8) == (0, data)


def test_reset_drops_scheduled_work() -> None:
    _, ctx, host = make()
    ctx.enable_msix()
    host.enable()
    host.submit(0, AdminOpcode.IDENTIFY, prp1=0, cdw=(Cns.CONTROLLER,))
    ctx.model.reset()
    host.run()
    assert ctx.iommu_faults == []  # the queued command never ran


# --- identify, features, log pages ----------------------------------------------------


def test_identify_controller(host: NvmeHost) -> None:
    done, data = host.identify(Cns.CONTROLLER)
    assert done.status == 0
    assert struct.unpack_from("<HH", data, IdCtrl.VID) == (0x1B36, 0x1AF4)
    assert data[IdCtrl.SN : IdCtrl.SN + 20] == b"aiovfio0".ljust(20)
    assert data[IdCtrl.MN : IdCtrl.MN + 40] == b"QEMU NVMe Ctrl".ljust(40)
    assert data[IdCtrl.FR : IdCtrl.FR + 8] == b"7.2.0   "
    assert data[IdCtrl.MDTS] == 7
    assert struct.unpack_from("<I", data, IdCtrl.VER) == (0x10400,)
    assert (data[IdCtrl.SQES], data[IdCtrl.CQES]) == (0x66, 0x44)
    assert struct.unpack_from("<I", data, IdCtrl.NN) == (256,)
    subnqn = data[IdCtrl.SUBNQN : IdCtrl.SUBNQN + 256].rstrip(b"\0")
    assert subnqn == b"nqn.2019-08.org.qemu:aiovfio0"
    assert data[IdCtrl.SGLS : IdCtrl.SGLS + 4] == bytes(4)


@pytest.mark.parametrize("lba_size", [512, 4096])
def test_identify_namespace(lba_size: int) -> None:
    _, _, host = make(lba_size=lba_size)
    host.enable()
    done, data = host.identify(Cns.NAMESPACE, nsid=1)
    assert done.status == 0
    nsze, ncap, nuse = struct.unpack_from("<QQQ", data, IdNs.NSZE)
    assert nsze == ncap == nuse == SIZE // lba_size
    assert data[IdNs.NLBAF] == 7
    flbas = data[IdNs.FLBAS] & 0xF
    ms, lbads = struct.unpack_from("<HB", data, IdNs.LBAF0 + 4 * flbas)
    assert (ms, 1 << lbads) == (0, lba_size)


def test_identify_inactive_and_invalid_namespaces(host: NvmeHost) -> None:
    done, data = host.identify(Cns.NAMESPACE, nsid=2)
    assert done.status == 0
    assert data == bytes(4096)
    assert host.identify(Cns.NAMESPACE, nsid=0)[0].status == 0x400B
    assert host.identify(Cns.NAMESPACE, nsid=0xFFFF_FFFF)[0].status == 0x400B
    assert host.identify(Cns.NAMESPACE, nsid=257)[0].status == 0x400B
    assert host.identify(0x55)[0].status == 0x4002


def test_active_namespace_list(host: NvmeHost) -> None:
    done, data = host.identify(Cns.ACTIVE_NS_LIST, nsid=0)
    assert done.status == 0
    assert struct.unpack_from("<II", data) == (1, 0)
    assert host.identify(Cns.ACTIVE_NS_LIST, nsid=1)[1] == bytes(4096)
    assert host.identify(Cns.ACTIVE_NS_LIST, nsid=0xFFFF_FFFE)[0].status == 0x400B


def test_namespace_descriptor_list(host: NvmeHost) -> None:
    done, data = host.identify(Cns.NS_DESCRIPTOR_LIST, nsid=1)
    assert done.status == 0
    assert data[:5] == bytes((4, 1, 0, 0, 0))  # CSI descriptor: NVM


def test_number_of_queues() -> None:
    _, ctx, host = make()
    ctx.enable_msix()
    host.enable()
    done = host.admin(AdminOpcode.SET_FEATURES, cdw=(FeatureId.NUMBER_OF_QUEUES, 0x0003_0003))
    assert (done.status, done.dw0) == (0, 0x003F003F)  # the request is ignored
    done = host.admin(AdminOpcode.GET_FEATURES, cdw=(FeatureId.NUMBER_OF_QUEUES,))
    assert (done.status, done.dw0) == (0, 0x003F003F)
    bad = host.admin(AdminOpcode.SET_FEATURES, cdw=(FeatureId.NUMBER_OF_QUEUES, 0xFFFF))
    assert bad.status == 0x4002
    host.create_cq(1, 4, vector=1)
    late = host.admin(AdminOpcode.SET_FEATURES, cdw=(FeatureId.NUMBER_OF_QUEUES, 0))
    assert late.status == 0x400C


def test_other_features(host: NvmeHost) -> None:
    get = AdminOpcode.GET_FEATURES
    assert host.admin(get, cdw=(FeatureId.ARBITRATION,)).dw0 == 0x7
    assert host.admin(get, cdw=(FeatureId.VOLATILE_WRITE_CACHE,)).dw0 == 1
    done = host.admin(AdminOpcode.SET_FEATURES, cdw=(FeatureId.VOLATILE_WRITE_CACHE, 0))
    assert done.status == 0
    assert host.admin(get, cdw=(FeatureId.VOLATILE_WRITE_CACHE,)).dw0 == 0
    assert host.admin(get, cdw=(FeatureId.TEMPERATURE_THRESHOLD,)).dw0 == 0x157
    assert host.admin(get, cdw=(FeatureId.NUMBER_OF_QUEUES | 3 << 8,)).dw0 == 0x4  # changeable
    assert host.admin(get, cdw=(0x7F,)).status == 0x4002
    arbitration = host.admin(AdminOpcode.SET_FEATURES, cdw=(FeatureId.ARBITRATION, 0))
    assert arbitration.status == 0x410E
    saved = host.admin(AdminOpcode.SET_FEATURES, cdw=(1 << 31 | FeatureId.ASYNC_EVENT_CONFIG,))
    assert saved.status == 0x410D
    per_ns = host.admin(AdminOpcode.SET_FEATURES, nsid=1, cdw=(FeatureId.ASYNC_EVENT_CONFIG,))
    assert per_ns.status == 0x410F


def test_smart_log(host: NvmeHost) -> None:
    assert write(host, 0, pattern(4096)) == 0
    iova, buf = host.buffer(512)
    done = host.admin(
        AdminOpcode.GET_LOG_PAGE, nsid=0xFFFF_FFFF, prp1=iova, cdw=(LogId.SMART | 127 << 16,)
    )
    assert done.status == 0
    assert struct.unpack_from("<H", buf, Smart.TEMPERATURE) == (0x143,)
    assert u128(buf, Smart.HOST_WRITE_COMMANDS) == 1
    assert u128(buf, Smart.DATA_UNITS_WRITTEN) == 1  # 4 KiB rounds up to one unit
    assert u128(buf, Smart.HOST_READ_COMMANDS) == 0


def test_log_page_errors(host: NvmeHost) -> None:
    iova, _ = host.buffer(4096)
    log = AdminOpcode.GET_LOG_PAGE
    assert host.admin(log, nsid=2, prp1=iova, cdw=(LogId.SMART | 127 << 16,)).status == 0x400B
    assert host.admin(log, prp1=iova, cdw=(0x7F | 127 << 16,)).status == 0x4002
    assert host.admin(log, prp1=iova, cdw=(LogId.SMART, 0, 2)).status == 0x4002  # misaligned
    assert host.admin(log, nsid=1, prp1=iova, cdw=(LogId.SMART, 0, 512)).status == 0x4002
    assert host.admin(log, prp1=iova, cdw=(LogId.FIRMWARE_SLOT | 127 << 16,)).status == 0
    assert host.admin(log, prp1=iova, cdw=(LogId.ERROR_INFO | 15 << 16,)).status == 0


def test_invalid_admin_opcode_and_flags(host: NvmeHost) -> None:
    assert host.admin(0x7E).status == 0x4001
    sgl = host.admin(AdminOpcode.IDENTIFY, flags=1 << 6, cdw=(Cns.CONTROLLER,))
    assert sgl.status == 0x4002
    fused = host.admin(AdminOpcode.IDENTIFY, flags=1, cdw=(Cns.CONTROLLER,))
    assert fused.status == 0x0002


def test_async_event_requests_park_and_abort(host: NvmeHost) -> None:
    cids = [host.submit(0, AdminOpcode.ASYNC_EVENT_REQUEST) for _ in range(4)]
    host.run()
    assert host.reap(0) == []
    over = host.admin(AdminOpcode.ASYNC_EVENT_REQUEST)
    assert over.status == 0x0105  # AERL + 1 = 4 outstanding at most
    host.submit(0, AdminOpcode.ABORT, cdw=(cids[1] << 16,))
    host.run()
    aborted, abort = host.reap(0)
    assert (aborted.cid, aborted.status) == (cids[1], 0x0007)
    assert (abort.status, abort.dw0) == (0, 0)
    nothing = host.admin(AdminOpcode.ABORT, cdw=(1 | 99 << 16,))
    assert (nothing.status, nothing.dw0) == (0, 1)
    assert host.admin(AdminOpcode.ABORT, cdw=(9,)).status == 0x4002


def test_invalid_doorbells_complete_an_async_event_request(host: NvmeHost) -> None:
    cids = [host.submit(0, AdminOpcode.ASYNC_EVENT_REQUEST) for _ in range(2)]
    host.run()
    assert host.reap(0) == []
    host.set_reg(Reg.DOORBELLS + 8 * 7, 1)  # SQ 7 does not exist
    assert host.reap(0) == []  # posted after the write, not inside it
    host.run()
    (event,) = host.reap(0)
    assert (event.cid, event.status) == (cids[1], 0)  # the newest AER, as QEMU
    assert event.dw0 == 0x01_00_00  # error event, invalid doorbell register, log page 1
    host.set_reg(Reg.DOORBELLS + 8, 99)  # beyond SQ 1's size: an error event again...
    host.run()
    assert host.reap(0) == []  # ...masked until the error log is read
    iova, _ = host.buffer(PAGE)
    log = host.admin(AdminOpcode.GET_LOG_PAGE, prp1=iova, cdw=(LogId.ERROR_INFO | 15 << 16,))
    assert log.status == 0  # RAE = 0: unmasks errors, and drops the queued one
    host.set_reg(Reg.DOORBELLS + 8 + 4, 99)  # beyond CQ 1's size
    host.run()
    (event,) = host.reap(0)
    assert (event.cid, event.dw0) == (cids[0], 0x01_01_00)  # invalid doorbell value


# --- queues ---------------------------------------------------------------------------


def test_create_cq_checks() -> None:
    _, ctx, host = make()
    host.enable()
    assert host.create_cq(1, 4, vector=1).status == 0x4108  # MSI-X off: only vector 0
    ctx.enable_msix()
    assert host.create_cq(0, 4).status == 0x4101
    assert host.create_cq(65, 4).status == 0x4101  # > max_ioqpairs
    assert host.create_cq(1, 1).status == 0x4102  # QSIZE 0 (0-based)
    assert host.create_cq(1, 0x801).status == 0x4102  # > MQES + 1 entries
    assert host.create_cq(1, 4, vector=65).status == 0x4108  # >= msix_qsize
    assert host.create_cq(1, 4, pc=False).status == 0x4002
    misaligned = host.admin(AdminOpcode.CREATE_CQ, prp1=0x10_0200, cdw=(3 << 16 | 1, 1))
    assert misaligned.status == 0x4013
    assert host.create_cq(1, 4, vector=64).status == 0
    assert host.create_cq(1, 4).status == 0x4101  # taken


def test_create_sq_checks(host: NvmeHost) -> None:
    assert host.create_sq(2, 4, cqid=0).status == 0x4100
    assert host.create_sq(2, 4, cqid=9).status == 0x4100
    assert host.create_sq(0, 4, cqid=1).status == 0x4101
    assert host.create_sq(1, 4, cqid=1).status == 0x4101  # taken
    assert host.create_sq(65, 4, cqid=1).status == 0x4101
    assert host.create_sq(2, 1, cqid=1).status == 0x4102
    assert host.create_sq(2, 4, cqid=1, pc=False).status == 0x4002
    assert host.create_sq(2, 4, cqid=1).status == 0  # two SQs may share a CQ


def test_delete_cq_before_sq_is_a_queue_deletion_error(host: NvmeHost) -> None:
    done = host.admin(AdminOpcode.DELETE_CQ, cdw=(1,))
    assert (done.sct, done.sc, done.dnr) == (1, 0x0C, False)
    assert host.admin(AdminOpcode.DELETE_SQ, cdw=(1,)).status == 0
    assert host.admin(AdminOpcode.DELETE_CQ, cdw=(1,)).status == 0
    assert host.admin(AdminOpcode.DELETE_SQ, cdw=(1,)).status == 0x4101
    assert host.admin(AdminOpcode.DELETE_CQ, cdw=(1,)).status == 0x4100
    assert host.admin(AdminOpcode.DELETE_CQ, cdw=(0,)).status == 0x4100


def test_doorbells_to_missing_queues_or_past_the_size_are_ignored(host: NvmeHost) -> None:
    host.set_reg(Reg.DOORBELLS + 8 * 7, 1)
    host.set_reg(Reg.DOORBELLS + 8 * 1, 16)
    host.set_reg(Reg.DOORBELLS + 8 * 1 + 4, 99)
    host.set_reg(Reg.DOORBELLS + 2, 1)  # misaligned: silently ignored
    assert len(host.ctx.faults) == 3
    assert host.ctx.pending == 0


def test_commands_run_only_after_the_doorbell_write(host: NvmeHost) -> None:
    cid = host.submit(1, IoOpcode.FLUSH, nsid=NSID)
    assert host.ctx.pending == 1  # scheduled, not done
    assert host.reap(1) == []
    host.run()
    (done,) = host.reap(1)
    assert (done.cid, done.status, done.sqid, done.sqhd) == (cid, 0, 1, 1)


def test_a_batch_is_one_interrupt(host: NvmeHost) -> None:
    host.ctx.msix.clear()
    for _ in range(5):
        host.submit(1, IoOpcode.FLUSH, nsid=NSID, ring=False)
    host.ring(1)
    host.run()
    assert host.ctx.msix == [1]
    dones = host.reap(1)
    assert [d.sqhd for d in dones] == [5] * 5


def test_four_entry_cq_wraps_and_flips_phase() -> None:
    _, ctx, host = make()
    ctx.enable_msix()
    host.enable()
    assert host.create_cq(1, 4, vector=1).status == 0
    assert host.create_sq(1, 4, 1).status == 0
    phases = []
    for i in range(14):
        cid = host.submit(1, IoOpcode.FLUSH, nsid=NSID)
        host.run()
        (done,) = host.reap(1)
        assert done.cid == cid
        assert done.sqhd == (i + 1) % 4
        phases.append(done.phase)
    assert phases == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0]


def test_full_cq_holds_completions_until_the_head_moves() -> None:
    _, ctx, host = make()
    ctx.enable_msix()
    host.enable()
    assert host.create_cq(1, 4, vector=1).status == 0
    assert host.create_sq(1, 8, 1).status == 0
    ctx.msix.clear()
    cids = [host.submit(1, IoOpcode.FLUSH, nsid=NSID, ring=False) for _ in range(6)]
    host.ring(1)
    host.run()
    first = host.reap(1, doorbell=False)
    assert [d.cid for d in first] == cids[:3]  # a 4-entry CQ holds 3
    host.set_reg(Reg.DOORBELLS + 12, 3)  # consume them
    assert host.reap(1) == []  # nothing before the device runs again
    host.run()
    second = host.reap(1)
    assert [d.cid for d in second] == cids[3:]
    assert ctx.msix == [1, 1]


def test_sq_stalls_on_outstanding_requests_then_resumes() -> None:
    """An SQ has as many request slots as entries; held completions occupy them."""
    _, ctx, host = make()
    ctx.enable_msix()
    host.enable()
    assert host.create_cq(1, 2, vector=1).status == 0  # room for one entry
    assert host.create_sq(1, 2, 1).status == 0  # two request slots
    cids = []
    for _ in range(4):  # one at a time: the host's SQ holds one entry
        cids.append(host.submit(1, IoOpcode.FLUSH, nsid=NSID))
        host.run()
    sq = ctx.model._sqs[1]  # type: ignore[attr-defined]
    assert (sq.outstanding, sq.head != sq.tail) == (2, True)  # the 4th waits unfetched
    done = host.reap(1)  # frees one CQ slot: one posts, a request slot frees up
    for _ in range(4):
        host.run()
        done += host.reap(1)
    assert [d.cid for d in done] == cids


def test_delete_sq_drops_its_held_completions(host: NvmeHost) -> None:
    assert host.create_cq(2, 2, vector=2).status == 0
    assert host.create_sq(2, 8, 2).status == 0
    for _ in range(4):
        host.submit(2, IoOpcode.FLUSH, nsid=NSID, ring=False)
    host.ring(2)
    host.run()
    assert len(host.reap(2, doorbell=False)) == 1
    assert host.admin(AdminOpcode.DELETE_SQ, cdw=(2,)).status == 0
    assert host.admin(AdminOpcode.DELETE_CQ, cdw=(2,)).status == 0


# --- I/O ------------------------------------------------------------------------------


def test_write_read_round_trip(host: NvmeHost) -> None:
    data = pattern(4096, seed=3)
    assert write(host, 100, data) == 0
    assert read(host, 100, 8) == (0, data)
    assert read(host, 101, 1) == (0, data[512:1024])
    assert read(host, 0, 1) == (0, bytes(512))  # never written: zeros


def test_io_lands_in_a_bytearray_backing() -> None:
    disk = bytearray(SIZE)
    _, ctx, host = make(backing=disk, size=None)
    ctx.enable_msix()
    host.enable()
    host.io_pair()
    assert write(host, 3, b"\xab" * 512) == 0
    assert disk[3 * 512 : 4 * 512] == b"\xab" * 512
    disk[0:512] = b"\xcd" * 512
    assert read(host, 0, 1) == (0, b"\xcd" * 512)


def test_io_lands_in_a_file_backing(tmp_path: Path) -> None:
    image = tmp_path / "nvm.img"
    image.write_bytes(bytes(MIB))
    model, ctx, host = make(backing=str(image), size=None)
    assert model.size == MIB
    ctx.enable_msix()
    host.enable()
    host.io_pair()
    assert write(host, 2, pattern(1024)) == 0
    assert host.command(1, IoOpcode.FLUSH, nsid=NSID).status == 0
    assert image.read_bytes()[1024:2048] == pattern(1024)


def test_missing_backing_file() -> None:
    with pytest.raises(InvalidArgument, match="cannot open"):
        Nvme(backing="/nonexistent/nvm.img")


def test_prp1_with_an_offset(host: NvmeHost) -> None:
    data = pattern(4096, seed=9)
    assert write(host, 8, data) == 0
    iova, buf = host.buffer(2 * PAGE)
    done = host.command(
        1, IoOpcode.READ, nsid=NSID, prp1=iova + 0x200, prp2=iova + PAGE, cdw=rw_cdw(8, 8)
    )
    assert done.status == 0
    assert bytes(buf[0x200 : 0x200 + 4096]) == data
    assert buf[:0x200] == bytes(0x200)


def test_prp2_must_be_page_aligned(host: NvmeHost) -> None:
    iova, _ = host.buffer(3 * PAGE)
    done = host.command(
        1, IoOpcode.READ, nsid=NSID, prp1=iova, prp2=iova + PAGE + 8, cdw=rw_cdw(0, 16)
    )
    assert done.status == 0x4013


def test_64k_read_through_a_prp_list(host: NvmeHost) -> None:
    data = pattern(64 * 1024, seed=1)
    # write it 8 KiB at a time, then read it back in one command
    for i in range(8):
        assert write(host, 1000 + 16 * i, data[8192 * i : 8192 * (i + 1)]) == 0
    iova, buf = host.buffer(64 * 1024)
    list_iova, plist = host.buffer(PAGE, writable=False)
    plist[: 15 * 8] = prp_list([iova + PAGE * k for k in range(1, 16)])
    done = host.command(
        1, IoOpcode.READ, nsid=NSID, prp1=iova, prp2=list_iova, cdw=rw_cdw(1000, 128)
    )
    assert done.status == 0
    assert bytes(buf) == data


def test_prp_list_chains_through_its_last_slot(host: NvmeHost) -> None:
    data = pattern(4 * PAGE, seed=5)
    iova, buf = host.buffer(4 * PAGE, writable=False)
    buf[:] = data
    lists, plist = host.buffer(2 * PAGE, writable=False)
    # The first list starts 16 bytes before the end of its page: two slots,
    # the second of which chains to a list page holding the other two pages.
    first = lists + PAGE - 16
    plist[PAGE - 16 : PAGE] = prp_list([iova + PAGE, lists + PAGE])
    plist[PAGE : PAGE + 16] = prp_list([iova + 2 * PAGE, iova + 3 * PAGE])
    done = host.command(1, IoOpcode.WRITE, nsid=NSID, prp1=iova, prp2=first, cdw=rw_cdw(500, 32))
    assert done.status == 0
    status, back = read(host, 500, 8)
    assert (status, back) == (0, data[:PAGE])
    assert read(host, 524, 8) == (0, data[3 * PAGE :])


def test_misaligned_prp_list_entry(host: NvmeHost) -> None:
    iova, _ = host.buffer(3 * PAGE)
    list_iova, plist = host.buffer(PAGE, writable=False)
    plist[:16] = prp_list([iova + PAGE, iova + 2 * PAGE + 4])
    done = host.command(1, IoOpcode.READ, nsid=NSID, prp1=iova, prp2=list_iova, cdw=rw_cdw(0, 24))
    assert done.status == 0x4013


def test_mdts(host: NvmeHost) -> None:
    iova, _ = host.buffer(PAGE)
    too_big = 512 * 1024 // 512 + 1
    done = host.command(1, IoOpcode.READ, nsid=NSID, prp1=iova, cdw=rw_cdw(0, too_big))
    assert done.status == 0x4002


def test_lba_range_error_with_dnr(host: NvmeHost) -> None:
    status, _ = read(host, BLOCKS, 1)
    assert status == 0x4080
    status, _ = read(host, BLOCKS - 1, 2)
    assert status == 0x4080
    assert read(host, BLOCKS - 1, 1)[0] == 0


def test_io_namespace_and_opcode_errors(host: NvmeHost) -> None:
    iova, _ = host.buffer(PAGE)
    assert host.command(1, IoOpcode.READ, nsid=0, prp1=iova).status == 0x400B
    # QEMU 7.2: the broadcast NSID is valid, but names no namespace to read
    assert host.command(1, IoOpcode.READ, nsid=0xFFFF_FFFF, prp1=iova).status == 0x4002
    assert host.command(1, IoOpcode.READ, nsid=2, prp1=iova).status == 0x4002
    assert host.command(1, 0x7F, nsid=NSID).status == 0x4001
    assert host.command(1, IoOpcode.READ, nsid=NSID, flags=1 << 6, prp1=iova).status == 0x4002
    assert host.command(1, IoOpcode.FLUSH, nsid=0xFFFF_FFFF).status == 0
    assert host.command(1, IoOpcode.FLUSH, nsid=0).status == 0x400B
    assert host.command(1, IoOpcode.FLUSH, nsid=2).status == 0x4002
    assert host.command(1, IoOpcode.FLUSH, nsid=NSID).status == 0


def test_write_zeroes(host: NvmeHost) -> None:
    assert write(host, 40, pattern(1024)) == 0
    assert host.command(1, IoOpcode.WRITE_ZEROES, nsid=NSID, cdw=rw_cdw(40, 1)).status == 0
    assert read(host, 40, 2) == (0, bytes(512) + pattern(1024)[512:])
    assert host.command(1, IoOpcode.WRITE_ZEROES, nsid=NSID, cdw=rw_cdw(BLOCKS, 1)).status == 0x4080


# --- interrupts -----------------------------------------------------------------------


def test_msix_vector_per_cq(host: NvmeHost) -> None:
    host.ctx.msix.clear()
    host.admin(AdminOpcode.IDENTIFY, prp1=host.buffer(PAGE)[0], cdw=(Cns.CONTROLLER,))
    assert host.ctx.msix == [0]  # admin CQ: vector 0
    host.command(1, IoOpcode.FLUSH, nsid=NSID)
    assert host.ctx.msix == [0, 1]


def test_cq_without_ien_sends_nothing(host: NvmeHost) -> None:
    assert host.create_cq(3, 4, vector=3, ien=False).status == 0
    assert host.create_sq(3, 4, 3).status == 0
    before = list(host.ctx.msix)
    assert host.command(3, IoOpcode.FLUSH, nsid=NSID).status == 0
    assert host.ctx.msix == before


def test_masked_msix_vector_is_pending_until_unmasked(host: NvmeHost) -> None:
    vector_ctrl = 0x2000 + 16 * 1 + 12
    host.set_reg(vector_ctrl, 1)
    host.submit(1, IoOpcode.FLUSH, nsid=NSID)
    host.run()
    assert 1 not in host.ctx.msix
    assert host.reg(0x3000) == 1 << 1  # PBA
    host.set_reg(vector_ctrl, 0)
    assert host.ctx.msix[-1] == 1
    assert host.reg(0x3000) == 0


def test_intx_mode_level_follows_the_cq() -> None:
    _, ctx, host = make()
    host.enable()
    assert host.create_cq(1, 4, vector=0).status == 0
    assert host.create_sq(1, 4, 1).status == 0
    assert not ctx.intx  # the admin completions were reaped and acknowledged
    host.submit(1, IoOpcode.FLUSH, nsid=NSID)
    host.run()
    assert ctx.intx
    host.set_reg(Reg.INTMS, 1)
    assert not ctx.intx  # masked
    host.set_reg(Reg.INTMC, 1)
    assert ctx.intx
    assert len(host.reap(1)) == 1  # the head doorbell reaches the tail
    assert not ctx.intx
    assert ctx.msix == []
    host.submit(1, IoOpcode.FLUSH, nsid=NSID)
    host.run()
    assert ctx.intx
    host.disable()  # a controller reset drops the level
    assert not ctx.intx


# --- the IOMMU ------------------------------------------------------------------------


def test_data_transfer_fault_is_status_4(host: NvmeHost) -> None:
    unmapped = 0x7000_0000
    done = host.command(1, IoOpcode.READ, nsid=NSID, prp1=unmapped, cdw=rw_cdw(0, 1))
    assert (done.status, done.dnr) == (0x0004, False)
    ro, _ = host.buffer(PAGE, writable=False)
    assert host.command(1, IoOpcode.READ, nsid=NSID, prp1=ro, cdw=rw_cdw(0, 1)).status == 4
    done = host.command(1, IoOpcode.WRITE, nsid=NSID, prp1=unmapped, cdw=rw_cdw(0, 1))
    assert done.status == 0x0004
    assert host.reg(Reg.CSTS) == Csts.RDY  # the controller lives on


def test_prp_list_fault_is_status_4(host: NvmeHost) -> None:
    iova, _ = host.buffer(4 * PAGE)
    done = host.command(1, IoOpcode.READ, nsid=NSID, prp1=iova, prp2=0x7000_0000, cdw=rw_cdw(0, 24))
    assert done.status == 0x0004


def test_identify_into_unmapped_buffer_is_status_4(host: NvmeHost) -> None:
    done = host.admin(AdminOpcode.IDENTIFY, prp1=0x7000_0000, cdw=(Cns.CONTROLLER,))
    assert done.status == 0x0004


def test_sq_fetch_fault_sets_cfs(host: NvmeHost) -> None:
    host.ctx.unmap(host.queues[1].sq_iova)
    host.submit(1, IoOpcode.FLUSH, nsid=NSID)
    host.run()
    assert host.reg(Reg.CSTS) == Csts.CFS
    assert "fetching SQ 1" in host.ctx.faults[-1]
    assert host.disable() == 0
    assert host.enable() == Csts.RDY  # recovered by disable / enable


def test_cq_post_fault_sets_cfs(host: NvmeHost) -> None:
    cq = host.queues[1]
    host.ctx.unmap(cq.cq_iova)
    host.ctx.map(cq.cq_iova, PAGE, writable=False)
    host.submit(1, IoOpcode.FLUSH, nsid=NSID)
    host.run()
    assert host.reg(Reg.CSTS) == Csts.CFS
    assert "posting to CQ 1" in host.ctx.faults[-1]
    assert [f.write for f in host.ctx.iommu_faults] == [True]


def test_sqe_and_cqe_sizes() -> None:
    assert SQE.size == 64
    assert CQE.size == 16
