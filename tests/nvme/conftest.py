"""Simulated NVMe controllers for the driver's tests, each checked for leaks and faults."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from aiovfio.sim import Machine
from aiovfio.sim.models import Nvme
from aiovfio.testing.target import SIM_NVME, Target

MakeTarget = Callable[..., Target]


@pytest.fixture
def make_target() -> Iterator[MakeTarget]:
    """`make_target(**nvme_options)`: a machine with one nvme model at 00:05.0.

    `model=` passes a ready-made model instead. After the test: no leaks, no faults.
    """
    made: list[Target] = []

    def make(*, model: Nvme | None = None, **options: object) -> Target:
        machine = Machine()
        machine.add_device(model or Nvme(**options), name=SIM_NVME)  # type: ignore[arg-type]
        target = Target(machine.kernel, "", SIM_NVME, machine)
        made.append(target)
        return target

    try:
        yield make
        for target in made:
            assert target.machine is not None
            assert target.leaks() == [], target.leaks()
            faults = [r.message for r in target.machine.faults if r.kind == "iommu"]
            assert faults == [], faults
    finally:
        for target in made:
            target.close()
