"""The one lifecycle every handle shares, and the registry an owner tracks its children in.

A `Resource` goes NEW -> OPENING -> OPEN -> CLOSING -> CLOSED, once:

* entering twice is a `UsageError` and acquires nothing (`_begin_open`);
* closing twice does nothing; a second, *concurrent* `aclose()` waits for the
  first and returns only when the resource is really released;
* attributes that name a kernel resource call `_check_open()`, which raises
  `ClosedResourceError` after close;
* a resource garbage-collected while open emits `ResourceWarning` (as asyncio's
  and trio's own objects do) and releases what it can without the event loop
  (`_release_on_gc`: close an fd, drop an mmap).

Children never call back into their parent object. A parent hands each child
its `Children` registry (an owner handle); the child adds itself when it is
open and removes itself when it is closed. The parent closes what is still
registered in reverse order of opening, before it releases itself, and every
child's release uses only the narrow handles it was given (the kernel, an fd
number the parent keeps open until its children are gone, a DMA space), so
release never depends on the parent being open.

Where issue 11 hooks in: every release of every handle runs through
`Resource.aclose` -> `_shutdown` (KeyboardInterrupt protection wraps that one
method), and every open resource is in `live_resources()` (a fork hook walks
it in the child and calls `_forget_after_fork`).
"""

from __future__ import annotations

import contextlib
import enum
import os
import warnings
import weakref
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

import anyio
from attrs import define, field

from . import _fork, _ki, errors

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Children", "FdResource", "Resource", "State", "live_resources"]

R = TypeVar("R", bound="Resource")

#: every resource that is opening or open, for process-wide hooks (fork)
_LIVE: weakref.WeakSet[Resource] = weakref.WeakSet()


def live_resources() -> tuple[Resource, ...]:
    """Every handle of this process that is open (or being opened) now."""
    return tuple(_LIVE)


def _forget_all_after_fork() -> None:
    """In a forked child: every inherited handle is closed, the parent's left alone.

    See `aiovfio._fork` for what a child may and may not do. No VFIO call, no
    event loop, no lock: only state changes, close(2) of the child's fd
    copies and fresh zero pages over its mappings.
    """
    inherited = tuple(_LIVE)
    _LIVE.clear()
    for resource in inherited:
        with contextlib.suppress(Exception):  # one failure must not stop the rest
            resource._forget_after_fork()


os.register_at_fork(after_in_child=_forget_all_after_fork)


class State(enum.IntEnum):
    NEW = 0
    OPENING = 1
    OPEN = 2
    CLOSING = 3
    CLOSED = 4


class Children:
    """An owner's registry of its open children, in opening order.

    Add and remove are O(1) (a dict keeps the order), so a DMA space with
    65535 live mappings tracks them as cheaply as a device its two regions.
    """

    __slots__ = ("__weakref__", "_items")

    def __init__(self) -> None:
        self._items: dict[Resource, None] = {}

    def add(self, child: Resource) -> None:
        self._items[child] = None

    def discard(self, child: Resource) -> None:
        self._items.pop(child, None)

    def __contains__(self, child: object) -> bool:
        return child in self._items

    def __iter__(self) -> Iterator[Resource]:
        return iter(tuple(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def of_type(self, cls: type[R]) -> tuple[R, ...]:
        return tuple(c for c in self._items if isinstance(c, cls))

    async def aclose_all(self) -> None:
        """Close every child, newest first, even after one failed; re-raise the first failure."""
        first: BaseException | None = None
        while self._items:
            child = next(reversed(self._items))
            try:
                await child.aclose()
            except BaseException as exc:
                if first is None:
                    first = exc
            finally:
                self._items.pop(child, None)  # a failed close is still gone from here
        if first is not None:
            raise first

    def forget_all(self) -> None:
        self._items.clear()


@define(eq=False, repr=False, slots=False)
class Resource:
    """Base of every public handle: enter once, use, close once, warn when leaked.

    Subclasses implement `_release()` (give back what they hold; called once,
    shielded, after their children are closed) and call `_begin_open()` at the
    start of `__aenter__` and `_opened()` once they hold something.
    """

    _owner: Children | None = field(default=None, kw_only=True, alias="owner")
    _state: State = field(default=State.NEW, init=False)
    _children: Children = field(factory=Children, init=False)
    _closed_event: anyio.Event | None = field(default=None, init=False)

    # --- description -------------------------------------------------------------

    @property
    def label(self) -> str:
        """What the object is, for messages ("group 4", "device 0000:00:04.0")."""
        return type(self).__name__.lower()

    @property
    def closed(self) -> bool:
        """Whether it was closed (or is being closed)."""
        return self._state >= State.CLOSING

    @property
    def is_open(self) -> bool:
        return self._state == State.OPEN

    def _check_open(self) -> None:
        state = self._state
        if state == State.OPEN:
            return
        if state >= State.CLOSING:
            raise errors.ClosedResourceError(f"{self.label} is closed; open a new one")
        raise errors.UsageError(f"{self.label} is not open: use it as `async with`")

    # --- opening ---------------------------------------------------------------------

    def _begin_open(self) -> None:
        """Start entering; a second entry (or entry after close) acquires nothing."""
        if self._state != State.NEW:
            if self._state >= State.CLOSING:
                raise errors.ClosedResourceError(
                    f"{self.label} was closed; a {type(self).__name__} can be entered only once"
                )
            raise errors.UsageError(
                f"{self.label} is already entered; a {type(self).__name__} can be entered "
                f"only once (make a new one)"
            )
        self._state = State.OPENING
        _LIVE.add(self)
        _ki.activate()  # trio imported since aiovfio was: apply the KI-protection marks

    def _opened(self) -> None:
        """It holds its resources now: register with the owner."""
        self._state = State.OPEN
        if self._owner is not None:
            self._owner.add(self)

    def _open_now(self) -> None:
        """Open without `async with` (a region, created open by its device)."""
        self._begin_open()
        self._opened()

    # --- closing ---------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the children (newest first), then release; a second call waits for the first."""
        state = self._state
        if state == State.CLOSED:
            return
        if state == State.CLOSING:
            event = self._closed_event
            if event is not None:
                with anyio.CancelScope(shield=True):
                    await event.wait()
            return
        self._state = State.CLOSING
        self._closed_event = anyio.Event()
        try:
            with anyio.CancelScope(shield=True):
                await self._shutdown()
        finally:
            self._finish_close()

    def _finish_close(self) -> None:
        self._state = State.CLOSED
        _LIVE.discard(self)
        if self._owner is not None:
            self._owner.discard(self)
        event, self._closed_event = self._closed_event, None
        if event is not None:
            event.set()

    async def _shutdown(self) -> None:
        """Children first, then this resource's own release (even after a child failed)."""
        try:
            await self._children.aclose_all()
        finally:
            await self._release()

    async def _release(self) -> None:
        """Give back what this resource holds (shielded, called once)."""

    def _release_on_gc(self) -> None:
        """Release what can be released without the event loop (collected while open)."""

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the handle without touching the parent's resources."""
        self._state = State.CLOSED
        self._children.forget_all()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        state = getattr(self, "_state", State.CLOSED)
        if state in (State.OPENING, State.OPEN):
            try:
                warnings.warn(
                    f"{self.label} was never closed: leave its `async with` block or await "
                    f"aclose() (released now, by the garbage collector)",
                    ResourceWarning,
                    source=self,
                    stacklevel=2,
                )
            finally:
                self._state = State.CLOSED
                with contextlib.suppress(Exception):  # nothing to report to at collection
                    self._release_on_gc()


@define(eq=False, repr=False, slots=False)
class FdResource(Resource):
    """A Resource that owns one kernel fd (container, group, device)."""

    _fd: int = field(default=-1, init=False)

    @property
    def fd(self) -> int:
        """The file descriptor it owns."""
        self._check_open_fd()
        return self._fd

    def _check_open_fd(self) -> None:
        if self._fd < 0 or self._state >= State.CLOSING:
            if self._state >= State.CLOSING:
                raise errors.ClosedResourceError(f"{self.label} is closed; open a new one")
            raise errors.UsageError(f"{self.label} is not open: use it as `async with`")

    def _check_open(self) -> None:
        # OPENING counts as open for the object's own set-up calls (it holds its fd).
        if self._state == State.OPEN or (self._state == State.OPENING and self._fd >= 0):
            return
        super()._check_open()

    def _take_fd(self) -> int:
        fd, self._fd = self._fd, -1
        return fd

    def _forget_after_fork(self) -> None:
        """Closed in the child, and the child's copy of the fd closed: a group or
        device a child keeps open would stay busy for the parent too (the same
        open file), so the child never holds one."""
        super()._forget_after_fork()
        _fork.close_in_child(self._take_fd())

    async def __aenter__(self) -> Self:  # pragma: no cover - each subclass enters itself
        raise NotImplementedError


_ki.protect_module(__name__)
