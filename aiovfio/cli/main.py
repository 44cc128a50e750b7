"""`aiovfio`'s entry point: parse, configure logging, run a command, map errors to exit codes.

Only the command line configures structlog (a console renderer on stderr,
INFO, or DEBUG with `-v`, which logs every kernel interaction). Exit status:
0 success; 1 a failure, printed as one line on stderr saying what to do (`-v`
adds the traceback); 2 a usage error (bad arguments, an address with no
device), also one line, with nothing written to sysfs; bare `aiovfio` prints
the help and exits 2.

Paths are rooted at `--sysfs`, `--dev`, `--proc` and `--state` (hidden
options) or `AIOVFIO_SYSFS`, `AIOVFIO_DEV`, `AIOVFIO_PROC`, `AIOVFIO_STATE`, so
tests and the simulated machine can stand in for the real ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TextIO

import structlog

from ..errors import InvalidArgument, VfioError
from .commands import COMMANDS, Usage
from .console import one_line
from .parser import build_parser
from .sysfs import Roots

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "vm":
        from ..testing.vm import main as vm_main

        return int(vm_main(args_list[1:]) or 0)
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command = getattr(args, "command", None)
    handler = getattr(args, "handler", None)  # a plug-in command's (aiovfio nvme)
    if command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if getattr(args, "noiommu", False):  # the explicit opt-in, for every command that opens
        os.environ["AIOVFIO_NOIOMMU"] = "1"
    verbose = bool(args.verbose)
    restore = _configure_logging(verbose, sys.stderr)
    try:
        if handler is not None:
            return int(handler(args))
        roots = Roots.from_env(sysfs=args.sysfs, dev=args.dev, proc=args.proc, state=args.state)
        return COMMANDS[command](args, roots)
    except BrokenPipeError:
        # the reader went away (`aiovfio ls | head`): stop quietly, as cat does
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except (Usage, InvalidArgument) as exc:
        print(f"aiovfio {command}: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (VfioError, OSError) as exc:
        if verbose:
            traceback.print_exc()
        print(f"aiovfio: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("aiovfio: interrupted", file=sys.stderr)
        return 130
    finally:
        restore()


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
