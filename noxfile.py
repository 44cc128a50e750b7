"""Developer tasks: `nox -s tests`, `demo`, `vm`, `lint`, `typecheck`, `bench`, `docs`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

import nox

nox.needs_version = ">=2024.10"
nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
#: The real-kernel setups of `nox -s vm` (names of aiovfio.testing.vm.SETUPS).
VM_SETUPS = ("6.1", "6.12", "iommufd", "iommufd-compat", "noiommu")
#: What `nox -s vm` (and so CI) runs when no setup is named: all five.
VM_DEFAULT = ("6.1", "6.12", "iommufd", "iommufd-compat", "noiommu")
#: Longest first, so that guests run side by side finish close together.
VM_ORDER = ("iommufd", "noiommu", "iommufd-compat", "6.1", "6.12")


def _group(name: str) -> list[str]:
    return list(nox.project.dependency_groups(PYPROJECT, name))


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite on the simulated machine, on asyncio, uvloop and trio.

    First it prepares what the golden ABI test compiles against (gcc and the
    kernel 6.12 uapi headers, see tests/unit/_headers.py); where it cannot (no
    root for apt-get install, no package mirror) it says why and goes on, and
    that test fails saying what to run. tests/vm is left out by tests/conftest.py
    outside the QEMU guest.
    """
    session.install("-e", ".[trio,uvloop]", *_group("test"))
    session.run("python", "tests/unit/_headers.py", success_codes=[0, 1])
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The edu driver on the simulated machine: the README's first command."""
    session.install("-e", ".")
    session.run("python", "-m", "aiovfio", "demo", *session.posargs)


@nox.session
def vm(session: nox.Session) -> None:
    """The real-kernel suite inside a QEMU guest, once per setup.

    Five setups (`aiovfio vm --on NAME`, `aiovfio.testing.vm.SETUPS`): Debian
    6.1 and 6.12 (legacy type1 container), and the 6.12 kernel built here with
    iommufd through the device cdev, through the legacy API iommufd serves, and
    in noiommu mode. Provisions the guest first (root: apt packages, Debian's
    kernels and the iommufd kernel's build, all cached). Without a setup named
    it runs all five; `nox -s vm -- 6.12 noiommu` runs those setups only; other
    arguments go to pytest (`nox -s vm -- 6.1 -k dma`).

    A guest's pytest keeps about one vCPU busy, so $AIOVFIO_VM_JOBS guests
    (default: 2, or 1 on a one-CPU machine) run side by side, each one's output
    printed whole when it ends; the session fails if any setup fails.
    """
    session.install("-e", ".[trio,uvloop]", *_group("test"))
    setups = [s for s in VM_SETUPS if s in session.posargs] or list(VM_DEFAULT)
    pytest_args = [a for a in session.posargs if a not in VM_SETUPS]
    on = [w for s in setups for w in ("--on", s)]
    # --install-only (CI makes the venv first): session.run skips, and returns None;
    # the guests below are not session.run calls, so stop here
    if session.run("python", "-c", "", silent=True) is None:
        return
    session.run("python", "-m", "aiovfio.testing.vm", "--setup", *on)
    # The venv's own python: its resolved target would leave the venv behind.
    # hypothesis's pytest plugin imports all of hypothesis: 10 s under TCG.
    python = os.path.join(session.bin, "python")
    guest = [python, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"]
    guest += [*_kernel_test_paths(), "-m", "kernel", "-o", "addopts=-ra --strict-markers", "-q"]
    guest += pytest_args
    jobs = int(os.environ.get("AIOVFIO_VM_JOBS") or min(2, os.cpu_count() or 1))
    ordered = sorted(setups, key=VM_ORDER.index)
    runs = {s: [python, "-m", "aiovfio.testing.vm", "--on", s, "--", *guest] for s in ordered}
    failed = _run_side_by_side(session, runs, jobs)
    if failed:
        session.error(f"the guest suite failed on: {', '.join(failed)}")


def _run_side_by_side(session: nox.Session, runs: dict[str, list[str]], jobs: int) -> list[str]:
    """Run each command, `jobs` at once; print each one's output whole when it ends.

    Returns the names whose command failed. An interrupt stops them all.
    """
    waiting = list(runs.items())
    running: dict[str, tuple[subprocess.Popen[bytes], BinaryIO, float]] = {}
    failed = []
    with tempfile.TemporaryDirectory(prefix="aiovfio-nox-vm.") as logs:
        try:
            while waiting or running:
                while waiting and len(running) < jobs:
                    name, argv = waiting.pop(0)
                    session.log(f"guest suite on {name}: started")
                    out: BinaryIO = open(os.path.join(logs, name), "wb")  # noqa: SIM115
                    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
                    running[name] = (proc, out, time.monotonic())
                for name, (proc, out, started) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    del running[name]
                    out.close()
                    with open(os.path.join(logs, name), encoding="utf-8", errors="replace") as f:
                        sys.stdout.write(f.read())
                    took = time.monotonic() - started
                    session.log(f"guest suite on {name}: exit {proc.returncode} in {took:.0f} s")
                    if proc.returncode != 0:
                        failed.append(name)
                time.sleep(0.5)
        finally:
            # SIGINT: aiovfio vm then kills its QEMU (which leads its own session)
            for proc, _, _ in running.values():
                proc.send_signal(signal.SIGINT)
            for proc, _, _ in running.values():
                _reap(proc)
    return failed


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for an interrupted guest run; kill it if it does not stop within 30 s."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _kernel_test_paths() -> list[str]:
    """tests/vm, and every other test file with a `@pytest.mark.kernel` body.

    Naming the files keeps the guest from importing the rest (imports are
    20-30x slower under TCG); `-m kernel` then picks the marked tests.
    """
    others = sorted(
        str(p)
        for p in Path("tests").rglob("test_*.py")
        if "vm" not in p.parts and "pytest.mark.kernel" in p.read_text()
    )
    return ["tests/vm", *others]


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install(*_group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package and the examples."""
    session.install("-e", ".[trio,uvloop]", *_group("typing"))
    session.run("mypy", "--strict", "aiovfio", "examples")


@nox.session
def bench(session: nox.Session) -> None:
    """Speed figures beside their raw baselines, with ratios."""
    session.install("-e", ".[trio,uvloop]")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """The docs site (Sphinx, furo) into docs/_build/html, checked in headless Chromium.

    Warnings are errors. Intersphinx reads the inventories shipped in
    docs/_inventories (the build never fetches). Then every page is opened in
    Debian's chromium (installed first when missing and root) and a broken
    page or a dead internal link fails the session. `nox -s docs -- --screenshot
    tutorial.html=out.png` saves a page too.
    """
    session.install("-e", ".[trio]", *_group("docs"))
    if shutil.which("chromium") is None and os.geteuid() == 0:
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        session.run("apt-get", "update", "-qq", external=True, env=env)
        session.run(
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "chromium",
            external=True,
            env=env,
        )
    out = "docs/_build/html"
    session.run("python", "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs", out)
    session.run("python", "docs/check_pages.py", out, *session.posargs)


if __name__ == "__main__":
    sys.exit("run this file with nox")
