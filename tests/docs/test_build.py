"""The docs build without a warning (what `nox -s docs` checks, minus the HTML and the
browser): a public name whose docstring breaks the build fails here, before it lands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_docs_build_with_warnings_as_errors(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "dummy",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
