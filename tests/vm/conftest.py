"""The real-kernel suite: it runs only inside the aiovfio QEMU guest.

    aiovfio vm --kernel 6.1 -- python -m pytest -p no:cacheprovider tests/vm

(`nox -s vm` does this for each Debian kernel.) The guest's stage exports
AIOVFIO_GUEST=1 and the PCI addresses of its devices in AIOVFIO_VM_EDU and
AIOVFIO_VM_NVME. A suite that proves the real kernel must never pass by not
running, so:

* collected outside the guest, this conftest fails the run;
* a missing device fails the tests that need it;
* inside the guest a skipped test counts as failed (mark what a kernel cannot
  do `xfail(strict=True)` instead), and a run that passes no test fails.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

from aiovfio.kernel.linux import LinuxKernel

if os.environ.get("AIOVFIO_GUEST") != "1":
    raise pytest.UsageError(
        "tests/vm runs on the real kernel inside the aiovfio QEMU guest only: "
        "`aiovfio vm -- python -m pytest -p no:cacheprovider tests/vm` or `nox -s vm`"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"a skip counts as a failure in the real-kernel suite: {report.longrepr}"
    return report


_passed: list[pytest.TestReport] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed:
        _passed.append(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if exitstatus == pytest.ExitCode.OK and not _passed:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED


@pytest.fixture(scope="session")
def linux() -> LinuxKernel:
    """The real kernel boundary."""
    return LinuxKernel()


def _device(variable: str, what: str) -> str:
    bdfs = os.environ.get(variable, "").split()
    if not bdfs:
        pytest.fail(f"no {what} in this guest ({variable} is empty): boot it with --{what} 1")
    return bdfs[0]


@pytest.fixture(scope="session")
def edu_bdf() -> str:
    """The PCI address of the guest's first edu device, bound to vfio-pci."""
    return _device("AIOVFIO_VM_EDU", "edu")


@pytest.fixture(scope="session")
def nvme_bdf() -> str:
    """The PCI address of the guest's first nvme controller, bound to vfio-pci."""
    return _device("AIOVFIO_VM_NVME", "nvme")
