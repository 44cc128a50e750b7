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
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import anyio

from . import _ki, _log, errors
from ._util import check_int, check_kernel, kcall, normalize_bdf
from .container import Container
from .device import Device
from .iommufd import Iommufd
from .kernel import Kernel, default_kernel
from .kernel.hints import missing_device
from .noiommu import NOIOMMU_RISK, opted_in

if sys.version_info < (3, 11):  # pragma: no cover - anyio's dependency there
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["BACKENDS", "Backend", "ReleasePolicy", "choose_backend", "open_device"]

#: What `backend=` (and $AIOVFIO_BACKEND) take.
BACKENDS = ("auto", "iommufd", "container")
Backend = Literal["auto", "iommufd", "container"]

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


def _keyboard_interrupt(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The KeyboardInterrupt a group holds when it holds nothing else."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    if leaves and all(isinstance(e, KeyboardInterrupt) for e in leaves):
        return leaves[0]
    return None


def _watches_req(device: Device) -> bool:
    try:
        info = device.irq_info("req")
    except errors.NotOffered:
        return False
    return info.count > 0 and bool(info.flags & 1)  # VFIO_IRQ_INFO_EVENTFD


def choose_backend(
    kernel: Kernel, name: str, group: int, backend: Backend | None, noiommu: bool
) -> Literal["iommufd", "container", "noiommu"]:
    """Which kernel interface opens device `name` of IOMMU group `group`.

    `backend` (else $AIOVFIO_BACKEND, else "auto"): "iommufd" when the kernel
    offers it for the device (/dev/iommu and a VFIO device cdev), the legacy
    container otherwise; "iommufd" or "container" force one. A noiommu group
    needs the opt-in (`noiommu=True` or $AIOVFIO_NOIOMMU=1) and the container.
    """
    source = "backend="
    if backend is None:
        backend = os.environ.get("AIOVFIO_BACKEND", "").strip() or "auto"  # type: ignore[assignment]
        source = "$AIOVFIO_BACKEND="
    if backend not in BACKENDS:
        raise errors.InvalidArgument(f"{source}{backend!r}: choose one of {', '.join(BACKENDS)}")
    if kcall("sysfs", f"IOMMU group {group}", kernel.noiommu_group, group):
        if not opted_in(noiommu):
            raise errors.NoiommuRefused(
                f"{name} is in noiommu group {group} (/dev/vfio/noiommu-{group}): VFIO runs "
                f"it without an IOMMU. Opening it needs an explicit opt-in "
                f"(`open_device(..., noiommu=True)`, `aiovfio --noiommu`, or "
                f"AIOVFIO_NOIOMMU=1), and the opt-in risks this: {NOIOMMU_RISK}"
            )
        if backend == "iommufd":
            raise errors.NoDeviceCdev(
                f"{name} is a noiommu device: it has no VFIO cdev, so iommufd cannot open it; "
                f"use backend='container' (or 'auto')"
            )
        return "noiommu"
    if backend == "auto":
        offered = kcall("stat", "/dev/iommu", kernel.iommufd_available) and kcall(
            "sysfs", f"device {name}", kernel.device_cdev, name
        )
        return "iommufd" if offered else "container"
    return backend


@contextlib.asynccontextmanager
async def _tree(
    k: Kernel, name: str, number: int, chosen: str, dma_mask: int | None
) -> AsyncIterator[Device]:
    """The container, group and device; or the iommufd and the device through its cdev."""
    if chosen == "iommufd":
        async with (
            Iommufd(kernel=k) as fd,
            fd.open_device(name, group=number, dma_mask=dma_mask) as device,
        ):
            yield device
        return
    async with (
        Container(kernel=k, noiommu=chosen == "noiommu") as container,
        container.group(number) as group,
        group.open_device(name, dma_mask=dma_mask) as device,
    ):
        yield device


@contextlib.asynccontextmanager
async def open_device(
    bdf: str,
    *,
    kernel: Kernel | None = None,
    dma_mask: int | None = None,
    on_release_request: ReleasePolicy = "cancel",
    backend: Backend | None = None,
    noiommu: bool = False,
) -> AsyncIterator[Device]:
    """Open one PCI device: its own container (or iommufd), its group, then the device.

    `async with aiovfio.open_device("0000:01:00.0") as dev:` Everything is
    released in reverse order when the block exits, on every exit path.
    `on_release_request` says what happens when the kernel asks for the
    device back (see `ReleasePolicy`). `backend` picks the kernel interface
    ("auto", "iommufd", "container"; default $AIOVFIO_BACKEND or "auto": see
    `choose_backend`). `noiommu=True` allows a device without an IOMMU
    (VFIO's unsafe noiommu mode; see `aiovfio.noiommu`): loud, and only then.
    """
    if kernel is not None:
        check_kernel(kernel)
    if dma_mask is not None:
        check_int("a DMA mask", dma_mask, minimum=1, below=1 << 64)
    _check_policy(on_release_request)
    k = kernel if kernel is not None else default_kernel()
    name = normalize_bdf(bdf)
    number = _find_group(k, name)
    chosen = choose_backend(k, name, number, backend, bool(noiommu))
    _log.logger.debug("device.backend", device=name, group=number, backend=chosen)
    if chosen == "noiommu":  # the container warns (NoiommuWarning) when the group joins
        _log.logger.warning("device.noiommu", device=name, group=number, risk=NOIOMMU_RISK)
    async with _tree(k, name, number, chosen, dma_mask) as device:
        if on_release_request == "ignore" or not _watches_req(device):
            yield device
            return
        req = device.interrupts("req")
        req.held_by = (
            "open_device's REQ watch (pass on_release_request='ignore' to take REQ yourself)"
        )
        async with req as (stream,):
            requested = False
            ours = False  # the watcher cancelled the block (REQ, or its own failure)
            outcome: BaseException | None = None
            failure: BaseException | None = None

            async def watch(scope: anyio.CancelScope) -> None:
                nonlocal requested, ours, failure
                try:
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
                        ours = True
                        scope.cancel()
                        return
                    assert callable(on_release_request)
                    result = on_release_request(device)
                    if inspect.isawaitable(result):
                        await result
                except anyio.get_cancelled_exc_class():
                    raise
                except BaseException as exc:
                    # Raised after the task group, unwrapped (an eventfd read error,
                    # the policy's own error, a KeyboardInterrupt).
                    failure, ours = exc, True
                    scope.cancel()

            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch, tg.cancel_scope)
                    try:
                        yield device
                    except BaseException as exc:
                        # The block's own exception leaves after the task group (never
                        # wrapped in an ExceptionGroup); our cancellation stays inside.
                        if ours and isinstance(exc, anyio.get_cancelled_exc_class()):
                            raise
                        outcome = exc
                    finally:
                        tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # trio delivers a KeyboardInterrupt that arrived in KI-protected code
                # at the next checkpoint, which may be the task group's exit: it
                # leaves bare, as it would without the REQ watch.
                ki = _keyboard_interrupt(group)
                if ki is None:
                    raise
                raise ki from None
            if failure is not None:
                try:
                    raise failure
                finally:
                    failure = outcome = None
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


_ki.protect_module(__name__)
