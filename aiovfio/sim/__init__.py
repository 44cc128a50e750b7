"""A simulated machine for VFIO drivers: no hardware, no root.

`Machine` is a second implementation of the `Kernel` boundary that obeys
Linux VFIO's rules (`aiovfio.sim.rules`) and the personality of one kernel
version (`Machine(linux="6.12")` or `"6.1"`), with device models written
against `aiovfio.sim.model`. QEMU's edu and nvme models live in
`aiovfio.sim.models` (imported on demand).

Every fault a device meets (Bus Master off, an IOMMU translation fault, a
clamped DMA address, a device error, a lost interrupt) is recorded in
`Machine.faults` with its message and emitted as a `SimFaultWarning` of its
kind; declare the ones a test causes on purpose with `Machine.expect_faults`.
"""

from __future__ import annotations

from .faults import (
    FAULT_KINDS,
    BusMasterFault,
    DeviceErrorFault,
    DmaMaskFault,
    FaultLog,
    FaultRecord,
    Injection,
    InterruptDropFault,
    IommuTranslationFault,
    SimFaultWarning,
)
from .machine import Machine
from .model import DeviceContext, DeviceModel, IommuFault, IrqSpec, RegionSpec
from .rules import KERNELS, PERSONALITY, RULES, Personality, Rule

__all__ = [
    "FAULT_KINDS",
    "KERNELS",
    "PERSONALITY",
    "RULES",
    "BusMasterFault",
    "DeviceContext",
    "DeviceErrorFault",
    "DeviceModel",
    "DmaMaskFault",
    "FaultLog",
    "FaultRecord",
    "Injection",
    "InterruptDropFault",
    "IommuFault",
    "IommuTranslationFault",
    "IrqSpec",
    "Machine",
    "Personality",
    "RegionSpec",
    "Rule",
    "SimFaultWarning",
]
