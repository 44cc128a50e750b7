"""The library's logger: structlog when the application configured it, else stdlib logging.

aiovfio never configures structlog, and never prints on stdout. Each event
goes to the first of:

* structlog, when the application has configured it (`structlog.configure`):
  the application's processors and renderer see `aiovfio` events with their
  key/value fields;
* otherwise the stdlib logger named "aiovfio", as one line `event key=value
  ...` (the fields are also in the record's `aiovfio_fields`), so a user of
  `logging.basicConfig` sees aiovfio's warnings and, at INFO or DEBUG, the rest.

`AIOVFIO_LOG=debug` (or info, warning, error), read at import, is the one
switch for everyone else: it sets the "aiovfio" logger's level, and when the
application has set up no logging at all, prints those lines on stderr.

Debug events (every kernel interaction, with its arguments and result) are
made only when someone will see them: structlog configured, or the "aiovfio"
logger enabled for DEBUG. Warnings a user must act on are `warnings`
(ResourceWarning, the simulated machine's faults), not log lines.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

import structlog

__all__ = ["ENV", "debug", "enabled", "logger", "refresh", "state"]

#: The environment variable that shows aiovfio's logs without configuring anything.
ENV = "AIOVFIO_LOG"

_stdlib = logging.getLogger("aiovfio")
_structlog = structlog.get_logger("aiovfio")


class _StderrUnlessHandled(logging.Handler):
    """AIOVFIO_LOG's output: stderr, but only while the application has no logging set up."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("aiovfio %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return  # the application's handlers get it through propagation
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # pragma: no cover - a closed stderr at exit
            self.handleError(record)


def _switch(environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    value = environ.get(ENV, "").strip()
    if not value:
        return
    level = logging.getLevelName(value.upper())
    if not isinstance(level, int):
        warnings.warn(
            f"{ENV}={value!r} is not a level: write debug, info, warning or error",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    _stdlib.setLevel(level)
    if not any(isinstance(h, _StderrUnlessHandled) for h in _stdlib.handlers):
        _stdlib.addHandler(_StderrUnlessHandled())


_switch()


def _render(event: str, fields: dict[str, Any]) -> str:
    parts = [event]
    for key, value in fields.items():
        text = value if isinstance(value, str) and value and " " not in value else repr(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


class _Logger:
    """`logger.debug/info/warning/error(event, **fields)`, routed as the module says."""

    __slots__ = ()

    def _emit(self, level: int, method: str, event: str, fields: dict[str, Any]) -> None:
        refresh()  # off the hot path: every event re-reads what the kernel boundary checks
        if structlog.is_configured():
            getattr(_structlog, method)(event, **fields)
        elif _stdlib.isEnabledFor(level):
            _stdlib.log(
                level, "%s", _render(event, fields), extra={"aiovfio_fields": fields}, stacklevel=3
            )

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, "debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, "warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, "error", event, fields)


logger = _Logger()


def enabled() -> bool:
    """Whether anyone will see aiovfio's events (structlog configured, or stdlib logging set up)."""
    refresh()
    return (
        structlog.is_configured()
        or bool(logging.getLogger().handlers)
        or _stdlib.level != logging.NOTSET
    )


class _State:
    """`state.is_configured`: whether debug events are wanted, kept as a plain attribute.

    The kernel boundary reads it on every ioctl, where even one function call
    doubled aiovfio's instruction count (benchmarks/run.py). structlog's public
    API has no cheaper question than `structlog.is_configured()`, so the answer
    is re-read by `refresh()` at each of aiovfio's own events (every open,
    close, eventfd, mapping and interrupt change logs one) and at import: a
    logging configuration made while a device is open takes effect at the next
    of them, or at once with `refresh()`.
    """

    __slots__ = ("is_configured",)

    def __init__(self) -> None:
        self.is_configured = False


state = _State()


def refresh() -> bool:
    """Re-read whether debug events are wanted (structlog configured, or DEBUG on "aiovfio")."""
    wanted = structlog.is_configured() or _stdlib.isEnabledFor(logging.DEBUG)
    state.is_configured = wanted
    return wanted


refresh()


def debug(event: str, **fields: Any) -> None:
    """Log a debug event when someone will see it."""
    if refresh():
        logger.debug(event, **fields)
