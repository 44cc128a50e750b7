"""edu conformance: register-by-register checks of an open edu `aiovfio.Device`.

The same script runs unchanged against aiovfio's simulated edu
(`aiovfio.sim.models.Edu`) and against QEMU's real edu bound to vfio-pci in the
aiovfio QEMU guest, so a difference between the model and QEMU shows up as a
failed check on one side:

    async with aiovfio.open_device(bdf, kernel=kernel) as device:
        report = await check_edu(device)
    assert report.ok, report

    python tests/conformance/edu_conformance.py                 # simulated
    aiovfio vm -- python tests/conformance/edu_conformance.py   # QEMU's edu

Only behaviour that both sides share by design is checked (DEVICES.md part B):
every DMA stays inside the device buffer and moves at most 4095 bytes (QEMU
< 8.2.1 aborts the whole VM otherwise), every IOVA is below 256 MiB (edu's
dma_mask) and mapped, so nothing is clamped or faults. The script sets Memory
Space and Bus Master itself (vfio-pci leaves them clear), acknowledges what a
previous run left pending, and waits with generous timeouts because the guest
runs under TCG. 8-byte register accesses are checked only where they reach the
device as one access (an mmap'd BAR, or the simulator's exact-width trap):
Linux before 6.11 splits an 8-byte pread into two 4-byte ones.
"""

from __future__ import annotations

import enum
import sys
import traceback
from collections.abc import Awaitable, Callable

import anyio
from attrs import define, field, frozen

import aiovfio
from aiovfio._uapi.pci import CapId, Cfg, MsiCtrl

__all__ = ["Check", "EduConformance", "check_edu", "main"]

EDU_IDS = (0x1234, 0x11E8)
EDU_REVISION = 0x10
EDU_CLASS = 0x00FF00
EDU_SUBSYSTEM = (0x1AF4, 0x1100)
EDU_IDENT = 0x010000ED
EDU_BAR_SIZE = 1 << 20
EDU_DMA_MASK = (1 << 28) - 1
DEVICE_BUFFER = 0x40000
#: The longest transfer every QEMU version survives (< 8.2.1 is off by one).
DMA_MAX = 4095
ONES32 = 0xFFFF_FFFF
ONES64 = (1 << 64) - 1
PAGE = 4096
#: Seconds to wait for the device: TCG is slow and a DMA takes 100 ms of guest time.
WAIT = 20.0
POLL = 0.001
#: A factorial QEMU's thread needs a noticeable time for (it loops n times): the
#: window in which "a read during computation returns n" can be seen.
SLOW_FACTORIAL = 0x1000_0000


class Reg(enum.IntEnum):
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
    IRQFACT = 0x80


class Cmd(enum.IntFlag):
    RUN = 0x1
    TO_RAM = 0x2
    IRQ = 0x4


IRQ_FACTORIAL = 0x001
IRQ_DMA = 0x100


@frozen
class Check:
    """One expectation and what the device did."""

    section: str
    name: str
    ok: bool | None  # None: skipped
    detail: str = ""

    def __str__(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[self.ok]
        return f"{mark} {self.section}: {self.name}" + (f" ({self.detail})" if self.detail else "")


@define
class EduConformance:
    """Every check of one run, in order."""

    device: str
    checks: list[Check] = field(factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and not self.failures

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    def __str__(self) -> str:
        passed = sum(1 for c in self.checks if c.ok)
        skipped = sum(1 for c in self.checks if c.ok is None)
        head = (
            f"edu conformance of {self.device}: {passed} passed, "
            f"{len(self.failures)} failed, {skipped} skipped"
        )
        return "\n".join([head, *(f"  {c}" for c in self.checks)])


@define
class _Run:
    device: aiovfio.Device
    bar: aiovfio.Region
    report: EduConformance
    section: str = ""

    @property
    def exact_8_byte(self) -> bool:
        """Whether an 8-byte access reaches the device as one access."""
        return self.bar.mapped or self.device.kernel.name == "sim"

    def expect(self, name: str, got: object, want: object) -> bool:
        ok = got == want
        shown = hex if isinstance(want, int) and not isinstance(want, bool) else repr
        detail = "" if ok else f"got {_show(got, shown)}, want {_show(want, shown)}"
        self.report.checks.append(Check(self.section, name, ok, detail))
        return ok

    def skip(self, name: str, why: str) -> None:
        self.report.checks.append(Check(self.section, name, None, why))

    def fail(self, name: str, detail: str) -> None:
        self.report.checks.append(Check(self.section, name, False, detail))

    # --- device helpers --------------------------------------------------------------
    async def interrupt(self, irq: aiovfio.InterruptStream, what: str) -> int:
        """Wait for `irq`; a timeout fails the section saying which wait it was."""
        with anyio.move_on_after(WAIT) as scope:
            return await irq.receive()
        assert scope.cancelled_caught
        raise TimeoutError(f"no interrupt within {WAIT} s {what}")

    def ack_all(self) -> None:
        pending = self.bar.read32(Reg.IRQ_STATUS)
        if pending:
            self.bar.write32(Reg.IRQ_ACK, pending)

    async def idle(self) -> None:
        """Wait for a factorial or DMA in progress (also one a previous run left going)."""
        for reg, bit, what in (
            (Reg.STATUS, Status.COMPUTING, "factorial"),
            (Reg.DMA_CMD, Cmd.RUN, "DMA"),
        ):
            with anyio.move_on_after(WAIT):
                while self.bar.read32(reg) & bit:  # noqa: ASYNC110 - polling is the point
                    await anyio.sleep(POLL)
                continue
            raise TimeoutError(f"the {what} did not finish within {WAIT} s")

    async def factorial(self, n: int) -> int:
        self.bar.write32(Reg.FACTORIAL, n)
        await self.idle()
        return self.bar.read32(Reg.FACTORIAL)

    def start_dma(self, src: int, dst: int, count: int, cmd: int) -> None:
        for reg, value in ((Reg.DMA_SRC, src), (Reg.DMA_DST, dst), (Reg.DMA_COUNT, count)):
            self.bar.write32(reg, value)  # all below 4 GiB: a 4-byte write zero-extends
        self.bar.write32(Reg.DMA_CMD, cmd)


def _show(value: object, shown: Callable[[int], str]) -> str:
    return shown(value) if isinstance(value, int) and not isinstance(value, bool) else repr(value)


# --- sections ---------------------------------------------------------------------------


async def _identity(run: _Run) -> None:
    cfg = run.device.config
    run.expect("vendor:device", (cfg.vendor_id, cfg.device_id), EDU_IDS)
    run.expect("revision", cfg.revision, EDU_REVISION)
    run.expect("class code", cfg.class_code, EDU_CLASS)
    subsystem = (cfg.read16(Cfg.SUBSYSTEM_VENDOR_ID), cfg.read16(Cfg.SUBSYSTEM_ID))
    run.expect("subsystem", subsystem, EDU_SUBSYSTEM)
    run.expect("interrupt pin", cfg.read8(Cfg.INTERRUPT_PIN), 1)
    caps = [c.id for c in cfg.capabilities()]
    run.expect("capabilities", caps, [CapId.MSI])
    msi = cfg.find_capability(CapId.MSI)
    if msi is not None:
        ctrl = cfg.read16(msi.offset + 2)
        run.expect("MSI: 64-bit", bool(ctrl & MsiCtrl.ADDR64), True)
        run.expect("MSI: one vector", ctrl & MsiCtrl.QMASK, 0)
        run.expect("MSI: no per-vector mask", bool(ctrl & MsiCtrl.MASKBIT), False)
    irqs = {kind: run.device.irq_info(kind).count for kind in ("intx", "msi", "msix")}
    run.expect("IRQ vectors", irqs, {"intx": 1, "msi": 1, "msix": 0})
    run.expect("BAR0 size", run.bar.size, EDU_BAR_SIZE)


async def _registers(run: _Run) -> None:
    bar = run.bar
    run.expect("ident", bar.read32(Reg.IDENT), EDU_IDENT)
    bar.write32(Reg.LIVENESS, 0x12345678)
    run.expect("liveness of 0x12345678", bar.read32(Reg.LIVENESS), 0xEDCBA987)
    bar.write32(Reg.LIVENESS, 0)
    run.expect("liveness of 0", bar.read32(Reg.LIVENESS), ONES32)
    bar.write32(Reg.IDENT, 0)
    run.expect("ident is read-only", bar.read32(Reg.IDENT), EDU_IDENT)
    for offset in (0x0C, 0x10, 0x28, Reg.IRQ_RAISE, Reg.IRQ_ACK, 0x84, 0xA0, 0x1000):
        run.expect(f"{offset:#x} reads all-ones", bar.read32(offset), ONES32)
    bar.write32(Reg.STATUS, Status.IRQFACT | Status.COMPUTING)
    run.expect("status: IRQFACT set, COMPUTING read-only", bar.read32(Reg.STATUS), Status.IRQFACT)
    bar.write32(Reg.STATUS, 0)
    run.expect("status: IRQFACT cleared", bar.read32(Reg.STATUS), 0)


async def _access_widths(run: _Run) -> None:
    bar = run.bar
    bar.write32(Reg.LIVENESS, 0x0F0F0F0F)
    run.expect("2-byte read reads 0", bar.read16(Reg.IDENT), 0)
    run.expect("1-byte read reads 0", bar.read8(Reg.IDENT), 0)
    bar.write16(Reg.LIVENESS, 0x1234)
    bar.write8(Reg.LIVENESS, 0x56)
    run.expect("1/2-byte writes are dropped", bar.read32(Reg.LIVENESS), 0xF0F0F0F0)
    if not run.exact_8_byte:
        run.skip("8-byte accesses", "this kernel splits an 8-byte pread in two")
        return
    run.expect("8-byte read below 0x80 is all-ones", bar.read64(Reg.IDENT), ONES64)
    bar.write64(Reg.IDENT, 0)  # covers ident and liveness: ignored whole
    run.expect("8-byte write below 0x80 is ignored", bar.read32(Reg.LIVENESS), 0xF0F0F0F0)
    run.expect("8-byte read of unimplemented 0xa0 is all-ones", bar.read64(0xA0), ONES64)


async def _dma_registers(run: _Run) -> None:
    bar = run.bar
    await run.idle()
    for reg in (Reg.DMA_SRC, Reg.DMA_DST, Reg.DMA_COUNT):
        bar.write32(reg, 0x89ABCDEF)
        run.expect(f"{reg.name} 4-byte write/read", bar.read32(reg), 0x89ABCDEF)
        run.expect(f"{reg.name}+4 decodes nothing", bar.read32(reg + 4), ONES32)
        bar.write32(reg + 4, 0x1)
        if run.exact_8_byte:
            run.expect(f"{reg.name} 4-byte write zero-extends", bar.read64(reg), 0x89ABCDEF)
            bar.write64(reg, 0x1_2345_6000)
            run.expect(f"{reg.name} 8-byte write/read", bar.read64(reg), 0x1_2345_6000)
            run.expect(f"{reg.name} 4-byte read is the low half", bar.read32(reg), 0x2345_6000)
            bar.write32(reg, 0x10)
            run.expect(f"{reg.name} 4-byte write clears the high half", bar.read64(reg), 0x10)
    before = bar.read32(Reg.DMA_CMD)
    bar.write32(Reg.DMA_CMD, Cmd.TO_RAM | Cmd.IRQ)  # no RUN: ignored
    run.expect("a cmd write without RUN is ignored", bar.read32(Reg.DMA_CMD), before)
    run.expect("no transfer started", bar.read32(Reg.DMA_CMD) & Cmd.RUN, 0)


async def _factorial(run: _Run) -> None:
    await run.idle()
    run.bar.write32(Reg.STATUS, 0)
    for n, want in ((0, 1), (1, 1), (5, 120), (10, 3628800), (12, 479001600), (13, 1932053504)):
        run.expect(f"{n}!", await run.factorial(n), want)
    run.expect("34! mod 2**32", await run.factorial(34), 0)


async def _factorial_in_progress(run: _Run) -> None:
    """'Forgot to wait': a read during the computation returns n; writes are ignored."""
    bar = run.bar
    await run.idle()
    bar.write32(Reg.FACTORIAL, SLOW_FACTORIAL)
    status = bar.read32(Reg.STATUS)
    value = bar.read32(Reg.FACTORIAL)
    bar.write32(Reg.FACTORIAL, 5)  # ignored while computing
    run.expect("COMPUTING right after the write", status & Status.COMPUTING, Status.COMPUTING)
    run.expect("a read during computation returns n", value, SLOW_FACTORIAL)
    await run.idle()
    run.expect("the write during computation was ignored", bar.read32(Reg.FACTORIAL), 0)


async def _interrupts_msi(run: _Run) -> None:
    bar = run.bar
    await run.idle()
    run.ack_all()
    async with run.device.interrupts("msi") as (irq,):
        bar.write32(Reg.IRQ_RAISE, 0xCAFE0000)
        await run.interrupt(irq, "after a raise")
        run.expect("raise: status echoes the value", bar.read32(Reg.IRQ_STATUS), 0xCAFE0000)
        bar.write32(Reg.IRQ_ACK, 0xCAFE0000)
        run.expect("ack clears it", bar.read32(Reg.IRQ_STATUS), 0)

        # Each raise sends a message, even with bits pending; but two messages
        # in quick succession may merge in the CPU's interrupt controller (one
        # IRR bit per vector), so count at least one, not exactly two.
        bar.write32(Reg.IRQ_RAISE, 0x2)
        bar.write32(Reg.IRQ_RAISE, 0x4)
        await run.interrupt(irq, "after two raises")
        run.expect("status ORs the raises", bar.read32(Reg.IRQ_STATUS), 0x6)
        bar.write32(Reg.IRQ_ACK, 0x2)
        run.expect("a partial ack leaves the rest", bar.read32(Reg.IRQ_STATUS), 0x4)
        bar.write32(Reg.IRQ_ACK, 0x4)

        bar.write32(Reg.STATUS, Status.IRQFACT)
        bar.write32(Reg.FACTORIAL, 10)
        await run.interrupt(irq, "after a factorial with IRQFACT")
        run.expect("factorial IRQ: status bit 0x1", bar.read32(Reg.IRQ_STATUS), IRQ_FACTORIAL)
        run.expect("factorial IRQ: the value", bar.read32(Reg.FACTORIAL), 3628800)
        run.expect("factorial IRQ: not computing", bar.read32(Reg.STATUS), Status.IRQFACT)
        bar.write32(Reg.IRQ_ACK, IRQ_FACTORIAL)
        bar.write32(Reg.STATUS, 0)
        run.expect("factorial IRQ acknowledged", bar.read32(Reg.IRQ_STATUS), 0)


async def _interrupts_intx(run: _Run) -> None:
    bar = run.bar
    await run.idle()
    run.ack_all()
    async with run.device.interrupts("intx") as (irq,):
        for value in (0x10, 0x20):  # twice: the unmask re-arms the line
            bar.write32(Reg.IRQ_RAISE, value)
            await run.interrupt(irq, f"INTx after raising {value:#x}")
            run.expect(f"INTx raise {value:#x}", bar.read32(Reg.IRQ_STATUS), value)
            bar.write32(Reg.IRQ_ACK, value)
            irq.unmask()
        run.expect("INTx acknowledged", bar.read32(Reg.IRQ_STATUS), 0)


async def _dma(run: _Run) -> None:
    bar = run.bar
    await run.idle()
    run.ack_all()
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(DMA_MAX))
    async with (
        run.device.dma_buffer(3 * PAGE, dma_mask=EDU_DMA_MASK) as buf,
        run.device.interrupts("msi") as (irq,),
    ):
        run.expect("IOVA below the DMA mask", buf.iova + buf.size - 1 <= EDU_DMA_MASK, True)
        a, b, c = buf.iova, buf.iova + PAGE, buf.iova + 2 * PAGE
        buf.view[:DMA_MAX] = pattern

        run.start_dma(a, DEVICE_BUFFER, DMA_MAX, Cmd.RUN | Cmd.IRQ)
        run.expect("RUN is set while the transfer is pending", bar.read32(Reg.DMA_CMD) & Cmd.RUN, 1)
        bar.write32(Reg.DMA_SRC, 0x1234)  # ignored while RUN
        run.expect("registers are frozen while RUN", bar.read32(Reg.DMA_SRC), a)
        await run.interrupt(irq, "after a DMA to the device")
        run.expect("RAM->device: IRQ 0x100", bar.read32(Reg.IRQ_STATUS), IRQ_DMA)
        run.expect("RAM->device: cmd keeps IRQ, RUN clear", bar.read32(Reg.DMA_CMD), Cmd.IRQ)
        bar.write32(Reg.IRQ_ACK, IRQ_DMA)

        run.start_dma(DEVICE_BUFFER, b, DMA_MAX, Cmd.RUN | Cmd.TO_RAM | Cmd.IRQ)
        await run.interrupt(irq, "after a DMA to RAM")
        bar.write32(Reg.IRQ_ACK, IRQ_DMA)
        run.expect(
            "device->RAM: cmd keeps DIR and IRQ", bar.read32(Reg.DMA_CMD), Cmd.TO_RAM | Cmd.IRQ
        )
        run.expect("round trip of 4095 bytes", bytes(buf.view[PAGE : PAGE + DMA_MAX]), pattern)
        run.expect("nothing past the count", buf.view[PAGE + DMA_MAX], 0)

        # Polled, without the IRQ bit, at an offset inside the device buffer.
        run.start_dma(DEVICE_BUFFER + 0x800, c, 16, Cmd.RUN | Cmd.TO_RAM)
        await run.idle()
        run.expect("no IRQ without the IRQ bit", bar.read32(Reg.IRQ_STATUS), 0)
        run.expect(
            "device buffer offset 0x800",
            bytes(buf.view[2 * PAGE : 2 * PAGE + 16]),
            pattern[0x800:0x810],
        )


async def _cleanup(run: _Run) -> None:
    await run.idle()
    run.ack_all()
    run.bar.write32(Reg.STATUS, 0)
    run.expect("left idle", run.bar.read32(Reg.IRQ_STATUS), 0)


_SECTIONS: tuple[tuple[str, Callable[[_Run], Awaitable[None]]], ...] = (
    ("identity", _identity),
    ("registers", _registers),
    ("access widths", _access_widths),
    ("DMA registers", _dma_registers),
    ("factorial", _factorial),
    ("factorial in progress", _factorial_in_progress),
    ("MSI", _interrupts_msi),
    ("INTx", _interrupts_intx),
    ("DMA", _dma),
    ("cleanup", _cleanup),
)


async def check_edu(device: aiovfio.Device) -> EduConformance:
    """Run every section on `device`; a section that raises is one failed check."""
    report = EduConformance(device.name)
    device.config.enable(bus_master=True)
    run = _Run(device, device.bar(0), report)
    for section, body in _SECTIONS:
        run.section = section
        try:
            await body(run)
        except Exception as exc:  # one broken section must not hide the others
            run.fail("raised", "".join(traceback.format_exception_only(exc)).strip())
    return report


async def _run(bdf: str | None) -> EduConformance:
    from aiovfio.testing.target import in_guest, real_target, sim_target

    if bdf is not None:  # a real edu, on this machine's kernel
        async with aiovfio.open_device(bdf) as device:
            return await check_edu(device)
    target = real_target() if in_guest() else sim_target()
    try:
        async with aiovfio.open_device(target.edu, kernel=target.kernel) as device:
            report = await check_edu(device)
        leaks = target.leaks()
        if leaks:
            report.checks.append(Check("cleanup", "nothing leaked", False, repr(leaks)))
        return report
    finally:
        target.close()


def main(argv: list[str] | None = None) -> int:
    """`[BDF]`: a real edu at BDF; without one the simulated edu, or the guest's."""
    args = sys.argv[1:] if argv is None else argv
    report = anyio.run(_run, args[0] if args else None)
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
