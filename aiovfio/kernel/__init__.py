"""The Kernel boundary: one Protocol, a real implementation and the sim's."""

from __future__ import annotations

from .linux import LinuxKernel as LinuxKernel
from .protocol import Kernel as Kernel
from .protocol import PciIds as PciIds

__all__ = ["Kernel", "LinuxKernel", "PciIds", "default_kernel"]

_default: Kernel | None = None


def default_kernel() -> Kernel:
    """The real Linux kernel, rooted at /sys and /dev (made once)."""
    global _default
    if _default is None:
        _default = LinuxKernel()
    return _default
