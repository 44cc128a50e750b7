"""What to say when a device cannot be found: the commonest sim mistake, and the fix.

A test that builds a simulated `Machine` but forgets `kernel=machine.kernel`
asks the host's real kernel for the device; the answer "no such device" is
true but useless. Simulated kernels register here while their machine is
alive, so the public layer can hint at the fix (and, on the sim, name the
devices the machine has). It lives at the kernel boundary so that both the
public layer and `aiovfio.sim` may import it.
"""

from __future__ import annotations

import weakref

from .protocol import Kernel

__all__ = ["missing_device", "register_simulated", "unregister_simulated"]

_live: weakref.WeakSet[Kernel] = weakref.WeakSet()


def register_simulated(kernel: Kernel) -> None:
    """A simulated machine's kernel is alive (Machine() calls this)."""
    _live.add(kernel)


def unregister_simulated(kernel: Kernel) -> None:
    """Its machine closed."""
    _live.discard(kernel)


def _devices(kernel: Kernel) -> str:
    try:
        names = kernel.pci_devices()
    except OSError:
        return "?"
    return ", ".join(names) or "none"


def missing_device(kernel: Kernel, bdf: str) -> str:
    """The sentence after "no PCI device BDF": what to do about it."""
    if kernel in _live:
        return f"the simulated machine has {_devices(kernel)}"
    others = list(_live)
    if others:
        return (
            f"a simulated Machine is alive in this process (devices: {_devices(others[0])}): "
            "pass kernel=machine.kernel to use it instead of the host's kernel"
        )
    return "list them with `aiovfio ls`"
