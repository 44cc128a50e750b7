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
import contextlib
import ctypes
import enum
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from attrs import define, field, frozen

from . import _fork, _ki, _log, errors
from ._resource import Resource, State
from ._uapi import vfio as uapi
from ._util import kcall

if TYPE_CHECKING:
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


_MODES = (IrqKind.INTX, IrqKind.MSI, IrqKind.MSIX)


def _irq_set_call(
    kernel: Kernel, device_fd: int, label: str, index: int, action: int, start: int, count: int
) -> None:
    """SET_IRQS with DATA_NONE: trigger, unmask or (count 0) disable."""
    buf = set_irqs_buffer(index, uapi.IrqSetFlag.DATA_NONE | action, start, None, count=count)
    kcall("VFIO_DEVICE_SET_IRQS", label, kernel.device_set_irqs, device_fd, buf)


@define(eq=False, repr=False, slots=False)
class InterruptStream(Resource, anyio.abc.ObjectReceiveStream[int]):
    """One interrupt vector: `await stream.receive()` returns the coalesced count.

    Closed by its `InterruptSet`; `receive` then raises ClosedResourceError.
    Two tasks receiving at once is BusyResourceError. `receive` always
    checkpoints: a cancelled scope cancels it even with a count pending.
    """

    kind: str
    vector: int
    _fd: int = field(alias="fd")
    _kernel: Kernel = field(alias="kernel")
    #: the device fd and IRQ index, for unmask and trigger (the set keeps the fd open)
    _device_fd: int = field(alias="device_fd")
    _index: int = field(alias="index")
    device_name: str = ""
    _pending: int = field(default=0, init=False)
    _receiving: bool = field(default=False, init=False)
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
        self._open_now()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return (
            f"<InterruptStream {self.kind}[{self.vector}] of {self.device_name} "
            f"{state} received={self.received}>"
        )

    @property
    def label(self) -> str:
        return f"{self.kind}[{self.vector}] of device {self.device_name}"

    @property
    def fd(self) -> int:
        """The eventfd the kernel signals."""
        self._check_open()
        return self._fd

    def unmask(self) -> None:
        """Unmask the line (INTx is masked by VFIO after each interrupt)."""
        if self.closed:
            raise errors.ClosedResourceError(f"{self!r} is closed")
        _irq_set_call(
            self._kernel,
            self._device_fd,
            f"device {self.device_name} {self.kind} interrupts (unmask)",
            self._index,
            uapi.IrqSetFlag.ACTION_UNMASK,
            self.vector,
            1,
        )

    def trigger(self) -> None:
        """Fire the vector from software (VFIO_IRQ_SET_DATA_NONE | ACTION_TRIGGER)."""
        if self.closed:
            raise errors.ClosedResourceError(f"{self!r} is closed")
        _irq_set_call(
            self._kernel,
            self._device_fd,
            f"device {self.device_name} {self.kind} interrupts (trigger)",
            self._index,
            uapi.IrqSetFlag.ACTION_TRIGGER,
            self.vector,
            1,
        )

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
        """trio's channel pattern: check for cancellation, take without blocking and make a
        cancel-shielded checkpoint, or wait for readiness."""
        import trio

        await trio.lowlevel.checkpoint_if_cancelled()
        n = self._drain()
        if n:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return n
        while True:
            try:
                await trio.lowlevel.wait_readable(self._fd)
            except trio.ClosedResourceError:
                raise errors.ClosedResourceError(f"{self!r} was closed while waiting") from None
            n = self._drain()
            if n:
                return n

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
        # anyio delivers a scope's cancellation only to a task that waits on an
        # unfinished future: a device that fires on every iteration (the reader
        # resolves the waiter first, uvloop runs it first) would starve it.
        await anyio.lowlevel.checkpoint_if_cancelled()
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
        if self._state != State.OPEN or self._failure is not None:
            raise self._refusal(waiting=True)
        n, self._pending = self._pending, 0
        self.received += n
        return n

    async def _receive_slow(self) -> int:
        if self._receiving or self._state != State.OPEN or self._failure is not None:
            await anyio.lowlevel.checkpoint_if_cancelled()
            raise self._refusal()
        if self._pending:
            await anyio.lowlevel.checkpoint()
            return self._take()
        await anyio.lowlevel.checkpoint_if_cancelled()
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

    async def wait_signal(self) -> int:
        """`receive()`, except that on trio it waits for readiness before its first read.

        So a watcher that may wait forever (open_device's REQ watch) makes no
        kernel call until the vector fires.
        """
        if self._trio is None and self._loop is None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                self._trio = True
        if self._trio and self._state == State.OPEN and not self._receiving:
            import trio

            try:
                await trio.lowlevel.wait_readable(self._fd)
            except trio.ClosedResourceError:
                raise errors.ClosedResourceError(f"{self!r} was closed while waiting") from None
        return await self.receive()

    def _refusal(self, *, waiting: bool = False) -> errors.VfioError:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            return failure
        if self.closed:
            when = "was closed while waiting" if waiting else "is closed"
            return errors.ClosedResourceError(f"{self!r} {when}")
        return errors.BusyResourceError(f"another task is already receiving from {self!r}")

    async def _release(self) -> None:
        self._close_fd()

    def _release_on_gc(self) -> None:
        self._close_fd()

    def _forget_after_fork(self) -> None:
        """In a forked child: close its copy of the eventfd, and nothing else (the
        loop's epoll instance is the parent's too: no remove_reader)."""
        super()._forget_after_fork()
        fd, self._fd = self._fd, -1
        self._loop = self._waiter = None
        _fork.close_in_child(fd)

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(fd)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)  # the waiter sees the state and raises
        if self._trio:
            import trio

            with contextlib.suppress(RuntimeError):  # no trio run (collected outside it)
                trio.lowlevel.notify_closing(fd)
        kcall("close", f"eventfd {fd}", self._kernel.close, fd)


@define(eq=False, repr=False, slots=False, kw_only=True)
class InterruptSet(Resource):
    """`async with device.interrupts("msix", 4) as vectors:` — the enabled vectors.

    Entering checks VFIO's one-mode rule against the sets already entered on
    the device, creates the eventfds and enables the vectors; leaving
    disables them, then closes the eventfds, on every exit path (also when
    the device closes first: it closes its sets before its fd).
    """

    kernel: Kernel
    device_fd: int
    device_name: str
    info: IrqInfo
    count: int
    #: who entered it, when it is not the driver (e.g. open_device's REQ watch)
    held_by: str | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("enabled" if self.is_open else "not enabled")
        return f"<InterruptSet {self.info.kind} x{self.count} of {self.device_name} {state}>"

    @property
    def streams(self) -> tuple[InterruptStream, ...]:
        return self._children.of_type(InterruptStream)

    @property
    def label(self) -> str:
        return f"device {self.device_name} {self.info.kind} interrupts"

    def _check_mode(self) -> None:
        if self._owner is None:
            return
        index = self.info.index
        for other in self._owner.of_type(InterruptSet):
            if other is self or not other.is_open:
                continue
            o = other.info.index
            if o == index or (index in _MODES and o in _MODES):
                who = f" by {other.held_by}" if other.held_by else ""
                raise errors.BusyResourceError(
                    f"{self.label}: {other!r} is entered{who}; leave that `async with` first "
                    f"(VFIO allows one of intx, msi, msix at a time, and one set per index)"
                )

    async def __aenter__(self) -> tuple[InterruptStream, ...]:
        self._begin_open()
        k = self.kernel
        try:
            await anyio.lowlevel.checkpoint()
            self._check_mode()
            streams = []
            for vector in range(self.count):
                fd = kcall("eventfd", self.label, k.eventfd)
                stream = InterruptStream(
                    self.info.kind,
                    vector,
                    fd,
                    k,
                    self.device_fd,
                    self.info.index,
                    self.device_name,
                    owner=self._children,
                )
                streams.append(stream)
            buf = set_irqs_buffer(
                self.info.index,
                uapi.IrqSetFlag.DATA_EVENTFD | uapi.IrqSetFlag.ACTION_TRIGGER,
                0,
                [s._fd for s in streams],
            )
            kcall("VFIO_DEVICE_SET_IRQS", self.label, k.device_set_irqs, self.device_fd, buf)
        except BaseException:
            self._state = State.CLOSING
            try:
                await self._close_streams()
            finally:
                self._finish_close()
            raise
        self._opened()
        _log.debug("irq.enable", device=self.device_name, kind=self.info.kind, count=self.count)
        return tuple(streams)

    async def _shutdown(self) -> None:
        """Disable the vectors first, then close their eventfds (even when disabling failed)."""
        try:
            _irq_set_call(
                self.kernel,
                self.device_fd,
                self.label,
                self.info.index,
                uapi.IrqSetFlag.ACTION_TRIGGER,
                0,
                0,
            )
            _log.debug("irq.disable", device=self.device_name, kind=self.info.kind)
        finally:
            await self._close_streams()

    async def _close_streams(self) -> None:
        await self._children.aclose_all()

    def _release_on_gc(self) -> None:
        for stream in self._children:
            stream._release_on_gc()


_ki.protect_module(__name__)
