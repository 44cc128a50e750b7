"""A simulated machine for VFIO drivers: no hardware, no root.

`Machine` is a second implementation of the `Kernel` boundary that obeys
Linux VFIO's rules (`aiovfio.sim.rules`), with device models written against
`aiovfio.sim.model`. QEMU's edu and nvme models live in `aiovfio.sim.models`
(imported on demand).
"""

from __future__ import annotations

from .faults import FaultLog, FaultRecord, Injection
from .machine import Machine
from .model import DeviceContext, DeviceModel, IommuFault, IrqSpec, RegionSpec
from .rules import RULES, Rule

__all__ = [
    "RULES",
    "DeviceContext",
    "DeviceModel",
    "FaultLog",
    "FaultRecord",
    "Injection",
    "IommuFault",
    "IrqSpec",
    "Machine",
    "RegionSpec",
    "Rule",
]
