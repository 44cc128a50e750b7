"""Capability chains: the walker and the decoders, on well-formed chains built
with the _uapi structures and on malformed ones. Whatever the bytes, the only
exception that may escape is CapabilityChainError: never IndexError,
struct.error, ctypes' ValueError or an endless loop."""

from __future__ import annotations

import contextlib
import ctypes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiovfio._uapi.caps import (
    MAX_CAPABILITIES,
    Capability,
    dma_avail,
    iova_ranges,
    region_type,
    sparse_mmap_areas,
    walk,
)
from aiovfio._uapi.vfio import (
    VFIO_REGION_TYPE_PCI_VENDOR_TYPE,
    IommuInfoCap,
    IommuInfoFlag,
    RegionCap,
    RegionFlag,
    vfio_info_cap_header,
    vfio_iommu_type1_info,
    vfio_iommu_type1_info_cap_iova_range,
    vfio_iommu_type1_info_dma_avail,
    vfio_iova_range,
    vfio_region_info,
    vfio_region_info_cap_sparse_mmap,
    vfio_region_info_cap_type,
    vfio_region_sparse_mmap_area,
)
from aiovfio.errors import CapabilityChainError, InvalidArgument

REGION_INFO = ctypes.sizeof(vfio_region_info)  # 32
IOMMU_INFO = ctypes.sizeof(vfio_iommu_type1_info)  # 24
HEADER = ctypes.sizeof(vfio_info_cap_header)  # 8


def hdr(cap_id: int, nxt: int, version: int = 1) -> vfio_info_cap_header:
    return vfio_info_cap_header(id=cap_id, version=version, next=nxt)


def sparse_cap(nxt: int, areas: list[tuple[int, int]], nr_areas: int | None = None) -> bytes:
    head = vfio_region_info_cap_sparse_mmap(
        header=hdr(RegionCap.SPARSE_MMAP, nxt),
        nr_areas=len(areas) if nr_areas is None else nr_areas,
    )
    items = b"".join(bytes(vfio_region_sparse_mmap_area(offset=o, size=s)) for o, s in areas)
    return bytes(head) + items


def type_cap(nxt: int, type_: int, subtype: int) -> bytes:
    return bytes(
        vfio_region_info_cap_type(header=hdr(RegionCap.TYPE, nxt), type=type_, subtype=subtype)
    )


def iova_cap(nxt: int, ranges: list[tuple[int, int]], nr: int | None = None) -> bytes:
    head = vfio_iommu_type1_info_cap_iova_range(
        header=hdr(IommuInfoCap.IOVA_RANGE, nxt), nr_iovas=len(ranges) if nr is None else nr
    )
    return bytes(head) + b"".join(bytes(vfio_iova_range(start=s, end=e)) for s, e in ranges)


def avail_cap(nxt: int, avail: int) -> bytes:
    cap = vfio_iommu_type1_info_dma_avail(header=hdr(IommuInfoCap.DMA_AVAIL, nxt), avail=avail)
    return bytes(cap) + bytes(4)  # the kernel keeps the next capability 8-aligned


def layout(size: int, parts: dict[int, bytes]) -> bytearray:
    """A zeroed buffer of `size` bytes with `parts` placed at their offsets."""
    buf = bytearray(size)
    for off, data in parts.items():
        buf[off : off + len(data)] = data
    return buf


# --- well-formed -----------------------------------------------------------------


def test_region_info_with_sparse_mmap_type_and_msix_mappable() -> None:
    areas = [(0x0, 0x1000), (0x3000, 0x1000), (0x8000, 0x8000)]
    sparse = sparse_cap(96, areas)  # 16 + 3 * 16 = 64 bytes, 32..96
    vendor = (VFIO_REGION_TYPE_PCI_VENDOR_TYPE | 0x10DE, 1)
    info = vfio_region_info(
        argsz=120,
        flags=RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP | RegionFlag.CAPS,
        index=0,
        cap_offset=REGION_INFO,
        size=0x10000,
        offset=0,
    )
    buf = layout(
        120,
        {
            0: bytes(info),
            32: sparse,
            96: type_cap(112, *vendor),
            112: bytes(hdr(RegionCap.MSIX_MAPPABLE, 0)),
        },
    )
    chain = walk(buf, info.cap_offset, start=REGION_INFO)
    assert [(c.id, c.offset, len(c.data)) for c in chain] == [
        (RegionCap.SPARSE_MMAP, 32, 64),
        (RegionCap.TYPE, 96, 16),
        (RegionCap.MSIX_MAPPABLE, 112, 8),
    ]
    assert sparse_mmap_areas(chain[0]) == areas
    assert region_type(chain[1]) == vendor
    assert chain[0].data == sparse


def test_iommu_info_with_iova_ranges_and_dma_avail() -> None:
    ranges = [(0, 0xFEDF_FFFF), (0xFEF0_0000, 0xFFFF_FFFF_FFFF_FFFF)]
    iova = iova_cap(72, ranges)  # 24..72
    info = vfio_iommu_type1_info(
        argsz=88,
        flags=IommuInfoFlag.PGSIZES | IommuInfoFlag.CAPS,
        iova_pgsizes=0x4000_0000 | 0x20_0000 | 0x1000,
        cap_offset=IOMMU_INFO,
    )
    buf = layout(88, {0: bytes(info), 24: iova, 72: avail_cap(0, 65535)})
    chain = walk(buf, info.cap_offset, start=IOMMU_INFO)
    assert [c.id for c in chain] == [IommuInfoCap.IOVA_RANGE, IommuInfoCap.DMA_AVAIL]
    assert iova_ranges(chain[0]) == ranges
    assert dma_avail(chain[1]) == 65535


def test_chain_order_is_not_memory_order() -> None:
    # The first capability sits last in memory and points back to an earlier one;
    # each still ends where the next one in memory begins.
    buf = layout(
        80,
        {32: type_cap(0, 1, 2), 48: sparse_cap(32, [(0, 0x1000)])},
    )
    chain = walk(buf, 48, start=32)
    assert [(c.id, c.offset, len(c.data)) for c in chain] == [
        (RegionCap.SPARSE_MMAP, 48, 32),
        (RegionCap.TYPE, 32, 16),
    ]
    assert sparse_mmap_areas(chain[0]) == [(0, 0x1000)]
    assert region_type(chain[1]) == (1, 2)


def test_no_chain() -> None:
    assert walk(bytes(REGION_INFO), 0, start=REGION_INFO) == []


def test_empty_sparse_mmap_and_iova_range() -> None:
    buf = layout(48, {16: sparse_cap(32, []), 32: iova_cap(0, [])})
    sparse, iova = walk(buf, 16, start=16)
    assert sparse_mmap_areas(sparse) == []
    assert iova_ranges(iova) == []


def test_longest_chain_allowed() -> None:
    n = MAX_CAPABILITIES
    parts = {8 * i: bytes(hdr(3, 8 * (i + 1) if i < n else 0)) for i in range(1, n + 1)}
    chain = walk(layout(8 * (n + 1), parts), 8, start=8)
    assert len(chain) == n


# --- malformed -------------------------------------------------------------------


def test_self_loop() -> None:
    buf = layout(64, {32: bytes(hdr(1, 32))})
    with pytest.raises(CapabilityChainError, match="loops back to offset 0x20"):
        walk(buf, 32, start=32)


def test_loop_a_b_a() -> None:
    buf = layout(64, {32: bytes(hdr(2, 48)), 48: bytes(hdr(3, 32))})
    with pytest.raises(CapabilityChainError, match="loops back to offset 0x20"):
        walk(buf, 32, start=32)


def test_long_loop_ends() -> None:
    parts = {8 * i: bytes(hdr(3, 8 * (i % 40) + 8)) for i in range(1, 41)}
    with pytest.raises(CapabilityChainError, match="loops back"):
        walk(layout(8 * 41, parts), 8, start=8)


def test_chain_too_long() -> None:
    n = MAX_CAPABILITIES + 1
    parts = {8 * i: bytes(hdr(3, 8 * (i + 1) if i < n else 0)) for i in range(1, n + 1)}
    with pytest.raises(CapabilityChainError, match="longer than"):
        walk(layout(8 * (n + 1), parts), 8, start=8)


@pytest.mark.parametrize("first", [64, 68, 0x1000, 0xFFFF_FFFC])
def test_first_offset_past_the_buffer(first: int) -> None:
    with pytest.raises(CapabilityChainError, match="past the end"):
        walk(bytes(64), first, start=32)


def test_next_offset_past_the_buffer() -> None:
    buf = layout(64, {32: bytes(hdr(1, 0xFFFF_FFF0))})
    with pytest.raises(CapabilityChainError, match="past the end"):
        walk(buf, 32, start=32)


@pytest.mark.parametrize("size", [33, 36, 39])
def test_truncated_header(size: int) -> None:
    with pytest.raises(CapabilityChainError, match="truncated"):
        walk(bytes(size), 32, start=32)


def test_truncated_second_header() -> None:
    buf = layout(44, {32: bytes(hdr(1, 40))})
    with pytest.raises(CapabilityChainError, match="header at 0x28 is truncated"):
        walk(buf, 32, start=32)


@pytest.mark.parametrize("first", [4, 16, 28])
def test_offset_inside_the_fixed_structure(first: int) -> None:
    with pytest.raises(CapabilityChainError, match="overlaps the 32-byte info structure"):
        walk(bytes(64), first, start=32)


def test_next_points_back_into_the_fixed_structure() -> None:
    buf = layout(64, {32: bytes(hdr(1, 8))})
    with pytest.raises(CapabilityChainError, match="overlaps the 32-byte"):
        walk(buf, 32, start=32)


@pytest.mark.parametrize("first", [33, 34, 35, 38])
def test_unaligned_offset(first: int) -> None:
    with pytest.raises(CapabilityChainError, match="not 4-byte aligned"):
        walk(bytes(64), first, start=32)


def test_overlapping_capabilities() -> None:
    # B starts inside A's header: A's `next` (36) is B's id (36) and version (0).
    buf = layout(64, {32: bytes(hdr(1, 36))})
    buf[36:44] = bytes(hdr(36, 0, version=0))
    with pytest.raises(CapabilityChainError, match="overlap"):
        walk(buf, 32, start=32)


def test_negative_offsets() -> None:
    with pytest.raises(CapabilityChainError, match="negative"):
        walk(bytes(64), -8, start=0)
    with pytest.raises(InvalidArgument):
        walk(bytes(64), 32, start=-1)


@pytest.mark.parametrize("nr_areas", [2, 3, 0x1000, 0xFFFF_FFFF])
def test_sparse_mmap_areas_overrun_the_buffer(nr_areas: int) -> None:
    buf = layout(64, {32: sparse_cap(0, [(0, 0x1000)], nr_areas=nr_areas)})
    (cap,) = walk(buf, 32, start=32)
    with pytest.raises(CapabilityChainError, match="sparse mmap capability at 0x20 is truncated"):
        sparse_mmap_areas(cap)


def test_sparse_mmap_areas_overrun_into_the_next_capability() -> None:
    # Two areas claimed, but the next capability begins after the first one.
    buf = layout(96, {32: sparse_cap(64, [(0, 0x1000)], nr_areas=2), 64: type_cap(0, 1, 1)})
    sparse, _ = walk(buf, 32, start=32)
    with pytest.raises(CapabilityChainError, match="truncated: 32 bytes, needs 48"):
        sparse_mmap_areas(sparse)


@pytest.mark.parametrize("nr", [1, 0xFFFF_FFFF])
def test_iova_ranges_overrun(nr: int) -> None:
    (cap,) = walk(layout(40, {24: iova_cap(0, [], nr=nr)}), 24, start=24)
    with pytest.raises(CapabilityChainError, match="IOVA range capability at 0x18 is truncated"):
        iova_ranges(cap)


@pytest.mark.parametrize(
    ("decode", "what"),
    [
        (sparse_mmap_areas, "sparse mmap"),
        (region_type, "region type"),
        (iova_ranges, "IOVA range"),
        (dma_avail, "DMA available"),
    ],
)
def test_decoders_refuse_a_bare_header(decode: object, what: str) -> None:
    (cap,) = walk(layout(40, {32: bytes(hdr(1, 0))}), 32, start=32)
    assert callable(decode)
    with pytest.raises(CapabilityChainError, match=f"{what} capability at 0x20 is truncated"):
        decode(cap)


# --- anything at all -------------------------------------------------------------

FUZZ = settings(max_examples=400, derandomize=True, database=None, deadline=None)
DECODERS = (sparse_mmap_areas, region_type, iova_ranges, dma_avail)


def _check_chain(buf: bytes, first: int, start: int) -> None:
    """Walk and decode; only CapabilityChainError may escape, and a chain that
    is accepted must make sense."""
    try:
        chain = walk(buf, first, start=start)
    except CapabilityChainError:
        return
    offsets = [c.offset for c in chain]
    assert len(set(offsets)) == len(offsets) <= MAX_CAPABILITIES
    assert offsets[:1] == ([first] if first else [])
    for i, cap in enumerate(chain):
        assert cap.offset >= start and cap.offset % 4 == 0
        assert len(cap.data) >= HEADER
        assert cap.data == bytes(buf[cap.offset : cap.offset + len(cap.data)])
        header = vfio_info_cap_header.from_buffer_copy(cap.data)
        assert (header.id, header.version) == (cap.id, cap.version)
        assert header.next == (chain[i + 1].offset if i + 1 < len(chain) else 0)
        for decode in DECODERS:
            with contextlib.suppress(CapabilityChainError):
                decode(cap)


@FUZZ
@given(
    buf=st.binary(max_size=600),
    first=st.one_of(st.integers(0, 640), st.integers(-(2**40), 2**40)),
    start=st.integers(0, 640),
)
def test_random_bytes_and_offsets(buf: bytes, first: int, start: int) -> None:
    _check_chain(buf, first, start)


@st.composite
def chains(draw: st.DrawFn) -> tuple[bytes, int, int]:
    """Buffers that look like info structures with capability chains: headers
    at aligned slots whose `next` mostly points at other slots."""
    start = draw(st.sampled_from([0, 16, 24, 32]))
    slots = draw(st.integers(0, 12))
    step = draw(st.sampled_from([8, 16, 24, 32]))
    offsets = [start + step * i for i in range(slots)]
    slot = st.sampled_from([0, *offsets])
    near = st.integers(0, start + step * slots + 16)
    nexts = st.one_of(
        slot,
        slot,
        slot,
        near.map(lambda n: n & ~3),
        near,
        st.integers(0, 0xFFFF_FFFF),
    )
    size = start + step * slots + draw(st.integers(0, 40))
    buf = bytearray(draw(st.binary(min_size=size, max_size=size)))
    for off in offsets:
        header = hdr(draw(st.integers(0, 6)), draw(nexts), draw(st.integers(0, 2)))
        count = draw(st.integers(0, 4))
        item = bytes(header) + count.to_bytes(4, "little")
        buf[off : off + len(item)] = item[: max(0, len(buf) - off)]
    ours = st.sampled_from(offsets or [0])
    first = draw(st.one_of(ours, ours, ours, st.integers(0, size + 8)))
    return bytes(buf[:size]), first, start


@FUZZ
@given(chains())
def test_random_chains(chain: tuple[bytes, int, int]) -> None:
    _check_chain(*chain)


@FUZZ
@given(
    cap_id=st.integers(0, 0xFFFF),
    data=st.binary(max_size=200),
    offset=st.integers(0, 1 << 32),
)
def test_decoders_on_random_capabilities(cap_id: int, data: bytes, offset: int) -> None:
    cap = Capability(cap_id, 1, offset, data)
    for decode in DECODERS:
        with contextlib.suppress(CapabilityChainError):
            decode(cap)
