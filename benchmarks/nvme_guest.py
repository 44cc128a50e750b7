"""aiovfio.nvme against the kernel's nvme driver on one emulated controller, in one boot.

    aiovfio vm --kernel 6.12 -- python benchmarks/nvme_guest.py [--seconds 8]

Inside the aiovfio guest (QEMU's nvme, a sparse image backing, TCG): 4 KiB
random reads at QD1 and QD32,

* aiovfio.nvme on the controller bound to vfio-pci, in each completion mode
  (interrupt, polled, hybrid), through `aiovfio.nvme.perf.run_workload`: one
  task keeping the queue full through `Namespace.batch`, and (rows "tasks")
  one task per command, `await ns.read_into`;
* then the controller rebound to the kernel's nvme driver and fio
  (`--direct=1 --ioengine=io_uring --rw=randread --bs=4k`) on /dev/nvme0n1;
* then rebound to vfio-pci; `--rounds` times, interleaved (aiovfio, kernel,
  aiovfio, kernel, ...).

This host moves the kernel's own QD32 figure by up to 2x from round to round
(TCG shares two cores with everything else), so one round's ratio is noise
as often as signal: each round's ratio is printed against the kernel's figure
of the same round, then, per mode, best against best and median against
median over the rounds, and in how many rounds the target was met.

Each aiovfio run is a child process (`--one`), so `--tree NAME=PATH` (given
more than once) measures several source trees (PYTHONPATH=PATH) in the same
boot and the same rounds: a before/after comparison interleaved with the
kernel's rounds. `--modes` picks modes ("poll batch", "irq tasks", ...).

Printed: IOPS and CPU per I/O of both, and the ratio (aiovfio / kernel).
Targets: >= 1.0x the kernel's IOPS at QD32, >= 0.6x at QD1. fio's CPU per
I/O is its own process's (usr + sys); interrupt work the kernel does outside
fio's context is not in it. The perf tool's own output (`aiovfio nvme perf`)
for QD32 follows the tables (`--no-perf`: left out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import anyio

import aiovfio
from aiovfio.nvme import open_controller
from aiovfio.nvme.perf import PerfResult, run_workload

SIZE = 4096
TARGETS = {1: 0.6, 32: 1.0}
PCI = Path("/sys/bus/pci")


def _write(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)


def _bind(bdf: str, driver: str) -> None:
    """Move `bdf` to `driver` (vfio-pci or nvme) the way the harness does."""
    dev = PCI / "devices" / bdf
    if (dev / "driver").exists():
        if (dev / "driver").resolve().name == driver:
            return
        _write(dev / "driver" / "unbind", bdf)
    _write(dev / "driver_override", driver)
    _write(PCI / "drivers_probe", bdf)
    if (dev / "driver").resolve().name != driver:
        raise RuntimeError(f"{bdf} did not bind to {driver}")


def _block_device(bdf: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for ctrl in (PCI / "devices" / bdf / "nvme").glob("nvme*"):
            for ns in ctrl.glob("nvme*n1"):
                dev = Path("/dev") / ns.name
                if dev.exists():
                    return str(dev)
        time.sleep(0.1)
    raise RuntimeError(f"no block device appeared for {bdf}")


def _fio(device: str, qd: int, seconds: float) -> tuple[float, float]:
    """(IOPS, CPU us per I/O) of fio's 4 KiB randread at `qd`."""
    out = subprocess.run(
        [
            "fio",
            "--name=randread",
            f"--filename={device}",
            "--direct=1",
            "--rw=randread",
            "--bs=4k",
            "--ioengine=io_uring",
            f"--iodepth={qd}",
            f"--runtime={seconds:g}",
            "--time_based",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    job = json.loads(out)["jobs"][0]
    ios = job["read"]["total_ios"]
    runtime = job["job_runtime"] / 1000
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * runtime
    return job["read"]["iops"], cpu / ios * 1e6 if ios else 0.0


async def _aiovfio(
    bdf: str, qd: int, poll: bool | float, seconds: float, tasks: bool
) -> PerfResult:
    async with aiovfio.open_device(bdf) as dev:
        async with open_controller(
            dev, queue_depth=max(qd, 2), poll=poll, command_timeout=120
        ) as ctrl:
            ctrl_ns = ctrl.namespace(1)
            return await run_workload(
                dev,
                ctrl_ns,
                qd=qd,
                size=SIZE,
                pattern="randread",
                seconds=seconds,
                tasks=tasks,
            )


def _modes(hybrid_us: float) -> dict[str, tuple[bool | float, bool]]:
    """Mode name -> (poll=, tasks=)."""
    polls: dict[str, bool | float] = {"irq": False, "poll": True, "hybrid": hybrid_us / 1e6}
    modes = {f"{name} batch": (poll, False) for name, poll in polls.items()}
    return modes | {f"{name} tasks": (poll, True) for name, poll in polls.items()}


def _one(bdf: str, qd: int, mode: str, seconds: float, hybrid_us: float) -> int:
    """The child: one aiovfio run, its figures as one JSON line."""
    poll, tasks = _modes(hybrid_us)[mode]
    r = anyio.run(_aiovfio, bdf, qd, poll, seconds, tasks)
    print(json.dumps({"iops": r.iops, "cpu_us": r.cpu_per_io_us}), flush=True)
    return 0


def _run_child(
    tree: str | None, bdf: str, qd: int, mode: str, seconds: float, hybrid_us: float
) -> tuple[float, float]:
    """(IOPS, CPU us per I/O) of one aiovfio run in a child on `tree` (None: this one)."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = tree
    argv = [sys.executable, os.path.abspath(__file__), "--one", str(qd), mode]
    argv += ["--seconds", f"{seconds:g}", "--hybrid-us", f"{hybrid_us:g}"]
    out = subprocess.run(argv, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"aiovfio run failed ({mode}, QD{qd}, tree {tree}):\n{out.stderr}")
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    return figures["iops"], figures["cpu_us"]


def _trees(specs: list[str]) -> dict[str, str | None]:
    trees: dict[str, str | None] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path, "aiovfio").is_dir():
            raise SystemExit(
                f"--tree takes NAME=PATH of a source tree (PATH/aiovfio), not {spec!r}"
            )
        trees[name] = os.path.abspath(path)
    return trees or {"this": None}


def _summary(
    label: str, ours: list[tuple[float, float]], kernel: list[tuple[float, float]], target: float
) -> str:
    """One row: best vs best, median vs median, the per-round ratios' range, rounds met."""
    ratios = [a / k for (a, _), (k, _) in zip(ours, kernel, strict=True) if k]
    best_a, best_k = max(a for a, _ in ours), max(k for k, _ in kernel)
    med_a, med_k = statistics.median(a for a, _ in ours), statistics.median(k for k, _ in kernel)
    cpu_a, cpu_k = statistics.median(c for _, c in ours), statistics.median(c for _, c in kernel)
    met = sum(r >= target for r in ratios)
    return (
        f"{label:<30} {best_a:>7.0f} / {best_k:<7.0f} {best_a / best_k:>5.2f}x "
        f"{med_a:>7.0f} / {med_k:<7.0f} {med_a / med_k:>5.2f}x "
        f"{min(ratios):>5.2f}-{max(ratios):<5.2f}x {met:>2}/{len(ratios):<2} "
        f"{cpu_a:>8.1f} {cpu_k:>8.1f}  >= {target:g}x"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--hybrid-us", type=float, default=200.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--qd", default="1,32", help="queue depths, comma separated")
    parser.add_argument(
        "--modes", default=None, help='comma separated, e.g. "poll batch,irq tasks" (default: all)'
    )
    parser.add_argument(
        "--no-tasks", action="store_true", help="leave out the task-per-command rows"
    )
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="measure aiovfio from this source tree too (repeatable; default: this one)",
    )
    parser.add_argument("--no-perf", action="store_true", help="leave out the perf tool's run")
    parser.add_argument("--one", nargs=2, metavar=("QD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    bdfs = os.environ.get("AIOVFIO_VM_NVME", "").split()
    if not bdfs or shutil.which("fio") is None:
        print("run in the aiovfio guest with fio installed on the host (apt install fio)")
        return 2
    bdf = bdfs[0]
    if args.one is not None:
        return _one(bdf, int(args.one[0]), args.one[1], args.seconds, args.hybrid_us)
    every = _modes(args.hybrid_us)
    names = list(every) if args.modes is None else [m.strip() for m in args.modes.split(",")]
    if args.no_tasks:
        names = [m for m in names if not m.endswith("tasks")]
    unknown = [m for m in names if m not in every]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}: pick from {', '.join(every)}")
    depths = [int(q) for q in args.qd.split(",")]
    trees = _trees(args.tree)
    ours: dict[tuple[int, str, str], list[tuple[float, float]]] = {}
    kernel: dict[int, list[tuple[float, float]]] = {qd: [] for qd in depths}
    subprocess.run(["modprobe", "nvme"], check=True)
    for round_ in range(1, args.rounds + 1):
        for qd in depths:
            for tree, path in trees.items():
                for mode in names:
                    r = _run_child(path, bdf, qd, mode, args.seconds, args.hybrid_us)
                    ours.setdefault((qd, mode, tree), []).append(r)
                    print(
                        f"round {round_} aiovfio QD{qd} {mode} ({tree}): {r[0]:.0f} IOPS, "
                        f"{r[1]:.1f} us CPU/IO",
                        flush=True,
                    )
        _bind(bdf, "nvme")
        try:
            device = _block_device(bdf)
            for qd in depths:
                k = _fio(device, qd, args.seconds)
                kernel[qd].append(k)
                print(
                    f"round {round_} kernel QD{qd}: {k[0]:.0f} IOPS, {k[1]:.1f} us CPU/IO",
                    flush=True,
                )
        finally:
            _bind(bdf, "vfio-pci")
    print(
        f"\n4 KiB randread, {args.rounds} interleaved rounds of {args.seconds:g} s, "
        f"kernel {os.uname().release}, QEMU nvme ({bdf}); each round's ratio is against "
        f"the kernel's figure of the same round"
    )
    print(
        f"{'QD':>3} {'mode (tree)':<30} "
        + " ".join(f"{'r' + str(i):>14}" for i in range(1, args.rounds + 1))
    )
    for (qd, mode, tree), runs in ours.items():
        cells = [
            f"{a:>6.0f} {a / k:>5.2f}x " if k else f"{a:>6.0f}    -  "
            for (a, _), (k, _) in zip(runs, kernel[qd], strict=True)
        ]
        print(f"{qd:>3} {f'{mode} ({tree})':<30} " + " ".join(cells))
    for qd in depths:
        print(
            f"{qd:>3} {'kernel (fio)':<30} "
            + " ".join(f"{k:>6.0f}         " for k, _ in kernel[qd])
        )
    print(
        f"\n{'QD mode (tree)':<33} {'best aiovfio / kernel':>23} {'median aiovfio / kernel':>23} "
        f"{'per round':>11} {'met':>5} {'us/IO ours':>10} {'kernel':>7}"
    )
    for (qd, mode, tree), runs in ours.items():
        print(f"{qd:>2} " + _summary(f"{mode} ({tree})", runs, kernel[qd], TARGETS.get(qd, 1.0)))
    if args.no_perf or 32 not in depths:
        return 0
    print("\n$ aiovfio nvme perf --qd 32 --size 4k --pattern randread --seconds 5 (best mode)")
    from aiovfio.nvme import cli

    best = max(
        ((m, t) for q, m, t in ours if q == 32),
        key=lambda mt: statistics.median(a for a, _ in ours[32, mt[0], mt[1]]),
    )[0]
    kind, style = best.split()[0], best.split()[-1]
    flags = {"poll": ["--poll"], "irq": []}.get(kind, ["--hybrid", f"{args.hybrid_us:g}"])
    flags += ["--tasks"] if style == "tasks" else []
    perf = ["perf", bdf, "--qd", "32", "--size", "4k", "--pattern", "randread", "--seconds", "5"]
    return cli.main([*perf, *flags])


if __name__ == "__main__":
    sys.exit(main())
