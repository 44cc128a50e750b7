"""Real SIGINTs, sent at random moments of open, DMA, interrupt and close loops.

A child process per backend (asyncio, uvloop, trio; side by side) runs `_sigint_child.py`:
for each run it loops over the public API on a fresh simulated machine; the
parent sends SIGINT after a random delay (a fixed seed per backend). Every
run must end in KeyboardInterrupt with nothing leaked: the machine's
`leaks()` is empty, the child has no fd it did not have before the first
run, and the device opens again at once.

`AIOVFIO_SIGINT_RUNS` sets the runs per backend (default below).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from aiovfio.testing.target import in_guest

RUNS = int(os.environ.get("AIOVFIO_SIGINT_RUNS", "200"))
#: the longest delay before the SIGINT: a few iterations of the child's loop
MAX_DELAY = 0.030
#: in the guest: runs per backend, and the longest delay (Python is ~14x slower there)
GUEST_RUNS = 15
GUEST_MAX_DELAY = 0.5
CHILD = Path(__file__).with_name("_sigint_child.py")
BACKENDS = ("asyncio", "uvloop", "trio")


def _readline(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        err = proc.stderr.read() if proc.stderr is not None else ""
        raise AssertionError(f"the child died ({proc.returncode}): {err[-2000:]}")
    return line.strip()


def drive(backend: str, runs: int, max_delay: float = MAX_DELAY) -> list[str]:
    """Run the child for `backend` `runs` times; the failed runs, one line each."""
    rng = random.Random(zlib.crc32(f"sigint {backend}".encode()))
    failures: list[str] = []
    with subprocess.Popen(
        [sys.executable, str(CHILD), backend],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=CHILD.parent,
    ) as proc:
        assert proc.stdin is not None
        try:
            assert _readline(proc) == "started"
            for run in range(runs):
                proc.stdin.write("go\n")
                proc.stdin.flush()
                assert _readline(proc) == "ready"
                time.sleep(rng.uniform(0, max_delay))
                os.kill(proc.pid, signal.SIGINT)
                result = json.loads(_readline(proc))
                ok = (
                    result["outcome"] == "KeyboardInterrupt"
                    and result["reopen"] == "ok"
                    and not result["leaks"]
                    and not result["fds"]
                )
                if not ok:
                    failures.append(f"{backend} run {run}: {result}")
        finally:
            proc.stdin.close()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return failures


def test_sigint_at_random_moments() -> None:
    """The three backends' children run side by side (each is mostly waiting)."""
    results: dict[str, list[str] | BaseException] = {}

    def one(backend: str) -> None:
        try:
            results[backend] = drive(backend, RUNS)
        except BaseException as exc:
            results[backend] = exc

    threads = [threading.Thread(target=one, args=(b,)) for b in BACKENDS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log = os.environ.get("AIOVFIO_EXITS_LOG")
    failures: list[str] = []
    for backend in BACKENDS:
        outcome = results[backend]
        if isinstance(outcome, BaseException):
            raise outcome
        line = f"[cases] SIGINT runs, {backend}: {RUNS} cases, {len(outcome)} failed"
        print(line)
        if log:
            with open(log, "a") as f:
                f.write(line + "\n")
        failures += outcome
    assert not failures, f"{len(failures)} runs went wrong:\n" + "\n".join(failures[:20])


@pytest.mark.kernel
@pytest.mark.timeout(900)  # the guest: three children, Python ~14x slower there
def test_sigint_during_dma() -> None:
    """The same loop on real VFIO inside the guest (on the host: the sim again, briefly).

    Afterwards each run opened the device again at once (the child does), and
    the device still does a DMA round trip (the next run's first iteration).
    """
    runs = GUEST_RUNS if in_guest() else 10
    failures: list[str] = []
    for backend in BACKENDS:
        outcome = drive(backend, runs, max_delay=GUEST_MAX_DELAY if in_guest() else MAX_DELAY)
        print(f"[cases] SIGINT runs during DMA, {backend}: {runs} runs, {len(outcome)} failed")
        failures += outcome
    assert not failures, f"{len(failures)} runs went wrong:\n" + "\n".join(failures[:20])
