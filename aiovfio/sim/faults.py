"""Faults the machine records, and faults a test injects.

`FaultLog` is `Machine.faults`: every fault, by kind: a device DMA or MSI
while Bus Master is off ("bus_master"), an IOMMU translation fault (an
unmapped IOVA, a missing permission, no IOMMU: "iommu"), a DMA address the
device's mask clamped ("dma_mask"), a device-level error a model reports
("device"), an interrupt nobody could receive ("interrupt"). Each keeps its
message, is logged (structlog, when the application configured it) and is
emitted as a warning of its kind's `SimFaultWarning` subclass, unless the
test declared it (`Machine.expect_faults`).

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

import contextlib
import os
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import cast

from attrs import define, evolve, field, frozen

from .. import _log
from ..errors import InvalidArgument
from ..kernel.protocol import Kernel

__all__ = [
    "FAULT_KINDS",
    "KERNEL_OPERATIONS",
    "BusMasterFault",
    "DeviceErrorFault",
    "DmaMaskFault",
    "FaultLog",
    "FaultRecord",
    "Injection",
    "Injector",
    "InterruptDropFault",
    "IommuTranslationFault",
    "SimFaultWarning",
]

#: Every operation of the Kernel protocol, the names `inject` accepts.
KERNEL_OPERATIONS: frozenset[str] = frozenset(
    name for name, value in vars(Kernel).items() if callable(value) and not name.startswith("_")
)


class SimFaultWarning(UserWarning):
    """A fault on the simulated machine: what Linux's device would do silently.

    Every fault the machine records is also emitted as a warning of the
    subclass of its kind, so pytest shows it and ``-W error`` makes it fatal.
    Declare faults a test causes on purpose with `Machine.expect_faults`
    (or the pytest plugin's ``@pytest.mark.sim_faults(kind, ...)``).
    """

    kind = "fault"


class BusMasterFault(SimFaultWarning):
    """A device DMA or MSI while Bus Master is off in COMMAND: dropped."""

    kind = "bus_master"


class IommuTranslationFault(SimFaultWarning):
    """A device access to an IOVA that is not mapped, or lacks the permission."""

    kind = "iommu"


class DmaMaskFault(SimFaultWarning):
    """A DMA address the device's DMA mask clamped (edu: 28 bits)."""

    kind = "dma_mask"


class DeviceErrorFault(SimFaultWarning):
    """A device-level error a model reports (a bad doorbell, CSTS.CFS, a bad range)."""

    kind = "device"


class InterruptDropFault(SimFaultWarning):
    """An interrupt the device sent that nobody could receive."""

    kind = "interrupt"


#: fault kind -> its warning category
FAULT_KINDS: dict[str, type[SimFaultWarning]] = {
    c.kind: c
    for c in (
        BusMasterFault,
        IommuTranslationFault,
        DmaMaskFault,
        DeviceErrorFault,
        InterruptDropFault,
    )
}


def check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """The kinds, or InvalidArgument naming the known ones."""
    out = tuple(kinds)
    for kind in out:
        if kind not in FAULT_KINDS:
            raise InvalidArgument(
                f"{kind!r} is not a fault kind; one of: {', '.join(sorted(FAULT_KINDS))}"
            )
    return out


@frozen
class FaultRecord:
    """One recorded fault."""

    #: a key of FAULT_KINDS: "bus_master", "iommu", "dma_mask", "device", "interrupt"
    kind: str
    device: str
    message: str
    iova: int | None = None
    size: int | None = None
    write: bool | None = None
    #: the test declared it (Machine.expect_faults or the plugin's marker)
    declared: bool = False

    def __str__(self) -> str:
        return f"{self.kind} fault on {self.device}: {self.message}"


#: how many recent faults the FaultLog's repr shows
_REPR_LATEST = 3


@define(eq=False)
class FaultLog:
    """What went wrong on the machine's devices, in order, with counts by kind.

    Each fault is recorded, logged (structlog, at warning level, when the
    application configured it), and emitted as a `SimFaultWarning` of its
    kind unless a test declared that kind (`expect`). Warnings are emitted
    by `flush`, which the machine calls when the kernel call or the clock
    callback that caused them has finished, so a warning raised as an error
    (``-W error``) never interrupts a device model half-way.
    """

    records: list[FaultRecord] = field(factory=list)
    counts: Counter[str] = field(factory=Counter)
    #: kind -> how many expect() scopes declare it
    _declared: Counter[str] = field(factory=Counter, repr=False)
    #: recorded and not yet emitted as warnings (`flush` empties it)
    pending: list[FaultRecord] = field(factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[FaultRecord]:
        return iter(list(self.records))

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"
        latest = "".join(f"\n  {r}" for r in self.records[-_REPR_LATEST:])
        more = len(self.records) - _REPR_LATEST
        earlier = f"\n  ({more} earlier)" if more > 0 else ""
        return f"<FaultLog {counts}{earlier}{latest}>"

    def count(self, kind: str | None = None) -> int:
        """How many faults of `kind` (all kinds when None)."""
        return len(self.records) if kind is None else self.counts[kind]

    def of(self, kind: str) -> list[FaultRecord]:
        return [r for r in self.records if r.kind == kind]

    def undeclared(self) -> list[FaultRecord]:
        """The faults no test declared: what the pytest plugin fails a test for."""
        return [r for r in self.records if not r.declared]

    def clear(self) -> None:
        self.records.clear()
        self.counts.clear()
        self.pending.clear()

    def add(self, record: FaultRecord) -> None:
        if record.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {record.kind!r}")
        if self._declared[record.kind]:
            record = evolve(record, declared=True)
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
        if not record.declared:
            self.pending.append(record)

    def flush(self, stacklevel: int = 2) -> None:
        """Emit the warnings of faults recorded since the last flush."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        for record in pending:
            warnings.warn(str(record), FAULT_KINDS[record.kind], stacklevel=stacklevel + 1)

    # --- declaring faults ------------------------------------------------------------------

    def declare(self, kinds: Iterable[str]) -> None:
        for kind in check_kinds(kinds):
            self._declared[kind] += 1

    def undeclare(self, kinds: Iterable[str]) -> None:
        for kind in kinds:
            self._declared[kind] -= 1

    @contextlib.contextmanager
    def expect(self, *kinds: str, lock: threading.RLock | None = None) -> Iterator[None]:
        """Faults of `kinds` are expected inside the block: no warning, no test failure.

        At least one of each kind must happen, else AssertionError at the end
        (a test that declares a fault it no longer causes is wrong too).
        """
        kinds = check_kinds(kinds)
        if not kinds:
            raise InvalidArgument(
                "expect_faults needs at least one kind: " + ", ".join(sorted(FAULT_KINDS))
            )
        guard = lock if lock is not None else contextlib.nullcontext()
        with guard:
            before = Counter(self.counts)
            self.declare(kinds)
        ok = False
        try:
            yield
            ok = True
        finally:
            with guard:
                self.undeclare(kinds)
                missing = [k for k in kinds if self.counts[k] <= before[k]]
        if ok and missing:
            raise AssertionError(
                f"expected {', '.join(missing)} fault(s) but none happened; faults seen: {self!r}"
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


class CallCounts(Counter[str]):
    """`Machine.kernel_calls`: a Counter whose item assignment is dict's own, in C.

    Counter defines `__delitem__` in Python, and CPython then routes every item
    assignment (`calls[op] += 1`, one per kernel call and so per register access)
    through a Python-level slot: a wrapper call with an argument tuple, about a
    tenth of a trapped register read. Here both are dict's, so `del` of a name
    never counted raises KeyError, as a dict's does; everything else is Counter's.
    """

    __slots__ = ()
    __setitem__ = dict.__setitem__
    __delitem__ = cast("Callable[[Counter[str], object], None]", dict.__delitem__)


@define(eq=False)
class Injector:
    """The armed injections and the record of kernel calls."""

    injections: list[Injection] = field(factory=list)
    calls: Counter[str] = field(factory=CallCounts)

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
