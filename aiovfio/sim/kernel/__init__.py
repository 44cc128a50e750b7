"""The simulated kernel, split by file kind as Linux's drivers/vfio is.

`dispatch.SimKernel` implements the `Kernel` protocol and sends each ioctl
to the handlers of the file's kind: `container` (container.c and
vfio_iommu_type1.c), `group` (group.c), `device` (vfio_pci_core.c,
vfio_pci_rdwr.c, vfio_pci_config.c). `files` is the fd table and the user
memory of ioctl arguments. The state they all read is `aiovfio.sim.topology`.
"""

from __future__ import annotations

from ..topology import SimContainer
from .dispatch import SimKernel
from .files import UserBuffer

__all__ = ["SimContainer", "SimKernel", "UserBuffer"]
