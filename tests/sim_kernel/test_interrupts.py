"""Interrupts: IRQ info, SET_IRQS, INTx automasking, MSI/MSI-X delivery through eventfds."""

from __future__ import annotations

import struct

import pytest

from aiovfio._uapi.pci import CapId
from aiovfio._uapi.vfio import IrqInfoFlag, IrqSetFlag, PciIrq
from aiovfio.sim import Machine

from .rig import GROUP, MSI_VECTORS, MSIX_VECTORS, NAME, Rig, Toy


def pending(rig: Rig, fd: int) -> int:
    """The eventfd's count, 0 when nothing arrived."""
    try:
        return rig.k.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_irq_info(rig: Rig) -> None:
    _, _, d = rig.device()
    intx = rig.irq_info(d, PciIrq.INTX)
    assert (intx.count, intx.flags) == (
        1,
        IrqInfoFlag.EVENTFD | IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED,
    )
    fixed = IrqInfoFlag.EVENTFD | IrqInfoFlag.NORESIZE
    assert (rig.irq_info(d, PciIrq.MSI).count, rig.irq_info(d, PciIrq.MSI).flags) == (
        MSI_VECTORS,
        fixed,
    )
    assert rig.irq_info(d, PciIrq.MSIX).count == MSIX_VECTORS
    assert (rig.irq_info(d, PciIrq.REQ).count, rig.irq_info(d, PciIrq.REQ).flags) == (1, fixed)


def test_irq_info_pcie_has_err_and_no_pin_no_intx(machine: Machine) -> None:
    machine.add_device(Toy(pcie=True, pin=0), name=NAME, group=GROUP)
    rig = Rig(machine, Toy())
    _, _, d = rig.device()
    assert rig.irq_info(d, PciIrq.ERR).count == 1
    assert rig.irq_info(d, PciIrq.INTX).count == 0


def test_intx_is_automasked_until_unmask(rig: Rig) -> None:
    _, _, d = rig.device()
    e = rig.k.eventfd()
    rig.eventfds(d, PciIrq.INTX, [e])
    ctx = rig.toy.ctx
    assert ctx is not None
    ctx.set_intx(True)
    assert pending(rig, e) == 1
    ctx.set_intx(False)
    ctx.set_intx(True)  # masked: nothing more
    assert pending(rig, e) == 0
    rig.unmask(d)  # still asserted: vfio-pci fires again instead of unmasking
    assert pending(rig, e) == 1
    ctx.set_intx(False)
    rig.unmask(d)  # the line is low now: unmasked
    assert pending(rig, e) == 0
    ctx.set_intx(True)
    assert pending(rig, e) == 1


def test_intx_status_bit_follows_the_line(rig: Rig) -> None:
    _, _, d = rig.device()
    assert rig.toy.ctx is not None
    rig.toy.ctx.set_intx(True)
    assert rig.cfg_read(d, 6, 2) & 0x08
    rig.toy.ctx.set_intx(False)
    assert not rig.cfg_read(d, 6, 2) & 0x08


def test_intx_enable_with_the_line_asserted_fires(rig: Rig) -> None:
    _, _, d = rig.device()
    assert rig.toy.ctx is not None
    rig.toy.ctx.set_intx(True)
    e = rig.k.eventfd()
    rig.eventfds(d, PciIrq.INTX, [e])
    assert pending(rig, e) == 1


def test_intx_mask_and_command_intx_disable(rig: Rig) -> None:
    _, _, d = rig.device()
    e = rig.k.eventfd()
    rig.eventfds(d, PciIrq.INTX, [e])
    assert rig.toy.ctx is not None
    rig.irq_set(d, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_MASK, 0, 0, 1)
    rig.toy.ctx.set_intx(True)
    assert pending(rig, e) == 0
    rig.toy.ctx.set_intx(False)
    rig.unmask(d)
    command = rig.cfg_read(d, 4, 2)
    rig.cfg_write(d, 4, 2, command | 0x400)  # INTx Disable masks
    rig.toy.ctx.set_intx(True)
    assert pending(rig, e) == 0
    rig.cfg_write(d, 4, 2, command)  # clearing it unmasks: still asserted, so it fires
    assert pending(rig, e) == 1


def test_intx_loopback_and_bool(rig: Rig) -> None:
    _, _, d = rig.device()
    e = rig.k.eventfd()
    rig.eventfds(d, PciIrq.INTX, [e])
    rig.irq_set(d, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, 0, 0, 1)
    assert pending(rig, e) == 1
    rig.irq_set(d, IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_TRIGGER, 0, 0, 1, b"\0")
    assert pending(rig, e) == 0


def test_intx_disable(rig: Rig) -> None:
    _, _, d = rig.device()
    e = rig.k.eventfd()
    rig.eventfds(d, PciIrq.INTX, [e])
    rig.disable(d, PciIrq.INTX)
    assert rig.machine.leaks()[-1].startswith("group 10")  # no INTx line left
    assert rig.toy.ctx is not None
    rig.toy.ctx.set_intx(True)
    assert pending(rig, e) == 0


def _msi_enabled(rig: Rig, cap: int) -> bool:
    assert rig.toy.ctx is not None
    offset = rig.machine._devices[NAME].config.caps[cap]
    bit = 0x1 if cap == CapId.MSI else 0x8000
    return bool(rig.toy.ctx.config_read(offset + 2, 2) & bit)


def test_msi_sets_the_enable_bit_the_device_sees(rig: Rig) -> None:
    _, _, d = rig.device()
    e = rig.k.eventfd()
    assert not _msi_enabled(rig, CapId.MSI)
    rig.eventfds(d, PciIrq.MSI, [e])
    assert _msi_enabled(rig, CapId.MSI)
    # The user's view of MSI control is virtual, as in vfio_pci_config.c.
    offset = rig.machine._devices[NAME].config.caps[CapId.MSI]
    assert not rig.cfg_read(d, offset + 2, 2) & 0x1
    rig.disable(d, PciIrq.MSI)
    assert not _msi_enabled(rig, CapId.MSI)


def test_msix_sets_the_enable_bit(rig: Rig) -> None:
    _, _, d = rig.device()
    rig.eventfds(d, PciIrq.MSIX, [rig.k.eventfd()])
    assert _msi_enabled(rig, CapId.MSIX)
    rig.disable(d, PciIrq.MSIX)
    assert not _msi_enabled(rig, CapId.MSIX)


def test_msi_delivery_needs_bus_master(rig: Rig) -> None:
    _, _, d = rig.device()
    e0, e1 = rig.k.eventfd(), rig.k.eventfd()
    rig.eventfds(d, PciIrq.MSI, [e0, e1])
    ctx = rig.toy.ctx
    assert ctx is not None
    with rig.machine.expect_faults("bus_master"):
        ctx.send_msi(1)
    assert pending(rig, e1) == 0
    (dropped,) = rig.machine.faults.of("bus_master")
    assert "MSI vector 1 dropped: Bus Master is off" in dropped.message
    rig.bus_master(d)
    ctx.send_msi(1)
    ctx.send_msi(1)
    assert (pending(rig, e0), pending(rig, e1)) == (0, 2)  # an eventfd counts
    with rig.machine.expect_faults("interrupt"):
        ctx.send_msi(3)  # not allocated
        ctx.send_msix(0)  # MSI-X is not enabled
    assert rig.machine.faults.count("interrupt") == 2


def test_msi_vector_minus_one_disables_it(rig: Rig) -> None:
    _, _, d = rig.device()
    rig.bus_master(d)
    e0, e1 = rig.k.eventfd(), rig.k.eventfd()
    rig.eventfds(d, PciIrq.MSI, [e0, e1])
    rig.eventfds(d, PciIrq.MSI, [-1], start=1)
    assert rig.toy.ctx is not None
    with rig.machine.expect_faults("interrupt"):
        rig.toy.ctx.send_msi(1)
    assert pending(rig, e1) == 0
    rig.toy.ctx.send_msi(0)
    assert pending(rig, e0) == 1


def test_msi_loopback_signals_vectors(rig: Rig) -> None:
    _, _, d = rig.device()
    e0, e1 = rig.k.eventfd(), rig.k.eventfd()
    rig.eventfds(d, PciIrq.MSIX, [e0, e1])
    rig.irq_set(d, IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_TRIGGER, 2, 0, 2, b"\0\1")
    assert (pending(rig, e0), pending(rig, e1)) == (0, 1)
    rig.irq_set(d, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, 2, 0, 2)
    assert (pending(rig, e0), pending(rig, e1)) == (1, 1)


def test_delivery_survives_the_driver_closing_its_eventfd(rig: Rig) -> None:
    _, _, d = rig.device()
    rig.bus_master(d)
    e = rig.k.eventfd()
    rig.eventfds(d, PciIrq.MSI, [e])
    rig.k.close(e)
    other = rig.k.eventfd()  # may reuse the number: it must not get the interrupt
    assert rig.toy.ctx is not None
    rig.toy.ctx.send_msi(0)
    assert pending(rig, other) == 0


def test_device_close_disables_interrupts(rig: Rig) -> None:
    _, _, d = rig.device()
    e = rig.k.eventfd()
    rig.eventfds(d, PciIrq.MSIX, [e])
    rig.eventfds(d, PciIrq.REQ, [e])
    rig.k.close(d)
    assert not _msi_enabled(rig, CapId.MSIX)
    assert [line for line in rig.machine.leaks() if NAME in line] == []


def test_req_and_err(machine: Machine) -> None:
    machine.add_device(Toy(pcie=True), name=NAME, group=GROUP)
    rig = Rig(machine, Toy())
    _, _, d = rig.device()
    req, err = rig.k.eventfd(), rig.k.eventfd()
    assert machine.request_release(NAME) is False
    rig.eventfds(d, PciIrq.REQ, [req])
    rig.eventfds(d, PciIrq.ERR, [err])
    assert machine.request_release(NAME) is True
    assert machine.report_error(NAME) is True
    assert (pending(rig, req), pending(rig, err)) == (1, 1)
    rig.irq_set(d, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, PciIrq.REQ, 0, 1)
    assert pending(rig, req) == 1  # loopback
    rig.irq_set(d, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, PciIrq.REQ, 0, 0)
    assert machine.request_release(NAME) is False


@pytest.mark.parametrize("kind", [PciIrq.MSI, PciIrq.MSIX])
def test_enable_with_a_bad_fd_changes_nothing(rig: Rig, kind: int) -> None:
    _, _, d = rig.device()
    good = rig.k.eventfd()
    with pytest.raises(OSError):
        rig.eventfds(d, kind, [good, 10_000])
    assert not any("vector" in line for line in rig.machine.leaks())
    rig.eventfds(d, kind, [good])


def test_intx_enabled_without_an_eventfd(rig: Rig) -> None:
    _, _, d = rig.device()
    rig.irq_set(
        d, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER, 0, 0, 1, struct.pack("<i", -1)
    )
    assert f"{NAME}: INTx enabled (no eventfd)" in rig.machine.leaks()
