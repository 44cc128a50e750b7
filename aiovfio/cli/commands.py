"""The commands: ls, info, bind, unbind, doctor, demo, repl, completion.

Each takes the parsed arguments and the `Roots` and returns the exit status;
what a command cannot do it raises (a VfioError or OSError: exit 1, or
`Usage`: exit 2), and `main` prints it as one line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import DeviceNotFound, SetupError, VfioError
from ..noiommu import opted_in
from . import pciids
from . import sysfs as _sysfs
from .binding import Binder, BindResult
from .console import human_size, one_line, table
from .parser import FORMAT_VERSION
from .sysfs import VFIO_DRIVER, PciFunction, Roots, Sysfs

__all__ = ["COMMANDS", "Usage"]

Handler = Callable[[argparse.Namespace, Roots], int]


class Usage(Exception):
    """Bad input found once sysfs is read (no such device or driver): exit status 2."""


def _resolve(sysfs: Sysfs, addresses: Iterable[str]) -> list[str]:
    """The addresses, checked to exist (before anything is written), in order, once each."""
    out: list[str] = []
    for address in addresses:
        try:
            resolved = sysfs.resolve(address)
        except DeviceNotFound as exc:
            raise Usage(str(exc)) from None
        if resolved not in out:
            out.append(resolved)
    return out


# --- ls --------------------------------------------------------------------------


def _function_dict(
    f: PciFunction, viable: bool | None, users: tuple[str, ...] | None = None
) -> dict[str, Any]:
    names = pciids.names()
    ids = f.ids
    data: dict[str, Any] = {
        "address": f.address,
        "vendor": f"{ids.vendor:04x}",
        "device": f"{ids.device:04x}",
        "subsystem_vendor": f"{ids.subsystem_vendor:04x}",
        "subsystem_device": f"{ids.subsystem_device:04x}",
        "class": f"{ids.class_code:06x}",
        "class_name": f.class_name,
        "vendor_name": names.vendor(ids.vendor),
        "device_name": names.device(ids.vendor, ids.device),
        "subsystem_name": names.subsystem(
            ids.vendor, ids.device, ids.subsystem_vendor, ids.subsystem_device
        ),
        "revision": f"{ids.revision:02x}",
        "driver": f.driver,
        "driver_override": f.driver_override,
        "iommu_group": f.iommu_group,
        "viable": viable,
    }
    if users is not None:
        data["in_use"] = list(users)
    return data


def _id_or_names(text: str, what: str, find: Callable[[str], set[Any]]) -> set[Any] | int:
    """A hex id, or the ids whose pci.ids name contains `text`."""
    clean = text.strip().lower().removeprefix("0x")
    if clean and len(clean) <= 4 and all(c in "0123456789abcdef" for c in clean):
        return int(clean, 16)
    if pciids.names().path is None:
        raise Usage(
            f"--{what} {text!r}: names need the system's pci.ids (`apt-get install pci.ids`, "
            f"or set AIOVFIO_PCI_IDS); give the hex {what} id instead (`aiovfio ls` shows it)"
        )
    found = find(text)
    if not found:
        raise Usage(f"--{what} {text!r}: no {what} in pci.ids has that in its name; try the id")
    return found


def _filters(args: argparse.Namespace) -> Callable[[PciFunction], bool]:
    names = pciids.names()
    vendor_spec, _, device_spec = (args.vendor or "").partition(":")
    device_spec = args.device or device_spec
    vendors = _id_or_names(vendor_spec, "vendor", names.vendors_named) if vendor_spec else None
    devices = _id_or_names(device_spec, "device", names.devices_named) if device_spec else None
    klass = (args.klass or "").lower().removeprefix("0x")

    def matches(f: PciFunction) -> bool:
        ids = f.ids
        if isinstance(vendors, int) and ids.vendor != vendors:
            return False
        if isinstance(vendors, set) and ids.vendor not in vendors:
            return False
        if isinstance(devices, int) and ids.device != devices:
            return False
        if isinstance(devices, set) and (ids.vendor, ids.device) not in devices:
            return False
        if klass:
            code = f"{ids.class_code:06x}"
            by_code = all(c in "0123456789abcdef" for c in klass) and code.startswith(klass)
            if not by_code and klass not in f.class_name.lower():
                return False
        if args.driver:
            wanted = None if args.driver == "none" else args.driver
            if f.driver != wanted:
                return False
        return True

    return matches


def _cmd_ls(args: argparse.Namespace, roots: Roots) -> int:
    sysfs = Sysfs(roots)
    matches = _filters(args)
    functions = [f for f in sysfs.functions() if matches(f)]
    viable: dict[int, bool] = {}
    for f in functions:
        if f.iommu_group is not None and f.iommu_group not in viable:
            viable[f.iommu_group] = sysfs.group(f.iommu_group).viable

    def viable_of(f: PciFunction) -> bool | None:
        return None if f.iommu_group is None else viable[f.iommu_group]

    users = {f.address: sysfs.in_use(f.address, short=True) for f in functions}
    if args.json:
        document = {
            "format": FORMAT_VERSION,
            "pci_ids": None if pciids.names().path is None else str(pciids.names().path),
            "functions": [_function_dict(f, viable_of(f), users[f.address]) for f in functions],
        }
        print(json.dumps(document, indent=2))
        return 0
    names = pciids.names()
    rows = [
        (
            f.address,
            f.class_name,
            names.product(f.ids.vendor, f.ids.device),
            f.driver or "-",
            "-" if f.iommu_group is None else f.iommu_group,
            {None: "-", True: "yes", False: "no"}[viable_of(f)],
            ", ".join(users[f.address]) or "-",
        )
        for f in functions
    ]
    if rows:
        print(table(("ADDRESS", "CLASS", "DEVICE", "DRIVER", "GROUP", "VIABLE", "IN USE"), rows))
    else:
        print("no PCI function matches", file=sys.stderr)
    if functions and all(f.iommu_group is None for f in functions):
        print(
            "no IOMMU groups: the IOMMU is off, so nothing can be bound to vfio-pci "
            "(see `aiovfio doctor`)",
            file=sys.stderr,
        )
    if names.path is None:
        print(
            "(no pci.ids: names need `apt-get install pci.ids`, or AIOVFIO_PCI_IDS)",
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
    (address,) = _resolve(sysfs, [args.bdf])
    function = sysfs.function(address)
    group = sysfs.group_of(address)
    data: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "function": _function_dict(
            function, None if group is None else group.viable, sysfs.in_use(address, short=True)
        ),
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
        from ..kernel import LinuxKernel
        from . import info

        try:
            data.update(info.from_vfio(address, LinuxKernel(sysfs=roots.sysfs, dev=roots.dev)))
            data["source"] = "vfio"
        except (VfioError, OSError) as exc:
            if args.verbose:
                traceback.print_exc()
            reason = f"opening it through VFIO failed: {one_line(exc)}"
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
    noiommu = roots.dev / "vfio" / f"noiommu-{group.number}"
    if not node.exists() and noiommu.exists():
        if not opted_in():
            return f"it is in noiommu group {group.number}: pass --noiommu to open it"
        node = noiommu
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
    product = " ".join(n for n in (f["vendor_name"], f["device_name"]) if n)
    subsystem = f"  subsystem {f['subsystem_vendor']}:{f['subsystem_device']}" + (
        f" ({f['subsystem_name']})" if f["subsystem_name"] else ""
    )
    lines = [
        f"{f['address']}  {f['class_name']}: {product + ' ' if product else ''}"
        f"[{f['vendor']}:{f['device']}] rev {f['revision']}{subsystem}",
        f"driver: {f['driver'] or 'none'}"
        + (f" (driver_override {f['driver_override']})" if f["driver_override"] else ""),
        f"reset: {data['reset']}",
        f"in use: {', '.join(f['in_use']) or 'no'}",
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


def _each(
    binder: Binder, addresses: list[str], group: bool, act: Callable[[str], list[BindResult]]
) -> int:
    """Run `act` per address (per group with --group): one line per function, 1 if any failed."""
    failed = False
    done: set[str] = set()
    for address in addresses:
        if address in done:
            continue
        if group:
            done.update(binder.group_targets(address))
        try:
            results = act(address)
        except (VfioError, OSError) as exc:
            print(f"aiovfio: {address}: {one_line(exc)}", file=sys.stderr)
            failed = True
            continue
        for result in results:
            done.add(result.address)
            print(result.describe())
    return 1 if failed else 0


def _cmd_bind(args: argparse.Namespace, roots: Roots) -> int:
    binder = Binder.from_roots(roots)
    addresses = _resolve(binder.sysfs, args.bdf)
    binder.ensure_vfio_driver(load=args.load)  # once, before any function is touched

    def act(address: str) -> list[BindResult]:
        if args.group:
            return binder.bind_group(address, force=args.force)
        return [binder.bind(address, force=args.force)]

    status = _each(binder, addresses, args.group, act)
    notes = {n for a in addresses if (n := binder.viability_note(a))}
    for note in sorted(notes):
        print(f"note: {note}", file=sys.stderr)
    return status


def _cmd_unbind(args: argparse.Namespace, roots: Roots) -> int:
    binder = Binder.from_roots(roots)
    addresses = _resolve(binder.sysfs, args.bdf)
    if args.to is not None and not binder.sysfs.driver_loaded(args.to):
        if not args.load:
            loaded = ", ".join(binder.sysfs.drivers()) or "none"
            raise Usage(
                f"--to {args.to}: no such driver in {binder.sysfs.pci_drivers_dir} (loaded: "
                f"{loaded}); `modprobe {args.to}` first, or pass --load"
            )
        binder.load_driver(args.to)

    def act(address: str) -> list[BindResult]:
        if args.group:
            return binder.unbind_group(
                address, to=args.to, leave_unbound=args.none, force=args.force, load=args.load
            )
        return [
            binder.unbind(
                address, to=args.to, leave_unbound=args.none, force=args.force, load=args.load
            )
        ]

    return _each(binder, addresses, args.group, act)


# --- doctor ----------------------------------------------------------------------


def _cmd_doctor(args: argparse.Namespace, roots: Roots) -> int:
    from .doctor import Doctor, Status

    doctor = Doctor(roots, memlock_need=args.memlock)
    address = None
    if args.bdf:
        (address,) = _resolve(doctor.sysfs, [args.bdf])
    checks = doctor.run(address)
    failed = any(c.status is Status.FAIL for c in checks)
    if args.json:
        document = {
            "format": FORMAT_VERSION,
            "ok": not failed,
            "checks": [c.as_dict() for c in checks],
        }
        print(json.dumps(document, indent=2))
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
    package = Path(__file__).resolve().parent.parent
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
    from .. import repl

    kernel = None
    if roots != Roots():
        from ..kernel import LinuxKernel

        kernel = LinuxKernel(sysfs=roots.sysfs, dev=roots.dev)
    return repl.run(backend=args.backend, kernel=kernel)


def _cmd_completion(args: argparse.Namespace, roots: Roots) -> int:
    from .completion import script

    sys.stdout.write(script(args.shell))
    return 0


#: The command each subparser name runs.
COMMANDS: dict[str, Handler] = {
    "ls": _cmd_ls,
    "info": _cmd_info,
    "bind": _cmd_bind,
    "unbind": _cmd_unbind,
    "doctor": _cmd_doctor,
    "demo": _cmd_demo,
    "repl": _cmd_repl,
    "completion": _cmd_completion,
}
