"""`open_device`: find the device's group, build the tree (container, group, device).

It sits above the public objects (they never import it), so imports run one
way. It also watches VFIO's REQ interrupt: when the kernel asks for the
device back (an unbind, a hot-unplug), vfio-pci signals REQ and waits until
user space lets go; by default the block is cancelled and everything is
released, so the unbind completes, and the block ends with
`DeviceReleaseRequested`.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import anyio

from . import _log, errors
from ._util import check_int, check_kernel, normalize_bdf
from .container import Container
from .device import Device
from .kernel import Kernel, default_kernel
from .kernel.hints import missing_device

__all__ = ["ReleasePolicy", "open_device"]

#: "cancel" (the default): cancel the block, release everything, raise
#: DeviceReleaseRequested; "ignore": do not watch REQ (the unbind then waits
#: until the block ends); a callable: called with the Device when REQ fires
#: (sync, or async: awaited in the watching task), which must make the block end.
ReleasePolicy = Literal["cancel", "ignore"] | Callable[[Device], Awaitable[None] | None]


def _find_group(kernel: Kernel, bdf: str) -> int:
    try:
        group = kernel.iommu_group(bdf)
    except FileNotFoundError:
        raise errors.DeviceNotFound(
            f"no PCI device {bdf} on this machine; {missing_device(kernel, bdf)}"
        ) from None
    except OSError as exc:
        raise errors.from_oserror(exc, "sysfs", f"PCI device {bdf}") from exc
    if group is None:
        raise errors.VfioUnavailable(
            f"{bdf} has no IOMMU group: the IOMMU is off or the device is not behind one; "
            f"see `aiovfio doctor {bdf}`"
        )
    return group


def _check_policy(policy: object) -> None:
    if policy in ("cancel", "ignore") or callable(policy):
        return
    raise errors.InvalidArgument(
        f"on_release_request is 'cancel', 'ignore' or a callable taking the Device, not {policy!r}"
    )


def _watches_req(device: Device) -> bool:
    try:
        info = device.irq_info("req")
    except errors.NotOffered:
        return False
    return info.count > 0 and bool(info.flags & 1)  # VFIO_IRQ_INFO_EVENTFD


@contextlib.asynccontextmanager
async def open_device(
    bdf: str,
    *,
    kernel: Kernel | None = None,
    dma_mask: int | None = None,
    on_release_request: ReleasePolicy = "cancel",
) -> AsyncIterator[Device]:
    """Open one PCI device: its own container, its group, then the device.

    `async with aiovfio.open_device("0000:01:00.0") as dev:` Everything is
    released in reverse order when the block exits, on every exit path.
    `on_release_request` says what happens when the kernel asks for the
    device back (see `ReleasePolicy`).
    """
    if kernel is not None:
        check_kernel(kernel)
    if dma_mask is not None:
        check_int("a DMA mask", dma_mask, minimum=1, below=1 << 64)
    _check_policy(on_release_request)
    k = kernel if kernel is not None else default_kernel()
    name = normalize_bdf(bdf)
    number = _find_group(k, name)
    async with (
        Container(kernel=k) as container,
        container.group(number) as group,
        group.open_device(name, dma_mask=dma_mask) as device,
    ):
        if on_release_request == "ignore" or not _watches_req(device):
            yield device
            return
        req = device.interrupts("req")
        req.held_by = (
            "open_device's REQ watch (pass on_release_request='ignore' to take REQ yourself)"
        )
        async with req as (stream,):
            requested = False
            outcome: BaseException | None = None

            async def watch(scope: anyio.CancelScope) -> None:
                nonlocal requested
                # No kernel call until REQ fires (so the block's own calls keep
                # their order whatever the scheduler does). The driver closing
                # the device (and so REQ) ends the watch.
                try:
                    await stream.wait_signal()
                except errors.ClosedResourceError:
                    return
                requested = True
                _log.logger.warning("device.release_requested", device=device.name)
                if on_release_request == "cancel":
                    scope.cancel()
                    return
                assert callable(on_release_request)
                result = on_release_request(device)
                if inspect.isawaitable(result):
                    await result

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, tg.cancel_scope)
                try:
                    yield device
                except BaseException as exc:
                    # The block's own exception leaves after the task group (never
                    # wrapped in an ExceptionGroup); our cancellation stays inside.
                    if requested and isinstance(exc, anyio.get_cancelled_exc_class()):
                        raise
                    outcome = exc
                finally:
                    tg.cancel_scope.cancel()
            if outcome is not None:
                try:
                    raise outcome
                finally:
                    outcome = None
            if requested and on_release_request == "cancel":
                raise errors.DeviceReleaseRequested(
                    f"the kernel asked for device {device.name} back (it is being unbound or "
                    f"removed): the block was cancelled and the device released; open it "
                    f"again once it is bound to vfio-pci"
                )
