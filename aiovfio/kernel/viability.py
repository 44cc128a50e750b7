"""When an IOMMU group is viable: the one rule the public layer and the sim share.

Linux reports a group VIABLE (VFIO_GROUP_GET_STATUS) while no device of the
group is bound to a driver that claims DMA ownership
(`iommu_group_dma_owner_claimed`, drivers/iommu/iommu.c). Drivers declare
`driver_managed_dma` when they leave DMA to user space: vfio-pci and its
vendor variant drivers (`mlx5_vfio_pci`, `hisi_acc_vfio_pci`, ...), pci-stub
and the PCIe port driver. An unbound function claims nothing.

It lives at the kernel boundary so that both `aiovfio.group` and
`aiovfio.sim` can import it (the sim never imports public objects).
"""

from __future__ import annotations

__all__ = ["DMA_FREE_DRIVERS", "is_vfio_driver", "keeps_group_viable"]

#: Drivers besides vfio-pci's family that never claim DMA ownership (driver_managed_dma).
DMA_FREE_DRIVERS = frozenset({"vfio-pci", "pci-stub", "pcieport"})


def is_vfio_driver(driver: str | None) -> bool:
    """vfio-pci and its variant drivers, which register VFIO devices (`*_vfio_pci`)."""
    return driver is not None and (driver == "vfio-pci" or driver.endswith("vfio_pci"))


def keeps_group_viable(driver: str | None) -> bool:
    """Whether a PCI function bound to `driver` (None: unbound) leaves its group viable."""
    return driver is None or driver in DMA_FREE_DRIVERS or is_vfio_driver(driver)
