"""The `aiovfio` command line (placeholder until the CLI lands)."""

from __future__ import annotations

import sys

from ._version import __version__
from .kernel import default_kernel

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Print the version and whether this kernel has VFIO."""
    args = sys.argv[1:] if argv is None else argv
    kernel = default_kernel()
    print(f"aiovfio {__version__}")
    print(f"VFIO on this kernel: {'yes' if kernel.vfio_available() else 'no (/dev/vfio/vfio absent)'}")
    if args and args[0] == "vm":
        from .testing.vm import main as vm_main

        return vm_main(args[1:])
    return 0
