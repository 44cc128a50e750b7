"""Every async test runs on asyncio, asyncio with uvloop, and trio."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

_BACKENDS: list[Any] = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("trio", {}), id="trio"),
]
if importlib.util.find_spec("uvloop") is not None:
    _BACKENDS.insert(1, pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"))


@pytest.fixture(params=_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param
