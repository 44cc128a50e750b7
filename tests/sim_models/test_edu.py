"""The edu model, register by register, through the fake context."""

from __future__ import annotations

import struct

import pytest

from aiovfio._uapi.pci import CapId, MsiCtrl
from aiovfio._uapi.vfio import IrqInfoFlag, PciIrq, PciRegion, RegionFlag
from aiovfio.errors import InvalidArgument, UsageError
from aiovfio.sim.models import Edu
from aiovfio.sim.models.edu import (
    EDU_BAR_SIZE,
    EDU_DMA_START,
    EDU_IDENT,
    EduDmaCmd,
    EduIrq,
    EduReg,
    EduStatus,
)

from .fakes import PAGE, FakeContext

ONES32 = 0xFFFF_FFFF
ONES64 = (1 << 64) - 1
RUN_TO_DEVICE = EduDmaCmd.RUN | EduDmaCmd.IRQ
RUN_TO_RAM = EduDmaCmd.RUN | EduDmaCmd.TO_RAM | EduDmaCmd.IRQ


@pytest.fixture
def ctx() -> FakeContext:
    return FakeContext(Edu())


def factorial(ctx: FakeContext, n: int) -> int:
    ctx.write(EduReg.FACTORIAL, n)
    ctx.run_all()
    assert not ctx.read(EduReg.STATUS) & EduStatus.COMPUTING
    return ctx.read(EduReg.FACTORIAL)


def start_dma(ctx: FakeContext, src: int, dst: int, count: int, cmd: int) -> None:
    ctx.write(EduReg.DMA_SRC, src, 8)
    ctx.write(EduReg.DMA_DST, dst, 8)
    ctx.write(EduReg.DMA_COUNT, count, 8)
    ctx.write(EduReg.DMA_CMD, cmd, 8)


# --- identity and description ---------------------------------------------------


def test_identity() -> None:
    edu = Edu()
    assert (edu.vendor_id, edu.device_id, edu.revision) == (0x1234, 0x11E8, 0x10)
    assert edu.class_code == 0x00FF00
    assert (edu.subsystem_vendor_id, edu.subsystem_id) == (0x1AF4, 0x1100)
    assert edu.interrupt_pin == 1
    assert edu.supports_reset is False


def test_bar0_is_1mib_trapped_32bit_memory() -> None:
    (bar,) = Edu().regions()
    assert bar.index == PciRegion.BAR0
    assert bar.size == EDU_BAR_SIZE == 1 << 20
    assert bar.mmap_areas == ()
    assert not bar.flags & RegionFlag.MMAP
    assert not bar.is_64bit
    assert not bar.prefetchable


def test_only_msi_capability_one_vector_64bit_no_mask() -> None:
    ((cap_id, body),) = Edu().capabilities()
    assert cap_id == CapId.MSI
    (ctrl,) = struct.unpack_from("<H", body)
    assert ctrl & MsiCtrl.ADDR64
    assert not ctrl & (MsiCtrl.MASKBIT | MsiCtrl.QMASK | MsiCtrl.ENABLE)
    assert len(body) == 12  # control, address low/high, data: a 14-byte capability


def test_irqs_intx_and_one_msi_no_msix() -> None:
    irqs = {spec.index: spec for spec in Edu().irqs()}
    assert irqs[PciIrq.INTX].count == 1
    assert irqs[PciIrq.INTX].flags & IrqInfoFlag.AUTOMASKED
    assert irqs[PciIrq.MSI].count == 1
    assert irqs[PciIrq.MSIX].count == 0
    assert PciIrq.ERR not in irqs  # conventional PCI


def test_unattached_model_refuses_work() -> None:
    edu = Edu()
    assert edu.read(0, EduReg.IDENT, 4) == EDU_IDENT  # pure register reads are fine
    with pytest.raises(UsageError, match="not attached"):
        edu.write(0, EduReg.FACTORIAL, 4, 5)


def test_attach_to_second_machine_refused(ctx: FakeContext) -> None:
    with pytest.raises(UsageError, match="already attached"):
        FakeContext(ctx.model)


@pytest.mark.parametrize(
    "kwargs",
    [{"dma_mask": -1}, {"dma_mask": 1 << 64}, {"dma_latency": -0.1}, {"factorial_latency": -1}],
)
def test_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidArgument):
        Edu(**kwargs)  # type: ignore[arg-type]


# --- access rules ------------------------------------------------------------------


def test_ident_and_liveness(ctx: FakeContext) -> None:
    assert ctx.read(EduReg.IDENT) == 0x010000ED
    assert ctx.read(EduReg.LIVENESS) == 0
    ctx.write(EduReg.LIVENESS, 0x12345678)
    assert ctx.read(EduReg.LIVENESS) == 0xEDCBA987
    ctx.write(EduReg.IDENT, 0)  # read-only
    assert ctx.read(EduReg.IDENT) == EDU_IDENT


def test_low_registers_8_byte_read_is_all_ones_write_ignored(ctx: FakeContext) -> None:
    assert ctx.read(EduReg.IDENT, 8) == ONES64
    ctx.write(EduReg.LIVENESS, 0x1, 8)
    assert ctx.read(EduReg.LIVENESS) == 0


@pytest.mark.parametrize("size", [1, 2])
def test_narrow_accesses_read_zero_and_are_dropped(ctx: FakeContext, size: int) -> None:
    assert ctx.read(EduReg.IDENT, size) == 0
    assert ctx.read(EduReg.DMA_SRC, size) == 0
    ctx.write(EduReg.LIVENESS, 0x55, size)
    assert ctx.read(EduReg.LIVENESS) == 0


def test_misaligned_accesses_read_zero_and_are_dropped(ctx: FakeContext) -> None:
    assert ctx.read(EduReg.IDENT + 2) == 0
    assert ctx.read(EduReg.DMA_SRC + 4, 8) == 0
    ctx.write(EduReg.LIVENESS + 2, 0x55)
    assert ctx.read(EduReg.LIVENESS) == 0


@pytest.mark.parametrize("offset", [0x0C, 0x10, 0x28, 0x60, 0x64, 0x84, 0x8C, 0xA0, 0x1000])
def test_unimplemented_offsets_read_all_ones(ctx: FakeContext, offset: int) -> None:
    assert ctx.read(offset) == ONES32
    if offset >= 0x80 and offset % 8 == 0:
        assert ctx.read(offset, 8) == ONES64


def test_other_regions_are_not_answered(ctx: FakeContext) -> None:
    assert ctx.read(EduReg.IDENT, region=1) == 0
    assert ctx.read(EDU_BAR_SIZE - 4) == ONES32
    assert ctx.read(EDU_BAR_SIZE) == 0


def test_dma_registers_take_4_and_8_byte_accesses(ctx: FakeContext) -> None:
    ctx.write(EduReg.DMA_SRC, 0x1_2345_6789, 8)
    assert ctx.read(EduReg.DMA_SRC, 8) == 0x1_2345_6789
    assert ctx.read(EduReg.DMA_SRC, 4) == 0x2345_6789
    assert ctx.read(EduReg.DMA_SRC + 4, 4) == ONES32  # 0x84 decodes nothing
    ctx.write(EduReg.DMA_SRC, 0xABCD, 4)  # sets the whole register, zero-extended
    assert ctx.read(EduReg.DMA_SRC, 8) == 0xABCD
    ctx.write(EduReg.DMA_SRC + 4, 0x1, 4)  # lost
    assert ctx.read(EduReg.DMA_SRC, 8) == 0xABCD
    for reg in (EduReg.DMA_DST, EduReg.DMA_COUNT):
        ctx.write(reg, 0xFFFF_0000_0000_0001, 8)
        assert ctx.read(reg, 8) == 0xFFFF_0000_0000_0001


def test_dma_cmd_write_without_run_is_ignored(ctx: FakeContext) -> None:
    ctx.write(EduReg.DMA_CMD, EduDmaCmd.TO_RAM | EduDmaCmd.IRQ, 8)
    assert ctx.read(EduReg.DMA_CMD, 8) == 0
    assert ctx.pending == 0


# --- factorial -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, 1),
        (1, 1),
        (5, 120),
        (10, 3628800),
        (12, 479001600),
        (13, 1932053504),
        (20, 2192834560),
        (33, 2147483648),
        (34, 0),
        (0xFFFF_FFFF, 0),
    ],
)
def test_factorial_values(ctx: FakeContext, n: int, expected: int) -> None:
    assert factorial(ctx, n) == expected


def test_factorial_completes_only_through_the_clock(ctx: FakeContext) -> None:
    """'Forgot to wait': reads before the scheduled completion see n and COMPUTING."""
    ctx.write(EduReg.FACTORIAL, 10)
    assert ctx.pending == 1
    assert ctx.read(EduReg.STATUS) & EduStatus.COMPUTING
    assert ctx.read(EduReg.FACTORIAL) == 10
    ctx.advance(1e-6)
    assert ctx.read(EduReg.FACTORIAL) == 10  # latency not elapsed yet
    ctx.run_all()
    assert not ctx.read(EduReg.STATUS) & EduStatus.COMPUTING
    assert ctx.read(EduReg.FACTORIAL) == 3628800


def test_factorial_write_ignored_while_computing(ctx: FakeContext) -> None:
    ctx.write(EduReg.FACTORIAL, 5)
    ctx.write(EduReg.FACTORIAL, 10)
    assert ctx.pending == 1
    ctx.run_all()
    assert ctx.read(EduReg.FACTORIAL) == 120


def test_huge_factorial_stays_computing_longer() -> None:
    ctx = FakeContext(Edu(factorial_latency=0, factorial_step_latency=1e-9))
    ctx.write(EduReg.FACTORIAL, 0xFFFF_FFFF)
    ctx.advance(1.0)
    assert ctx.read(EduReg.STATUS) & EduStatus.COMPUTING
    ctx.advance(4.0)
    assert not ctx.read(EduReg.STATUS) & EduStatus.COMPUTING


def test_status_irqfact_is_rw_computing_is_ro(ctx: FakeContext) -> None:
    ctx.write(EduReg.STATUS, EduStatus.IRQFACT | EduStatus.COMPUTING)
    assert ctx.read(EduReg.STATUS) == EduStatus.IRQFACT
    ctx.write(EduReg.STATUS, 0)
    assert ctx.read(EduReg.STATUS) == 0


def test_factorial_irq_intx(ctx: FakeContext) -> None:
    ctx.write(EduReg.STATUS, EduStatus.IRQFACT)
    ctx.write(EduReg.FACTORIAL, 10)
    assert not ctx.intx
    ctx.run_all()
    assert ctx.intx
    assert ctx.read(EduReg.IRQ_STATUS) == EduIrq.FACTORIAL
    ctx.write(EduReg.IRQ_ACK, EduIrq.FACTORIAL)
    assert not ctx.intx
    assert ctx.read(EduReg.IRQ_STATUS) == 0


def test_factorial_irq_msi(ctx: FakeContext) -> None:
    ctx.enable_msi()
    ctx.write(EduReg.STATUS, EduStatus.IRQFACT)
    ctx.write(EduReg.FACTORIAL, 3)
    ctx.run_all()
    assert ctx.msi == [0]
    assert not ctx.intx_history
    assert ctx.read(EduReg.IRQ_STATUS) == 1


def test_irqfact_set_after_completion_raises_nothing(ctx: FakeContext) -> None:
    factorial(ctx, 4)
    ctx.write(EduReg.STATUS, EduStatus.IRQFACT)
    assert not ctx.intx
    assert ctx.read(EduReg.IRQ_STATUS) == 0


def test_no_irq_without_irqfact(ctx: FakeContext) -> None:
    factorial(ctx, 4)
    assert not ctx.intx
    assert ctx.msi == []


# --- interrupts ----------------------------------------------------------------------


def test_raise_and_ack_intx_level(ctx: FakeContext) -> None:
    ctx.write(EduReg.IRQ_RAISE, 0xCAFE0000)
    assert ctx.intx
    assert ctx.read(EduReg.IRQ_STATUS) == 0xCAFE0000
    ctx.write(EduReg.IRQ_RAISE, 0x1)
    assert ctx.read(EduReg.IRQ_STATUS) == 0xCAFE0001
    ctx.write(EduReg.IRQ_ACK, 0xCAFE0000)
    assert ctx.intx  # still bits pending
    ctx.write(EduReg.IRQ_ACK, 0x1)
    assert not ctx.intx
    assert [level for _, level in ctx.intx_history] == [True, False]


def test_raise_zero_with_nothing_pending_does_nothing(ctx: FakeContext) -> None:
    ctx.write(EduReg.IRQ_RAISE, 0)
    assert not ctx.intx
    assert not ctx.intx_history


def test_msi_sent_once_per_raise_even_when_pending(ctx: FakeContext) -> None:
    ctx.enable_msi()
    ctx.write(EduReg.IRQ_RAISE, 0x10)
    ctx.write(EduReg.IRQ_RAISE, 0x10)
    ctx.write(EduReg.IRQ_RAISE, 0)  # status still non-zero: another message
    assert ctx.msi == [0, 0, 0]
    ctx.write(EduReg.IRQ_ACK, 0x10)
    assert ctx.read(EduReg.IRQ_STATUS) == 0
    assert ctx.msi == [0, 0, 0]
    assert not ctx.intx_history


def test_irq_registers_are_write_only(ctx: FakeContext) -> None:
    ctx.write(EduReg.IRQ_RAISE, 0x8)
    assert ctx.read(EduReg.IRQ_RAISE) == ONES32
    assert ctx.read(EduReg.IRQ_ACK) == ONES32
    ctx.write(EduReg.IRQ_STATUS, 0)  # read-only
    assert ctx.read(EduReg.IRQ_STATUS) == 0x8


def test_mode_is_read_at_each_raise(ctx: FakeContext) -> None:
    ctx.write(EduReg.IRQ_RAISE, 0x2)
    assert ctx.intx
    ctx.write(EduReg.IRQ_ACK, 0x2)
    ctx.enable_msi()
    ctx.write(EduReg.IRQ_RAISE, 0x2)
    assert ctx.msi == [0]
    assert [level for _, level in ctx.intx_history] == [True, False]


# --- DMA ---------------------------------------------------------------------------------


def test_dma_round_trip_through_the_iommu(ctx: FakeContext) -> None:
    a = ctx.map(0x10000, PAGE, writable=False)  # read-only for the device is enough
    b = ctx.map(0x20000, PAGE)
    a[:] = bytes(range(256)) * 16
    start_dma(ctx, 0x10000, EDU_DMA_START, 4095, RUN_TO_DEVICE)
    assert ctx.read(EduReg.DMA_CMD) & EduDmaCmd.RUN
    assert ctx.next_due == pytest.approx(0.1)
    ctx.advance(0.05)
    assert ctx.read(EduReg.DMA_CMD) & EduDmaCmd.RUN
    ctx.advance(0.05)
    assert ctx.read(EduReg.DMA_CMD, 8) == EduDmaCmd.IRQ  # DIR and IRQ stay set
    assert ctx.intx
    assert ctx.read(EduReg.IRQ_STATUS) == EduIrq.DMA
    ctx.write(EduReg.IRQ_ACK, EduIrq.DMA)

    start_dma(ctx, EDU_DMA_START, 0x20000, 4095, RUN_TO_RAM)
    ctx.run_all()
    assert b[:4095] == a[:4095]
    assert b[4095] == 0
    assert ctx.read(EduReg.DMA_CMD, 8) == EduDmaCmd.TO_RAM | EduDmaCmd.IRQ
    assert ctx.faults == []
    assert ctx.iommu_faults == []


def test_dma_completes_in_msi_mode(ctx: FakeContext) -> None:
    ctx.enable_msi()
    ctx.map(0x10000, PAGE)
    start_dma(ctx, 0x10000, EDU_DMA_START + 16, 16, RUN_TO_DEVICE)
    ctx.run_all()
    assert ctx.msi == [0]


def test_dma_without_irq_bit_raises_nothing(ctx: FakeContext) -> None:
    ctx.map(0x10000, PAGE)
    start_dma(ctx, 0x10000, EDU_DMA_START, 8, EduDmaCmd.RUN)
    ctx.run_all()
    assert not ctx.intx
    assert ctx.read(EduReg.IRQ_STATUS) == 0
    assert ctx.read(EduReg.DMA_CMD) == 0


def test_dma_registers_frozen_while_running(ctx: FakeContext) -> None:
    ctx.map(0x10000, PAGE)
    start_dma(ctx, 0x10000, EDU_DMA_START, 8, RUN_TO_DEVICE)
    ctx.write(EduReg.DMA_SRC, 0x99000, 8)
    ctx.write(EduReg.DMA_DST, 0, 8)
    ctx.write(EduReg.DMA_COUNT, 0, 8)
    ctx.write(EduReg.DMA_CMD, RUN_TO_RAM, 8)  # no restart, no second timer
    assert ctx.read(EduReg.DMA_SRC, 8) == 0x10000
    assert ctx.read(EduReg.DMA_DST, 8) == EDU_DMA_START
    assert ctx.read(EduReg.DMA_COUNT, 8) == 8
    assert ctx.read(EduReg.DMA_CMD, 8) == RUN_TO_DEVICE
    assert ctx.pending == 1
    ctx.run_all()
    ctx.write(EduReg.DMA_SRC, 0x99000, 8)
    assert ctx.read(EduReg.DMA_SRC, 8) == 0x99000


def test_dma_happens_only_in_the_scheduled_callback(ctx: FakeContext) -> None:
    a = ctx.map(0x10000, PAGE)
    b = ctx.map(0x20000, PAGE)
    a[:4] = b"\x01\x02\x03\x04"
    start_dma(ctx, 0x10000, EDU_DMA_START, 4, RUN_TO_DEVICE)
    ctx.run_all()
    start_dma(ctx, EDU_DMA_START, 0x20000, 4, RUN_TO_RAM)
    assert b[:4] == bytes(4)  # nothing yet: the copy waits for the timer
    ctx.run_all()
    assert b[:4] == b"\x01\x02\x03\x04"


def test_dma_mask_clamps_the_ram_address_before_translation(ctx: FakeContext) -> None:
    low = ctx.map(0x0012_3000, PAGE)
    start_dma(ctx, EDU_DMA_START, 0x1_1012_3000, 16, RUN_TO_RAM)
    ctx.run_all()
    assert ctx.iommu_faults == []  # the clamped IOVA 0x123000 is mapped
    assert low[:16] == bytes(16)
    assert len(ctx.faults) == 1
    assert "0x110123000" in ctx.faults[0]
    assert "0x123000" in ctx.faults[0]


def test_wide_dma_mask_does_not_clamp() -> None:
    ctx = FakeContext(Edu(dma_mask=(1 << 64) - 1))
    high = ctx.map(0x1_0000_0000, PAGE)
    ctx.map(0x10000, PAGE)[:2] = b"hi"
    start_dma(ctx, 0x10000, EDU_DMA_START, 2, RUN_TO_DEVICE)
    ctx.run_all()
    start_dma(ctx, EDU_DMA_START, 0x1_0000_0000, 2, RUN_TO_RAM)
    ctx.run_all()
    assert high[:2] == b"hi"
    assert ctx.faults == []


def test_dma_to_unmapped_iova_drops_the_write(ctx: FakeContext) -> None:
    b = ctx.map(0x20000, PAGE)
    start_dma(ctx, EDU_DMA_START, 0x30000, 64, RUN_TO_RAM)
    ctx.run_all()
    assert len(ctx.iommu_faults) == 1
    assert ctx.iommu_faults[0].write
    assert ctx.iommu_faults[0].iova == 0x30000
    assert b == bytes(PAGE)
    assert not ctx.read(EduReg.DMA_CMD) & EduDmaCmd.RUN
    assert ctx.intx
    assert ctx.read(EduReg.IRQ_STATUS) == EduIrq.DMA


def test_dma_to_readonly_mapping_faults(ctx: FakeContext) -> None:
    ro = ctx.map(0x20000, PAGE, writable=False)
    ctx.map(0x10000, PAGE)[:4] = b"abcd"
    start_dma(ctx, 0x10000, EDU_DMA_START, 4, EduDmaCmd.RUN)
    ctx.run_all()
    start_dma(ctx, EDU_DMA_START, 0x20000, 4, RUN_TO_RAM)
    ctx.run_all()
    assert ro[:4] == bytes(4)
    assert [f.write for f in ctx.iommu_faults] == [True]


def test_dma_from_unmapped_iova_reads_zeros(ctx: FakeContext) -> None:
    a = ctx.map(0x10000, PAGE)
    b = ctx.map(0x20000, PAGE)
    a[:8] = b"\xff" * 8
    start_dma(ctx, 0x10000, EDU_DMA_START, 8, EduDmaCmd.RUN)
    ctx.run_all()
    ctx.unmap(0x10000)
    start_dma(ctx, 0x10000, EDU_DMA_START, 8, RUN_TO_DEVICE)
    ctx.run_all()
    assert [f.write for f in ctx.iommu_faults] == [False]
    assert ctx.read(EduReg.IRQ_STATUS) == EduIrq.DMA
    start_dma(ctx, EDU_DMA_START, 0x20000, 8, EduDmaCmd.RUN | EduDmaCmd.TO_RAM)
    ctx.run_all()
    assert b[:8] == bytes(8)  # the failed read left zeros in the device buffer


def _out_of_range_case(version: tuple[int, ...], dst: int, count: int) -> FakeContext:
    ctx = FakeContext(Edu(qemu_version=version))
    a = ctx.map(0x10000, PAGE)
    a[:] = b"\x5a" * PAGE
    start_dma(ctx, 0x10000, dst, count, RUN_TO_DEVICE)
    ctx.run_all()
    assert not ctx.read(EduReg.DMA_CMD) & EduDmaCmd.RUN
    assert ctx.read(EduReg.IRQ_STATUS) == EduIrq.DMA
    return ctx


@pytest.mark.parametrize(
    ("version", "ok"),
    [((7, 2), False), ((8, 2), False), ((8, 2, 1), True), ((9, 0), True), ((9, 1), True)],
)
def test_4096_bytes_at_0x40000_quirk_by_version(version: tuple[int, ...], ok: bool) -> None:
    ctx = _out_of_range_case(version, EDU_DMA_START, 4096)
    if ok:
        assert ctx.faults == []
    else:
        assert len(ctx.faults) == 1
        assert "off by one" in ctx.faults[0]
        assert "4095" in ctx.faults[0]


@pytest.mark.parametrize("version", [(7, 2), (9, 0), (10, 1)])
@pytest.mark.parametrize(("dst", "count"), [(0x3FFFF, 4), (0x40FFF, 2), (0x50000, 1)])
def test_out_of_range_dma_is_logged_not_copied(
    version: tuple[int, ...], dst: int, count: int
) -> None:
    ctx = _out_of_range_case(version, dst, count)
    assert len(ctx.faults) == 1
    assert "outside the buffer" in ctx.faults[0]
    assert ctx.iommu_faults == []  # no RAM access at all


@pytest.mark.parametrize(("version", "faults"), [((7, 2), 1), ((9, 0), 1), ((9, 1), 0)])
def test_zero_count_dma(version: tuple[int, ...], faults: int) -> None:
    ctx = _out_of_range_case(version, EDU_DMA_START, 0)
    assert len(ctx.faults) == faults


def test_device_state_survives_reset_hook(ctx: FakeContext) -> None:
    ctx.write(EduReg.LIVENESS, 1)
    ctx.model.reset()  # no reset in edu: the default hook does nothing
    assert ctx.read(EduReg.LIVENESS) == ONES32 - 1
