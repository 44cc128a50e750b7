"""The code samples of docs/*.md, extracted so the test suite runs every one.

* a ```pycon block is a REPL transcript: each `>>>` statement (with its `...`
  lines) runs with top-level `await`, in `aiovfio repl`'s namespace, one
  namespace per page, and what it prints must match what the page shows
  (doctest's rules, `...` as an ellipsis);
* a ```{code-block} python with a `:caption: NAME.py` is a file: it is written
  to a folder and run by the page's test;
* any other ```python block runs as one statement list in the page's namespace.

```console blocks are commands for a shell and are not run here.
"""

from __future__ import annotations

import ast
import contextlib
import doctest
import io
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attrs import frozen

DOCS = Path(__file__).resolve().parents[2] / "docs"

_FENCE = re.compile(r"^(?P<ticks>`{3,})\s*(?:\{code-block\}\s*)?(?P<lang>[\w-]*)\s*$")


@frozen
class Sample:
    page: Path
    line: int
    lang: str
    text: str
    caption: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(DOCS)}:{self.line}"


def samples(page: Path) -> list[Sample]:
    """The fenced blocks of one Markdown page, in order."""
    out: list[Sample] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None or not m["lang"]:
            i += 1
            continue
        start, ticks, lang = i + 1, m["ticks"], m["lang"]
        i += 1
        caption = None
        while i < len(lines) and lines[i].startswith(":"):
            key, _, value = lines[i][1:].partition(":")
            if key.strip() == "caption":
                caption = value.strip()
            i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].strip() != ticks:
            body.append(lines[i])
            i += 1
        i += 1
        out.append(Sample(page, start, lang, "\n".join(body).strip("\n") + "\n", caption))
    return out


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


@frozen
class Step:
    source: str
    want: str
    line: int


def transcript(sample: Sample) -> Iterator[Step]:
    """The `>>>` statements of a pycon block and the output each expects."""
    lines = sample.text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith(">>>"):
            raise AssertionError(f"{sample.where}+{i}: expected '>>> ', got {lines[i]!r}")
        line = sample.line + i
        source = [lines[i][4:]]
        i += 1
        while i < len(lines) and lines[i].startswith("..."):
            source.append(lines[i][4:])
            i += 1
        want = []
        while i < len(lines) and not lines[i].startswith(">>>"):
            want.append(lines[i])
            i += 1
        yield Step(
            "\n".join(source) + "\n", "\n".join(want).rstrip() + ("\n" if want else ""), line
        )


_CHECKER = doctest.OutputChecker()
_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


async def run_statement(source: str, namespace: dict[str, Any]) -> str:
    """Run one REPL statement as `aiovfio repl` does; return what it printed."""
    code = compile(source, "<docs>", "single", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    out = io.StringIO()
    hook = sys.displayhook

    def display(value: object) -> None:
        if value is not None:
            namespace["_"] = value
            out.write(repr(value) + "\n")

    sys.displayhook = display
    try:
        with contextlib.redirect_stdout(out):
            result = types.FunctionType(code, namespace)()
            if _is_coro(result):
                await result
    finally:
        sys.displayhook = hook
    return out.getvalue()


def _is_coro(value: object) -> bool:
    import inspect

    return inspect.iscoroutine(value)


async def run_transcript(sample: Sample, namespace: dict[str, Any]) -> None:
    for step in transcript(sample):
        got = await run_statement(step.source, namespace)
        if not _CHECKER.check_output(step.want, got, _FLAGS):
            raise AssertionError(
                f"{sample.page.relative_to(DOCS)}:{step.line}: {step.source.strip()}\n"
                f"the page shows:\n{step.want}it printed:\n{got}"
            )


async def run_block(sample: Sample, namespace: dict[str, Any]) -> None:
    code = compile(sample.text, sample.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = types.FunctionType(code, namespace)()
    if _is_coro(result):
        await result


def repl_namespace() -> dict[str, Any]:
    """What `aiovfio repl` puts in front of its user."""
    import anyio

    import aiovfio
    from aiovfio.repl import attach, hold, release, session

    return {
        "__name__": "__docs__",
        "aiovfio": aiovfio,
        "anyio": anyio,
        "attach": attach,
        "hold": hold,
        "release": release,
        "session": session,
    }
