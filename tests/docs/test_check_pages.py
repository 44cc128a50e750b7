"""docs/check_pages.py finds a broken page and a dead internal link (Chromium stood in for
by the file's own text here; `nox -s docs` runs the real one on the built site)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

CHECK = Path(__file__).resolve().parents[2] / "docs" / "check_pages.py"


@pytest.fixture
def check_pages(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_pages", CHECK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def render(browser: str, page: Path, profile: Path) -> tuple[str, str]:
        console = "Uncaught TypeError: x is undefined" if "bad-js" in page.name else ""
        return page.read_text(), console

    monkeypatch.setattr(module, "render", render)
    return module


def site(root: Path, pages: dict[str, str]) -> Path:
    for name, body in pages.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"<html><body>{body}</body></html>")
    return root


def test_a_good_site_passes(check_pages: ModuleType, tmp_path: Path) -> None:
    root = site(
        tmp_path,
        {
            "index.html": '<article>hi <a href="sub/page.html#part">x</a>'
            '<a href="https://example.org/">y</a><a href="#top">z</a></article><p id="top"/>',
            "sub/page.html": '<article><h2 id="part">Part</h2>'
            '<a href="../index.html">up</a></article>',
        },
    )
    assert check_pages.check(root, "chromium") == []


def test_broken_pages_and_dead_links_are_found(check_pages: ModuleType, tmp_path: Path) -> None:
    root = site(
        tmp_path,
        {
            "index.html": '<article>hi <a href="missing.html">a</a>'
            '<a href="other.html#nowhere">b</a></article>',
            "other.html": '<article>text <div class="system-message">bad</div></article>',
            "empty.html": "<div>no article</div>",
            "bad-js.html": "<article>text</article>",
        },
    )
    problems = check_pages.check(root, "chromium")
    assert any("index.html: dead link 'missing.html'" in p for p in problems)
    assert any(
        "index.html: dead link 'other.html#nowhere': no #nowhere there" in p for p in problems
    )
    assert any("other.html: 1 docutils system message(s)" in p for p in problems)
    assert any("empty.html: no article text" in p for p in problems)
    assert any("bad-js.html: script error" in p for p in problems)
    assert len(problems) == 5
