"""nvme conformance: aiovfio.nvme against one controller, check by check.

The same script runs unchanged on aiovfio's simulated nvme and on QEMU's nvme
bound to vfio-pci in the aiovfio guest (whose namespace is a sparse image
that keeps data for the boot):

    python tests/nvme/nvme_conformance.py                  # simulated
    aiovfio vm --kernel 6.12 -- python tests/nvme/nvme_conformance.py

It checks: the identify strings and numbers QEMU sets; the namespace size;
patterns written and read back at sizes from one block to MDTS and past it
(split), through the bounced pair (read/write) and the zero-copy pair
(read_into/write_from, PRP1 offsets, PRP lists); unaligned or non-DMA
buffers refused as documented (the zero-copy pair never bounces); the
driver's refusal and the controller's own status (LBA Out of Range, DNR)
for an LBA past the end; a cancel in the middle of transfers (no command
left in flight, the controller still works, shuts down cleanly); and that
the controller opens and works again at once, with the data still there.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Awaitable, Callable

import anyio
from attrs import define, field, frozen

import aiovfio
from aiovfio.nvme import (
    Controller,
    Namespace,
    NvmeStatusError,
    TransferOutOfRange,
    open_controller,
)
from aiovfio.nvme.spec import IoOpcode

__all__ = ["NvmeConformance", "check_nvme", "main"]

QEMU_MODEL = "QEMU NVMe Ctrl"
QEMU_VID, QEMU_SSVID = 0x1B36, 0x1AF4
NQN_PREFIX = "nqn.2019-08.org.qemu:"
#: The sim target's Nvme() default, and the guest harness's sparse image.
SIM_BYTES, GUEST_BYTES = 64 << 20, 1 << 30
#: TCG is slow: generous command timeout.
COMMAND_TIMEOUT = 120.0


@frozen
class Check:
    section: str
    name: str
    ok: bool
    detail: str = ""

    def __str__(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        return f"{mark} {self.section}: {self.name}" + (f" ({self.detail})" if self.detail else "")


@define
class NvmeConformance:
    device: str
    checks: list[Check] = field(factory=list)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and not self.failures

    def __str__(self) -> str:
        head = (
            f"nvme conformance of {self.device}: {len(self.checks) - len(self.failures)} passed, "
            f"{len(self.failures)} failed"
        )
        return "\n".join([head, *(f"  {c}" for c in self.checks)])


@define
class _Run:
    device: aiovfio.Device
    report: NvmeConformance
    section: str = ""

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.report.checks.append(Check(self.section, name, bool(ok), detail))
        return bool(ok)

    async def guarded(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        try:
            await body()
        except Exception as exc:  # a check that raises is a failed check, the run goes on
            self.check(name, False, f"{type(exc).__name__}: {exc}")
            traceback.print_exc()


async def check_nvme(
    device: aiovfio.Device, *, expected_bytes: int | None = None
) -> NvmeConformance:
    """Run every check against an open nvme `device`."""
    run = _Run(device, NvmeConformance(device.name))
    async with open_controller(
        device, io_queues=2, queue_depth=16, command_timeout=COMMAND_TIMEOUT
    ) as ctrl:
        run.section = "identify"
        await run.guarded("identify", lambda: _identify(run, ctrl, expected_bytes))
        ns = ctrl.namespace(1)
        run.section = "patterns"
        await run.guarded("patterns", lambda: _patterns(run, device, ctrl, ns))
        run.section = "buffers"
        await run.guarded("buffers", lambda: _buffers(run, device, ns))
        run.section = "range"
        await run.guarded("range", lambda: _range(run, device, ns))
        run.section = "cancel"
        await run.guarded("cancel", lambda: _cancel(run, device, ctrl, ns))
    run.section = "shutdown"
    run.check("CC.SHN shutdown completed (SHST)", ctrl.shutdown_clean is True)
    bar = device.bar(0)
    run.check(
        "disabled after leaving: CC.EN=0, CSTS.RDY=0",
        bar.read32(0x14) & 1 == 0 and bar.read32(0x1C) & 1 == 0,
    )
    run.section = "reopen"
    await run.guarded("reopen", lambda: _reopen(run, device))
    return run.report


def _pattern(lba: int, nbytes: int) -> bytes:
    """Bytes that differ per LBA and per byte (a misplaced block shows)."""
    seed = (lba * 2654435761) & 0xFFFFFFFF
    return (seed.to_bytes(4, "little") + os.urandom(4)) * (nbytes // 8)


async def _identify(run: _Run, ctrl: Controller, expected_bytes: int | None) -> None:
    ident = ctrl.identify
    run.check("model number", ident.model == QEMU_MODEL, repr(ident.model))
    run.check(
        "serial number",
        bool(ident.serial) and ident.serial == ident.serial.strip(),
        repr(ident.serial),
    )
    run.check("firmware revision", bool(ident.firmware), repr(ident.firmware))
    run.check(
        "PCI vendor ids",
        (ident.vid, ident.ssvid) == (QEMU_VID, QEMU_SSVID),
        f"{ident.vid:#x}/{ident.ssvid:#x}",
    )
    run.check("subsystem NQN", ident.subnqn == NQN_PREFIX + ident.serial, ident.subnqn)
    run.check(
        "MDTS 7 (512 KiB)", ident.mdts == 7 and ctrl.max_transfer == 512 * 1024, str(ident.mdts)
    )
    run.check("NN 256", ident.nn == 256, str(ident.nn))
    run.check(
        "NVMe 1.4", ident.version == 0x10400 and ctrl.version == 0x10400, f"{ident.version:#x}"
    )
    run.check("CAP.MQES 2048 entries", ctrl.cap.mqes == 0x7FF, str(ctrl.cap.mqes))
    run.check("active namespaces [1]", ctrl.namespaces == (1,), str(ctrl.namespaces))
    ns = ctrl.namespace(1)
    run.check("LBA size 512", ns.block_size == 512, str(ns.block_size))
    if expected_bytes is not None:
        run.check("namespace size", ns.size == expected_bytes, f"{ns.blocks} blocks = {ns.size} B")
    run.check("two I/O queue pairs granted", ctrl.granted_queues >= 2 and len(ctrl.queues) == 2)


async def _patterns(run: _Run, device: aiovfio.Device, ctrl: Controller, ns: Namespace) -> None:
    bs = ns.block_size
    mdts_blocks = ctrl.max_transfer // bs
    sizes = [1, 8, 9, 16, 128, mdts_blocks, mdts_blocks + 8]
    lba = 64
    for blocks in sizes:
        data = _pattern(lba, blocks * bs)
        await ns.write(lba, data)
        back = await ns.read(lba, blocks)
        run.check(f"write/read {blocks} block(s) at LBA {lba}", back == data)
        lba += blocks + 3
    # The zero-copy pair, at PRP1 offsets 0, 512 and 4 (dword), up to MDTS.
    async with device.dma_buffer(ctrl.max_transfer + 8192) as buf:
        for blocks, offset in ((1, 0), (8, 512), (64, 4), (mdts_blocks, 0), (mdts_blocks, 4)):
            nbytes = blocks * bs
            data = _pattern(lba, nbytes)
            buf.view[offset : offset + nbytes] = data
            await ns.write_from(lba, buf.view[offset : offset + nbytes])
            same = await ns.read(lba, blocks) == data
            buf.view[: nbytes + offset] = bytes(nbytes + offset)
            await ns.read_into(lba, buf.view[offset : offset + nbytes])
            same = same and bytes(buf.view[offset : offset + nbytes]) == data
            run.check(f"write_from/read_into {blocks} block(s), PRP1 offset {offset}", same)
            lba += blocks + 1
    # The last block of the namespace.
    last = _pattern(ns.blocks - 1, bs)
    await ns.write(ns.blocks - 1, last)
    run.check("the last LBA", await ns.read(ns.blocks - 1, 1) == last)
    await ns.flush()  # raises (a failed section) unless the controller completes it


async def _buffers(run: _Run, device: aiovfio.Device, ns: Namespace) -> None:
    async with device.dma_buffer(8192) as buf:
        try:
            await ns.read_into(0, buf.view[2:514])
            run.check("an IOVA off a dword is refused (no bounce)", False)
        except aiovfio.AlignmentError:
            run.check("an IOVA off a dword is refused (no bounce)", True)
        try:
            await ns.read_into(0, buf.view[:100])
            run.check("a partial block is refused", False)
        except aiovfio.InvalidArgument:
            run.check("a partial block is refused", True)
    try:
        await ns.read_into(0, memoryview(bytearray(512)))
        run.check("memory that is not DMA-mapped is refused", False)
    except aiovfio.InvalidArgument:
        run.check("memory that is not DMA-mapped is refused", True)
    data = _pattern(7, 4096)
    await ns.write(7, memoryview(bytearray(data))[0:4096])  # any bytes: bounced
    run.check("read/write bounce any bytes", await ns.read(7, 8) == data)


async def _range(run: _Run, device: aiovfio.Device, ns: Namespace) -> None:
    try:
        await ns.read(ns.blocks - 1, 2)
        run.check("a range past the end is refused by the driver", False)
    except TransferOutOfRange:
        run.check("a range past the end is refused by the driver", True)
    async with device.dma_buffer(4096) as buf:
        try:
            await ns.command(
                IoOpcode.READ,
                buffer=buf.view[:512],
                cdw10=ns.blocks & 0xFFFFFFFF,
                cdw11=ns.blocks >> 32,
            )
            run.check("the controller answers LBA Out of Range", False, "it succeeded")
        except NvmeStatusError as exc:
            run.check(
                "the controller answers LBA Out of Range (SCT 0, SC 0x80, DNR)",
                (exc.sct, exc.sc, exc.dnr, exc.name) == (0, 0x80, True, "LBA Out of Range"),
                str(exc),
            )
    data = _pattern(1, 512)
    await ns.write(1, data)
    run.check("I/O works after the error", await ns.read(1, 1) == data)


async def _cancel(run: _Run, device: aiovfio.Device, ctrl: Controller, ns: Namespace) -> None:
    """Readers of MDTS-sized transfers into their own buffers, cancelled mid-flight."""
    started = 0
    nbytes = ctrl.max_transfer

    async def reader(i: int) -> None:
        nonlocal started
        async with device.dma_buffer(nbytes) as buf:
            while True:
                started += 1
                await ns.read_into(i * (nbytes // ns.block_size), buf)

    def busy() -> int:
        return sum(q.inflight for q in ctrl.queues)

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(reader, i)
            # Cancel once every reader is in a transfer: a fixed deadline could
            # land before the buffers are even mapped on a slow machine (TCG).
            with anyio.move_on_after(60):
                while started < 8 or not busy():  # noqa: ASYNC110 - driver state, no event
                    await anyio.sleep(0.001)
            await anyio.sleep(0.05)
            scope.cancel()
    inflight = busy()
    run.check(
        "the readers were cancelled mid-transfer",
        scope.cancelled_caught and started >= 8,
        f"{started} started",
    )
    run.check("no command left in flight after the cancel", inflight == 0, str(inflight))
    data = _pattern(3, 4096)
    await ns.write(3, data)
    run.check("the controller works after the cancel", await ns.read(3, 8) == data)


async def _reopen(run: _Run, device: aiovfio.Device) -> None:
    async with open_controller(device, command_timeout=COMMAND_TIMEOUT) as ctrl:
        ns = ctrl.namespace(1)
        data = _pattern(9, 512)
        await ns.write(9, data)
        run.check("opens again at once and works", await ns.read(9, 1) == data)
        last = await ns.read(64, 1)
    # The first pattern written (LBA 64) is still there: the backing keeps data.
    run.check(
        "written data survives a controller reset",
        last[:4] == ((64 * 2654435761) & 0xFFFFFFFF).to_bytes(4, "little"),
    )
    run.check("shut down cleanly again", ctrl.shutdown_clean is True)


async def _run(bdf: str | None) -> NvmeConformance:
    from aiovfio.testing.target import in_guest, real_target, sim_target

    if bdf is not None:
        async with aiovfio.open_device(bdf) as dev:
            return await check_nvme(dev)
    target = real_target() if in_guest() else sim_target()
    try:
        assert target.nvme is not None, "no nvme device"
        expected = GUEST_BYTES if target.real else SIM_BYTES
        async with aiovfio.open_device(target.nvme, kernel=target.kernel) as dev:
            report = await check_nvme(dev, expected_bytes=expected)
        leaks = target.leaks()
        report.checks.append(
            Check("leaks", "nothing left open, mapped or enabled", leaks == [], str(leaks))
        )
        return report
    finally:
        target.close()


def main(argv: list[str] | None = None) -> int:
    """`[BDF]`: a real nvme at BDF; without one the simulated nvme, or the guest's."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    args = sys.argv[1:] if argv is None else argv
    report = anyio.run(_run, args[0] if args else None)
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
