"""examples/nvme.py runs on the simulated controller (on every backend)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).parents[2] / "examples" / "nvme.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("aiovfio_example_nvme", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_example_runs_on_the_sim(capsys: pytest.CaptureFixture[str]) -> None:
    await _load().main()
    out = capsys.readouterr().out
    assert "QEMU NVMe Ctrl serial example" in out
    assert "16 readers read 1024 blocks" in out
    assert "shut down cleanly: True" in out
