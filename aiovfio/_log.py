"""The library's logger. aiovfio never configures structlog: applications do.

Kernel interactions are logged at debug level, and only once the application
has configured structlog (`structlog.is_configured()`): an unconfigured
structlog prints every level to stdout, which would make a library that logs
each ioctl unusable in a REPL. `aiovfio -v` configures it.
"""

from __future__ import annotations

from typing import Any

import structlog

__all__ = ["logger", "enabled", "debug"]

logger: Any = structlog.get_logger("aiovfio")

enabled = structlog.is_configured


def debug(event: str, **fields: Any) -> None:
    """Log a debug event when the application has configured structlog."""
    if structlog.is_configured():
        logger.debug(event, **fields)
