"""The sim's personality of the running kernel, row by row, against the kernel itself.

For every row of `aiovfio.sim.rules.PERSONALITY` the same probe
(`aiovfio.testing.probe`) asks the real kernel and a simulated machine with
that kernel's personality (`Machine(linux=...)`); both must give the
answer the table records for that kernel.
"""

from __future__ import annotations

import os

import pytest

from aiovfio.sim import Machine
from aiovfio.sim.models import Edu, Nvme
from aiovfio.sim.rules import PERSONALITY, PersonalityRow, personality_name
from aiovfio.testing.probe import ROW_PROBES
from aiovfio.testing.target import SIM_EDU, SIM_NVME, real_target

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.needs_iommu("the rows are about the container and vfio-pci with an IOMMU"),
]

LINUX = personality_name(os.environ.get("AIOVFIO_VM_KERNEL") or os.uname().release)


@pytest.mark.parametrize("row", PERSONALITY, ids=lambda r: r.name)
def test_row_agrees(row: PersonalityRow) -> None:
    real = real_target()
    assert real.nvme is not None, "the guest has no nvme (AIOVFIO_VM_NVME)"
    probe = ROW_PROBES[row.name]
    kernel_answer = probe(real.kernel, real.nvme, real.edu)
    with Machine(linux=LINUX, clock="thread") as machine:  # the edu DMA probe needs time
        machine.add_device(Edu(), name=SIM_EDU)
        machine.add_device(Nvme(), name=SIM_NVME)
        sim_answer = probe(machine.kernel, SIM_NVME, SIM_EDU)
        assert machine.leaks() == []
    print(f"{row.name} on {os.uname().release}: kernel {kernel_answer!r}, sim {sim_answer!r}")
    assert (kernel_answer, sim_answer) == (row.answers[LINUX], row.answers[LINUX]), (
        f"{row.name} ({row.enforced_by}): Linux {LINUX} answers {kernel_answer!r}, "
        f"the sim's {LINUX} personality {sim_answer!r}, the table says {row.answers[LINUX]!r}"
    )
