"""Tools for testing drivers.

* `Target` (the `vfio_target` fixture of aiovfio's pytest plugin): the
  simulated machine on a normal host, the real kernel inside the aiovfio QEMU
  guest, with leak and fault checks (`aiovfio.testing.target`).
* `aiovfio.testing.probe`: how a kernel behaves where Linux versions differ.
* `aiovfio.testing.vm`: the QEMU-guest harness (`aiovfio vm -- CMD`).
"""

from __future__ import annotations

from .target import Target

__all__ = ["Target"]
