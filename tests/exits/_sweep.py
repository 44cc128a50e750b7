"""Shared pieces of the exit-path sweeps: run cases, collect failures, sample points.

A sweep runs one case per interruption point of an operation, each from a
fresh simulated machine, and collects every failing case (rather than
stopping at the first) so a failure report shows how many points break.

Sampling: by default a sweep runs at most `AIOVFIO_EXITS_MAX` points per
operation (default below), chosen with `random.Random(seed)` where the seed
is fixed per (sweep, operation); `AIOVFIO_EXITS_FULL=1` runs every point.
The first and the last point are always in the sample.
"""

from __future__ import annotations

import os
import random
import traceback
import zlib
from collections.abc import Sequence
from typing import TypeVar

from attrs import define, field

T = TypeVar("T")

FULL = os.environ.get("AIOVFIO_EXITS_FULL", "") not in ("", "0")


def sample(points: Sequence[T], key: str, limit: int) -> list[T]:
    """`points`, or `limit` of them chosen with a seed fixed by `key` (see the module doc)."""
    limit = int(os.environ.get("AIOVFIO_EXITS_MAX", limit))
    if FULL or len(points) <= limit:
        return list(points)
    rng = random.Random(zlib.crc32(key.encode()))
    inner = sorted(rng.sample(range(1, len(points) - 1), limit - 2))
    return [points[0], *(points[i] for i in inner), points[-1]]


@define
class Tally:
    """The cases a sweep ran and the ones that failed (with a short reason)."""

    name: str
    cases: int = 0
    failures: list[str] = field(factory=list)

    def failed(self, case: str, exc: BaseException) -> None:
        last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        where = f" at {last[0].filename.split('/')[-1]}:{last[0].lineno}" if last else ""
        self.failures.append(f"{case}: {type(exc).__name__}: {exc}{where}"[:300])

    def check(self) -> None:
        line = f"[cases] {self.name}: {self.cases} cases, {len(self.failures)} failed"
        print(line)
        log = os.environ.get("AIOVFIO_EXITS_LOG")
        if log:
            with open(log, "a") as f:
                f.write(line + "\n")
        assert not self.failures, (
            f"{self.name}: {len(self.failures)} of {self.cases} cases failed:\n"
            + "\n".join(self.failures[:25])
        )
