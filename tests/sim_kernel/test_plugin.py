"""The pytest plugin a driver's suite uses: fault and leak checks as test failures, markers.

Each test writes a small test file and runs pytest on it in a child process
(the plugin loads by its entry point), then reads the outcome and output.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

_HEADER = '''
import anyio
import pytest

import aiovfio
from aiovfio.testing import Target

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def edu_dma_from_ram(target: Target, *, bus_master: bool) -> None:
    """edu copies 16 bytes from a DMA buffer into its own buffer (DEVICES.md 1.5)."""
    async with target.open("edu") as dev:
        if bus_master:
            dev.config.write16(4, dev.config.read16(4) | 0x4)
        bar = dev.bar(0)
        async with dev.dma_buffer(4096) as buf:
            bar.write64(0x80, buf.iova)
            bar.write64(0x88, 0x40000)
            bar.write64(0x90, 16)
            bar.write64(0x98, 0x1)
            with anyio.fail_after(5):
                while bar.read64(0x98) & 1:
                    await anyio.sleep(0.01)
'''


def _run(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "test_driver.py"
    path.write_text(_HEADER + textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )


def test_an_undeclared_bus_master_fault_fails_the_test_with_the_message(tmp_path: Path) -> None:
    done = _run(
        tmp_path,
        """
        async def test_forgot_bus_master(vfio_target: Target) -> None:
            await edu_dma_from_ram(vfio_target, bus_master=False)

        @pytest.mark.sim_faults("bus_master")
        async def test_declared(vfio_target: Target) -> None:
            await edu_dma_from_ram(vfio_target, bus_master=False)

        async def test_declared_in_a_block(vfio_target: Target) -> None:
            with vfio_target.expect_faults("bus_master"):
                await edu_dma_from_ram(vfio_target, bus_master=False)

        async def test_with_bus_master(vfio_target: Target) -> None:
            await edu_dma_from_ram(vfio_target, bus_master=True)
        """,
    )
    out = done.stdout
    assert "1 failed, 3 passed" in out, out
    assert "FAILED test_driver.py::test_forgot_bus_master" in out
    assert "did not declare" in out
    assert "bus_master fault on 0000:00:04.0" in out
    assert "Bus Master is off in COMMAND" in out
    assert "error" not in out.splitlines()[-1]


def test_a_declared_fault_that_never_happens_fails(tmp_path: Path) -> None:
    done = _run(
        tmp_path,
        """
        @pytest.mark.sim_faults("iommu")
        async def test_no_fault(vfio_target: Target) -> None:
            await edu_dma_from_ram(vfio_target, bus_master=True)
        """,
    )
    assert "1 failed" in done.stdout, done.stdout
    assert "expected iommu fault(s) but none happened" in done.stdout


def test_leaks_are_test_failures_and_open_closes_what_it_gave(tmp_path: Path) -> None:
    done = _run(
        tmp_path,
        """
        async def test_entered_by_hand(vfio_target: Target) -> None:
            cm = aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel)
            dev = await cm.__aenter__()
            assert dev.name == vfio_target.edu

        async def test_awaited_open(vfio_target: Target) -> None:
            dev = await vfio_target.open("nvme")
            assert dev.name == vfio_target.nvme
        """,
    )
    out = done.stdout
    assert "1 failed, 1 passed" in out, out
    assert "FAILED test_driver.py::test_entered_by_hand" in out
    assert "device fd" in out and "(0000:00:04.0) is open" in out
    assert "errors" not in out.splitlines()[-1], out


def test_machine_options_by_marker(tmp_path: Path) -> None:
    done = _run(
        tmp_path,
        """
        @pytest.mark.sim(linux="6.1", clock="manual", page_size=8192, memlock_limit=1 << 20,
                         group_peers=("e1000e",))
        def test_options(vfio_target: Target) -> None:
            m = vfio_target.machine
            assert m is not None
            assert (m.linux, m.clock.kind, m.page_size) == ("6.1", "manual", 8192)
            assert m.topology.memlock.limit == 1 << 20
            assert not m.topology.devices[vfio_target.edu].group.viable

        @pytest.mark.sim(colour="blue")
        def test_bad_option(vfio_target: Target) -> None:
            pass
        """,
    )
    out = done.stdout
    assert "1 passed, 1 error" in out, out
    assert "unknown simulated-machine option(s) colour" in out
