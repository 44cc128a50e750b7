"""aiovfio's pytest plugin (loaded automatically once aiovfio is installed).

Fixtures:

* `vfio_target`: a `Target` — the simulated machine on a normal host, the real
  kernel inside the aiovfio QEMU guest. The test fails if it leaves anything
  open, mapped or enabled.
* `sim_machine`: always a fresh simulated machine (edu at 00:04.0, nvme at
  00:05.0), checked for leaks the same way.

Mark a test `@pytest.mark.kernel` when its body should also run on the real
kernel in the guest (`nox -s vm`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .target import Target, in_guest, real_target, sim_target

__all__ = ["vfio_target", "sim_machine"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kernel: the test body also runs on the real kernel inside the QEMU guest"
    )


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
