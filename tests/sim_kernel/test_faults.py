"""Fault injection and the record of kernel calls."""

from __future__ import annotations

import contextlib
import errno
import os
import warnings
from collections.abc import Callable

import pytest

from aiovfio import InvalidArgument
from aiovfio._uapi.vfio import IrqSetFlag
from aiovfio.sim import Machine
from aiovfio.sim.faults import (
    FAULT_KINDS,
    KERNEL_OPERATIONS,
    BusMasterFault,
    DeviceErrorFault,
    SimFaultWarning,
)

from .rig import GROUP, NAME, PAGE, Rig, Toy, buffer


def test_inject_once(rig: Rig) -> None:
    injection = rig.machine.inject("open_container", errno.EMFILE)
    with pytest.raises(OSError) as info:
        rig.k.open_container()
    assert info.value.errno == errno.EMFILE
    assert "injected into open_container" in str(info.value)
    assert injection.fired == 1 and injection.exhausted
    rig.k.open_container()  # once only


def test_inject_nth_and_times(rig: Rig) -> None:
    rig.machine.inject("get_api_version", errno.EIO, nth=2, times=2)
    c = rig.container()
    assert rig.k.get_api_version(c) == 0
    for _ in range(2):
        with pytest.raises(OSError, match="injected"):
            rig.k.get_api_version(c)
    assert rig.k.get_api_version(c) == 0


def test_inject_always_until_cancelled(rig: Rig) -> None:
    injection = rig.machine.inject("pci_devices", errno.EACCES, times=None)
    for _ in range(3):
        with pytest.raises(OSError):
            rig.k.pci_devices()
    injection.cancel()
    assert rig.k.pci_devices() == (NAME,)


def test_injected_failure_changes_nothing(rig: Rig) -> None:
    c, _ = rig.attached()
    _buf, addr = buffer()
    rig.machine.inject("map_dma", errno.ENOMEM)
    with pytest.raises(OSError):
        rig.map(c, addr, 0, PAGE)
    assert not any("DMA" in line for line in rig.machine.leaks())
    before = os.listdir("/proc/self/fd")
    rig.machine.inject("open_group", errno.EBUSY)
    rig.machine.inject("eventfd", errno.EMFILE)
    with pytest.raises(OSError):
        rig.k.eventfd()
    assert os.listdir("/proc/self/fd") == before


def test_injected_close_still_closes(rig: Rig) -> None:
    c = rig.container()
    rig.machine.inject("close", errno.EIO)
    with pytest.raises(OSError) as info:
        rig.k.close(c)
    assert info.value.errno == errno.EIO
    with pytest.raises(OSError) as gone:
        os.fstat(c)
    assert gone.value.errno == errno.EBADF
    assert rig.machine.leaks() == []


def test_inject_rejects_unknown_operations(machine: Machine) -> None:
    with pytest.raises(ValueError, match="not a Kernel operation"):
        machine.inject("ioctl", errno.EIO)
    with pytest.raises(ValueError, match="nth"):
        machine.inject("close", errno.EIO, nth=0)
    with pytest.raises(ValueError, match="errno"):
        machine.inject("close", 0)


def test_kernel_calls_are_counted(rig: Rig) -> None:
    rig.device()
    calls = rig.machine.kernel_calls
    assert calls["open_container"] == 1
    assert calls["group_set_container"] == 1
    assert calls["group_get_device_fd"] == 1
    assert set(calls) <= KERNEL_OPERATIONS


def _scenario(rig: Rig) -> None:
    """A driver's life on the raw kernel, cleaning up on every exit path."""
    k = rig.k
    opened: list[int] = []
    mapped = False
    c = k.open_container()
    opened.append(c)
    try:
        assert k.get_api_version(c) == 0
        assert k.check_extension(c, 3) == 1
        g = k.open_group(GROUP)
        opened.append(g)
        k.group_set_container(g, c)
        k.set_iommu(c, 3)
        d = k.group_get_device_fd(g, NAME)
        opened.append(d)
        e = k.eventfd()
        opened.append(e)
        rig.eventfds(d, 1, [e])
        try:
            _buf, addr = buffer()
            rig.map(c, addr, 0, PAGE)
            mapped = True
            k.pwrite(d, b"\1\0\0\0", 0)
            k.pread(d, 4, 0)
        finally:
            if mapped:
                rig.unmap(c, 0, PAGE)
            rig.irq_set(d, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, 1, 0, 0)
    finally:
        for fd in reversed(opened):
            with contextlib.suppress(OSError):  # an injected close failure still closes
                k.close(fd)


def test_a_failure_at_every_kernel_call_leaks_nothing() -> None:
    """Enumerate the operations a scenario uses, then make each fail in turn."""
    with Machine(clock="manual") as m:
        m.add_device(Toy(), name=NAME, group=GROUP)
        _scenario(Rig(m, Toy()))
        used = dict(m.kernel_calls)
    assert {"open_container", "map_dma", "device_set_irqs", "close", "pread"} <= set(used)
    for op, count in used.items():
        for nth in range(1, count + 1):
            with Machine(clock="manual") as m:
                m.add_device(Toy(), name=NAME, group=GROUP)
                injection = m.inject(op, errno.EIO, nth=nth)
                raised: OSError | None = None
                try:
                    _scenario(Rig(m, Toy()))
                except OSError as exc:
                    raised = exc
                if op == "close":
                    assert raised is None  # the scenario swallows close errors
                else:
                    assert raised is not None and raised.errno == errno.EIO
                assert injection.fired == 1, f"{op} #{nth}"
                assert m.leaks() == [], f"{op} #{nth}"


def test_fault_log(rig: Rig) -> None:
    assert rig.toy.ctx is not None
    with pytest.warns(DeviceErrorFault, match="the model noticed something"):
        rig.toy.ctx.log_fault("the model noticed something")
    faults = rig.machine.faults
    assert len(faults) == 1 and faults.count("device") == 1
    assert "device fault on 0000:00:04.0" in str(next(iter(faults)))
    assert "device=1" in repr(faults)
    assert "the model noticed something" in repr(faults)  # the latest, with messages
    assert [r.message for r in faults.undeclared()] == ["the model noticed something"]
    faults.clear()
    assert faults.count() == 0


def test_fault_log_repr_shows_the_latest_few(rig: Rig) -> None:
    assert rig.toy.ctx is not None
    with rig.machine.expect_faults("device"):
        for i in range(5):
            rig.toy.ctx.log_fault(f"problem {i}")
    text = repr(rig.machine.faults)
    assert "problem 4" in text and "problem 2" in text and "problem 1" not in text
    assert "(2 earlier)" in text
    assert rig.machine.faults.undeclared() == []


def test_each_kind_warns_with_its_own_category() -> None:
    assert issubclass(BusMasterFault, SimFaultWarning)
    assert {c.kind for c in FAULT_KINDS.values()} == set(FAULT_KINDS)
    assert len(set(FAULT_KINDS.values())) == len(FAULT_KINDS) == 5


def test_a_fault_is_an_error_under_w_error(rig: Rig) -> None:
    assert rig.toy.ctx is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", SimFaultWarning)
        with pytest.raises(DeviceErrorFault, match="boom"):
            rig.toy.ctx.log_fault("boom")


def test_expect_faults_needs_the_fault_and_a_known_kind(rig: Rig) -> None:
    with pytest.raises(AssertionError, match="expected iommu fault"):
        with rig.machine.expect_faults("iommu"):
            pass
    with pytest.raises(InvalidArgument, match="bus_master"):
        rig.machine.expect_faults("bogus")


def test_faults_inside_a_kernel_call_warn_after_it(rig: Rig) -> None:
    """A warning raised as an error never interrupts the model half-way."""
    _, _, d = rig.device()
    rig.toy.on_write = lambda: rig.toy.ctx.log_fault("from a register write")  # type: ignore[union-attr]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SimFaultWarning)
        with pytest.raises(DeviceErrorFault, match="from a register write"):
            rig.k.pwrite(d, b"\1\0\0\0", 0)
    assert rig.toy.regs[(0, 0)] == 1  # the write itself completed


@pytest.mark.parametrize("op", sorted(KERNEL_OPERATIONS))
def test_every_operation_can_be_injected(machine: Machine, op: str) -> None:
    machine.inject(op, errno.EIO)
    method: Callable[..., object] = getattr(machine.kernel, op)
    assert callable(method)
