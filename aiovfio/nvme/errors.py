"""The NVMe driver's errors, all `aiovfio.VfioError` subclasses.

* `NvmeStatusError`: the controller completed a command with an error status.
* `ControllerFailed`: the controller is dead (CSTS.CFS, a command timeout, a
  register read of all-ones); every in-flight command fails with it and the
  controller is disabled. Open it again to recover.
* `CommandTimeout`: a command exceeded the command timeout and an NVMe Abort
  ended it; the controller goes on.
* `ControllerNotReady`: CSTS.RDY did not follow CC.EN within CAP.TO.
* `TransferOutOfRange`, `QueueLimitExceeded`: bad arguments, refused before
  anything reaches the device (they are `InvalidArgument`s).
"""

from __future__ import annotations

from ..errors import DeviceFault, InvalidArgument
from .spec import status_name

__all__ = [
    "CommandTimeout",
    "ControllerFailed",
    "ControllerNotReady",
    "NvmeError",
    "NvmeStatusError",
    "QueueLimitExceeded",
    "TransferOutOfRange",
]

_DNR = 1 << 14


class NvmeError(DeviceFault):
    """Base of what the NVMe controller itself causes."""


class NvmeStatusError(NvmeError):
    """A command completed with an error status.

    `status` is the 15-bit status field of the completion (SC, SCT, CRD, M,
    DNR); `sct` and `sc` its type and code; `name` the specification's name.
    """

    status: int
    sct: int
    sc: int
    name: str
    command: str
    #: for a batch command (`Namespace.batch`), the tag it was submitted with
    tag: object = None

    def __init__(self, status: int, command: str = "command") -> None:
        self.status = status
        self.sc = status & 0xFF
        self.sct = status >> 8 & 0x7
        self.name = status_name(self.sct, self.sc)
        self.command = command
        dnr = ", do not retry" if self.dnr else ""
        super().__init__(
            f"{command} failed: {self.name} (SCT {self.sct:#x}, SC {self.sc:#04x}{dnr})"
        )

    @property
    def dnr(self) -> bool:
        return bool(self.status & _DNR)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.status, self.command))


class ControllerFailed(NvmeError):
    """The controller failed (fatal status, timeout, gone); it was disabled."""


class CommandTimeout(NvmeError):
    """A command did not complete in time; it was aborted (NVMe Abort) and failed.

    The controller goes on working. (Had the Abort not ended it, the
    controller would have been declared failed: ControllerFailed.)
    """

    #: for a batch command, the tag it was submitted with
    tag: object = None


class ControllerNotReady(NvmeError):
    """The controller did not become ready (or not-ready) within CAP.TO."""


class TransferOutOfRange(InvalidArgument):
    """A transfer reaches past the end of the namespace, or is empty."""


class QueueLimitExceeded(InvalidArgument):
    """More queues, or a deeper queue, than the controller offers."""
