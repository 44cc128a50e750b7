"""On trio, a real SIGINT at every line the public layer executes, for every public operation.

A trace function counts the lines executed in aiovfio's own code (the
public layer and what it calls in aiovfio: not the simulated machine, not
the testing helpers) and, at the n-th line, sends SIGINT to the process
(`os.kill`). trio's own handler then does what it does in real life:
raises KeyboardInterrupt right there where the code is not KI-protected,
or delivers it at the next checkpoint where it is. The operation runs in
trio's main task (where trio delivers a deferred KeyboardInterrupt).

Each case: `trio.run` ends with exactly KeyboardInterrupt (no other
exception, no exception group), the machine holds nothing, and edu opens
and answers at once. Points are sampled as `_sweep.sample` says
(AIOVFIO_EXITS_FULL=1 runs every line).
"""

from __future__ import annotations

import os
import signal
import sys
import types
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
                # A real signal: its Python handler (trio's) runs at the main thread's next
                # eval-breaker check, in the traced code, as a Ctrl-C would. (Raising from
                # the trace function itself, as raise_signal does, crashed CPython 3.11
                # once in ~10k cases.)
                os.kill(os.getpid(), signal.SIGINT)
                return None
        return local

    def global_(frame: types.FrameType, event: str, arg: Any) -> TraceFn | None:
        return local if _public(frame.f_code) else None

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


@each_operation
def test_sigint_at_every_public_line(op: Operation) -> None:
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
    tally.check()
