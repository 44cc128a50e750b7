"""KeyboardInterrupt protection on trio for acquire-then-own and release code.

trio raises KeyboardInterrupt at whatever bytecode is running unless that
code is KI-protected; in protected code it delivers the interrupt at the
next checkpoint instead, where the library can still clean up (trio's own
primitives are protected the same way). `@protect` marks a function
protected: everything it calls, down to the syscall, is covered too.

trio (>= 0.27) keeps protection per code object, so marking costs nothing at
run time and needs no wrapper. aiovfio must not import trio just to mark its
functions (asyncio users may not have it, and it is slow to import), so the
marks are applied when trio is imported, by `activate()`: called when a
resource is entered and at import of aiovfio, it is one dict look-up once
trio is seen. Without trio there is nothing to protect against.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["protect", "protect_module", "activate"]

F = TypeVar("F", bound=Callable[..., Any])

_marked: list[Callable[..., Any]] = []
_active = False


def protect(fn: F) -> F:
    """Mark `fn` (sync or async) KI-protected on trio; returns `fn` itself."""
    _marked.append(fn)
    if _active:
        _apply(fn)
    return fn


def protect_module(name: str) -> None:
    """Mark every function and method defined in module `name` (call it at its end).

    Functions it calls are covered through the frame walk trio does; code
    defined elsewhere (anyio, the kernel) is covered while called from here.
    """
    module = sys.modules[name]
    for value in list(vars(module).values()):
        if isinstance(value, type) and value.__module__ == name:
            for member in vars(value).values():
                _protect_member(member)
        elif getattr(value, "__module__", None) == name:
            _protect_member(value)


def _protect_member(member: object) -> None:
    if isinstance(member, property):
        for fn in (member.fget, member.fset, member.fdel):
            if fn is not None:
                _protect_member(fn)
        return
    if isinstance(member, (staticmethod, classmethod)):
        member = member.__func__
    while True:
        if callable(member) and hasattr(member, "__code__"):
            protect(member)
        wrapped = getattr(member, "__wrapped__", None)  # asynccontextmanager, functools.wraps
        if wrapped is None:
            return
        member = wrapped


def activate() -> None:
    """Apply every mark once trio is imported (cheap to call often)."""
    global _active
    if _active or "trio" not in sys.modules:
        return
    _active = True
    for fn in _marked:
        _apply(fn)


def _apply(fn: Callable[..., Any]) -> None:
    from trio.lowlevel import enable_ki_protection

    if enable_ki_protection(fn) is not fn:  # trio < 0.27 wraps instead of marking the code
        import warnings

        warnings.warn(
            "aiovfio's KeyboardInterrupt protection needs trio >= 0.27",
            RuntimeWarning,
            stacklevel=2,
        )
