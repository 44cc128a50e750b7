"""`aiovfio nvme identify|perf`: the NVMe tools, on a real controller or the sim.

    aiovfio nvme identify 0000:01:00.0 [--json]
    aiovfio nvme perf 0000:01:00.0 --qd 32 --size 4k --pattern randread --seconds 10
                      [--queues Q] [--poll | --hybrid US] [--tasks]
                      [--backend asyncio|uvloop|trio]
    aiovfio nvme identify --sim        # a simulated QEMU nvme controller

`add_parser(subparsers)` registers `nvme` on the `aiovfio` command line; `run`
is its handler (`args.handler(args, roots)`). `main()` runs it alone
(`python -m aiovfio.nvme.cli`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any, TextIO

import anyio

from .. import errors
from .._open import open_device
from ..device import Device
from ..kernel import Kernel
from .controller import Controller, open_controller
from .perf import PATTERNS, PerfResult, parse_size, run_workload

__all__ = ["add_parser", "main", "render_perf", "run"]

#: The simulated controller's address and namespace size.
SIM_BDF = "0000:00:05.0"
SIM_SIZE = 1 << 30


def add_parser(subparsers: Any) -> None:
    """Add `nvme identify` and `nvme perf` to an argparse subparsers object."""
    nvme = subparsers.add_parser(
        "nvme", help="NVMe tools: identify, perf", description="NVMe tools on aiovfio.nvme"
    )
    tools = nvme.add_subparsers(title="tools", metavar="TOOL", dest="nvme_tool")

    def tool(name: str, text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = tools.add_parser(name, help=text, description=text)
        p.add_argument("bdf", metavar="BDF", nargs="?", help="the controller's PCI address")
        p.add_argument("--sim", action="store_true", help="use a simulated QEMU nvme controller")
        p.add_argument("--backend", choices=("asyncio", "uvloop", "trio"), default="asyncio")
        p.set_defaults(handler=run, nvme_tool=name)
        return p

    p = tool("identify", "bring the controller up and print what it says about itself")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = tool("perf", "a timed I/O workload: IOPS, MB/s, latency percentiles, CPU per I/O")
    p.add_argument("--qd", type=int, default=32, help="commands in flight (default 32)")
    p.add_argument("--size", default="4k", help="bytes per I/O (default 4k)")
    p.add_argument("--pattern", choices=PATTERNS, default="randread")
    p.add_argument("--seconds", type=float, default=10.0, help="run time (default 10)")
    p.add_argument("--queues", type=int, default=1, help="I/O queue pairs (default 1)")
    p.add_argument("--nsid", type=int, default=1)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--poll", action="store_true", help="poll for completions")
    mode.add_argument(
        "--hybrid",
        type=float,
        metavar="US",
        help="poll US microseconds after each completion, then sleep on the interrupt",
    )
    p.add_argument(
        "--tasks",
        action="store_true",
        help="one task per command (`await ns.read_into`); default: one batch per queue",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    nvme.set_defaults(handler=run, nvme_tool=None, nvme_parser=nvme)


def run(args: argparse.Namespace, roots: object = None, *, out: TextIO | None = None) -> int:
    """The `aiovfio nvme` handler: runs the tool `args` names; returns the exit status."""
    stream = out if out is not None else sys.stdout
    if args.nvme_tool is None:  # argparse's own usage error: the usage, a reason, exit 2
        parser = args.nvme_parser
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: choose a tool: identify, perf", file=sys.stderr)
        return 2
    if not args.sim and not args.bdf:
        raise errors.InvalidArgument("give the controller's PCI address (BDF), or --sim")
    backend, options = args.backend, {}
    if backend == "uvloop":
        backend, options = "asyncio", {"use_uvloop": True}
    main = _identify if args.nvme_tool == "identify" else _perf
    code: int = anyio.run(main, args, stream, backend=backend, backend_options=options)
    return code


@contextlib.asynccontextmanager
async def _controller(args: argparse.Namespace) -> AsyncIterator[tuple[Device, Controller]]:
    poll: bool | float = bool(getattr(args, "poll", False))
    if getattr(args, "hybrid", None) is not None:
        poll = args.hybrid / 1e6
    queues = getattr(args, "queues", 1)
    depth = -(-args.qd // queues) if args.nvme_tool == "perf" else None
    kernel: Kernel | None = None
    machine = None
    if args.sim:
        from ..sim import Machine
        from ..sim.models import Nvme

        machine = Machine()
        machine.add_device(Nvme(size=SIM_SIZE, serial="aiovfio-sim"), name=SIM_BDF)
        kernel = machine.kernel
    try:
        async with (
            open_device(args.bdf or SIM_BDF, kernel=kernel) as dev,
            open_controller(dev, io_queues=queues, queue_depth=depth, poll=poll) as ctrl,
        ):
            yield dev, ctrl
    finally:
        if machine is not None:
            machine.close()


def identify_dict(ctrl: Controller) -> dict[str, Any]:
    ident = ctrl.identify
    return {
        "device": ctrl.device.name,
        "model": ident.model,
        "serial": ident.serial,
        "firmware": ident.firmware,
        "vendor": f"{ident.vid:04x}",
        "subsystem_vendor": f"{ident.ssvid:04x}",
        "version": f"{ident.version >> 16}.{ident.version >> 8 & 0xFF}.{ident.version & 0xFF}",
        "max_transfer": ctrl.max_transfer,
        "max_queue_entries": ctrl.cap.mqes + 1,
        "timeout_s": ctrl.cap.timeout,
        "io_queues_granted": ctrl.granted_queues,
        "namespaces_max": ident.nn,
        "subnqn": ident.subnqn,
        "namespaces": [
            {
                "nsid": nsid,
                "blocks": ctrl.namespace(nsid).blocks,
                "block_size": ctrl.namespace(nsid).block_size,
                "bytes": ctrl.namespace(nsid).size,
            }
            for nsid in ctrl.namespaces
        ],
    }


async def _identify(args: argparse.Namespace, out: TextIO) -> int:
    async with _controller(args) as (_, ctrl):
        data = identify_dict(ctrl)
    if args.json:
        print(json.dumps(data, indent=2), file=out)
        return 0
    width = max(len(k) for k in data)
    for key, value in data.items():
        if key == "namespaces":
            continue
        print(f"{key.replace('_', ' '):<{width}}  {value}", file=out)
    for ns in data["namespaces"]:
        gib = ns["bytes"] / (1 << 30)
        print(
            f"{'namespace ' + str(ns['nsid']):<{width}}  {ns['blocks']} blocks of "
            f"{ns['block_size']} B ({gib:.2f} GiB)",
            file=out,
        )
    return 0


async def _perf(args: argparse.Namespace, out: TextIO) -> int:
    size = parse_size(args.size)
    tty = sys.stderr.isatty()

    def progress(elapsed: float, ios: int) -> None:
        rate = ios / elapsed
        line = f"  {elapsed:5.1f} s  {rate:10.0f} IOPS  {rate * size / 1e6:8.1f} MB/s"
        print(line, end="\r" if tty else "\n", file=sys.stderr, flush=True)

    async with _controller(args) as (dev, ctrl):
        ns = ctrl.namespace(args.nsid)
        mode = "poll" if args.poll else (f"hybrid {args.hybrid:g} us" if args.hybrid else "irq")
        mode += ", tasks" if args.tasks else ", batch"
        print(
            f"{ctrl.identify.model} ({dev.name}) ns {ns.nsid}: {args.pattern} {args.size} "
            f"qd {args.qd}, {len(ctrl.queues)} queue(s), {mode}, {args.seconds:g} s, "
            f"{args.backend}",
            file=sys.stderr,
        )
        result = await run_workload(
            dev,
            ns,
            qd=args.qd,
            size=size,
            pattern=args.pattern,
            seconds=args.seconds,
            progress=progress,
            tasks=args.tasks,
        )
    if tty:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(perf_dict(result, dev.name, mode)), file=out)
    else:
        print(render_perf([(f"{dev.name} ns {ns.nsid}", mode, result)]), file=out)
    return 0


def perf_dict(r: PerfResult, device: str, mode: str) -> dict[str, Any]:
    return {
        "device": device,
        "mode": mode,
        "pattern": r.pattern,
        "qd": r.qd,
        "size": r.size,
        "queues": r.queues,
        "ios": r.ios,
        "seconds": round(r.seconds, 3),
        "iops": round(r.iops, 1),
        "mb_per_s": round(r.iops * r.size / 1e6, 2),
        "mean_us": round(r.mean_us, 2),
        "p50_us": round(r.percentile_us(50), 2),
        "p99_us": round(r.percentile_us(99), 2),
        "p99_9_us": round(r.percentile_us(99.9), 2),
        "cpu_us_per_io": round(r.cpu_per_io_us, 2),
        "loop_cpu_us_per_io": round(r.thread_cpu_per_io_us, 2),
    }


def render_perf(rows: Sequence[tuple[str, str, PerfResult]]) -> str:
    """spdk_nvme_perf's table: one line per device and mode."""
    head = (
        f"{'Device':<24} {'mode':<14} {'IOPS':>10} {'MB/s':>9} {'mean us':>9} "
        f"{'p50 us':>9} {'p99 us':>9} {'p99.9 us':>9} {'CPU us/IO':>10} {'loop us/IO':>10}"
    )
    lines = [head]
    for name, mode, r in rows:
        lines.append(
            f"{name:<24} {mode:<14} {r.iops:>10.0f} {r.iops * r.size / 1e6:>9.1f} "
            f"{r.mean_us:>9.1f} {r.percentile_us(50):>9.1f} {r.percentile_us(99):>9.1f} "
            f"{r.percentile_us(99.9):>9.1f} {r.cpu_per_io_us:>10.2f} "
            f"{r.thread_cpu_per_io_us:>10.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m aiovfio.nvme.cli identify|perf ...`, without the rest of `aiovfio`."""
    import logging

    import structlog

    parser = argparse.ArgumentParser(prog="aiovfio")
    add_parser(parser.add_subparsers(title="commands", metavar="COMMAND"))
    args = parser.parse_args(["nvme", *(sys.argv[1:] if argv is None else argv)])
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        return run(args)
    except errors.VfioError as exc:
        print(f"aiovfio: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
