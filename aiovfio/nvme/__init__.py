"""aiovfio.nvme: a user-space NVMe driver on aiovfio's public API.

    async with aiovfio.open_device(bdf) as dev:
        async with aiovfio.nvme.open_controller(dev, io_queues=2) as ctrl:
            print(ctrl.identify.model)
            ns = ctrl.namespace(1)
            await ns.write(0, bytes(ns.block_size))
            data = await ns.read(0, 1)

This module only re-exports; each name lives in a module named after its job:
`spec` (constants, Identify layouts), `prp` (PRP entries and lists), `queue`
(one queue pair), `controller` (bring-up, watchdog, shutdown), `namespace`
(block I/O), `batch` (many commands from one task), `errors`, and `cli`
(`aiovfio nvme identify|perf`).
"""

from .batch import Batch as Batch
from .controller import Controller as Controller
from .controller import open_controller as open_controller
from .errors import CommandTimeout as CommandTimeout
from .errors import ControllerFailed as ControllerFailed
from .errors import ControllerNotReady as ControllerNotReady
from .errors import NvmeError as NvmeError
from .errors import NvmeStatusError as NvmeStatusError
from .errors import QueueLimitExceeded as QueueLimitExceeded
from .errors import TransferOutOfRange as TransferOutOfRange
from .namespace import DmaTarget as DmaTarget
from .namespace import Namespace as Namespace
from .spec import IdentifyController as IdentifyController
from .spec import IdentifyNamespace as IdentifyNamespace

__all__ = [
    "Batch",
    "CommandTimeout",
    "Controller",
    "ControllerFailed",
    "ControllerNotReady",
    "DmaTarget",
    "IdentifyController",
    "IdentifyNamespace",
    "Namespace",
    "NvmeError",
    "NvmeStatusError",
    "QueueLimitExceeded",
    "TransferOutOfRange",
    "open_controller",
]

for _name in __all__:  # tracebacks and reprs say aiovfio.nvme.X
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("aiovfio.nvme."):
        _obj.__module__ = "aiovfio.nvme"
del _name, _obj
