"""The lifecycle every fd-owning public object shares: enter once, use, close once."""

from __future__ import annotations

from types import TracebackType

from attrs import define, field

from . import errors

__all__ = ["FdResource"]


@define(eq=False, repr=False)
class FdResource:
    """Owns one kernel fd from `async with` entry until `aclose()`.

    Using it before entry is a UsageError, after close a ClosedResourceError;
    closing twice does nothing (subclasses keep that in `aclose`).
    """

    _fd: int = field(default=-1, init=False)
    _entered: bool = field(default=False, init=False)
    _closed: bool = field(default=False, init=False)

    @property
    def label(self) -> str:
        """What the object is, for messages ("group 4", "device 0000:00:04.0")."""
        return type(self).__name__.lower()

    @property
    def fd(self) -> int:
        """The file descriptor it owns."""
        self._check_open()
        return self._fd

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise errors.ClosedResourceError(f"{self.label} is closed; open a new one")
        if self._fd < 0:
            raise errors.UsageError(f"{self.label} is not open: use it as `async with`")

    def _enter_once(self) -> None:
        if self._entered:
            raise errors.UsageError(f"a {type(self).__name__} can be entered only once")
        self._entered = True

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
