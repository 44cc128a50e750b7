"""aiovfio's pytest plugin (loaded automatically once aiovfio is installed).

Fixtures:

* `vfio_target`: a `aiovfio.testing.Target` — the simulated machine on a
  normal host, the real kernel inside the aiovfio QEMU guest.
* `sim_machine`: always a fresh simulated machine (edu at 00:04.0, nvme at
  00:05.0).

Both check the test: a fault on the simulated machine that the test did not
declare fails it (with the faults' messages), and so does anything left open,
mapped or enabled when the test and its fixtures are done. Both are reported
as the test's failure (FAILED), not as an error of the fixture. Devices from
`await vfio_target.open(name)` are closed inside the test's event loop after
the test body, before the checks; a device entered by hand and never left is
a leak.

Markers:

* `@pytest.mark.kernel`: the test body also runs on the real kernel inside the
  QEMU guest (`nox -s vm`), where `vfio_target.linux` is the booted kernel.
* `@pytest.mark.sim(clock="manual", linux="6.1", memlock_limit=..., page_size=...,
  dma_entry_limit=..., group_peers=("e1000e",))`: the simulated machine's
  options (ignored on the real kernel). `group_peers` adds functions to edu's
  IOMMU group, bound to those drivers.
* `@pytest.mark.sim_faults("bus_master", ...)`: the test causes faults of these
  kinds on purpose (each must happen at least once). For a narrower scope use
  `with vfio_target.expect_faults("iommu"): ...`.

A driver's suite, on asyncio and trio (anyio's pytest plugin)::

    import pytest
    from aiovfio.testing import Target

    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(request: pytest.FixtureRequest) -> str:
        return request.param

    @pytest.mark.anyio
    @pytest.mark.sim(clock="thread", linux="6.1")
    async def test_reads_ident(vfio_target: Target) -> None:
        async with vfio_target.open("edu") as dev:
            assert dev.bar(0).read32(0) == 0x010000ED

Inside the guest a suite that proves the real kernel must never pass by not
running: a skipped test counts as failed (mark what a kernel cannot do
`xfail(strict=True)`), and a run in which no test passed fails.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from .target import Target, in_guest, real_target, sim_options, sim_target

__all__ = ["sim_machine", "vfio_target"]

_TARGET_FIXTURES = ("vfio_target", "sim_machine")
_LEAK_REPORT = "aiovfio_check_failed"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kernel: the test body also runs on the real kernel inside the QEMU guest"
    )
    config.addinivalue_line(
        "markers",
        "sim(**options): options of the simulated machine (clock, linux, memlock_limit, "
        "page_size, dma_entry_limit, iova_ranges, io_width, group_peers)",
    )
    config.addinivalue_line(
        "markers", "sim_faults(*kinds): the test causes simulated faults of these kinds on purpose"
    )


def _targets(item: pytest.Item) -> list[Target]:
    funcargs: dict[str, Any] = getattr(item, "funcargs", {})
    return [t for name in _TARGET_FIXTURES if isinstance(t := funcargs.get(name), Target)]


def _fault_failure(target: Target) -> str | None:
    """The undeclared faults not reported yet, as a failure message."""
    every = target.faults()
    faults = every[target.faults_reported :]
    target.faults_reported = len(every)
    if not faults:
        return None
    lines = "\n".join(f"  {f}" for f in faults)
    return (
        f"the test caused {len(faults)} fault(s) on the simulated machine that it did not "
        f"declare:\n{lines}\n(declare faults caused on purpose with "
        "@pytest.mark.sim_faults(kind, ...) or `with vfio_target.expect_faults(kind):`)"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    targets = _targets(item)
    if targets and isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
        item.obj = _closing_owned(item.obj, targets, check_leaks=not _held_by_fixtures(item))
    result = yield
    for target in targets:
        problem = _fault_failure(target)
        if problem is not None:
            pytest.fail(problem, pytrace=False)
    return result


def _held_by_fixtures(item: pytest.Function) -> bool:
    """Whether another fixture of the test uses the target (it may hold devices past the body)."""
    for name, defs in item._fixtureinfo.name2fixturedefs.items():
        if name in _TARGET_FIXTURES:
            continue
        if any(set(d.argnames) & set(_TARGET_FIXTURES) for d in defs):
            return True
    return False


def _closing_owned(
    fn: Callable[..., Any], targets: list[Target], *, check_leaks: bool
) -> Callable[..., Any]:
    """The async test, then (in its event loop) the devices `await target.open()` gave.

    When no other fixture holds the target's devices, leaks are checked here,
    right after the body and before the event loop could finalise a context
    manager entered by hand and abandoned (which would hide the leak).
    """

    @functools.wraps(fn)
    async def test(*args: Any, **kwargs: Any) -> Any:
        leaks: list[str] = []
        try:
            result = await fn(*args, **kwargs)
            if check_leaks:
                leaks = [line for t in targets if not t.owns_devices() for line in t.leaks()]
            return result
        finally:
            for target in targets:
                await target.aclose_owned()
            if leaks:
                pytest.fail(_leak_message(leaks), pytrace=False)

    return test


def _leak_message(leaks: list[str]) -> str:
    lines = "\n".join(f"  {leak}" for leak in leaks)
    return (
        f"the test left {len(leaks)} thing(s) open, mapped or enabled:\n{lines}\n"
        "(leave every `async with`; a device entered by hand must be left too, or use "
        "`await vfio_target.open(name)`, which the plugin closes)"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if in_guest() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"a skip counts as a failure on the real kernel: {report.longrepr}"
    if (
        report.when == "teardown"
        and call.excinfo is not None
        and call.excinfo.errisinstance(_CheckFailed)
    ):
        report.longrepr = str(call.excinfo.value)
        setattr(report, _LEAK_REPORT, True)
    return report


def pytest_report_teststatus(report: pytest.TestReport) -> tuple[str, str, str] | None:
    """A leak or fault found after the fixtures closed is the test's failure, not an error."""
    if getattr(report, _LEAK_REPORT, False):
        return "failed", "F", "FAILED"
    return None


_passed: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed:
        _passed.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if in_guest() and exitstatus == pytest.ExitCode.OK and not _passed:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED


class _CheckFailed(AssertionError):
    """What the fixture found after the test: leaks, or faults during teardown."""


def _make(request: pytest.FixtureRequest, *, real: bool) -> Target:
    if real:
        return real_target()
    options = sim_options([m.kwargs for m in reversed(list(request.node.iter_markers("sim")))])
    return sim_target(**options)  # type: ignore[arg-type]


def _checked(request: pytest.FixtureRequest, target: Target) -> Iterator[Target]:
    kinds = [k for m in request.node.iter_markers("sim_faults") for k in m.args]
    declared = target.machine is not None and bool(kinds)
    if declared:
        assert target.machine is not None
        expecting = target.machine.expect_faults(*kinds)
        expecting.__enter__()
    try:
        yield target
        problems = []
        if declared:
            try:
                expecting.__exit__(None, None, None)
            except AssertionError as exc:
                problems.append(str(exc))
            declared = False
        fault = _fault_failure(target)
        if fault is not None:
            problems.append(fault)
        leaks = target.leaks()
        if leaks:
            problems.append(_leak_message(leaks))
        if problems:
            raise _CheckFailed("\n".join(problems))
    finally:
        if declared:
            expecting.__exit__(None, None, None)
        target.close()


@pytest.fixture
def vfio_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    """The simulated machine, or the real kernel inside the aiovfio guest."""
    yield from _checked(request, _make(request, real=in_guest()))


@pytest.fixture
def sim_machine(request: pytest.FixtureRequest) -> Iterator[Target]:
    """A fresh simulated machine with edu and nvme, checked for leaks and faults."""
    yield from _checked(request, _make(request, real=False))
