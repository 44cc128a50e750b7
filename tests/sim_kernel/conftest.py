"""Fixtures for the simulated kernel's tests (synchronous: no event loop)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from aiovfio.sim import Machine

from .rig import GROUP, NAME, Rig, Toy


@pytest.fixture
def machine() -> Iterator[Machine]:
    with Machine(clock="manual") as m:
        yield m


@pytest.fixture
def toy() -> Toy:
    return Toy()


@pytest.fixture
def rig(machine: Machine, toy: Toy) -> Rig:
    machine.add_device(toy, name=NAME, group=GROUP)
    return Rig(machine, toy)
