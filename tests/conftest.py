"""Every async test runs on asyncio, asyncio with uvloop, and trio.

tests/vm is the real-kernel suite: outside the aiovfio QEMU guest it is not
collected (so a bare `pytest` runs the host suite), unless named on the command
line, where its conftest says how to run it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest

collect_ignore: list[str] = [] if os.environ.get("AIOVFIO_GUEST") == "1" else ["vm"]

_BACKENDS: list[Any] = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("trio", {}), id="trio"),
]
if importlib.util.find_spec("uvloop") is not None:
    _BACKENDS.insert(1, pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"))


@pytest.fixture(params=_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param
