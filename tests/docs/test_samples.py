"""Every code sample in docs/ runs (see samples.py for the kinds), on asyncio and trio;
the tutorial's driver also runs on the real kernel in the QEMU guest (pytest.mark.kernel)."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
import structlog
from samples import DOCS, Sample, pages, repl_namespace, run_block, run_transcript, samples

import aiovfio.repl
from aiovfio.testing import Target

RUNNABLE = ("pycon", "python")


@pytest.fixture(autouse=True)
def logging_as_found() -> Iterator[None]:
    """A page starts as an application that configured nothing, and leaves it so."""
    was, previous = structlog.is_configured(), structlog.get_config()
    level = logging.getLogger("aiovfio").level
    structlog.reset_defaults()
    yield
    logging.getLogger("aiovfio").setLevel(level)
    if was:
        structlog.configure(**previous)
    else:
        structlog.reset_defaults()


def runnable_pages() -> list[Path]:
    return [p for p in pages() if any(s.lang in RUNNABLE for s in samples(p))]


def test_the_docs_have_samples_to_run() -> None:
    assert {p.name for p in runnable_pages()} >= {"tutorial.md", "repl.md", "logging.md"}


@pytest.mark.parametrize("page", runnable_pages(), ids=lambda p: str(p.relative_to(DOCS)))
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_page_samples_run(
    page: Path, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page's REPL transcripts and inline blocks, in order, in one namespace."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(aiovfio.repl, "session", aiovfio.repl.Session())
    monkeypatch.setattr(aiovfio.repl._InRepl, "active", True)  # no atexit hook from a test
    namespace = repl_namespace() | {"session": aiovfio.repl.session}
    files: list[Sample] = []

    async def run() -> None:
        try:
            for sample in samples(page):
                if sample.caption:
                    (tmp_path / sample.caption).write_text(sample.text)
                    files.append(sample)
                elif sample.lang == "pycon":
                    await run_transcript(sample, namespace)
                elif sample.lang == "python":
                    await run_block(sample, namespace)
        finally:
            await aiovfio.repl.session.aclose()

    anyio.run(run, backend=backend)
    for machine in [v for v in namespace.values() if type(v).__name__ == "Machine"]:
        assert machine.leaks() == []


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tutorial_driver(tmp_path: Path) -> Path:
    (sample,) = [s for s in samples(DOCS / "tutorial.md") if s.caption == "first_driver.py"]
    path = tmp_path / "first_driver.py"
    path.write_text(sample.text)
    return path


def test_the_tutorial_driver_runs_as_the_page_says(tmp_path: Path) -> None:
    path = _tutorial_driver(tmp_path)
    done = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    shown = next(
        s.text
        for s in samples(DOCS / "tutorial.md")
        if s.lang == "console" and "$ python first_driver.py" in s.text
    )
    assert done.stdout.splitlines() == shown.splitlines()[1:]


@pytest.mark.kernel
@pytest.mark.anyio
async def test_the_tutorial_driver_on_the_target(vfio_target: Target, tmp_path: Path) -> None:
    """On the simulated machine here, on Linux's vfio-pci inside the aiovfio guest."""
    module: Any = _load(_tutorial_driver(tmp_path))
    got = await module.main(vfio_target.edu, vfio_target.kernel)
    assert got == b"hello from RAM"


def test_the_testing_guide_files_pass_under_pytest(tmp_path: Path) -> None:
    """conftest.py and test_edu.py of the testing how-to, as a user's own suite."""
    page = DOCS / "howto" / "testing.md"
    files = [s for s in samples(page) if s.caption]
    assert {s.caption for s in files} == {"conftest.py", "test_edu.py"}
    for sample in files:
        (tmp_path / str(sample.caption)).write_text(sample.text)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_edu.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    shown = next(s.text for s in samples(page) if s.lang == "console" and "pytest -q" in s.text)
    summary = shown.splitlines()[-1]  # "4 passed"
    assert any(line.startswith(summary + " in ") for line in done.stdout.splitlines())
