"""`aiovfio repl` through a pseudo-terminal, as a person types it: line editing and
history (Up recalls), Tab completion of names and attributes, `hold()` across lines
with an interrupt triggered and received, Ctrl-C, release in reverse order, exit 0.
On asyncio and on trio (the REPL's own event loop)."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PROMPT = ">>> "


class Terminal:
    """A child process on a pseudo-terminal: type keys, wait for what it prints."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.master = master
        self.pending = b""
        self.seen = b""

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def expect(self, pattern: str, timeout: float = 60) -> str:
        """Everything up to and including the first match of `pattern` (a regex)."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern.encode())
        while True:
            match = regex.search(self.pending)
            if match:
                out, self.pending = self.pending[: match.end()], self.pending[match.end() :]
                return out.decode(errors="replace")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} in {(self.seen + self.pending)[-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"exited {self.proc.returncode}: {self.pending!r}")
                self.pending += chunk
                self.seen += chunk

    def line(self, text: str) -> str:
        """Type one line; return what it printed before the next prompt."""
        self.type(text + "\r")
        out = self.expect(re.escape(PROMPT))
        return out.removesuffix(PROMPT).split("\r\n", 1)[-1]

    def rest(self) -> str:
        """What it prints until it closes the terminal."""
        chunks = [self.pending]
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture(params=["asyncio", "trio"])
def repl(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Terminal]:
    env = os.environ | {
        "TERM": "dumb",
        "INPUTRC": "/dev/null",
        "AIOVFIO_HISTORY": str(tmp_path / "history"),
    }
    env.pop("AIOVFIO_LOG", None)
    argv = [sys.executable, "-m", "aiovfio", "repl", "--backend", request.param]
    terminal = Terminal(argv, env)
    try:
        yield terminal
    finally:
        terminal.close()


def test_a_session_as_typed(repl: Terminal, tmp_path: Path) -> None:
    banner = repl.expect(re.escape(PROMPT))
    for helper in ("attach", "hold", "release", "session"):
        assert f"  {helper} " in banner
    assert repl.line('dev = await attach("sim")') == ""

    # history and line editing: Up recalls the last line, Backspace edits it
    assert repl.line("x = 41") == ""
    repl.type("\x1b[A\x7f2\r")
    repl.expect(re.escape(PROMPT))
    assert repl.line("x") == "42\r\n"

    # Tab completes a name, then an attribute (a callable gets its parenthesis)
    repl.type("sess\t")
    repl.expect("session")
    assert repl.line("") == "<aiovfio session: 0000:00:04.0 attached>\r\n"
    repl.type("dev.ba\t")
    repl.expect(re.escape("dev.bar("))
    assert repl.line("0).read32(0) == 0x010000ED") == "True\r\n"

    # hold an interrupt set across lines, trigger it (edu's IRQ_RAISE), receive it
    assert repl.line('irq, = await hold(dev.interrupts("msi"))') == ""
    assert repl.line("dev.config.enable()") == ""
    assert repl.line("dev.bar(0).write32(0x60, 0x1)") == ""
    assert repl.line("await irq.receive()") == "1\r\n"
    assert "1 held" in repl.line("session")

    # what is held is released newest first, with the device last
    for text in (
        "import contextlib",
        "@contextlib.asynccontextmanager",
        "async def note(name):",
        "    yield name",
        "    print('closed', name)",
        "",
    ):
        repl.type(text + "\r")
        repl.expect(re.escape(PROMPT) if text in ("import contextlib", "") else re.escape("... "))
    assert repl.line('await hold(note("first"))') == "'first'\r\n"
    assert repl.line('await hold(note("second"))') == "'second'\r\n"

    # Ctrl-C cancels the statement that is running, not the session
    repl.type("await anyio.sleep(60)\r")
    time.sleep(1)
    os.kill(repl.proc.pid, signal.SIGINT)
    repl.expect("Cancelled")
    repl.expect(re.escape(PROMPT))
    assert repl.line("1 + 1") == "2\r\n"

    repl.type("\x04")  # Ctrl-D
    rest = repl.rest()
    assert repl.proc.wait(timeout=60) == 0
    assert rest.index("closed second") < rest.index("closed first")
    assert "released 3 held, 1 device(s), newest first" in rest
    assert "leak" not in rest
    assert "Traceback" not in rest
    assert "x = 41" in (tmp_path / "history").read_text()


def test_exit_with_a_status_and_errors_shown(repl: Terminal) -> None:
    repl.expect(re.escape(PROMPT))
    out = repl.line("1 / 0")
    assert "ZeroDivisionError: division by zero" in out
    assert "repl.py" not in out  # the REPL's own frames are not the user's business
    assert repl.line("hold(42)").startswith("<coroutine")
    out = repl.line("await hold(42)")
    assert "hold() takes a context manager" in out
    repl.type("exit(3)\r")
    repl.rest()
    assert repl.proc.wait(timeout=60) == 3
