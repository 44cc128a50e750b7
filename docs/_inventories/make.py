"""Make the intersphinx inventories the docs build reads, without the internet.

The build must not fetch (`conf.py` points intersphinx at these files), so:

* python.inv is the one Debian's python3.X-doc package installs
  (/usr/share/doc/python3.X/html/objects.inv), Python's own;
* anyio.inv and trio.inv are made here from the reStructuredText sources in
  their PyPI sdists (the versions installed here): every `.. module::`,
  `.. currentmodule::` and object directive (`autofunction`, `class`,
  `method` nested under a class, ...) becomes an entry pointing at the page and
  anchor Sphinx gives it on their Read the Docs sites.

    python docs/_inventories/make.py      # rewrites the three files
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent

_DIRECTIVE = re.compile(
    r"^(?P<indent>\s*)\.\.\s+(?:py:)?(?P<auto>auto)?(?P<kind>module|currentmodule|function|"
    r"class|exception|data|attribute|method|decorator|classmethod|staticmethod|property)"
    r"::\s*(?P<name>[\w.]+)"
)
_ROLE = {
    "function": "function",
    "decorator": "function",
    "class": "class",
    "exception": "exception",
    "data": "data",
    "attribute": "attribute",
    "property": "property",
    "method": "method",
    "classmethod": "method",
    "staticmethod": "method",
}


def entries(doc: str, text: str) -> list[tuple[str, str, str]]:
    """(name, py role, page) for each object directive of one .rst page."""
    out: list[tuple[str, str, str]] = []
    module = ""
    classes: list[tuple[int, str]] = []  # (indent, qualified class name)
    for line in text.splitlines():
        m = _DIRECTIVE.match(line)
        if m is None:
            continue
        indent, kind, name = len(m["indent"]), m["kind"], m["name"]
        while classes and classes[-1][0] >= indent:
            classes.pop()
        if kind in ("module", "currentmodule"):
            module = name
            if kind == "module" and not m["auto"]:
                out.append((name, "module", doc))
            continue
        if classes and kind in ("method", "attribute", "classmethod", "staticmethod", "property"):
            full = f"{classes[-1][1]}.{name}"
        elif module and not name.startswith(module + "."):
            full = f"{module}.{name}"
        else:
            full = name
        out.append((full, _ROLE[kind], doc))
        if kind in ("class", "exception"):
            classes.append((indent, full))
    return out


def write_inventory(
    path: Path, project: str, version: str, rows: list[tuple[str, str, str]]
) -> None:
    seen: set[tuple[str, str]] = set()
    lines = []
    for name, role, doc in rows:
        if (name, role) in seen:
            continue
        seen.add((name, role))
        anchor = f"module-{name}" if role == "module" else name
        lines.append(f"{name} py:{role} 1 {doc}.html#{anchor} -\n")
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    path.write_bytes(header.encode() + zlib.compress("".join(sorted(lines)).encode()))


def from_sdist(project: str, docs: str) -> None:
    version = importlib.metadata.version(project)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"{project}=={version}",
                "-d",
                tmp,
            ],
            check=True,
        )
        (sdist,) = Path(tmp).glob(f"{project}-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        root = next(Path(tmp).glob(f"{project}-*/{docs}"))
        rows = []
        for rst in sorted(root.rglob("*.rst")):
            doc = rst.relative_to(root).with_suffix("").as_posix()
            rows += entries(doc, rst.read_text(encoding="utf-8"))
    write_inventory(HERE / f"{project}.inv", project, version, rows)
    print(f"{project}.inv: {len(rows)} objects from {project} {version}'s docs")


def python() -> None:
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = Path(f"/usr/share/doc/python{minor}/html/objects.inv")
    if not source.is_file():
        raise SystemExit(f"no {source}: apt-get install python{minor}-doc")
    shutil.copyfile(source, HERE / "python.inv")
    print(f"python.inv: from {source}")


if __name__ == "__main__":
    python()
    from_sdist("anyio", "docs")
    from_sdist("trio", "docs/source")
