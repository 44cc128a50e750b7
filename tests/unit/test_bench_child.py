"""benchmarks/run.py's callgrind child runs the interpreter of the virtualenv it was started
from (the resolved base interpreter cannot import aiovfio)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

RUN = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("aiovfio_bench_run", RUN)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_callgrind_child_is_this_interpreter_and_imports_aiovfio() -> None:
    argv = load().callgrind_argv("read32", "api", 50)
    assert argv[:3] == ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    assert argv[3] == sys.executable  # not os.path.realpath(sys.executable)
    child = subprocess.run(argv[3:], capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == 0, child.stderr
