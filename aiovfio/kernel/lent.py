"""Memory a DMA map call maps, lent by the caller to kernels that can use it.

A kernel that is not Linux (the simulated machine, `aiovfio.sim`) makes its
devices read and write process memory by address. Without more it must go
through /proc/self/mem, one syscall per access, because an address alone
proves nothing: the process may unmap the memory at any time. A caller that
holds a memoryview of the memory for as long as the mapping lives (the
public layer's `DmaMapping` pin, a `DmaBuffer`'s view) lends that view here
for the duration of the map call; the kernel may keep a reference and copy
through it. A memoryview is safe to use for as long as it is not released:
while it is not, the buffer protocol keeps its memory allocated and mapped
(an mmap with exports cannot be closed, a bytearray cannot be resized);
once it is, every access raises ValueError instead of touching memory.

Linux's kernel never looks here. It lives at the kernel boundary so that
both the public layer and `aiovfio.sim` may import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["borrow", "lend"]

_lent: dict[tuple[int, int], memoryview] = {}


@contextlib.contextmanager
def lend(address: int, size: int, view: memoryview | None) -> Iterator[None]:
    """Within the block, `borrow(address, size)` returns `view` (nothing to lend: None)."""
    if view is None:
        yield
        return
    key = (address, size)
    _lent[key] = view
    try:
        yield
    finally:
        if _lent.get(key) is view:
            del _lent[key]


def borrow(address: int, size: int) -> memoryview | None:
    """The view lent for [address, address+size) by a map call in progress, if any."""
    return _lent.get((address, size))
