"""The library's logger. aiovfio never configures structlog: applications do.

Kernel interactions are logged at debug level, and only once the application
has configured structlog (`structlog.is_configured()`): an unconfigured
structlog prints every level to stdout, which would make a library that logs
each ioctl unusable in a REPL. `aiovfio -v` configures it.
"""

from __future__ import annotations

from typing import Any, Protocol

import structlog

__all__ = ["logger", "enabled", "debug", "state"]

logger: Any = structlog.get_logger("aiovfio")

enabled = structlog.is_configured


class _State(Protocol):
    @property
    def is_configured(self) -> bool: ...


class _Asking:
    """Falls back to the public function if structlog's state object moves."""

    @property
    def is_configured(self) -> bool:
        return structlog.is_configured()


def _find_state() -> _State:
    try:
        from structlog._config import _CONFIG
    except ImportError:  # pragma: no cover - a structlog that reorganised
        return _Asking()
    return _CONFIG


#: `state.is_configured` is what `structlog.is_configured()` returns, read as
#: an attribute: the kernel boundary checks it on every ioctl, where a
#: function call measured a third of aiovfio's overhead (benchmarks/run.py).
state: _State = _find_state()


def debug(event: str, **fields: Any) -> None:
    """Log a debug event when the application has configured structlog."""
    if structlog.is_configured():
        logger.debug(event, **fields)
