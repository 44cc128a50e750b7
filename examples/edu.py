"""A driver for QEMU's `edu` teaching device, on the simulated machine or real VFIO.

    python examples/edu.py                 # the simulated machine (no root, no hardware)
    python examples/edu.py 0000:00:04.0    # a real edu bound to vfio-pci (root)
    python -m aiovfio demo                 # the same as the first line

It reads the identification, checks liveness, computes factorials (polled,
announced by an MSI, and by INTx with unmask), raises a software interrupt,
and does a DMA round trip through the IOMMU. Register facts: QEMU's
hw/misc/edu.c and docs/specs/edu.rst.
"""

from __future__ import annotations

import argparse
import enum
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
from attrs import define, field

import aiovfio
from aiovfio.kernel import Kernel

__all__ = ["Edu", "EduReg", "DemoReport", "run_demo", "main", "SIM_BDF"]

SIM_BDF = "0000:00:04.0"
EDU_IDS = (0x1234, 0x11E8)
DMA_MASK = (1 << 28) - 1  # edu drops IOVA bits above 28
DEVICE_BUFFER = 0x40000  # edu's internal 4 KiB DMA buffer, in device address space
#: QEMU < 8.2.1 aborts the VM on a transfer that ends at 0x41000: stay one short.
DMA_LENGTH = 4095


class EduReg(enum.IntEnum):
    IDENT = 0x00
    LIVENESS = 0x04
    FACTORIAL = 0x08
    STATUS = 0x20
    IRQ_STATUS = 0x24
    IRQ_RAISE = 0x60
    IRQ_ACK = 0x64
    DMA_SRC = 0x80
    DMA_DST = 0x88
    DMA_COUNT = 0x90
    DMA_CMD = 0x98


class Status(enum.IntFlag):
    COMPUTING = 0x01
    IRQ_ON_FACTORIAL = 0x80


class DmaCmd(enum.IntFlag):
    RUN = 0x1
    TO_RAM = 0x2
    IRQ = 0x4


IRQ_FACTORIAL = 0x1
IRQ_DMA = 0x100


@define
class Edu:
    """The edu driver: register access on BAR0 of an open `aiovfio.Device`."""

    device: aiovfio.Device
    bar: aiovfio.Region = field(init=False)

    def __attrs_post_init__(self) -> None:
        cfg = self.device.config
        ids = (cfg.vendor_id, cfg.device_id)
        if ids != EDU_IDS:
            raise aiovfio.DeviceNotFound(
                f"{self.device.name} is {ids[0]:04x}:{ids[1]:04x}, not an edu device (1234:11e8)"
            )
        cfg.enable(bus_master=True)  # Memory Space + Bus Master: vfio-pci leaves them to us
        self.device.dma_mask = DMA_MASK
        self.bar = self.device.bar(0)

    # --- registers ------------------------------------------------------------------

    def ident(self) -> tuple[int, int]:
        """(major, minor) version from the identification register (0xRRrr00ED)."""
        value = self.bar.read32(EduReg.IDENT)
        if value & 0xFF != 0xED:
            raise aiovfio.DeviceFault(f"edu identification reads {value:#010x}, not 0x....00ed")
        return (value >> 24, (value >> 16) & 0xFF)

    def liveness(self, value: int) -> int:
        """Write `value`; the device answers with its bitwise inverse."""
        self.bar.write32(EduReg.LIVENESS, value)
        return self.bar.read32(EduReg.LIVENESS)

    def ack(self) -> int:
        """Acknowledge every pending interrupt source; return what was pending."""
        pending = self.bar.read32(EduReg.IRQ_STATUS)
        if pending:
            self.bar.write32(EduReg.IRQ_ACK, pending)
        return pending

    # --- factorial ------------------------------------------------------------------

    async def factorial_polled(self, n: int) -> int:
        """n! mod 2**32, polling the COMPUTING bit (yielding between reads)."""
        self.bar.write32(EduReg.STATUS, 0)
        self.bar.write32(EduReg.FACTORIAL, n)
        # Polling is this method's point (the IRQ variants below do it right).
        while self.bar.read32(EduReg.STATUS) & Status.COMPUTING:  # noqa: ASYNC110
            await anyio.sleep(0.0005)
        return self.bar.read32(EduReg.FACTORIAL)

    async def factorial_irq(self, n: int, irq: aiovfio.InterruptStream, *, intx: bool) -> int:
        """n! mod 2**32, announced by the device's interrupt."""
        self.bar.write32(EduReg.STATUS, Status.IRQ_ON_FACTORIAL)
        self.bar.write32(EduReg.FACTORIAL, n)
        await irq.receive()
        pending = self.ack()
        if intx:
            irq.unmask()  # VFIO masked INTx when it fired
        if not pending & IRQ_FACTORIAL:
            raise aiovfio.DeviceFault(f"edu interrupt status {pending:#x} lacks the factorial bit")
        self.bar.write32(EduReg.STATUS, 0)
        return self.bar.read32(EduReg.FACTORIAL)

    async def raise_irq(self, value: int, irq: aiovfio.InterruptStream, *, intx: bool) -> int:
        """Raise a software interrupt with `value`; return the status the handler saw."""
        self.bar.write32(EduReg.IRQ_RAISE, value)
        await irq.receive()
        pending = self.ack()
        if intx:
            irq.unmask()
        return pending

    # --- DMA ------------------------------------------------------------------------

    async def dma(
        self,
        src: int,
        dst: int,
        length: int,
        irq: aiovfio.InterruptStream,
        *,
        to_ram: bool,
        intx: bool = False,
    ) -> None:
        """One DMA transfer, waited for with the completion interrupt."""
        self.bar.write64(EduReg.DMA_SRC, src)
        self.bar.write64(EduReg.DMA_DST, dst)
        self.bar.write64(EduReg.DMA_COUNT, length)
        cmd = DmaCmd.RUN | DmaCmd.IRQ | (DmaCmd.TO_RAM if to_ram else 0)
        self.bar.write64(EduReg.DMA_CMD, cmd)
        await irq.receive()
        pending = self.ack()
        if intx:
            irq.unmask()
        if not pending & IRQ_DMA:
            raise aiovfio.DeviceFault(f"edu interrupt status {pending:#x} lacks the DMA bit")

    async def dma_round_trip(
        self, irq: aiovfio.InterruptStream, length: int = DMA_LENGTH, *, intx: bool = False
    ) -> bool:
        """RAM page A -> device buffer -> RAM page B; True when B equals A."""
        async with self.device.dma_buffer(2 * 4096) as buf:
            a, b = buf.iova, buf.iova + 4096
            pattern = bytes((i * 7 + 3) & 0xFF for i in range(length))
            buf.view[:length] = pattern
            await self.dma(a, DEVICE_BUFFER, length, irq, to_ram=False, intx=intx)
            await self.dma(DEVICE_BUFFER, b, length, irq, to_ram=True, intx=intx)
            return bytes(buf.view[4096 : 4096 + length]) == pattern


@define
class DemoReport:
    """What the demo saw, for tests and for people."""

    version: tuple[int, int] = (0, 0)
    liveness_ok: bool = False
    factorials: dict[str, int] = field(factory=dict)
    soft_irq_status: int = 0
    dma_ok: bool = False
    interrupts: dict[str, int] = field(factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every step gave the value QEMU's edu gives."""
        return (
            self.version == (1, 0)
            and self.liveness_ok
            and self.dma_ok
            and self.soft_irq_status == 0xCAFE0000
            and self.factorials.get("polled 10!") == 3628800
            and self.factorials.get("msi 12!") == 479001600
            and self.factorials.get("intx 12!") == 479001600
        )


@asynccontextmanager
async def _simulated() -> AsyncIterator[tuple[Kernel, object]]:
    from aiovfio.sim import Machine
    from aiovfio.sim.models import Edu as EduModel

    machine = Machine()
    try:
        machine.add_device(EduModel(), name=SIM_BDF)
        yield machine.kernel, machine
    finally:
        leaks = machine.leaks()
        machine.close()
        if leaks:
            raise aiovfio.VfioError(f"the demo leaked: {leaks}")


async def run_demo(
    bdf: str | None = None, *, kernel: Kernel | None = None, say: Callable[[str], None] = print
) -> DemoReport:
    """Drive an edu device through every feature; on the simulated machine when `bdf` is None."""
    report = DemoReport()
    if bdf is None and kernel is None:
        async with _simulated() as (sim_kernel, machine):
            say(f"simulated machine: {machine!r}")
            await _drive(SIM_BDF, sim_kernel, report, say)
    else:
        await _drive(bdf or SIM_BDF, kernel, report, say)
    return report


async def _drive(
    bdf: str, kernel: Kernel | None, report: DemoReport, say: Callable[[str], None]
) -> None:
    async with aiovfio.open_device(bdf, kernel=kernel) as device:
        edu = Edu(device)
        say(f"opened {device!r}")
        report.version = edu.ident()
        say(f"  edu v{report.version[0]}.{report.version[1]} at {bdf}, BAR0 {edu.bar!r}")
        report.liveness_ok = edu.liveness(0x12345678) == 0xEDCBA987
        say(f"  liveness: wrote 0x12345678, read back its inverse: {report.liveness_ok}")

        report.factorials["polled 10!"] = await edu.factorial_polled(10)
        say(f"  10! polled                 = {report.factorials['polled 10!']}")

        for kind in ("msi", "intx"):
            intx = kind == "intx"
            async with device.interrupts(kind) as (irq,):
                value = await edu.factorial_irq(12, irq, intx=intx)
                report.factorials[f"{kind} 12!"] = value
                say(f"  12! announced by {kind:<5}     = {value}  ({irq!r})")
                if not intx:
                    report.soft_irq_status = await edu.raise_irq(0xCAFE0000, irq, intx=False)
                    say(f"  software interrupt        : status {report.soft_irq_status:#x}")
                    report.dma_ok = await edu.dma_round_trip(irq)
                    via = device.dma_space.backend  # container, iommufd or noiommu
                    say(
                        f"  DMA round trip ({DMA_LENGTH} B, {via}): "
                        f"{'bytes match' if report.dma_ok else 'MISMATCH'}"
                    )
                report.interrupts[kind] = irq.received
    say("closed everything: no fd, mapping or enabled interrupt left")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bdf", nargs="?", help="PCI address of a real edu (default: simulated)")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args(argv)
    try:
        report = anyio.run(run_demo, args.bdf, backend=args.backend)
    except aiovfio.VfioError as exc:
        print(f"edu: {exc}", file=sys.stderr)
        return 1
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
