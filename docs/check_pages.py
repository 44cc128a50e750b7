"""Open every built page in headless Chromium; fail on a broken page or a dead internal link.

    python docs/check_pages.py docs/_build/html [--screenshot PAGE=FILE.png ...]

Each page is loaded from file:// by Debian's `chromium` (offline: no network,
no first-run, no component updates, a fresh profile), its DOM as rendered
after scripts is read back (`--dump-dom`), and checked:

* the page rendered: an `<article>` with text, no docutils system message
  (an unresolved reference or directive left in the page), no uncaught
  script error on Chromium's console;
* every internal link (`href` without a scheme) names a page that exists and,
  with a `#fragment`, an element id in that page's rendered DOM.

Exit status 0 when every page passes, 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--enable-logging=stderr",
    "--v=0",
]


class Page(HTMLParser):
    """What the checks need from a rendered DOM."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.system_messages = 0
        self.article_text: list[str] = []
        self._in_article = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.add(str(values["id"]))
        if tag == "a" and values.get("name"):
            self.ids.add(str(values["name"]))
        if tag in ("a", "link") and values.get("href"):
            self.links.append(str(values["href"]))
        if "system-message" in (values.get("class") or "").split():
            self.system_messages += 1
        if tag == "article":
            self._in_article += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "article" and self._in_article:
            self._in_article -= 1

    def handle_data(self, data: str) -> None:
        if self._in_article and data.strip():
            self.article_text.append(data.strip())


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit(
        "check_pages: no Chromium; install Debian's (`apt-get install chromium`) and run again"
    )


def render(browser: str, page: Path, profile: Path) -> tuple[str, str]:
    """The page's DOM after scripts ran, and Chromium's console log."""
    done = subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return done.stdout, done.stderr


def screenshot(browser: str, page: Path, out: Path, profile: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            browser,
            *FLAGS,
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
            "--window-size=1280,1400",
            f"--screenshot={out}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )


def pages(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.html") if "_static" not in p.parts)


def check(root: Path, browser: str) -> list[str]:
    problems: list[str] = []
    rendered: dict[Path, Page] = {}
    with tempfile.TemporaryDirectory(prefix="aiovfio-chromium-") as tmp:
        for page in pages(root):
            name = page.relative_to(root)
            try:
                dom, console = render(browser, page, Path(tmp) / "profile")
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                problems.append(f"{name}: did not render: {exc}")
                continue
            parsed = Page()
            parsed.feed(dom)
            rendered[page.resolve()] = parsed
            if not parsed.article_text:
                problems.append(f"{name}: no article text: a broken page")
            if parsed.system_messages:
                problems.append(f"{name}: {parsed.system_messages} docutils system message(s)")
            errors = [line for line in console.splitlines() if "Uncaught" in line]
            problems += [f"{name}: script error: {line.strip()[-200:]}" for line in errors]
    for page, parsed in rendered.items():
        name = page.relative_to(root.resolve())
        for href in parsed.links:
            url = urlsplit(href)
            if url.scheme or url.netloc or href.startswith(("mailto:", "javascript:")):
                continue
            target = (page.parent / unquote(url.path)).resolve() if url.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                problems.append(f"{name}: dead link {href!r}: no {target}")
                continue
            if url.fragment and target.suffix == ".html":
                ids = rendered[target].ids if target in rendered else set()
                if unquote(url.fragment) not in ids:
                    problems.append(f"{name}: dead link {href!r}: no #{url.fragment} there")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the built site (docs/_build/html)")
    parser.add_argument(
        "--screenshot",
        action="append",
        default=[],
        metavar="PAGE=FILE",
        help="also save PAGE (relative to root) as a PNG",
    )
    args = parser.parse_args(argv)
    browser = chromium()
    args.root = args.root.resolve()
    problems = check(args.root, browser)
    count = len(pages(args.root))
    for problem in problems:
        print(f"check_pages: {problem}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="aiovfio-chromium-") as tmp:
        for item in args.screenshot:
            page, _, out = item.partition("=")
            screenshot(browser, args.root / page, Path(out), Path(tmp) / "profile")
            print(f"check_pages: screenshot of {page} in {out}")
    if problems:
        print(f"check_pages: {len(problems)} problem(s) in {count} pages", file=sys.stderr)
        return 1
    print(f"check_pages: {count} pages rendered in Chromium, every internal link resolves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
