"""What every exit-path test here needs from the process it runs in."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _sigint_is_delivered() -> Iterator[None]:
    """Python's own SIGINT handler for the test, whatever the suite started with.

    A suite started with SIGINT ignored (a background job of a non-interactive
    shell, some CI runners) would never see the SIGINTs these tests send, nor
    would trio install its KeyboardInterrupt handler; forked and spawned
    children inherit the handler set here.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
