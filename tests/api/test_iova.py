"""The IOVA allocator against a model: no overlap, inside the ranges, below the mask, all back."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aiovfio
from aiovfio._iova import IovaAllocator

PAGE = 0x1000

steps = st.lists(
    st.tuples(
        st.sampled_from(["allocate", "reserve", "release"]),
        st.integers(1, 9),  # pages
        st.integers(0, 80),  # page number (reserve) or which live range (release)
        st.sampled_from([None, 0x20FFF, 0x3FFFF]),  # a DMA mask
    ),
    max_size=120,
)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    start=st.sampled_from([0, 0x1000, 0x10000]),
    pages=st.integers(1, 96),
    gap=st.one_of(st.none(), st.integers(1, 8)),
    floor=st.sampled_from([0, 0x4000, 0x10000]),
    ops=steps,
)
def test_the_allocator_keeps_its_invariants(
    start: int, pages: int, gap: int | None, floor: int, ops: list[tuple[str, int, int, int | None]]
) -> None:
    ranges: tuple[tuple[int, int], ...] = ((start, start + pages * PAGE - 1),)
    if gap is not None:
        second = ranges[0][1] + 1 + gap * PAGE
        ranges += ((second, second + 16 * PAGE - 1),)
    alloc = IovaAllocator(ranges, PAGE, floor=floor)
    live: dict[int, int] = {}
    for op, n, where, mask in ops:
        size = n * PAGE
        if op == "release":
            if live:
                iova = sorted(live)[where % len(live)]
                alloc.release(iova, live.pop(iova))
            continue
        try:
            if op == "reserve":
                iova = start + where * PAGE
                alloc.reserve(iova, size, limit=mask)
            else:
                iova = alloc.allocate(size, limit=mask)
                assert iova >= floor
                assert iova % (1 << (size - 1).bit_length()) == 0  # size-aligned
        except aiovfio.VfioError:
            if op == "reserve":  # refused only when it overlaps or does not fit
                fits = any(s <= iova and iova + size - 1 <= e for s, e in ranges)
                fits = fits and (mask is None or iova + size - 1 <= mask)
                assert not fits or any(iova < j + m and j < iova + size for j, m in live.items())
            continue
        assert any(s <= iova and iova + size - 1 <= e for s, e in ranges)
        assert mask is None or iova + size - 1 <= mask
        assert all(iova + size <= j or j + m <= iova for j, m in live.items()), "overlap"
        live[iova] = size
        assert len(alloc) == len(live)
    for iova, size in live.items():
        alloc.release(iova, size)
    for s, e in ranges:  # everything merged back: each whole range can be claimed again
        alloc.reserve(s, e - s + 1)


def test_release_of_what_was_not_allocated_is_refused() -> None:
    alloc = IovaAllocator(((0, 0xFFFFF),), PAGE)
    iova = alloc.allocate(PAGE)
    with pytest.raises(aiovfio.UsageError, match="not allocated"):
        alloc.release(iova, 2 * PAGE)
    alloc.release(iova, PAGE)
    with pytest.raises(aiovfio.UsageError, match="not allocated"):
        alloc.release(iova, PAGE)


def test_an_exhausted_space_says_so() -> None:
    alloc = IovaAllocator(((0, 0x1FFFF),), PAGE)
    for _ in range(16):
        alloc.allocate(PAGE)
    with pytest.raises(aiovfio.DmaSpaceExhausted, match="16 mappings live"):
        alloc.allocate(PAGE)
