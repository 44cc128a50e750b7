"""Kernel personalities: every row of the table, answered by the sim and by the real kernel.

The probes (`aiovfio.testing.probe`) do what each row describes through the
raw Kernel boundary. On the host they run on `Machine(linux=...)` for every
kernel the project proves; the kernel-marked test runs the same probes on
`vfio_target` (the sim here, the booted kernel in the guest) and expects
what the table says that kernel does.
"""

from __future__ import annotations

import pytest

from aiovfio import InvalidArgument
from aiovfio.sim import Machine
from aiovfio.sim.models import Edu, Nvme
from aiovfio.sim.rules import KERNELS, NEWEST_KERNEL, PERSONALITY, Personality, personality_name
from aiovfio.testing import Target
from aiovfio.testing.probe import ROW_PROBES, probe
from aiovfio.testing.target import SIM_EDU, SIM_NVME


@pytest.mark.parametrize("linux", KERNELS)
def test_each_personality_answers_its_row(linux: str) -> None:
    with Machine(linux=linux, clock="thread") as machine:  # edu DMA runs in real time
        machine.add_device(Edu(), name=SIM_EDU)
        machine.add_device(Nvme(), name=SIM_NVME)
        answers = probe(machine.kernel, msix_device=SIM_NVME, edu=SIM_EDU)
        assert machine.leaks() == []
    assert answers == {row.name: row.answers[linux] for row in PERSONALITY}


def test_every_row_has_a_probe_and_names_a_kernel_function() -> None:
    assert set(ROW_PROBES) == {row.name for row in PERSONALITY}
    for row in PERSONALITY:
        assert set(row.answers) == set(KERNELS), row.name
        assert ".c: " in row.enforced_by, row.name


@pytest.mark.kernel
@pytest.mark.needs_iommu("the probes set a type1 IOMMU on a container: noiommu has none")
def test_this_kernel_agrees_with_its_personality(vfio_target: Target) -> None:
    assert vfio_target.nvme is not None, "no nvme device on this target"
    expected = Personality.of(vfio_target.linux)
    answers = probe(vfio_target.kernel, msix_device=vfio_target.nvme, edu=vfio_target.edu)
    wrong = {
        name: (got, getattr(expected, name))
        for name, got in answers.items()
        if got != getattr(expected, name)
    }
    assert wrong == {}, f"Linux {vfio_target.linux}: (answered, personality) per row: {wrong}"


def test_default_is_the_newest_kernel() -> None:
    with Machine(clock="manual") as machine:
        assert machine.linux == NEWEST_KERNEL == "6.12"
        assert "linux=6.12" in repr(machine)


@pytest.mark.parametrize(
    ("release", "linux"),
    [
        ("6.12-iommufd", "6.12-iommufd"),
        ("6.12.117-aiovfio", "6.12-iommufd"),
        ("6.12.95+deb12-amd64", "6.12"),
        ("6.1.0-57-amd64", "6.1"),
        ("6.6", "6.1"),
        ("6.13.2", "6.12"),
    ],
)
def test_personality_name(release: str, linux: str) -> None:
    assert personality_name(release) == linux


@pytest.mark.parametrize("bad", ["5.15", "6.2", "linux", ""])
def test_unknown_personality_says_which_exist(bad: str) -> None:
    with pytest.raises(InvalidArgument, match=r"6\.1, 6\.12"):
        Machine(linux=bad)
