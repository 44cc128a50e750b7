"""Interrupts as awaitable streams.

`device.interrupts("msi", n)` registers n eventfds with VFIO_DEVICE_SET_IRQS
and yields one `InterruptStream` per vector. Each stream is an anyio
`ObjectReceiveStream[int]`: every value is the number of interrupts the
eventfd coalesced since the previous one.

Wake-ups use the backend's own readiness path: on asyncio (and uvloop) one
persistent `add_reader` per eventfd that resolves a waiting future; on trio
`trio.lowlevel.wait_readable`. Never polling, never a sleep.
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from attrs import define, field, frozen

from . import _log, errors
from ._uapi import vfio as uapi
from ._util import kcall

if TYPE_CHECKING:
    from .device import Device
    from .kernel import Kernel

__all__ = ["IrqKind", "IrqInfo", "InterruptStream", "InterruptSet", "set_irqs_buffer"]


class IrqKind(enum.IntEnum):
    """The IRQ indexes of a PCI device, by the names `Device.interrupts` takes."""

    INTX = uapi.PciIrq.INTX
    MSI = uapi.PciIrq.MSI
    MSIX = uapi.PciIrq.MSIX
    ERR = uapi.PciIrq.ERR
    REQ = uapi.PciIrq.REQ

    @classmethod
    def parse(cls, kind: str | int) -> IrqKind:
        if isinstance(kind, str):
            try:
                return cls[kind.upper().replace("-", "")]
            except KeyError:
                pass
        elif isinstance(kind, int) and not isinstance(kind, bool):
            try:
                return cls(kind)
            except ValueError:
                pass
        raise errors.InvalidArgument(
            f"unknown interrupt kind {kind!r}: use 'intx', 'msi', 'msix', 'err' or 'req'"
        )


@frozen
class IrqInfo:
    """What VFIO_DEVICE_GET_IRQ_INFO says about one IRQ index."""

    index: int
    count: int
    flags: uapi.IrqInfoFlag

    @property
    def kind(self) -> str:
        try:
            return IrqKind(self.index).name.lower()
        except ValueError:
            return str(self.index)

    def __repr__(self) -> str:
        names = "|".join(f.name for f in uapi.IrqInfoFlag if f & self.flags and f.name) or "0"
        return f"IrqInfo({self.kind}, count={self.count}, flags={names})"


def set_irqs_buffer(
    index: int, flags: int, start: int, fds: Sequence[int] | None, count: int = 0
) -> bytearray:
    """A vfio_irq_set followed by its eventfd array (or no data)."""
    head = ctypes.sizeof(uapi.vfio_irq_set)
    n = len(fds) if fds is not None else count
    data = b"".join(ctypes.c_int32(fd) for fd in fds) if fds is not None else b""
    hdr = uapi.vfio_irq_set(argsz=head + len(data), flags=flags, index=index, start=start, count=n)
    return bytearray(hdr) + bytearray(data)


@define(eq=False, repr=False)
class InterruptStream(anyio.abc.ObjectReceiveStream[int]):
    """One interrupt vector: `await stream.receive()` returns the coalesced count.

    Closed by its `InterruptSet`; `receive` then raises ClosedResourceError.
    Two tasks receiving at once is BusyResourceError.
    """

    _set: InterruptSet = field(alias="owner")
    vector: int
    _fd: int = field(alias="fd")
    _kernel: Kernel = field(alias="kernel")
    _pending: int = field(default=0, init=False)
    _receiving: bool = field(default=False, init=False)
    _closed: bool = field(default=False, init=False)
    # asyncio: the loop our persistent reader is registered with, and the waiter
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)
    _waiter: asyncio.Future[None] | None = field(default=None, init=False)
    _trio: bool | None = field(default=None, init=False)
    _failure: errors.VfioError | None = field(default=None, init=False)
    _read: Callable[[int], int] = field(init=False, repr=False)
    #: total interrupts seen (for reprs and tests)
    received: int = field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self._read = self._kernel.eventfd_read

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return (
            f"<InterruptStream {self._set.info.kind}[{self.vector}] of {self._set.device.name} "
            f"{state} received={self.received}>"
        )

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._closed

    def unmask(self) -> None:
        """Unmask the line (INTx is masked by VFIO after each interrupt)."""
        if self._closed:
            raise errors.ClosedResourceError(f"{self!r} is closed")
        self._set._unmask(self.vector)

    def trigger(self) -> None:
        """Fire the vector from software (VFIO_IRQ_SET_DATA_NONE | ACTION_TRIGGER)."""
        if self._closed:
            raise errors.ClosedResourceError(f"{self!r} is closed")
        self._set._trigger(self.vector)

    def _drain(self) -> int:
        """Read the eventfd's count; 0 when nothing is pending."""
        try:
            return self._kernel.eventfd_read(self._fd)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise errors.from_oserror(exc, "eventfd read", repr(self)) from exc

    # --- asyncio path ------------------------------------------------------------

    def _on_readable(self) -> None:
        """The persistent reader (asyncio, uvloop): runs in the loop on each wake."""
        try:
            n = self._read(self._fd)
        except BlockingIOError:
            return
        except OSError as exc:  # not seen on Linux; surface it at the next receive
            self._failure = errors.from_oserror(exc, "eventfd read", repr(self))
            n = 1
        self._pending += n
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # --- trio path ---------------------------------------------------------------

    async def _receive_trio(self) -> int:
        import trio

        while True:
            n = self._drain()
            if n:
                return n
            try:
                await trio.lowlevel.wait_readable(self._fd)
            except trio.ClosedResourceError:
                raise errors.ClosedResourceError(f"{self!r} was closed while waiting") from None

    # --- ObjectReceiveStream --------------------------------------------------------

    async def receive(self) -> int:
        """Wait for the vector to fire; return how many times it fired since last time."""
        loop = self._loop
        if self._receiving or loop is None or self._pending:
            # Busy, closed (close drops the loop), failed, counts already
            # waiting, trio, or the first receive on asyncio.
            return await self._receive_slow()
        # The asyncio (and uvloop) hot path: the persistent reader resolves a
        # future when the eventfd counts; nothing here but that wait. A
        # cancelled waiter left behind is done, so the reader skips it.
        self._receiving = True
        try:
            waiter = loop.create_future()
            self._waiter = waiter
            await waiter
        finally:
            self._receiving = False
        return self._take()

    def _take(self) -> int:
        """Hand over the pending count (the reader woke us, or close did)."""
        if self._closed or self._failure is not None:
            raise self._refusal(waiting=True)
        n, self._pending = self._pending, 0
        self.received += n
        return n

    async def _receive_slow(self) -> int:
        if self._receiving or self._closed or self._failure is not None:
            raise self._refusal()
        if self._pending:
            await anyio.lowlevel.checkpoint()
            return self._take()
        self._receiving = True
        try:
            if not self._trio:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    self._trio = True
                else:
                    self._loop = loop
                    loop.add_reader(self._fd, self._on_readable)
            if self._trio:
                n = await self._receive_trio()
                self.received += n
                return n
        finally:
            self._receiving = False
        return await self.receive()

    def _refusal(self, *, waiting: bool = False) -> errors.VfioError:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            return failure
        if self._closed:
            when = "was closed while waiting" if waiting else "is closed"
            return errors.ClosedResourceError(f"{self!r} {when}")
        return errors.BusyResourceError(f"another task is already receiving from {self!r}")

    async def aclose(self) -> None:
        """Close the stream (its InterruptSet disables the vector first)."""
        self._close()
        await anyio.lowlevel.checkpoint_if_cancelled()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        fd, self._fd = self._fd, -1
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(fd)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)  # the waiter sees _closed and raises
        if self._trio:
            import trio

            trio.lowlevel.notify_closing(fd)
        kcall("close", f"eventfd {fd}", self._kernel.close, fd)


@define(eq=False, repr=False)
class InterruptSet:
    """`async with device.interrupts("msix", 4) as vectors:` — the enabled vectors.

    Entering creates the eventfds and enables the vectors; leaving disables
    them, then closes the eventfds, on every exit path.
    """

    device: Device
    info: IrqInfo
    count: int
    _streams: list[InterruptStream] = field(factory=list, init=False)
    _enabled: bool = field(default=False, init=False)
    _entered: bool = field(default=False, init=False)
    _closed: bool = field(default=False, init=False)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("enabled" if self._enabled else "not enabled")
        return f"<InterruptSet {self.info.kind} x{self.count} of {self.device.name} {state}>"

    @property
    def streams(self) -> tuple[InterruptStream, ...]:
        return tuple(self._streams)

    @property
    def label(self) -> str:
        return f"device {self.device.name} {self.info.kind} interrupts"

    async def __aenter__(self) -> tuple[InterruptStream, ...]:
        if self._entered:
            raise errors.UsageError("an InterruptSet can be entered only once")
        self._entered = True
        await anyio.lowlevel.checkpoint()
        dev = self.device
        k = dev.kernel
        try:
            for vector in range(self.count):
                fd = kcall("eventfd", self.label, k.eventfd)
                self._streams.append(InterruptStream(self, vector, fd, k))
            buf = set_irqs_buffer(
                self.info.index,
                uapi.IrqSetFlag.DATA_EVENTFD | uapi.IrqSetFlag.ACTION_TRIGGER,
                0,
                [s.fd for s in self._streams],
            )
            kcall("VFIO_DEVICE_SET_IRQS", self.label, k.device_set_irqs, dev.fd, buf)
            self._enabled = True
        except BaseException:
            self._release()
            raise
        dev._interrupts_opened(self)
        _log.debug("irq.enable", device=dev.name, kind=self.info.kind, count=self.count)
        return tuple(self._streams)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Disable the vectors, then close their eventfds; a second call does nothing."""
        self._release()
        await anyio.lowlevel.checkpoint_if_cancelled()

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        dev = self.device
        try:
            if self._enabled:
                self._enabled = False
                buf = set_irqs_buffer(
                    self.info.index,
                    uapi.IrqSetFlag.DATA_NONE | uapi.IrqSetFlag.ACTION_TRIGGER,
                    0,
                    None,
                )
                kcall("VFIO_DEVICE_SET_IRQS", self.label, dev.kernel.device_set_irqs, dev.fd, buf)
                _log.debug("irq.disable", device=dev.name, kind=self.info.kind)
        finally:
            streams, self._streams = self._streams, []
            first: BaseException | None = None
            for stream in streams:  # close every eventfd, even after one close failed
                try:
                    stream._close()
                except BaseException as exc:  # noqa: PERF203 - cleanup, not a hot loop
                    first = first or exc
            dev._interrupts_closed(self)
            if first is not None:
                raise first

    def _unmask(self, vector: int) -> None:
        dev = self.device
        buf = set_irqs_buffer(
            self.info.index,
            uapi.IrqSetFlag.DATA_NONE | uapi.IrqSetFlag.ACTION_UNMASK,
            vector,
            None,
            count=1,
        )
        kcall(
            "VFIO_DEVICE_SET_IRQS",
            f"{self.label} (unmask)",
            dev.kernel.device_set_irqs,
            dev.fd,
            buf,
        )

    def _trigger(self, vector: int) -> None:
        dev = self.device
        buf = set_irqs_buffer(
            self.info.index,
            uapi.IrqSetFlag.DATA_NONE | uapi.IrqSetFlag.ACTION_TRIGGER,
            vector,
            None,
            count=1,
        )
        kcall(
            "VFIO_DEVICE_SET_IRQS",
            f"{self.label} (trigger)",
            dev.kernel.device_set_irqs,
            dev.fd,
            buf,
        )
