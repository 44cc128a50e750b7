"""Who sees aiovfio's logs: structlog users, stdlib logging users, and (with AIOVFIO_LOG)
users of nothing at all; never on stdout, and the library configures neither."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest
import structlog

from aiovfio import _log
from aiovfio.kernel import LinuxKernel

#: A whole edu session on the simulated machine, then one real eventfd.
SESSION = """
import anyio, aiovfio
from aiovfio.kernel import LinuxKernel
from aiovfio.testing.target import sim_target
async def main():
    t = sim_target()
    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:
        async with dev.interrupts('msi') as (irq,), dev.dma_buffer(4096):
            irq.trigger(); await irq.receive()
    t.close()
anyio.run(main)
k = LinuxKernel(); k.close(k.eventfd())
"""


@pytest.fixture(autouse=True)
def structlog_unconfigured() -> Iterator[None]:
    """Each test starts as an application that never configured structlog, and puts it back."""
    was, previous = structlog.is_configured(), structlog.get_config()
    structlog.reset_defaults()
    yield
    if was:
        structlog.configure(**previous)
    else:
        structlog.reset_defaults()


def python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    environ = {k: v for k, v in os.environ.items() if k != _log.ENV} | env
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
        check=True,
    )


def test_a_user_of_nothing_sees_nothing() -> None:
    done = python(SESSION)
    assert (done.stdout, done.stderr) == ("", "")


def test_aiovfio_log_debug_shows_everything_on_stderr_to_a_user_of_nothing() -> None:
    done = python(SESSION, AIOVFIO_LOG="debug")
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert any(line.startswith("aiovfio DEBUG kernel.sim op=") for line in lines), lines[:5]
    assert any(line.startswith("aiovfio DEBUG irq.enable device=") for line in lines)
    assert any(line.startswith("aiovfio DEBUG kernel.eventfd fd=") for line in lines)


def test_aiovfio_log_info_leaves_out_debug() -> None:
    done = python(
        SESSION + "from aiovfio import _log; _log.logger.info('x.y', n=1)\n", AIOVFIO_LOG="info"
    )
    assert done.stderr.splitlines() == ["aiovfio INFO x.y n=1"]


def test_a_bad_switch_value_says_what_to_write() -> None:
    done = python("import aiovfio", AIOVFIO_LOG="loud", PYTHONWARNINGS="default")
    assert "AIOVFIO_LOG='loud' is not a level: write debug, info, warning or error" in done.stderr


def test_a_stdlib_user_gets_records_in_their_own_handlers() -> None:
    code = (
        "import logging, sys\n"
        "logging.basicConfig(\n"
        "    level=logging.DEBUG, stream=sys.stdout, format='%(name)s|%(message)s'\n"
        ")\n" + SESSION
    )
    done = python(code, AIOVFIO_LOG="debug")  # with the switch too: no second copy on stderr
    assert done.stderr == ""
    assert "aiovfio|irq.enable device=0000:00:04.0 kind=msi count=1" in done.stdout.splitlines()
    assert any(line.startswith("aiovfio|kernel.eventfd fd=") for line in done.stdout.splitlines())


def test_stdlib_records_carry_the_fields(caplog: pytest.LogCaptureFixture) -> None:
    assert not structlog.is_configured()
    kernel = LinuxKernel()
    with caplog.at_level(logging.DEBUG, logger="aiovfio"):
        fd = kernel.eventfd()
        kernel.close(fd)
        _log.logger.warning("test.warned", path="/a b")
    messages = [r.getMessage() for r in caplog.records if r.name == "aiovfio"]
    assert messages == [
        f"kernel.eventfd fd={fd}",
        f"kernel.close fd={fd}",
        "test.warned path='/a b'",
    ]
    assert caplog.records[-1].aiovfio_fields == {"path": "/a b"}  # type: ignore[attr-defined]
    assert caplog.records[-1].levelno == logging.WARNING


def test_warnings_reach_a_stdlib_user_at_its_default_level(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        _log.logger.info("test.quiet")
        _log.logger.warning("test.loud", n=2)
    assert [r.getMessage() for r in caplog.records] == ["test.loud n=2"]


def test_debug_events_are_not_built_when_nobody_listens() -> None:
    assert not structlog.is_configured()
    assert not logging.getLogger("aiovfio").isEnabledFor(logging.DEBUG)
    assert _log.state.is_configured is False


def test_the_ioctl_check_follows_configuration_at_the_next_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The per-ioctl check is a plain attribute, re-read at each of aiovfio's own events."""
    kernel = LinuxKernel()
    assert _log.state.is_configured is False
    with caplog.at_level(logging.DEBUG, logger="aiovfio"):
        fd = kernel.eventfd()  # an event: the check is re-read
        assert _log.state.is_configured is True
        kernel.close(fd)
    kernel.close(kernel.eventfd())  # the level is back: the next event turns it off
    assert _log.state.is_configured is False
    structlog.configure()
    assert _log.refresh() is True
    assert _log.state.is_configured is True
