"""Small helpers shared by the public objects: kernel calls with error mapping,
PCI address parsing, and shielded cleanup."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from . import _ki, errors
from ._threads import run_sync
from .kernel.protocol import Kernel
from .kernel.viability import keeps_group_viable

__all__ = [
    "kcall",
    "kcall_thread",
    "normalize_bdf",
    "keeps_group_viable",
    "aclose_all",
    "check_int",
    "check_kernel",
    "PAGE_SIZE",
]

T = TypeVar("T")

PAGE_SIZE = 4096

_BDF = re.compile(
    r"^(?:(?:(?P<domain>[0-9a-f]{1,8}):)?(?P<bus>[0-9a-f]{1,2}):)?"
    r"(?P<dev>[0-9a-f]{1,2})\.(?P<fn>[0-7])$",
    re.IGNORECASE,
)


def normalize_bdf(text: str) -> str:
    """`04.0`, `00:04.0` or `0000:00:04.0` (any case) as `0000:00:04.0`.

    Anything else is an InvalidArgument that shows the expected form.
    """
    if not isinstance(text, str):
        raise errors.InvalidArgument(f"a PCI address is a string like '0000:00:04.0', not {text!r}")
    match = _BDF.match(text.strip())
    if match is None:
        raise errors.InvalidArgument(
            f"{text!r} is not a PCI address: write it as 0000:00:04.0, 00:04.0 or 04.0 "
            "(see `aiovfio ls`)"
        )
    dev = int(match["dev"], 16)
    if dev > 0x1F:
        raise errors.InvalidArgument(
            f"{text!r} is not a PCI address: the device number {dev:#x} is above 0x1f"
        )
    domain = int(match["domain"] or "0", 16)
    bus = int(match["bus"] or "0", 16)
    return f"{domain:04x}:{bus:02x}:{dev:02x}.{match['fn']}"


def kcall(operation: str, target: str, fn: Callable[..., T], *args: object) -> T:
    """Call a Kernel method; an OSError becomes the matching KernelError."""
    try:
        return fn(*args)
    except OSError as exc:
        raise errors.from_oserror(exc, operation, target) from exc


async def kcall_thread(
    operation: str,
    target: str,
    fn: Callable[..., T],
    *args: object,
    then: Callable[[T], object] | None = None,
    release: bool = False,
) -> T:
    """`kcall` in a worker thread that is never abandoned, whatever cancels the task.

    See `_threads.run_sync`: `then(result)` owns what the call did before any
    interruption (asyncio's native cancel included) is raised from this await;
    `release=True` runs the call even when interrupted before it started.
    """
    return await run_sync(kcall, operation, target, fn, *args, then=then, release=release)


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


def check_int(
    what: str, value: object, *, minimum: int | None = None, below: int | None = None
) -> int:
    """`value` as an int in [minimum, below); bool is not an int here. Else InvalidArgument."""
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or (minimum is not None and value < minimum)
        or (below is not None and value >= below)
    ):
        lo = "" if minimum is None else f" >= {minimum}"
        hi = "" if below is None else f" below {below:#x}"
        joint = " and" if lo and hi else ""
        raise errors.InvalidArgument(f"{what} is an int{lo}{joint}{hi}, not {value!r}")
    return value


def check_kernel(kernel: object) -> None:
    """Refuse anything that is not a Kernel (a string, a number) before using it."""
    if not isinstance(kernel, Kernel):
        raise errors.InvalidArgument(
            f"kernel= takes a Kernel (aiovfio.LinuxKernel(), aiovfio.sim.Machine().kernel), "
            f"not {kernel!r}; leave it out for the real kernel"
        )


_ki.protect_module(__name__)
