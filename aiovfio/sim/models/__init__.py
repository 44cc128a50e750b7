"""Simulated PCI devices for `aiovfio.sim.Machine`: QEMU's edu and nvme."""

from .edu import Edu as Edu
from .nvme import Nvme as Nvme

__all__ = ["Edu", "Nvme"]
