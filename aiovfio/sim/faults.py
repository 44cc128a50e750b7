"""Faults the machine records, and faults a test injects.

`FaultLog` is `Machine.faults`: every IOMMU fault (a device access to an
unmapped IOVA or without the permission), every device-level error a model
reports with `DeviceContext.log_fault`, and every interrupt a device sent
that nobody could receive. Each is logged once (structlog, only when the
application configured it) and counted by kind.

`Injector` is behind `Machine.inject`: make a named `Kernel` method fail
with an errno, on its nth call, a number of times. An injected failure
happens before the method changes anything, so nothing leaks from the
failing call itself, with one exception that mirrors Linux: `close` always
releases the fd, then reports the injected error (close(2) frees the
descriptor even when it returns an error). `kernel_calls` counts every
`Kernel` method called, so a test can list the operations an API uses and
inject a failure at each one.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

from attrs import define, field, frozen

from .. import _log
from ..errors import InvalidArgument
from ..kernel.protocol import Kernel

__all__ = ["KERNEL_OPERATIONS", "FaultLog", "FaultRecord", "Injection", "Injector"]

#: Every operation of the Kernel protocol, the names `inject` accepts.
KERNEL_OPERATIONS: frozenset[str] = frozenset(
    name for name, value in vars(Kernel).items() if callable(value) and not name.startswith("_")
)


@frozen
class FaultRecord:
    """One recorded fault."""

    #: "iommu", "device" or "interrupt"
    kind: str
    device: str
    message: str
    iova: int | None = None
    size: int | None = None
    write: bool | None = None

    def __str__(self) -> str:
        return f"{self.kind} fault on {self.device}: {self.message}"


@define(eq=False)
class FaultLog:
    """What went wrong on the machine's devices, in order, with counts by kind."""

    records: list[FaultRecord] = field(factory=list)
    counts: Counter[str] = field(factory=Counter)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[FaultRecord]:
        return iter(list(self.records))

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"
        return f"<FaultLog {counts}>"

    def count(self, kind: str | None = None) -> int:
        """How many faults of `kind` (all kinds when None)."""
        return len(self.records) if kind is None else self.counts[kind]

    def of(self, kind: str) -> list[FaultRecord]:
        return [r for r in self.records if r.kind == kind]

    def clear(self) -> None:
        self.records.clear()
        self.counts.clear()

    def add(self, record: FaultRecord) -> None:
        self.records.append(record)
        self.counts[record.kind] += 1
        if _log.enabled():
            _log.logger.warning(
                f"sim.fault.{record.kind}",
                device=record.device,
                message=record.message,
                iova=record.iova,
                size=record.size,
                write=record.write,
            )


@define(eq=False)
class Injection:
    """One armed failure. `fired` counts the failures it caused so far."""

    op: str
    errno: int
    #: fail on the nth call from arming (1 = the next call); None: from the next call
    nth: int | None = None
    #: how many failures in all; None: every call from then on
    times: int | None = 1
    calls: int = 0
    fired: int = 0
    cancelled: bool = False

    @property
    def exhausted(self) -> bool:
        return self.cancelled or (self.times is not None and self.fired >= self.times)

    def cancel(self) -> None:
        self.cancelled = True

    def _should_fire(self) -> bool:
        if self.exhausted:
            return False
        self.calls += 1
        if self.nth is not None and self.calls < self.nth:
            return False
        self.fired += 1
        return True


@define(eq=False)
class Injector:
    """The armed injections and the record of kernel calls."""

    injections: list[Injection] = field(factory=list)
    calls: Counter[str] = field(factory=Counter)

    def inject(
        self, op: str, errno: int, *, nth: int | None = None, times: int | None = 1
    ) -> Injection:
        if op not in KERNEL_OPERATIONS:
            known = ", ".join(sorted(KERNEL_OPERATIONS))
            raise InvalidArgument(f"{op!r} is not a Kernel operation; one of: {known}")
        if errno <= 0:
            raise InvalidArgument(f"errno must be positive, not {errno}")
        if nth is not None and nth < 1:
            raise InvalidArgument(f"nth counts from 1, not {nth}")
        if times is not None and times < 1:
            raise InvalidArgument(f"times must be >= 1 or None (always), not {times}")
        injection = Injection(op, errno, nth, times)
        self.injections.append(injection)
        return injection

    def clear(self) -> None:
        for injection in self.injections:
            injection.cancel()
        self.injections.clear()

    def check(self, op: str) -> OSError | None:
        """Count a call of `op`; the error to raise when an injection fires."""
        self.calls[op] += 1
        for injection in self.injections:
            if injection.op == op and injection._should_fire():
                return OSError(
                    injection.errno,
                    f"{os.strerror(injection.errno)} [sim: injected into {op}, "
                    f"failure {injection.fired}]",
                )
        return None
