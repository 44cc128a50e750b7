"""The `aiovfio` command line: ls, info, bind, unbind, doctor, demo, repl, vm.

Only this module configures structlog (a console renderer on stderr, INFO, or
DEBUG with `-v`, which logs every kernel interaction). Every failure a user can
meet ends as one line on stderr and exit status 1; `-v` adds the traceback.

Paths are rooted at `--sysfs`, `--dev`, `--proc` and `--state` (hidden
options) or `AIOVFIO_SYSFS`, `AIOVFIO_DEV`, `AIOVFIO_PROC`, `AIOVFIO_STATE`, so
tests and the simulated machine can stand in for the real ones.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import structlog

from . import sysfs as _sysfs
from ._console import human_size, table
from ._version import __version__
from .errors import InvalidArgument, SetupError, VfioError
from .sysfs import VFIO_DRIVER, Binder, PciFunction, Roots, Sysfs

__all__ = ["main"]

Handler = Callable[[argparse.Namespace, Roots], int]


# --- entry point -----------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "vm":
        from .testing.vm import main as vm_main

        return int(vm_main(args_list[1:]) or 0)
    parser = _parser()
    args = parser.parse_args(args_list)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 1
    verbose = bool(args.verbose)
    restore = _configure_logging(verbose, sys.stderr)
    try:
        roots = Roots.from_env(sysfs=args.sysfs, dev=args.dev, proc=args.proc, state=args.state)
        handler: Handler = args.handler
        return handler(args, roots)
    except BrokenPipeError:
        # the reader went away (`aiovfio ls | head`): stop quietly, as cat does
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (VfioError, OSError) as exc:
        if verbose:
            traceback.print_exc()
        print(f"aiovfio: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aiovfio: interrupted", file=sys.stderr)
        return 130
    finally:
        restore()


def _one_line(exc: BaseException) -> str:
    """What went wrong and what to do, on one line."""
    if isinstance(exc, VfioError) or not isinstance(exc, OSError):
        text = str(exc)
    else:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror or exc}{where}"
        if exc.errno in (errno.EACCES, errno.EPERM):
            text += "; run it as root (sudo), or see `aiovfio doctor`"
        elif exc.errno == errno.EBUSY:
            text += "; another process holds it"
        elif exc.errno == errno.ENOENT:
            text += "; see `aiovfio doctor`"
    return " ".join(text.split())


def _configure_logging(verbose: bool, stream: TextIO) -> Callable[[], None]:
    """Configure structlog for the CLI; returns a function that undoes it."""
    was_configured = structlog.is_configured()
    previous = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            *([structlog.processors.TimeStamper(fmt="%H:%M:%S.%f")] if verbose else []),
            structlog.dev.ConsoleRenderer(colors=_isatty(stream)),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if verbose else logging.INFO
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )

    def restore() -> None:
        if was_configured:
            structlog.configure(**previous)
        else:
            structlog.reset_defaults()

    return restore


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# --- parser ----------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-v and the hidden roots, accepted before and after the command."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="log every kernel interaction; show tracebacks",
    )
    for name in ("sysfs", "dev", "proc", "state"):
        parser.add_argument(f"--{name}", default=default, help=argparse.SUPPRESS)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiovfio",
        description="Find, bind and inspect PCI devices for user-space drivers on VFIO.",
        epilog=(
            "`bind` remembers each function's previous driver in /run/aiovfio/drivers.json "
            "(AIOVFIO_STATE moves it) so that `unbind` restores it. "
            "`aiovfio vm -- CMD` runs CMD in a QEMU guest with emulated devices."
        ),
    )
    parser.add_argument("--version", action="version", version=f"aiovfio {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p, top=False)
        p.set_defaults(handler=handler)
        return p

    p = command("ls", _cmd_ls, "list PCI functions with their driver and IOMMU group")
    p.add_argument("--vendor", help="vendor id, or vendor:device (hex)")
    p.add_argument("--class", dest="klass", help="class code prefix (hex, e.g. 0108) or name")
    p.add_argument("--driver", help="driver name, or 'none' for unbound functions")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("info", _cmd_info, "regions, IRQs, capabilities and group of one function")
    p.add_argument("bdf", metavar="BDF", help="PCI address (0000:00:04.0, 00:04.0 or 04.0)")
    p.add_argument(
        "--no-open", action="store_true", help="use sysfs only; never open (or reset) it"
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    for name, handler, text in (
        ("bind", _cmd_bind, "bind a function to vfio-pci, remembering its driver"),
        ("unbind", _cmd_unbind, "release a function from vfio-pci to its previous driver"),
    ):
        p = command(name, handler, text)
        p.add_argument("bdf", metavar="BDF", help="PCI address")
        p.add_argument("--group", action="store_true", help="every function of its IOMMU group")
        p.add_argument("--force", action="store_true", help="even when the function is in use")
        p.add_argument("--load", action="store_true", help="run modprobe for a missing driver")
        if name == "unbind":
            to = p.add_mutually_exclusive_group()
            to.add_argument("--to", metavar="DRIVER", help="bind to DRIVER, not the remembered one")
            to.add_argument("--none", action="store_true", help="leave it without a driver")

    p = command("doctor", _cmd_doctor, "check that this machine is ready for VFIO")
    p.add_argument("bdf", metavar="BDF", nargs="?", help="also check this function")
    p.add_argument("--memlock", default="64M", help="DMA memory a driver will pin (default 64M)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("demo", _cmd_demo, "run the edu demo driver on the simulated machine")
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")

    command("repl", _cmd_repl, "an asyncio REPL with aiovfio imported and `attach()`")
    sub.add_parser("vm", help="run a command in the QEMU guest (see `aiovfio vm --help`)")
    return parser


# --- ls --------------------------------------------------------------------------


def _function_dict(f: PciFunction, viable: bool | None) -> dict[str, Any]:
    return {
        "address": f.address,
        "vendor": f"{f.ids.vendor:04x}",
        "device": f"{f.ids.device:04x}",
        "subsystem_vendor": f"{f.ids.subsystem_vendor:04x}",
        "subsystem_device": f"{f.ids.subsystem_device:04x}",
        "class": f"{f.ids.class_code:06x}",
        "class_name": f.class_name,
        "revision": f"{f.ids.revision:02x}",
        "driver": f.driver,
        "driver_override": f.driver_override,
        "iommu_group": f.iommu_group,
        "viable": viable,
    }


def _hex(text: str, what: str) -> int:
    try:
        return int(text, 16)
    except ValueError:
        raise InvalidArgument(f"{what} {text!r} is not a hex number") from None


def _matches(f: PciFunction, args: argparse.Namespace) -> bool:
    if args.vendor:
        vendor, _, device = args.vendor.lower().partition(":")
        if f.ids.vendor != _hex(vendor, "vendor"):
            return False
        if device and f.ids.device != _hex(device, "device"):
            return False
    if args.klass:
        text = args.klass.lower().removeprefix("0x")
        code = f"{f.ids.class_code:06x}"
        by_code = all(c in "0123456789abcdef" for c in text) and code.startswith(text)
        if not by_code and text not in f.class_name.lower():
            return False
    if args.driver:
        wanted = None if args.driver == "none" else args.driver
        if f.driver != wanted:
            return False
    return True


def _cmd_ls(args: argparse.Namespace, roots: Roots) -> int:
    sysfs = Sysfs(roots)
    functions = [f for f in sysfs.functions() if _matches(f, args)]
    viable: dict[int, bool] = {}
    for f in functions:
        if f.iommu_group is not None and f.iommu_group not in viable:
            viable[f.iommu_group] = sysfs.group(f.iommu_group).viable

    def viable_of(f: PciFunction) -> bool | None:
        return None if f.iommu_group is None else viable[f.iommu_group]

    if args.json:
        print(json.dumps([_function_dict(f, viable_of(f)) for f in functions], indent=2))
        return 0
    rows = [
        (
            f.address,
            f"{f.ids.vendor:04x}:{f.ids.device:04x}",
            f.class_name,
            f.driver or "-",
            "-" if f.iommu_group is None else f.iommu_group,
            {None: "-", True: "yes", False: "no"}[viable_of(f)],
        )
        for f in functions
    ]
    if rows:
        print(table(("ADDRESS", "ID", "CLASS", "DRIVER", "GROUP", "VIABLE"), rows))
    else:
        print("no PCI function matches", file=sys.stderr)
    if functions and all(f.iommu_group is None for f in functions):
        print(
            "no IOMMU groups: the IOMMU is off, so nothing can be bound to vfio-pci "
            "(see `aiovfio doctor`)",
            file=sys.stderr,
        )
    return 0


# --- info ------------------------------------------------------------------------


def _reset_sentence(sysfs: Sysfs, address: str) -> str:
    methods = sysfs.reset_methods(address)
    if methods is None:
        return "sysfs does not say whether it can be reset"
    if not methods:
        return "it has no reset method: its state survives opening and closing it"
    return (
        f"opening it through VFIO resets it ({', '.join(methods)}); so does closing it: "
        "state a kernel driver left is lost"
    )


def _cmd_info(args: argparse.Namespace, roots: Roots) -> int:
    sysfs = Sysfs(roots)
    address = sysfs.resolve(args.bdf)
    function = sysfs.function(address)
    group = sysfs.group_of(address)
    data: dict[str, Any] = {
        "function": _function_dict(function, None if group is None else group.viable),
        "reset": _reset_sentence(sysfs, address),
        "group": None
        if group is None
        else {
            "number": group.number,
            "viable": group.viable,
            "members": [{"address": m.address, "driver": m.driver} for m in group.members],
        },
    }
    reason = _why_not_open(args, roots, function, group)
    if reason is None:
        from . import _info
        from .kernel import LinuxKernel

        try:
            data.update(_info.from_vfio(address, LinuxKernel(sysfs=roots.sysfs, dev=roots.dev)))
            data["source"] = "vfio"
        except (VfioError, OSError) as exc:
            if args.verbose:
                traceback.print_exc()
            reason = f"opening it through VFIO failed: {_one_line(exc)}"
    if reason is not None:
        data["source"] = "sysfs"
        data["why_sysfs"] = reason
        data.update(_sysfs_details(sysfs, address))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(_render_info(data))
    return 0


def _why_not_open(
    args: argparse.Namespace, roots: Roots, f: PciFunction, group: _sysfs.IommuGroup | None
) -> str | None:
    """Why `info` reads sysfs only, None when it can open the device through VFIO."""
    if args.no_open:
        return "--no-open"
    if group is None:
        return "it has no IOMMU group, so VFIO cannot open it"
    if f.driver != VFIO_DRIVER:
        return (
            f"it is bound to {f.driver or 'no driver'}, not vfio-pci (`aiovfio bind {f.address}`)"
        )
    if not group.viable:
        return f"group {group.number} is not viable (`aiovfio doctor {f.address}`)"
    node = roots.dev / "vfio" / str(group.number)
    if not node.exists():
        return f"{node} does not exist"
    if not os.access(node, os.R_OK | os.W_OK):
        return f"no permission to open {node} (run as root)"
    container = roots.dev / "vfio" / "vfio"
    if not container.exists():
        return f"{container} does not exist (`modprobe vfio-pci`)"
    return None


def _sysfs_details(sysfs: Sysfs, address: str) -> dict[str, Any]:
    bars = [
        {
            "index": b.index,
            "name": "ROM" if b.index == 6 else f"BAR{b.index}",
            "size": b.size,
            "flags": [b.kind.value]
            + (["64bit"] if b.is_64bit else [])
            + (["prefetchable"] if b.prefetchable else []),
        }
        for b in sysfs.bars(address)
    ]
    config = sysfs.config(address)
    caps = [
        {"id": c.id, "name": c.name, "offset": c.offset, "extended": c.extended}
        for c in _sysfs.walk_capabilities(config)
    ]
    irq_text = (
        (sysfs.path(address) / "irq").read_text().strip()
        if (sysfs.path(address) / "irq").exists()
        else None
    )
    return {
        "regions": bars,
        "irqs": [] if not irq_text or irq_text == "0" else [{"name": "INTx", "line": irq_text}],
        "capabilities": caps,
        "config_bytes": len(config),
    }


def _render_info(data: dict[str, Any]) -> str:
    f = data["function"]
    lines = [
        f"{f['address']}  {f['vendor']}:{f['device']}  {f['class_name']}  rev {f['revision']}"
        f"  subsystem {f['subsystem_vendor']}:{f['subsystem_device']}",
        f"driver: {f['driver'] or 'none'}"
        + (f" (driver_override {f['driver_override']})" if f["driver_override"] else ""),
        f"reset: {data['reset']}",
    ]
    group = data["group"]
    if group is None:
        lines.append("IOMMU group: none (the IOMMU is off; see `aiovfio doctor`)")
    else:
        state = "viable" if group["viable"] else "NOT viable"
        lines.append(f"IOMMU group {group['number']}: {state}")
        lines.append(
            table(
                ("MEMBER", "DRIVER"),
                [(m["address"], m["driver"] or "-") for m in group["members"]],
                indent="  ",
            )
        )
    if data["source"] == "sysfs":
        lines.append(f"(from sysfs only: {data['why_sysfs']})")
    if data.get("device_flags"):
        lines.append(f"device flags: {data['device_flags']}")
    lines.append("regions:")
    if data["regions"]:
        lines.append(
            table(
                ("REGION", "SIZE", "FLAGS", "MMAP AREAS"),
                [
                    (
                        r["name"],
                        human_size(r["size"]),
                        " ".join(r["flags"]) or "-",
                        " ".join(
                            f"{a['offset']:#x}+{human_size(a['size'])}"
                            for a in r.get("mmap_areas", [])
                        )
                        or "-",
                    )
                    for r in data["regions"]
                ],
                indent="  ",
            )
        )
    else:
        lines.append("  none")
    lines.append("irqs:")
    if data["irqs"]:
        if data["source"] == "vfio":
            rows = [(i["name"], i["count"], " ".join(i["flags"]) or "-") for i in data["irqs"]]
            lines.append(table(("IRQ", "COUNT", "FLAGS"), rows, indent="  "))
        else:
            lines.extend(f"  {i['name']} on line {i['line']}" for i in data["irqs"])
    else:
        lines.append("  none")
    caps = data["capabilities"]
    if caps:
        text = ", ".join(f"{c['name']}@{c['offset']:#x}" for c in caps)
        lines.append(f"capabilities: {text}")
    elif data["source"] == "sysfs" and data.get("config_bytes", 0) <= 64:
        lines.append("capabilities: unknown (config space beyond 64 bytes needs root)")
    else:
        lines.append("capabilities: none")
    return "\n".join(lines)


# --- bind / unbind ---------------------------------------------------------------


def _binder(roots: Roots) -> Binder:
    return Binder.from_roots(roots)


def _cmd_bind(args: argparse.Namespace, roots: Roots) -> int:
    binder = _binder(roots)
    address = binder.sysfs.resolve(args.bdf)
    if args.group:
        results = binder.bind_group(address, force=args.force, load=args.load)
    else:
        results = [binder.bind(address, force=args.force, load=args.load)]
    for result in results:
        print(result.describe())
    note = binder.viability_note(address)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _cmd_unbind(args: argparse.Namespace, roots: Roots) -> int:
    binder = _binder(roots)
    address = binder.sysfs.resolve(args.bdf)
    if args.group:
        results = binder.unbind_group(
            address, leave_unbound=args.none, force=args.force, load=args.load
        )
    else:
        results = [
            binder.unbind(
                address, to=args.to, leave_unbound=args.none, force=args.force, load=args.load
            )
        ]
    for result in results:
        print(result.describe())
    return 0


# --- doctor ----------------------------------------------------------------------


def _parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    clean = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (clean[:-1], clean[-1]) if clean and clean[-1] in units else (clean, "")
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise InvalidArgument(f"--memlock {text!r} is not a size (write e.g. 64M or 1G)") from None


def _cmd_doctor(args: argparse.Namespace, roots: Roots) -> int:
    from .doctor import Doctor, Status

    doctor = Doctor(roots, memlock_need=_parse_size(args.memlock))
    address = None
    if args.bdf:
        address = doctor.sysfs.resolve(args.bdf)
    checks = doctor.run(address)
    failed = any(c.status is Status.FAIL for c in checks)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [c.as_dict() for c in checks]}, indent=2))
        return 1 if failed else 0
    marks = {Status.OK: " ok ", Status.INFO: "info", Status.WARN: "WARN", Status.FAIL: "FAIL"}
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"[{marks[c.status]}] {c.name.ljust(width)}  {c.summary}")
        if c.fix and c.status is not Status.OK:
            print(f"       {' ' * width}  fix: {c.fix}")
    bad = [c for c in checks if c.status is Status.FAIL]
    print(
        f"{len(bad)} problem(s) to fix" if bad else "ready for VFIO",
        file=sys.stderr,
    )
    return 1 if failed else 0


# --- demo / repl -----------------------------------------------------------------


def _find_example(name: str) -> Path | None:
    """examples/NAME.py: shipped inside the wheel, or beside the package in a checkout."""
    package = Path(__file__).resolve().parent
    for folder in (package / "examples", package.parent / "examples"):
        path = folder / f"{name}.py"
        if path.is_file():
            return path
    return None


def _cmd_demo(args: argparse.Namespace, roots: Roots) -> int:
    import anyio

    path = _find_example("edu")
    if path is None:
        raise SetupError(
            "the edu demo (examples/edu.py) is not in this installation; run it from a "
            "source checkout of aiovfio"
        )
    spec = importlib.util.spec_from_file_location("aiovfio_example_edu", path)
    if spec is None or spec.loader is None:
        raise SetupError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entry = getattr(module, "run_demo", None) or getattr(module, "main", None)
    if entry is None:
        raise SetupError(f"{path} has no run_demo() or main()")
    result = anyio.run(entry, backend=args.backend)
    if isinstance(result, int):
        return result
    return 0 if getattr(result, "ok", True) else 1


def _cmd_repl(args: argparse.Namespace, roots: Roots) -> int:
    from . import repl

    return repl.run(roots=roots)
