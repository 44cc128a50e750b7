"""PRP entries and lists, checked against the rules of NVMe 1.4 4.3 (no device)."""

from __future__ import annotations

import struct

import pytest

from aiovfio.nvme.prp import build_prp, list_pages_needed

PAGE = 4096
LIST = 0x9000_0000


def entries(view: memoryview, count: int, offset: int = 0) -> list[int]:
    return list(struct.unpack_from(f"<{count}Q", view, offset))


@pytest.mark.parametrize(
    ("iova", "length", "prp2"),
    [
        (0x10000, 512, 0),
        (0x10000, PAGE, 0),
        (0x10800, 2048, 0),
        (0x10800, 2049, 0x11000),
        (0x10000, 2 * PAGE, 0x11000),
        (0x10004, PAGE, 0x11000),
    ],
)
def test_one_or_two_pages_need_no_list(iova: int, length: int, prp2: int) -> None:
    view = memoryview(bytearray(PAGE))
    assert build_prp(iova, length, PAGE, view, LIST) == (iova, prp2)
    assert bytes(view) == bytes(PAGE)


def test_a_list_names_every_page_after_the_first() -> None:
    view = memoryview(bytearray(PAGE))
    assert build_prp(0x20200, 5 * PAGE, PAGE, view, LIST) == (0x20200, LIST)
    assert entries(view, 5) == [0x21000, 0x22000, 0x23000, 0x24000, 0x25000]


def test_a_full_list_page_is_not_chained() -> None:
    view = memoryview(bytearray(PAGE))
    build_prp(0x100000, 513 * PAGE, PAGE, view, LIST)  # 512 pages after the first
    got = entries(view, 512)
    assert got == [0x101000 + i * PAGE for i in range(512)]


def test_the_last_slot_chains_to_the_next_list_page() -> None:
    view = memoryview(bytearray(3 * PAGE))
    build_prp(0x100010, 513 * PAGE, PAGE, view, LIST)  # 513 pages after the first
    first = entries(view, 512)
    assert first[:511] == [0x101000 + i * PAGE for i in range(511)]
    assert first[511] == LIST + PAGE
    assert entries(view, 2, PAGE) == [0x101000 + 511 * PAGE, 0x101000 + 512 * PAGE]


@pytest.mark.parametrize(
    ("max_transfer", "pages"),
    [(PAGE, 0), (2 * PAGE, 1), (512 * 1024, 1), (2 * 1024 * 1024, 1), (4 * 1024 * 1024, 3)],
)
def test_list_pages_cover_any_offset(max_transfer: int, pages: int) -> None:
    assert list_pages_needed(max_transfer, PAGE) == pages
    if pages:
        view = memoryview(bytearray(pages * PAGE))
        build_prp(0x100000 + PAGE - 4, max_transfer, PAGE, view, LIST)  # the worst offset
