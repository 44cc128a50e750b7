"""Sphinx configuration for aiovfio's docs site (`nox -s docs`).

Pages are Markdown (MyST); the API reference is autodoc, the CLI reference is
made from the argument parser (`_ext/cli_reference.py`). Links to Python,
anyio and trio resolve through intersphinx inventories shipped in
`_inventories/` (made by `_inventories/make.py`): the build never fetches.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))

import aiovfio  # noqa: E402

project = "aiovfio"
author = "aiovfio developers"
copyright = "aiovfio developers"
release = aiovfio.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "aiovfio_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_inventories", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"aiovfio {release}"
html_static_path: list[str] = []

# Docstrings write `name` for code, as Markdown does.
default_role = "code"

autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = False
autoclass_content = "class"

# Offline: each inventory is a file in the repository, beside the site it names.
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", str(HERE / "_inventories" / "python.inv")),
    "anyio": ("https://anyio.readthedocs.io/en/stable", str(HERE / "_inventories" / "anyio.inv")),
    "trio": ("https://trio.readthedocs.io/en/stable", str(HERE / "_inventories" / "trio.inv")),
}
intersphinx_timeout = 1
