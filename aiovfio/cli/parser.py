"""The `aiovfio` argument parser, and the checks that turn bad input into exit status 2.

Every argument is checked here, before a command runs: a malformed PCI
address, size or driver name ends as one line on stderr saying what to write
instead, exit status 2, and nothing read from or written to sysfs. The
completion scripts (`aiovfio completion`) and the docs' CLI reference are made
from this same parser.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from fractions import Fraction
from typing import Any, NoReturn

from .._util import normalize_bdf
from .._version import __version__
from ..errors import InvalidArgument

__all__ = [
    "FORMAT_VERSION",
    "ArgumentParser",
    "build_parser",
    "driver_name",
    "pci_address",
    "size",
]

#: The `format` every `--json` document carries; raised when a field changes meaning.
FORMAT_VERSION = 1

#: Where `size` stops: an exabyte is no DMA budget anyone means.
_MAX_SIZE = 1 << 60
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[KMGTP]?)(?:I?B)?", re.IGNORECASE)
_DRIVER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (what to do), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


# --- argument types ----------------------------------------------------------------


def pci_address(text: str) -> str:
    """A PCI address in its full form (0000:00:04.0); 00:04.0 and 04.0 are accepted."""
    try:
        return normalize_bdf(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def size(text: str) -> int:
    """A byte count: 4096, 64M, 1.5G, 2GiB (binary units). Not inf, not negative, not 0."""
    shown = repr(text if len(text) <= 24 else text[:20] + "...")
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{shown} is not a size: write a positive number of bytes with an optional "
            "K, M, G or T (e.g. 64M or 1G)"
        )
    # exact arithmetic: no float overflow to inf, no rounding of large counts
    value = int(Fraction(match["number"]) * _UNITS[match["unit"].upper()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{shown} is not a size: it must be at least 1 byte")
    if value > _MAX_SIZE:
        raise argparse.ArgumentTypeError(f"{shown} is too large: at most {_MAX_SIZE >> 50}P")
    return value


def driver_name(text: str) -> str:
    """A kernel driver's name (a directory of /sys/bus/pci/drivers): no slashes, no dots first."""
    if not _DRIVER.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a driver name: write one of /sys/bus/pci/drivers "
            "(e.g. nvme, e1000e); `aiovfio ls` shows the drivers in use"
        )
    return text


# --- the parser ---------------------------------------------------------------------


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


def _address_arg(parser: argparse.ArgumentParser, *, nargs: str | None = None) -> None:
    action = parser.add_argument(
        "bdf",
        metavar="BDF",
        type=pci_address,
        nargs=nargs,
        help="PCI address: 0000:00:04.0, 00:04.0 or 04.0 (`aiovfio ls` lists them)",
    )
    action.complete = {"bash": "_aiovfio_bdf", "zsh": "_aiovfio_bdf"}  # type: ignore[attr-defined]


def build_parser(*, with_nvme: bool = True) -> ArgumentParser:
    """The whole command line. `with_nvme` adds `aiovfio nvme` (when that package exists)."""
    parser = ArgumentParser(
        prog="aiovfio",
        description="Find, bind and inspect PCI devices for user-space drivers on VFIO.",
        epilog=(
            "Exit status: 0 success, 1 a failure (the line says what to do), 2 a usage error. "
            "`bind` remembers each function's previous driver in /run/aiovfio/drivers.json "
            "(AIOVFIO_STATE moves it) so that `unbind` restores it. "
            "AIOVFIO_LOG=debug shows the library's logs on stderr."
        ),
    )
    parser.add_argument("--version", action="version", version=f"aiovfio {__version__}")
    parser.add_argument(
        "--noiommu",
        action="store_true",
        help="allow devices without an IOMMU (VFIO's unsafe noiommu mode: the device can "
        "reach all memory); sets AIOVFIO_NOIOMMU=1 for the command",
    )
    _common(parser, top=True)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p, top=False)
        return p

    p = command("ls", "list PCI functions: names, driver, IOMMU group, viability, users")
    p.add_argument(
        "--vendor",
        help="vendor id (hex, 8086) or a word of its name (intel); VENDOR:DEVICE (hex) too",
    )
    p.add_argument("--device", help="device id (hex, 10d3) or a word of its name (nvme)")
    p.add_argument(
        "--class", dest="klass", help="class code prefix (hex, 0108) or a word (ethernet)"
    )
    p.add_argument(
        "--driver", type=driver_name, help="driver name, or 'none' for unbound functions"
    )
    p.add_argument("--json", action="store_true", help="print JSON (with a format version)")

    p = command("info", "regions, IRQs, capabilities and group of one function")
    _address_arg(p)
    p.add_argument(
        "--no-open", action="store_true", help="use sysfs only; never open (or reset) it"
    )
    p.add_argument("--json", action="store_true", help="print JSON (with a format version)")

    p = command("bind", "bind functions to vfio-pci, remembering their drivers")
    _address_arg(p, nargs="+")
    p.add_argument("--group", action="store_true", help="every function of their IOMMU groups")
    p.add_argument("--force", action="store_true", help="even when a function is in use")
    p.add_argument("--load", action="store_true", help="run `modprobe vfio-pci` if it is missing")

    p = command("unbind", "release functions from vfio-pci to their previous drivers")
    _address_arg(p, nargs="+")
    p.add_argument("--group", action="store_true", help="every function of their IOMMU groups")
    p.add_argument("--force", action="store_true", help="even when a function is in use")
    p.add_argument("--load", action="store_true", help="run modprobe for a driver not loaded")
    to = p.add_mutually_exclusive_group()
    to.add_argument(
        "--to",
        metavar="DRIVER",
        type=driver_name,
        help="bind to DRIVER (one of /sys/bus/pci/drivers), not the remembered one",
    )
    to.add_argument("--none", action="store_true", help="leave them without a driver")

    p = command("doctor", "check that this machine is ready for VFIO, and say how to fix it")
    _address_arg(p, nargs="?")
    p.add_argument(
        "--memlock",
        type=size,
        default="64M",
        metavar="SIZE",
        help="DMA memory a driver will pin (default 64M; K, M, G, T)",
    )
    p.add_argument("--json", action="store_true", help="print JSON (with a format version)")

    p = command("demo", "run the edu demo driver on the simulated machine")
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")

    p = command("repl", "an async REPL with aiovfio imported, attach() and hold()")
    p.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")

    p = command("completion", "print a shell completion script (bash or zsh)")
    p.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete for")

    sub.add_parser("vm", help="run a command in the QEMU guest (see `aiovfio vm --help`)")
    if with_nvme:
        _add_nvme(sub)
    return parser


def _add_nvme(sub: Any) -> None:
    """`aiovfio nvme`, from aiovfio.nvme.cli once that module exists."""
    try:
        nvme_cli = importlib.import_module("aiovfio.nvme.cli")
    except ModuleNotFoundError as exc:
        if exc.name in ("aiovfio.nvme", "aiovfio.nvme.cli"):
            return  # not landed or not installed: no `aiovfio nvme`
        raise
    nvme_cli.add_parser(sub)


if __name__ == "__main__":  # pragma: no cover - `python -m aiovfio.cli.parser` shows it
    build_parser().print_help(sys.stdout)
