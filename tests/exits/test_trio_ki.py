"""On trio, a real SIGINT at every line the public layer executes, for every public operation.

A trace function counts the lines executed in aiovfio's own code (the
public layer and what it calls in aiovfio: not the simulated machine, not
the testing helpers) and, at the n-th line, sends SIGINT to the process
(`signal.raise_signal`). trio's own handler then does what it does in real life:
raises KeyboardInterrupt right there where the code is not KI-protected,
or delivers it at the next checkpoint where it is. The operation runs in
trio's main task (where trio delivers a deferred KeyboardInterrupt).

Each case: `trio.run` ends with exactly KeyboardInterrupt (no other
exception, no exception group), the machine holds nothing, and edu opens
and answers at once. Points are sampled as `_sweep.sample` says
(AIOVFIO_EXITS_FULL=1 runs every line).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from api._operations import OPERATIONS, Operation, assert_fresh_open_works, new_target

import aiovfio

from ._sweep import Tally, sample

trio = pytest.importorskip("trio")

each_operation = pytest.mark.parametrize("op", OPERATIONS, ids=[op.name for op in OPERATIONS])

#: points per operation in the normal suite (see _sweep.sample)
LIMIT = 30

_ROOT = str(Path(aiovfio.__file__).parent)
_OUTSIDE = tuple(f"{_ROOT}/{d}/" for d in ("sim", "testing", "cli"))


def _public(code: types.CodeType) -> bool:
    name = code.co_filename
    return name.startswith(_ROOT) and not name.startswith(_OUTSIDE)


def _in_finalizer(frame: types.FrameType | None) -> bool:
    """Whether `frame` runs inside a `__del__`: the collector runs finalizers when it
    likes (the sim's clock thread allocates too), so their lines fall at other points of
    the count from run to run: a point near the end was then not reached, or reached
    once trio.run had restored Python's handler, whose KeyboardInterrupt CPython drops
    in a finalizer ("escaped: None", seen once in a loaded full run). What a finalizer
    does on trio is KI-protected like the rest of `_resource.py`; it is not an
    operation's line."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


TraceFn = Callable[[types.FrameType, str, Any], Any]


def line_tracer(at: int | None, seen: list[str]) -> TraceFn:
    """A global trace function counting public-layer lines; SIGINT at line `at`."""
    count = 0

    def local(frame: types.FrameType, event: str, arg: Any) -> TraceFn | None:
        nonlocal count
        if event == "line":
            count += 1
            if at is None:
                seen.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
            elif count == at:
                seen.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
                sys.settrace(None)
                # A real SIGINT, handled right here: raise_signal runs the Python handler
                # (trio's) before it returns, so KeyboardInterrupt comes at this line where
                # it is not KI-protected, else at the next checkpoint. (os.kill, whose
                # handler runs at a later eval-breaker check, crashed CPython 3.11 more
                # often while tracing; this form crashed once in ~3300 cases, FULL mode.)
                signal.raise_signal(signal.SIGINT)
                return None
        return local

    def global_(frame: types.FrameType, event: str, arg: Any) -> TraceFn | None:
        return local if _public(frame.f_code) and not _in_finalizer(frame) else None

    return global_


def run_traced(op: Operation, at: int | None) -> tuple[BaseException | None, list[str], Any]:
    t = new_target()
    seen: list[str] = []

    async def main() -> None:
        await op(t)

    sys.settrace(line_tracer(at, seen))
    try:
        trio.run(main)
    except BaseException as exc:
        return exc, seen, t
    finally:
        sys.settrace(None)
    return None, seen, t


def sweep(op: Operation) -> Tally:
    _, _, t = run_traced(op, None)  # a first run: aiovfio applies its KI marks once
    t.machine.close()
    outcome, lines, t = run_traced(op, None)
    t.machine.close()
    assert outcome is None, f"{op.name} failed without interruption: {outcome!r}"
    assert lines, f"{op.name} runs no public-layer line"
    tally = Tally(f"trio SIGINT at public line, {op.name}")
    for at in sample(range(1, len(lines) + 1), f"ki {op.name}", LIMIT):
        tally.cases += 1
        case = f"line {at}/{len(lines)} ({lines[at - 1]})"
        exc, _, t = run_traced(op, at)
        try:
            if type(exc) is not KeyboardInterrupt:
                raise AssertionError(f"escaped: {exc!r}") from exc
            trio.run(assert_fresh_open_works, t)
        except BaseException as failure:
            tally.failed(case, failure)
        finally:
            t.machine.close()
    return tally


def _sweep_in_child(name: str, conn: Any) -> None:
    op = next(o for o in OPERATIONS if o.name == name)
    try:
        tally = sweep(op)
        conn.send((tally.cases, tally.failures))
    except BaseException as exc:
        conn.send((0, [f"the sweep itself failed: {type(exc).__name__}: {exc}"]))
    finally:
        conn.close()


def _run_child(name: str) -> tuple[int, list[str]] | int:
    """The sweep's (cases, failures) from a forked child, or the child's exit code if it died."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    with warnings.catch_warnings():  # 3.12+: forking a process with threads warns
        warnings.simplefilter("ignore", DeprecationWarning)
        proc = ctx.Process(target=_sweep_in_child, args=(name, child))
        proc.start()
    child.close()
    got = None
    if parent.poll(100):
        with contextlib.suppress(EOFError):  # the child died before it could report
            got = parent.recv()
    proc.join(10)
    return got if got is not None else (proc.exitcode or -1)


@each_operation
def test_sigint_at_every_public_line(op: Operation) -> None:
    """Each operation's sweep runs in a forked child: CPython 3.11.7 crashes (SIGSEGV inside
    the tracing machinery, on trio's checkpoint) on some runs, which must not take the whole
    session down. A child that died is run again, twice at most; each crash is reported."""
    got = _run_child(op.name)
    for _ in range(2):
        if not isinstance(got, int):
            break
        print(f"[crash] the sweep's child for {op.name} died ({got}); running it again")
        got = _run_child(op.name)
    assert not isinstance(got, int), f"the sweep's child died three times (exit code {got})"
    tally = Tally(f"trio SIGINT at public line, {op.name}", got[0], list(got[1]))
    tally.check()
