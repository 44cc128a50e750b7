"""A bounce pool: page runs of one DMA buffer, for `read`/`write` of plain bytes.

First fit over a byte-per-page map (`bytearray.find` does the search in C).
A task that finds no room waits until a run is freed.
"""

from __future__ import annotations

import anyio
from attrs import define, field

__all__ = ["BouncePool"]

_FREE, _USED = 0, 1


@define(eq=False, repr=False)
class BouncePool:
    """`size` bytes at `iova` (seen by the CPU as `view`), handed out in pages."""

    view: memoryview
    iova: int
    page: int
    _map: bytearray = field(init=False)
    _freed: anyio.Event | None = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._map = bytearray(len(self.view) // self.page)

    def __repr__(self) -> str:
        used = self._map.count(_USED)
        return f"<BouncePool {len(self._map)} pages, {used} in use>"

    @property
    def size(self) -> int:
        return len(self._map) * self.page

    def try_alloc(self, nbytes: int) -> int | None:
        """The byte offset of a free run of pages covering `nbytes`, or None."""
        pages = -(-nbytes // self.page)
        index = self._map.find(bytes(pages)) if pages > 1 else self._map.find(_FREE)
        if index < 0:
            return None
        self._map[index : index + pages] = b"\x01" * pages
        return index * self.page

    async def alloc(self, nbytes: int) -> int:
        """A free run covering `nbytes` (at most `size`), waiting for one if need be."""
        while True:
            offset = self.try_alloc(nbytes)
            if offset is not None:
                return offset
            if self._freed is None:
                self._freed = anyio.Event()
            await self._freed.wait()

    def free(self, offset: int, nbytes: int) -> None:
        index = offset // self.page
        pages = -(-nbytes // self.page)
        self._map[index : index + pages] = bytes(pages)
        freed, self._freed = self._freed, None
        if freed is not None:
            freed.set()
