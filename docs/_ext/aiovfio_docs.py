"""Sphinx directives for aiovfio's reference pages.

* `.. aiovfio-names:: MODULE` documents names of `MODULE.__all__` with
  autodoc: those listed in `:names:`, or with `:rest:` every one not yet
  documented on the page, so a new public name can never be left out.
* `.. aiovfio-cli::` is the command-line reference, made from the argument
  parser itself (`aiovfio.cli.parser.build_parser`): one section per command
  with its usage, description and options, so it cannot fall behind.

Docstrings are written for `help()` (short, Markdown-ish), not for reST: one
that docutils would warn about is shown as a literal block instead, so a new
public name cannot break the warnings-as-errors build; a data object without
a `#:` comment shows no docstring (not its type's).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


def _kind(obj: Any) -> str:
    if inspect.isclass(obj):
        return "autoexception" if issubclass(obj, BaseException) else "autoclass"
    if callable(obj):
        return "autofunction"
    return "autodata"


class AiovfioNames(SphinxDirective):
    required_arguments = 1
    option_spec = {"names": directives.unchanged, "rest": directives.flag}

    def run(self) -> list[nodes.Node]:
        module_name = self.arguments[0]
        module = importlib.import_module(module_name)
        public = [n for n in module.__all__ if not n.startswith("_")]
        done: set[str] = self.env.temp_data.setdefault("aiovfio_documented", set())
        if "rest" in self.options:
            names = [n for n in public if f"{module_name}.{n}" not in done]
        else:
            names = self.options.get("names", "").split()
            missing = [n for n in names if n not in public]
            if missing:
                raise self.error(f"not in {module_name}.__all__: {', '.join(missing)}")
        lines: list[str] = []
        for name in names:
            done.add(f"{module_name}.{name}")
            lines += [f".. {_kind(getattr(module, name))}:: {module_name}.{name}", ""]
        node = nodes.container()
        nested_parse_with_titles(
            self.state, StringList(lines, source=self.get_source_info()[0]), node
        )
        return node.children


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    out: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            out += list(action.choices.items())
    return out


class AiovfioCli(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        from aiovfio.cli.parser import build_parser

        parser = build_parser()
        lines = [
            "``aiovfio``",
            "-" * 11,
            "",
            ".. code-block:: text",
            "",
            *(f"   {line}" for line in parser.format_help().splitlines()),
            "",
        ]
        for name, sub in _subcommands(parser):
            title = f"``aiovfio {name}``"
            lines += [title, "-" * len(title), ""]
            if sub.description:
                lines += [sub.description[0].upper() + sub.description[1:] + ".", ""]
            lines += [
                ".. code-block:: text",
                "",
                *(f"   {line}" for line in sub.format_help().splitlines()),
                "",
            ]
        node = nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, source="aiovfio.cli.parser"), node)
        return node.children


def _reST_problems(text: str) -> bool:
    """Whether docutils reports anything (level >= warning) for `text` as reST."""
    from docutils.core import publish_doctree

    doctree = publish_doctree(
        text,
        settings_overrides={"report_level": 5, "halt_level": 5, "warning_stream": io.StringIO()},
    )
    return any(m["level"] >= 2 for m in doctree.findall(nodes.system_message))


def safe_docstring(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    if what in ("data", "attribute") and not inspect.isclass(obj):
        inherited = inspect.getdoc(type(obj)) or ""
        if "\n".join(lines).strip() == inherited.strip():
            lines[:] = []
            return
    text = "\n".join(lines)
    if text.strip() and _reST_problems(text):
        lines[:] = ["::", "", *(f"    {line}" for line in lines), ""]


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", safe_docstring)
    app.add_directive("aiovfio-names", AiovfioNames)
    app.add_directive("aiovfio-cli", AiovfioCli)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
