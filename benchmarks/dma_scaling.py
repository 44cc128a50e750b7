"""DMA map+unmap time against the number of live mappings (issue 10: flat within 2x).

Three rows per level of live mappings (1, 1k, 16k, 65k):

* `public layer`: `DmaMapping` enter + `aclose()` through a `DmaSpace` whose
  kernel side does nothing (`NullSpace`): everything aiovfio itself does per
  map and unmap (allocator, entry budget, bookkeeping, the worker-thread hop),
  without the kernel's own cost (the sim's IOMMU is a list, and Linux's is
  its own business).
* `allocator`: `IovaAllocator.allocate` + `release` alone.
* `old allocator`: the first-fit list allocator this replaced (copied here as
  the baseline), side by side up to 16k live (filling it to 65k takes minutes).

Run: `.venv/bin/python benchmarks/dma_scaling.py` (about a minute; `--quick`
stops at 16k). Prints microseconds per map+unmap and the ratio to the 1-live
figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import anyio

from aiovfio._iova import IovaAllocator
from aiovfio.dma import DmaMapping, IommuInfo, Type1Space
from aiovfio.sim import Machine

PAGE = 4096
RANGES = ((0, (1 << 48) - 1),)
LEVELS = (1, 1_000, 16_000, 65_000)


class NullSpace(Type1Space):
    """A type1 space whose kernel calls succeed at once."""

    def _kernel_map(self, vaddr: int, iova: int, size: int, readonly: bool) -> None:
        return None

    def _kernel_unmap(self, iova: int, size: int) -> int:
        return size


class OldAllocator:
    """The first-fit allocator of aiovfio before issue 10 (sorted list, linear scan)."""

    def __init__(self, ranges: tuple[tuple[int, int], ...], page: int) -> None:
        self.ranges, self.page, self.floor = ranges, page, 0x10000
        self.used: list[tuple[int, int]] = []

    def allocate(self, size: int) -> int:
        for start, end in self.ranges:
            cand = -(-max(start, self.floor) // self.page) * self.page
            for used_start, used_end in self.used:
                if used_end <= cand:
                    continue
                if used_start >= cand + size:
                    break
                cand = -(-used_end // self.page) * self.page
            if cand + size - 1 <= end:
                self.used.append((cand, cand + size))
                self.used.sort()
                return cand
        raise RuntimeError("full")

    def release(self, iova: int, size: int) -> None:
        self.used.remove((iova, iova + size))


def per_op(fn: Callable[[], None], budget: float = 0.3) -> float:
    """Microseconds per call of `fn`, run for about `budget` seconds (at least 20 calls)."""
    n, start = 0, time.perf_counter()
    while n < 20 or time.perf_counter() - start < budget:
        fn()
        n += 1
    return (time.perf_counter() - start) / n * 1e6


async def public_layer(levels: tuple[int, ...]) -> list[float]:
    with Machine() as machine:
        space = NullSpace(
            kernel=machine.kernel,
            info=IommuInfo(page_sizes=PAGE, iova_ranges=RANGES, dma_avail=None),
            name="null space",
            container_fd=-1,
        )
        live: list[DmaMapping] = []
        out = []
        for level in levels:
            while len(live) < level:
                m = DmaMapping(space, 0x1000_0000, PAGE, False)
                await m.__aenter__()
                live.append(m)
            n, start = 0, time.perf_counter()
            while n < 200 or time.perf_counter() - start < 0.3:
                m = DmaMapping(space, 0x1000_0000, PAGE, False)
                await m.__aenter__()
                await m.aclose()
                n += 1
            out.append((time.perf_counter() - start) / n * 1e6)
        await space.aclose()
        return out


def allocator(
    make: Callable[[], IovaAllocator | OldAllocator], levels: tuple[int, ...]
) -> list[float]:
    alloc = make()
    live = 0
    out = []
    for level in levels:
        while live < level:
            alloc.allocate(PAGE)
            live += 1

        def cycle() -> None:
            iova = alloc.allocate(PAGE)
            alloc.release(iova, PAGE)

        out.append(per_op(cycle))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="stop at 16k live mappings")
    args = parser.parse_args()
    levels = LEVELS[:3] if args.quick else LEVELS
    rows = {
        "public layer (map+unmap)": anyio.run(public_layer, levels),
        "allocator (allocate+release)": allocator(lambda: IovaAllocator(RANGES, PAGE), levels),
        # Filling the old allocator to 65k takes minutes (it is quadratic): 16k at most.
        "old allocator (baseline)": allocator(
            lambda: OldAllocator(RANGES, PAGE), tuple(n for n in levels if n <= 16_000)
        ),
    }
    head = "".join(f"{f'{n:,} live':>14}" for n in levels)
    print(f"{'us per op':<30}{head}{'worst/1':>10}")
    for name, figures in rows.items():
        cells = "".join(f"{v:>14.2f}" for v in figures) + " " * 14 * (len(levels) - len(figures))
        print(f"{name:<30}{cells}{max(figures) / figures[0]:>9.1f}x")
    worst = max(rows["public layer (map+unmap)"]) / rows["public layer (map+unmap)"][0]
    print(f"\npublic layer: worst level / 1 live = {worst:.2f}x (target: flat within 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
