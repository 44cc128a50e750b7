"""One exception hierarchy for everything aiovfio raises.

Two branches that callers treat differently:

* `UsageError`: the caller asked for something wrong (an offset past a region,
  a closed object, an unknown PCI address). Raised before any syscall.
* `KernelError`: the kernel (real or simulated) refused. It is also an
  `OSError` and keeps the errno; its message names the operation and the
  group, device or region it was for.

`SetupError` covers a machine that is not ready for VFIO (no IOMMU, group not
viable, wrong API version); its message says what to run to fix it.
`from_oserror` is the one seam that turns an `OSError` into a `KernelError`.
"""

from __future__ import annotations

import errno as _errno
import os
import warnings

import anyio
from attrs import frozen

__all__ = [
    "VfioError",
    "UsageError",
    "InvalidArgument",
    "RegionAccessError",
    "AlignmentError",
    "ClosedResourceError",
    "BusyResourceError",
    "DeviceNotFound",
    "NotOffered",
    "DmaSpaceExhausted",
    "CapabilityChainError",
    "KernelError",
    "PermissionDenied",
    "KernelBusy",
    "AlreadyExists",
    "NoSpace",
    "OutOfMemory",
    "NoSuchEntity",
    "InvalidRequest",
    "BadAddress",
    "NotSupportedByKernel",
    "SetupError",
    "VfioUnavailable",
    "ApiVersionMismatch",
    "IommuTypeUnsupported",
    "GroupNotViable",
    "Offender",
    "DeviceFault",
    "DeviceReleaseRequested",
    "from_oserror",
]


class VfioError(Exception):
    """Base of every error aiovfio raises on purpose."""


# --- caller misuse -------------------------------------------------------------


class UsageError(VfioError):
    """The caller asked for something that cannot be done; no syscall was made."""


class InvalidArgument(UsageError, ValueError):
    """An argument is out of range, of the wrong type, or inconsistent."""


class RegionAccessError(InvalidArgument):
    """A register or bulk access falls outside a region or uses a bad width."""


class AlignmentError(InvalidArgument):
    """An address, offset or size is not aligned as required."""


class ClosedResourceError(UsageError, anyio.ClosedResourceError):
    """The object was closed; open a new one. Also an anyio.ClosedResourceError."""


class BusyResourceError(UsageError, anyio.BusyResourceError):
    """Another task is already using this object (e.g. receiving on a stream).

    Also an anyio.BusyResourceError, whose constructor wants an "action";
    ours takes the whole message.
    """

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)


class DeviceNotFound(UsageError, LookupError):
    """No PCI device, IOMMU group or region by that name or number."""


class NotOffered(UsageError):
    """The device does not offer what was asked (an IRQ kind, a reset, a BAR): misuse.

    (Formerly `Unsupported`; the kernel refusing a feature is `NotSupportedByKernel`.)
    """


class DmaSpaceExhausted(UsageError):
    """No free IOVA range fits, or the container's DMA entry budget is spent."""


class CapabilityChainError(VfioError, ValueError):
    """A capability chain returned by the kernel is malformed (loop, truncation)."""


# --- kernel refusal ------------------------------------------------------------


class KernelError(VfioError, OSError):
    """The kernel refused an operation; `errno` is the kernel's."""

    #: the operation, e.g. "VFIO_IOMMU_MAP_DMA"
    operation: str
    #: what it was for, e.g. "container 3" or "device 0000:00:04.0 region 0"
    target: str

    def __init__(self, err: int, message: str, *, operation: str = "", target: str = "") -> None:
        super().__init__(err, message)
        self.operation = operation
        self.target = target

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno or 0, str(self.errno))
        return f"{self.strerror} [{name}]"

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.errno, self.strerror, self.operation, self.target))


def _rebuild(cls: type[KernelError], err: int, msg: str, op: str, target: str) -> KernelError:
    return cls(err, msg, operation=op, target=target)


class PermissionDenied(KernelError, PermissionError):
    """EPERM / EACCES."""


class KernelBusy(KernelError):
    """EBUSY from the kernel: the group or device is held by another opener.

    (Formerly `ResourceBusy`; a task misusing one of our objects is `BusyResourceError`.)
    """


class AlreadyExists(KernelError):
    """EEXIST: e.g. a DMA mapping overlaps an existing one."""


class NoSpace(KernelError):
    """ENOSPC: e.g. the container's DMA entry limit is reached."""


class OutOfMemory(KernelError):
    """ENOMEM: e.g. pinning past RLIMIT_MEMLOCK."""


class NoSuchEntity(KernelError):
    """ENOENT / ENODEV / ENXIO."""


class InvalidRequest(KernelError):
    """EINVAL: the kernel found the request malformed or out of order."""


class BadAddress(KernelError):
    """EFAULT: an address the kernel could not read or pin."""


class NotSupportedByKernel(KernelError):
    """ENOTTY / EOPNOTSUPP / ENOSYS: this kernel or device lacks the feature."""


_BY_ERRNO: dict[int, type[KernelError]] = {
    _errno.EPERM: PermissionDenied,
    _errno.EACCES: PermissionDenied,
    _errno.EBUSY: KernelBusy,
    _errno.EEXIST: AlreadyExists,
    _errno.ENOSPC: NoSpace,
    _errno.ENOMEM: OutOfMemory,
    _errno.ENOENT: NoSuchEntity,
    _errno.ENODEV: NoSuchEntity,
    _errno.ENXIO: NoSuchEntity,
    _errno.EINVAL: InvalidRequest,
    _errno.EFAULT: BadAddress,
    _errno.ENOTTY: NotSupportedByKernel,
    _errno.EOPNOTSUPP: NotSupportedByKernel,
    _errno.ENOSYS: NotSupportedByKernel,
}

_HINTS: dict[int, str] = {
    _errno.EPERM: "run as root or give your user access to /dev/vfio (see `aiovfio doctor`)",
    _errno.EACCES: "run as root or give your user access to /dev/vfio (see `aiovfio doctor`)",
    _errno.EBUSY: "someone else holds it (another process, or an object of this one); "
    "close that first",
    _errno.ENOMEM: "raise RLIMIT_MEMLOCK (`ulimit -l`) or map less",
    _errno.ENOSPC: "unmap something first, or raise vfio_iommu_type1.dma_entry_limit",
}


def from_oserror(
    exc: OSError, operation: str, target: str, *, hint: str | None = None
) -> KernelError:
    """Turn a kernel `OSError` into the matching `KernelError` subclass.

    The result keeps the errno and says which operation failed on what.
    Callers `raise from_oserror(exc, ...) from exc`.
    """
    if isinstance(exc, KernelError):
        return exc
    err = exc.errno if exc.errno is not None else _errno.EIO
    cls = _BY_ERRNO.get(err, KernelError)
    reason = os.strerror(err)
    advice = hint if hint is not None else _HINTS.get(err)
    message = f"{operation} on {target} failed: {reason}"
    if advice:
        message += f"; {advice}"
    return cls(err, message, operation=operation, target=target)


# --- machine not ready ---------------------------------------------------------


class SetupError(VfioError):
    """This machine is not set up for what was asked; the message says how to fix it."""


class VfioUnavailable(SetupError):
    """No VFIO here: the module is not loaded, or there is no IOMMU."""


class IommufdUnavailable(SetupError):
    """iommufd was asked for, but the kernel has no /dev/iommu."""


class NoDeviceCdev(SetupError):
    """The device has no VFIO device cdev (/dev/vfio/devices/vfioN) to open through iommufd."""


class NoiommuRefused(SetupError):
    """The device is in a noiommu group, and noiommu was not opted into."""


class NoiommuDmaError(UsageError):
    """Without an IOMMU this memory cannot be given to the device (where it is, or how)."""


class NoiommuWarning(RuntimeWarning):
    """A device is being driven without an IOMMU (VFIO's unsafe noiommu mode)."""


class ApiVersionMismatch(SetupError):
    """VFIO_GET_API_VERSION did not return the version aiovfio speaks (0)."""


class IommuTypeUnsupported(SetupError):
    """The container does not offer the Type1v2 IOMMU."""


@frozen
class Offender:
    """A device that makes a group non-viable, and the driver that holds it."""

    name: str
    driver: str | None


class GroupNotViable(SetupError):
    """A device of the group is bound to a non-VFIO driver."""

    group: int
    offenders: tuple[Offender, ...]

    def __init__(self, group: int, offenders: tuple[Offender, ...]) -> None:
        self.group = group
        self.offenders = offenders
        if offenders:
            who = ", ".join(f"{o.name} is bound to {o.driver or 'no driver'}" for o in offenders)
            cmds = " ".join(f"`aiovfio bind {o.name}`" for o in offenders)
            message = (
                f"group {group} is not viable: {who}; unbind it or bind it to vfio-pci: {cmds}"
            )
        else:
            message = (
                f"group {group} is not viable: a device of the group is bound to a "
                f"non-VFIO driver; see `aiovfio doctor`"
            )
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.group, self.offenders))


# --- device misbehaviour -------------------------------------------------------


class DeviceFault(VfioError):
    """The device did something it should not (an IOMMU fault, a bad status)."""


class DeviceReleaseRequested(VfioError):
    """The kernel asked for the device back (unbind, hot-unplug: VFIO's REQ interrupt).

    `open_device` cancelled the block and released the device so that the
    unbind can complete; open it again once it is bound to vfio-pci.
    """


#: old names, kept for one release (each warns when used)
_DEPRECATED = {"Unsupported": "NotOffered", "ResourceBusy": "KernelBusy"}


def __getattr__(name: str) -> type[VfioError]:
    new = _DEPRECATED.get(name)
    if new is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"aiovfio.{name} is renamed {new} (it is removed in the next release)",
        DeprecationWarning,
        stacklevel=2,
    )
    cls: type[VfioError] = globals()[new]
    return cls
