"""Property tests of the public API on the simulated machine: any argument, only VfioError.

Over register offsets, widths, values and bulk lengths (trapped, mmap'd and
sparse BARs, config space), region and IRQ indexes, IRQ kinds and counts,
DMA buffers, IOVAs, sizes and DMA masks:

* nothing but an `aiovfio.VfioError` escapes (no TypeError, IndexError,
  OverflowError, struct.error, bare ValueError or OSError);
* a bad argument is refused before any syscall;
* a valid access succeeds (and memory reads back what was written);
* the device is still usable afterwards.

The devices are opened once per test; hypothesis draws its examples inside.
Synchronous properties run in the event loop thread. The async ones run
hypothesis in a worker thread and each example on the loop through
`anyio.from_thread`, which works the same on asyncio, uvloop and trio.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.from_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aiovfio
from aiovfio.sim import Machine

from ._operations import EDU_IDENT, PAGE, RAM, closing_machine, new_target

pytestmark = pytest.mark.anyio

U64 = (1 << 64) - 1


def examples(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


#: what a caller might pass by mistake
junk = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.just(object()),
    st.lists(st.integers(), max_size=2),
)
huge_ints = st.integers(min_value=-(1 << 70), max_value=1 << 70)


def is_int(value: object) -> bool:
    """An int that is not a bool: what offsets, sizes, values and indexes take."""
    return isinstance(value, int) and not isinstance(value, bool)


def calls(machine: Machine) -> int:
    return sum(machine.kernel_calls.values())


async def run_in_worker(fn: Callable[[], None]) -> None:
    """Run a hypothesis test (sync) in a worker thread; its examples call back into the loop."""
    await anyio.to_thread.run_sync(fn)


def on_loop(fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
    anyio.from_thread.run(fn, *args)


# --- registers: offsets, widths, values, bulk lengths ------------------------------------------


async def test_register_access_takes_any_argument() -> None:
    with closing_machine(new_target()) as t:
        machine = t.machine
        assert machine is not None
        async with (
            aiovfio.open_device(t.edu, kernel=t.kernel) as edu,
            aiovfio.open_device(RAM, kernel=t.kernel) as ram,
        ):
            regions: dict[str, aiovfio.Region] = {
                "edu BAR0 (trapped)": edu.bar(0),
                "edu config": edu.config,
                "ram BAR0 (mmap)": ram.bar(0),
                "ram BAR2 (sparse)": ram.bar(2),
            }
            assert regions["ram BAR0 (mmap)"].mapped
            # what memory should hold: BAR0 whole, BAR2's mmap'd page
            shadow = {"ram BAR0 (mmap)": bytearray(0x4000), "ram BAR2 (sparse)": bytearray(0x4000)}
            memory = {"ram BAR0 (mmap)": (0, 0x4000), "ram BAR2 (sparse)": (0x1000, 0x2000)}

            offsets = st.one_of(
                st.integers(-16, 0x4010), st.integers(0xFFFF0, 0x100010), huge_ints, st.booleans(),
                junk,
            )  # fmt: skip
            values = st.one_of(st.integers(0, U64), huge_ints, st.booleans(), junk)

            @examples(1000)
            @given(
                name=st.sampled_from(sorted(regions)),
                op=st.sampled_from(["read", "write", "writer", "bulk read", "bulk write"]),
                width=st.sampled_from([1, 2, 4, 8]),
                offset=offsets,
                value=values,
                length=st.one_of(st.integers(-4, 80), huge_ints, junk),
            )
            def access(
                name: str, op: str, width: int, offset: Any, value: Any, length: Any
            ) -> None:
                region = regions[name]
                size = region.size
                if op == "writer":  # Region.writer32(offset)(value): write32's rules exactly
                    if name == "edu config":
                        op = "write"  # COMMAND and friends: see below
                    else:
                        width = 4
                whole = is_int(offset)
                if name == "edu config" and op in ("write", "bulk write"):
                    # a valid write may turn the device off (COMMAND, power
                    # state): only the interrupt line register is scratch
                    offset = 0x3C if is_int(offset) and 0 <= offset < 0x100 else offset
                    width, length = 1, length if not is_int(length) else length % 2
                n = width if op in ("read", "write", "writer") else length
                if op in ("read", "write", "writer"):
                    valid = whole and 0 <= offset <= size - width and not offset % width
                    if op != "read":
                        valid = valid and is_int(value) and 0 <= value < 1 << (8 * width)
                else:
                    valid = whole and is_int(length) and length >= 0
                    valid = valid and offset >= 0 and offset + length <= size
                data: Any = None
                if op == "bulk write":
                    if is_int(length) and 0 <= length <= 0x200:
                        data = bytes((i * 7 + 3) & 0xFF for i in range(length))
                    else:  # junk, a small int (bytes(5) would be 5 zeros), or bytes
                        small = not is_int(value) or -8 <= value <= 8
                        data = value if small else None
                        valid = isinstance(data, bytes) and whole
                        valid = valid and offset >= 0 and offset + len(data) <= size
                before = calls(machine)
                try:
                    if op == "read":
                        result = getattr(region, f"read{width * 8}")(offset)
                    elif op == "write":
                        getattr(region, f"write{width * 8}")(offset, value)
                    elif op == "writer":
                        region.writer32(offset)(value)
                    elif op == "bulk read":
                        result = region.read(offset, length)
                    else:
                        region.write(offset, data)
                except aiovfio.VfioError:
                    assert not valid, f"a valid {op} was refused"
                    assert calls(machine) == before, "refused after a syscall"
                    return
                assert valid, "accepted"
                mem = shadow.get(name)
                if mem is None or not is_int(offset):
                    return
                if op == "bulk write":
                    n = len(data)
                elif op == "bulk read":
                    n = len(result)
                lo, hi = memory[name]
                if not (lo <= offset and offset + n <= hi):
                    return  # trapped: the model's registers, no memory semantics
                if op in ("write", "writer"):
                    mem[offset : offset + n] = int(value).to_bytes(n, "little")
                elif op == "bulk write":
                    mem[offset : offset + n] = data
                elif op == "read":
                    assert result == int.from_bytes(mem[offset : offset + n], "little")
                else:
                    assert result == bytes(mem[offset : offset + n])

            access()
            assert edu.bar(0).read32(0) == EDU_IDENT
            edu.bar(0).write32(0x04, 0x0F0F0F0F)
            assert edu.bar(0).read32(0x04) == 0xF0F0F0F0
            assert edu.config.vendor_id == 0x1234
        assert machine.leaks() == []


async def test_region_and_irq_indexes_take_any_argument() -> None:
    with closing_machine(new_target()) as t:
        assert t.machine is not None
        async with aiovfio.open_device(t.edu, kernel=t.kernel) as edu:
            indexes = st.one_of(st.integers(-3, 12), huge_ints, st.booleans(), junk)
            kinds = st.one_of(
                st.sampled_from(["intx", "msi", "msix", "err", "req", "MSI", "msi-x", "nmi", ""]),
                indexes,
            )

            @examples(400)
            @given(what=st.sampled_from(["region_info", "bar", "irq_info"]), index=kinds)
            def describe(what: str, index: Any) -> None:
                try:
                    info = getattr(edu, what)(index)
                except aiovfio.VfioError:
                    if what == "region_info":
                        # 0-7 exist; 8 (VGA) is one vfio-pci refuses with EINVAL for edu
                        assert not (is_int(index) and 0 <= index <= 7)
                    elif what == "bar":
                        assert not (is_int(index) and index == 0)
                    return
                if what == "region_info":
                    assert is_int(index) and 0 <= index <= 8
                    assert info.index == index
                elif what == "bar":
                    assert info.index == 0
                else:
                    assert info.count in (0, 1)

            describe()
            assert [r.index for r in edu.regions] == [0, 7]
            assert edu.irq_info("msi").count == 1
        assert t.machine.leaks() == []


# --- interrupts: kinds and counts ---------------------------------------------------------------


async def test_interrupts_take_any_kind_and_count() -> None:
    with closing_machine(new_target()) as t:
        assert t.machine is not None and t.nvme is not None
        async with (
            aiovfio.open_device(t.edu, kernel=t.kernel) as edu,
            aiovfio.open_device(t.nvme, kernel=t.kernel) as nvme,
        ):
            devices = {"edu": edu, "nvme": nvme}
            vectors = {("edu", "intx"): 1, ("edu", "msi"): 1, ("edu", "req"): 1}
            vectors |= {("nvme", "intx"): 1, ("nvme", "msix"): 65}
            vectors |= {("nvme", "err"): 1, ("nvme", "req"): 1}
            names = ["intx", "msi", "msix", "err", "req"]

            async def example(device: str, kind: Any, count: Any) -> None:
                dev = devices[device]
                name = kind.lower().replace("-", "") if isinstance(kind, str) else None
                if isinstance(kind, int) and not isinstance(kind, bool) and 0 <= kind < 5:
                    name = names[kind]
                n = vectors.get((device, name or ""), 0)
                valid = isinstance(count, int) and not isinstance(count, bool) and 1 <= count <= n
                try:
                    iset = dev.interrupts(kind, count)
                    async with iset as streams:
                        assert len(streams) == count
                        if name in ("msi", "msix"):
                            for irq in {streams[0], streams[-1]}:
                                irq.trigger()
                                assert await irq.receive() == 1
                except aiovfio.VfioError:
                    assert not valid, f"{device} {kind!r} x{count!r} was refused"
                    return
                assert valid

            @examples(300)
            @given(
                device=st.sampled_from(["edu", "nvme"]),
                kind=st.one_of(
                    st.sampled_from([*names, "MSIX", "Msi-X", "nmi", ""]),
                    st.integers(-2, 7),
                    junk,
                ),
                count=st.one_of(st.integers(-2, 70), huge_ints, st.booleans(), junk),
            )
            def interrupts(device: str, kind: Any, count: Any) -> None:
                on_loop(example, device, kind, count)

            await run_in_worker(interrupts)
            async with edu.interrupts("msi") as (irq,):
                irq.trigger()
                assert await irq.receive() == 1
        assert t.machine.leaks() == []


# --- DMA: buffers, IOVAs, sizes, masks ----------------------------------------------------------


#: "pages" twice: half the mappings are of valid buffers
BUFFER_KINDS = (
    *("pages", "pages", "unaligned", "odd size", "empty"),
    *("strided", "bytes", "bytearray", "object"),
)


def _buffer(kind: str, pages: int) -> tuple[Any, mmap.mmap | None]:
    """A buffer of the kind asked for, and the mmap to close afterwards."""
    if kind == "object":
        return 42, None
    if kind == "bytes":
        return bytes(PAGE), None
    if kind == "bytearray":
        return bytearray(PAGE), None
    mem = mmap.mmap(-1, (pages + 1) * PAGE)
    view = memoryview(mem)
    return {
        "pages": view[: pages * PAGE],
        "unaligned": view[8 : 8 + pages * PAGE],
        "odd size": view[: pages * PAGE - 100],
        "empty": view[:0],
        "strided": view[: pages * PAGE : 2],
    }[kind], mem


async def test_dma_takes_any_buffer_iova_size_and_mask() -> None:
    with closing_machine(new_target()) as t:
        machine = t.machine
        assert machine is not None
        async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
            space = dev.dma_space

            def no_mappings() -> None:
                assert space.mapping_count == 0
                assert not [line for line in machine.leaks() if line.startswith("DMA mapping")]

            async def map_example(
                kind: str, pages: int, iova: Any, mask: Any, readonly: bool
            ) -> None:
                buffer, mem = _buffer(kind, pages)
                size = pages * PAGE
                mask_ok = mask is None or (isinstance(mask, int) and mask >= 0xFFFF_FFFF)
                sure = kind == "pages" and mask_ok and mask is not True
                if iova is not None:
                    sure = sure and isinstance(iova, int) and not isinstance(iova, bool)
                    sure = sure and not iova % PAGE and 0x10_0000 <= iova < 0x8000_0000
                try:
                    try:
                        async with space.map_dma(
                            buffer, iova=iova, readonly=readonly, dma_mask=mask
                        ) as m:
                            assert m.iova % PAGE == 0 and m.size == size
                            assert m.readonly == readonly
                            if iova is not None:
                                assert m.iova == iova
                            if isinstance(mask, int):
                                assert m.iova + size - 1 <= mask
                            assert space.mapping_count == 1
                    except aiovfio.VfioError:
                        assert not sure, "a valid mapping was refused"
                finally:
                    if isinstance(buffer, memoryview):
                        buffer.release()
                    if mem is not None:
                        mem.close()
                no_mappings()

            async def buffer_example(size: Any, mask: Any) -> None:
                sure = isinstance(size, int) and 0 < size <= 1 << 20 and not isinstance(size, bool)
                sure = sure and (mask is None or (isinstance(mask, int) and mask >= 0xFFFF_FFFF))
                try:
                    async with dev.dma_buffer(size, dma_mask=mask) as buf:
                        assert buf.size >= size and buf.size % PAGE == 0
                        assert buf.iova % PAGE == 0
                        if isinstance(mask, int):
                            assert buf.iova + buf.size - 1 <= mask
                        buf.view[0] = 1
                except aiovfio.VfioError:
                    assert not sure, "a valid buffer was refused"
                no_mappings()

            masks = st.one_of(
                st.none(),
                st.integers(0, 64).map(lambda k: (1 << k) - 1),
                huge_ints,
                st.booleans(),
                junk,
            )
            iovas = st.one_of(
                st.none(),
                st.integers(0x100, 0x8_0000).map(lambda p: p * PAGE),
                st.integers(0, 1 << 40),
                huge_ints,
                junk,
            )

            @examples(250)
            @given(
                kind=st.sampled_from(BUFFER_KINDS),
                pages=st.integers(1, 4),
                iova=iovas,
                mask=masks,
                readonly=st.booleans(),
            )
            def mappings(kind: str, pages: int, iova: Any, mask: Any, readonly: bool) -> None:
                on_loop(map_example, kind, pages, iova, mask, readonly)

            @examples(150)
            @given(
                size=st.one_of(st.integers(-2, 3 * PAGE), st.integers(1 << 45, 1 << 48), junk),
                mask=masks,
            )
            def buffers(size: Any, mask: Any) -> None:
                on_loop(buffer_example, size, mask)

            await run_in_worker(mappings)
            await run_in_worker(buffers)
            async with dev.dma_buffer(PAGE) as buf:
                assert buf.iova
            assert dev.bar(0).read32(0) == EDU_IDENT
        assert machine.leaks() == []


async def test_bulk_write_takes_buffers_only() -> None:
    """Region.write used bytes(data): an int wrote that many zeros, and a list of
    ints out of range escaped as a bare ValueError."""
    with closing_machine(new_target()) as t:
        async with aiovfio.open_device(RAM, kernel=t.kernel) as ram:
            bar = ram.bar(0)
            bar.write(0, b"\x01\x02")
            for data in (5, -1, [300], [1, 2], "ab", None):
                with pytest.raises(aiovfio.InvalidArgument, match="bytes-like"):
                    bar.write(0, data)  # type: ignore[arg-type]
            bar.write(0, memoryview(bytearray(b"\x03\x04")))
            assert bar.read(0, 2) == b"\x03\x04"
