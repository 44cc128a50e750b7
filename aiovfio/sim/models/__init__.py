"""Simulated PCI devices for `aiovfio.sim.Machine`: QEMU's edu and nvme."""

from .edu import Edu as Edu

__all__ = ["Edu"]
