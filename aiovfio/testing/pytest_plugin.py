"""aiovfio's pytest plugin (loaded automatically once aiovfio is installed).

Fixtures:

* `vfio_target`: a `Target` — the simulated machine on a normal host, the real
  kernel inside the aiovfio QEMU guest. The test fails if it leaves anything
  open, mapped or enabled.
* `sim_machine`: always a fresh simulated machine (edu at 00:04.0, nvme at
  00:05.0), checked for leaks the same way.

Mark a test `@pytest.mark.kernel` when its body should also run on the real
kernel in the guest (`nox -s vm`).

Inside the guest a suite that proves the real kernel must never pass by not
running: a skipped test counts as failed (mark what a kernel cannot do
`xfail(strict=True)`), and a run in which no test passed fails.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from .target import Target, in_guest, real_target, sim_target

__all__ = ["vfio_target", "sim_machine"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kernel: the test body also runs on the real kernel inside the QEMU guest"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if in_guest() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"a skip counts as a failure on the real kernel: {report.longrepr}"
    return report


_passed: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed:
        _passed.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if in_guest() and exitstatus == pytest.ExitCode.OK and not _passed:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED


def _checked(target: Target) -> Iterator[Target]:
    try:
        yield target
        leaks = target.leaks()
        assert leaks == [], f"the test leaked: {leaks}"
    finally:
        target.close()


@pytest.fixture
def vfio_target() -> Iterator[Target]:
    """The simulated machine, or the real kernel inside the aiovfio guest."""
    yield from _checked(real_target() if in_guest() else sim_target())


@pytest.fixture
def sim_machine() -> Iterator[Target]:
    """A fresh simulated machine with edu and nvme, checked for leaks."""
    yield from _checked(sim_target())
