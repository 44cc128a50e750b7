"""Interrupt streams: MSI, INTx with unmask, errors (sim and real kernel)."""

from __future__ import annotations

import anyio
import pytest

import aiovfio
from aiovfio.testing.target import Target

pytestmark = pytest.mark.anyio

FACT, STATUS, IRQ_STATUS, IRQ_RAISE, IRQ_ACK = 0x08, 0x20, 0x24, 0x60, 0x64


@pytest.mark.kernel
async def test_msi_factorial_interrupt(vfio_target: Target) -> None:
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        dev.config.enable()
        bar = dev.bar(0)
        async with dev.interrupts("msi") as (irq,):
            bar.write32(STATUS, 0x80)
            bar.write32(FACT, 10)
            with anyio.fail_after(10):
                count = await irq.receive()
            assert count >= 1
            assert bar.read32(IRQ_STATUS) == 1
            bar.write32(IRQ_ACK, 1)
            assert bar.read32(IRQ_STATUS) == 0
            assert bar.read32(FACT) == 3628800
            assert irq.received == count
        assert irq.closed
    assert vfio_target.leaks() == []


@pytest.mark.kernel
async def test_intx_needs_unmask(vfio_target: Target) -> None:
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        dev.config.enable()
        bar = dev.bar(0)
        info = dev.irq_info("intx")
        assert info.count == 1
        async with dev.interrupts("intx") as (irq,):
            for value in (0x10, 0x20):
                bar.write32(IRQ_RAISE, value)
                with anyio.fail_after(10):
                    assert await irq.receive() >= 1
                assert bar.read32(IRQ_STATUS) == value
                bar.write32(IRQ_ACK, value)
                irq.unmask()
            assert irq.received >= 2


@pytest.mark.kernel
async def test_software_trigger_and_coalescing(vfio_target: Target) -> None:
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        async with dev.interrupts("msi") as (irq,):
            irq.trigger()
            irq.trigger()
            with anyio.fail_after(10):
                assert await irq.receive() == 2  # the eventfd coalesces


@pytest.mark.kernel
async def test_two_receivers_is_busy(vfio_target: Target) -> None:
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        async with dev.interrupts("msi") as (irq,):
            async with anyio.create_task_group() as tg:
                tg.start_soon(irq.receive)
                await anyio.wait_all_tasks_blocked()
                with pytest.raises(aiovfio.BusyResourceError, match="already receiving") as info:
                    await irq.receive()
                assert isinstance(info.value, anyio.BusyResourceError)  # for generic code
                irq.trigger()
            assert irq.received == 1


@pytest.mark.kernel
async def test_cancelled_wait_then_reopen(vfio_target: Target) -> None:
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        async with dev.interrupts("msi") as (irq,):
            with anyio.move_on_after(0.05) as scope:
                await irq.receive()
            assert scope.cancelled_caught
            irq.trigger()  # a count that arrives after the cancel is not lost
            with anyio.fail_after(10):
                assert await irq.receive() == 1
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        async with dev.interrupts("msi") as (irq,):
            assert not irq.closed
    assert vfio_target.leaks() == []


@pytest.mark.kernel
async def test_interrupt_arguments_are_checked(vfio_target: Target) -> None:
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as dev:
        with pytest.raises(aiovfio.InvalidArgument, match="unknown interrupt kind"):
            dev.interrupts("nmi")
        with pytest.raises(aiovfio.NotOffered, match="msix"):
            dev.interrupts("msix")  # edu has no MSI-X
        with pytest.raises(aiovfio.InvalidArgument, match="vector"):
            dev.interrupts("msi", 2)
        with pytest.raises(aiovfio.InvalidArgument):
            dev.interrupts("msi", 0)
        async with dev.interrupts("msi"):
            second = dev.interrupts("intx")  # the rule is checked on entry
            with pytest.raises(aiovfio.BusyResourceError, match="one of intx, msi, msix"):
                async with second:
                    pass
        async with dev.interrupts("intx") as (irq,):
            assert "intx" in repr(irq)
    assert vfio_target.leaks() == []


async def test_closing_stream_wakes_receiver(sim_machine: Target) -> None:
    async with aiovfio.open_device(sim_machine.edu, kernel=sim_machine.kernel) as dev:
        iset = dev.interrupts("msi")
        (irq,) = await iset.__aenter__()
        outcome: list[BaseException] = []

        async def receive() -> None:
            try:
                await irq.receive()
            except aiovfio.ClosedResourceError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            await iset.aclose()
        assert len(outcome) == 1 and isinstance(outcome[0], anyio.ClosedResourceError)
        with pytest.raises(aiovfio.ClosedResourceError):
            await irq.receive()
