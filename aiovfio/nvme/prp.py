"""PRP entries: how a transfer's memory is described to the controller (NVMe 1.4 4.3).

PRP1 is the first byte's IOVA (any dword-aligned offset into a page). If the
rest fits in one more page, PRP2 is that page; otherwise PRP2 points to a PRP
list of page addresses, and when one list page is not enough its last slot
chains to the next list page. The buffers handed here are IOVA-contiguous, so
the entries are an arithmetic series.
"""

from __future__ import annotations

import struct

__all__ = ["ENTRY", "build_prp", "list_pages_needed"]

#: Bytes per PRP entry.
ENTRY = 8


def list_pages_needed(max_transfer: int, page: int) -> int:
    """List pages one command needs for any transfer up to `max_transfer` bytes."""
    if max_transfer <= page:
        return 0  # PRP1 and PRP2 cover any offset
    entries = -(-max_transfer // page)  # at most this many pages after the first
    per_page = page // ENTRY
    return max(1, -(-(entries - 1) // (per_page - 1)))


def build_prp(
    iova: int, length: int, page: int, list_view: memoryview, list_iova: int
) -> tuple[int, int]:
    """PRP1 and PRP2 for `length` bytes at `iova`, writing a PRP list into `list_view`.

    `list_view` (at `list_iova`) must hold `list_pages_needed` pages for the
    largest transfer the caller makes.
    """
    first = page - (iova & (page - 1))
    if length <= first:
        return iova, 0
    start = iova + first
    rest = length - first
    if rest <= page:
        return iova, start
    entries = -(-rest // page)
    per_page = page // ENTRY
    pos = 0
    offset = 0
    while True:
        left = entries - pos
        if left <= per_page:
            a = start + pos * page
            struct.pack_into(f"<{left}Q", list_view, offset, *range(a, a + left * page, page))
            return iova, list_iova
        n = per_page - 1
        a = start + pos * page
        struct.pack_into(f"<{n}Q", list_view, offset, *range(a, a + n * page, page))
        offset += page
        struct.pack_into("<Q", list_view, offset - ENTRY, list_iova + offset)
        pos += n
