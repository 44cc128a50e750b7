"""Small helpers shared by the public objects: kernel calls with error mapping,
PCI address parsing, and shielded cleanup."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

import anyio

from . import errors

__all__ = ["kcall", "kcall_thread", "normalize_bdf", "aclose_all", "PAGE_SIZE"]

T = TypeVar("T")

PAGE_SIZE = 4096

_BDF = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{1,4}):)?(?P<bus>[0-9a-fA-F]{1,2}):"
    r"(?P<slot>[0-1]?[0-9a-fA-F])\.(?P<func>[0-7])$"
)


def normalize_bdf(bdf: str) -> str:
    """Return the canonical `DDDD:BB:SS.F` form of a PCI address.

    Accepts `0000:00:04.0`, `00:04.0`; refuses anything else with a message
    that shows the expected form.
    """
    if not isinstance(bdf, str):
        raise errors.InvalidArgument(f"a PCI address is a string like '0000:00:04.0', not {bdf!r}")
    m = _BDF.match(bdf.strip())
    if m is None:
        raise errors.InvalidArgument(
            f"{bdf!r} is not a PCI address; write it as DDDD:BB:SS.F, e.g. '0000:00:04.0' "
            f"(see `aiovfio ls`)"
        )
    slot = int(m["slot"], 16)
    if slot > 0x1F:
        raise errors.InvalidArgument(f"{bdf!r}: PCI slot {slot:#x} is above 0x1f")
    return f"{int(m['domain'] or '0', 16):04x}:{int(m['bus'], 16):02x}:{slot:02x}.{m['func']}"


def kcall(operation: str, target: str, fn: Callable[..., T], *args: object) -> T:
    """Call a Kernel method; an OSError becomes the matching KernelError."""
    try:
        return fn(*args)
    except OSError as exc:
        raise errors.from_oserror(exc, operation, target) from exc


async def kcall_thread(operation: str, target: str, fn: Callable[..., T], *args: object) -> T:
    """`kcall` in a worker thread that is never abandoned on cancellation.

    anyio waits for the thread when the caller is cancelled, returns its
    result, and delivers the cancellation at the caller's next checkpoint:
    so whatever the call acquired is always handed back to be owned.
    """
    return await anyio.to_thread.run_sync(kcall, operation, target, fn, *args)


class _AsyncClosable(Protocol):
    async def aclose(self) -> None: ...


async def aclose_all(resources: Iterable[_AsyncClosable]) -> None:
    """Close every resource, even after one failed; then re-raise the first failure.

    A parent closing its children must not leave the rest open because one
    child's close raised.
    """
    first: BaseException | None = None
    for resource in list(resources):
        try:
            await resource.aclose()
        except BaseException as exc:  # noqa: PERF203 - cleanup, not a hot loop
            if first is None:
                first = exc
    if first is not None:
        raise first
