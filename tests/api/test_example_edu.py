"""examples/edu.py, the README's first command, on the sim and on a real edu."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from aiovfio.testing.target import Target

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "edu.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("aiovfio_example_edu", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.kernel
async def test_edu_example_drives_every_feature(vfio_target: Target) -> None:
    edu = _load()
    lines: list[str] = []
    report = await edu.run_demo(vfio_target.edu, kernel=vfio_target.kernel, say=lines.append)
    assert report.version == (1, 0)
    assert report.liveness_ok
    assert report.factorials == {"polled 10!": 3628800, "msi 12!": 479001600, "intx 12!": 479001600}
    assert report.soft_irq_status == 0xCAFE0000
    assert report.dma_ok
    assert report.interrupts["msi"] >= 4 and report.interrupts["intx"] >= 1
    assert any("DMA round trip" in line for line in lines)


async def test_edu_demo_on_its_own_simulated_machine() -> None:
    edu = _load()
    lines: list[str] = []
    report = await edu.run_demo(say=lines.append)
    assert report.ok
    assert lines[0].startswith("simulated machine")
