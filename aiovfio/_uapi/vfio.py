"""ctypes mirrors of `linux/vfio.h`: structures, ioctl numbers, flags, indexes.

Names follow the kernel header so that a reader can grep one against the
other; the golden test (tests/unit/test_uapi_golden.py) compiles the real
header and compares every size, offset and number here with it.
A flexible array member (`data[]`, `areas[]`...) is a zero-length ctypes
array, as in C: the structure's `sizeof` is the header's, the items start at
the member's offset, and the item type's alignment counts in the structure's
(vfio_region_info_cap_sparse_mmap is 8-aligned because of its u64 areas).
Read the items from the buffer (`item.from_buffer_copy(buf, offset + i * size)`);
the zero-length array itself holds none.
"""

from __future__ import annotations

import ctypes
import enum

from .ioctl import IO

__all__ = [
    "STRUCTS",
    "VFIO_API_VERSION",
    "VFIO_BASE",
    "VFIO_PCI_DEVID_NOT_OWNED",
    "VFIO_PCI_DEVID_OWNED",
    "VFIO_REGION_TYPE_PCI_VENDOR_MASK",
    "VFIO_REGION_TYPE_PCI_VENDOR_TYPE",
    "VFIO_TYPE",
    "BusMasterOp",
    "DeviceFeature",
    "DeviceFeatureFlag",
    "DeviceFlag",
    "DeviceInfoCap",
    "DmaMapFlag",
    "DmaUnmapFlag",
    "Extension",
    "GroupFlag",
    "HotResetFlag",
    "Ioctl",
    "IoeventfdFlag",
    "IommuInfoCap",
    "IommuInfoFlag",
    "IrqInfoFlag",
    "IrqSetFlag",
    "PciAtomicCompFlag",
    "PciIrq",
    "PciRegion",
    "RegionCap",
    "RegionFlag",
    "RegionType",
    "vfio_device_attach_iommufd_pt",
    "vfio_device_bind_iommufd",
    "vfio_device_detach_iommufd_pt",
    "vfio_device_feature",
    "vfio_device_feature_bus_master",
    "vfio_device_info",
    "vfio_device_info_cap_pci_atomic_comp",
    "vfio_device_ioeventfd",
    "vfio_group_status",
    "vfio_info_cap_header",
    "vfio_iommu_type1_dma_map",
    "vfio_iommu_type1_dma_unmap",
    "vfio_iommu_type1_info",
    "vfio_iommu_type1_info_cap_iova_range",
    "vfio_iommu_type1_info_cap_migration",
    "vfio_iommu_type1_info_dma_avail",
    "vfio_iova_range",
    "vfio_irq_info",
    "vfio_irq_set",
    "vfio_pci_dependent_device",
    "vfio_pci_hot_reset",
    "vfio_pci_hot_reset_info",
    "vfio_region_info",
    "vfio_region_info_cap_sparse_mmap",
    "vfio_region_info_cap_type",
    "vfio_region_sparse_mmap_area",
]

VFIO_API_VERSION = 0
VFIO_TYPE = ";"
VFIO_BASE = 100

_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_s32 = ctypes.c_int32
_u64 = ctypes.c_uint64


class Extension(enum.IntEnum):
    """IOMMU types and extensions for VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU."""

    TYPE1_IOMMU = 1
    SPAPR_TCE_IOMMU = 2
    TYPE1v2_IOMMU = 3
    DMA_CC_IOMMU = 4
    EEH = 5
    TYPE1_NESTING_IOMMU = 6
    SPAPR_TCE_v2_IOMMU = 7
    NOIOMMU_IOMMU = 8
    UNMAP_ALL = 9
    UPDATE_VADDR = 10


class Ioctl(enum.IntEnum):
    """VFIO ioctl request numbers, `_IO(';', 100 + n)`.

    Container (type1) and device ioctls reuse numbers: IOMMU_GET_INFO is
    DEVICE_GET_PCI_HOT_RESET_INFO, IOMMU_DISABLE is DEVICE_IOEVENTFD (15220),
    so those members are enum aliases. Dispatch on the kind of fd, never on
    the number alone.
    """

    GET_API_VERSION = IO(VFIO_TYPE, VFIO_BASE + 0)
    CHECK_EXTENSION = IO(VFIO_TYPE, VFIO_BASE + 1)
    SET_IOMMU = IO(VFIO_TYPE, VFIO_BASE + 2)
    GROUP_GET_STATUS = IO(VFIO_TYPE, VFIO_BASE + 3)
    GROUP_SET_CONTAINER = IO(VFIO_TYPE, VFIO_BASE + 4)
    GROUP_UNSET_CONTAINER = IO(VFIO_TYPE, VFIO_BASE + 5)
    GROUP_GET_DEVICE_FD = IO(VFIO_TYPE, VFIO_BASE + 6)
    DEVICE_GET_INFO = IO(VFIO_TYPE, VFIO_BASE + 7)
    DEVICE_GET_REGION_INFO = IO(VFIO_TYPE, VFIO_BASE + 8)
    DEVICE_GET_IRQ_INFO = IO(VFIO_TYPE, VFIO_BASE + 9)
    DEVICE_SET_IRQS = IO(VFIO_TYPE, VFIO_BASE + 10)
    DEVICE_RESET = IO(VFIO_TYPE, VFIO_BASE + 11)
    DEVICE_GET_PCI_HOT_RESET_INFO = IO(VFIO_TYPE, VFIO_BASE + 12)
    DEVICE_PCI_HOT_RESET = IO(VFIO_TYPE, VFIO_BASE + 13)
    DEVICE_QUERY_GFX_PLANE = IO(VFIO_TYPE, VFIO_BASE + 14)
    DEVICE_GET_GFX_DMABUF = IO(VFIO_TYPE, VFIO_BASE + 15)
    DEVICE_IOEVENTFD = IO(VFIO_TYPE, VFIO_BASE + 16)
    DEVICE_FEATURE = IO(VFIO_TYPE, VFIO_BASE + 17)
    DEVICE_BIND_IOMMUFD = IO(VFIO_TYPE, VFIO_BASE + 18)
    DEVICE_ATTACH_IOMMUFD_PT = IO(VFIO_TYPE, VFIO_BASE + 19)
    DEVICE_DETACH_IOMMUFD_PT = IO(VFIO_TYPE, VFIO_BASE + 20)
    MIG_GET_PRECOPY_INFO = IO(VFIO_TYPE, VFIO_BASE + 21)
    # Container (type1) ioctls share numbers with device ones: the fd's kind
    # decides which is meant.
    IOMMU_GET_INFO = IO(VFIO_TYPE, VFIO_BASE + 12)
    IOMMU_MAP_DMA = IO(VFIO_TYPE, VFIO_BASE + 13)
    IOMMU_UNMAP_DMA = IO(VFIO_TYPE, VFIO_BASE + 14)
    IOMMU_ENABLE = IO(VFIO_TYPE, VFIO_BASE + 15)
    IOMMU_DISABLE = IO(VFIO_TYPE, VFIO_BASE + 16)
    IOMMU_DIRTY_PAGES = IO(VFIO_TYPE, VFIO_BASE + 17)


class GroupFlag(enum.IntFlag):
    VIABLE = 1 << 0
    CONTAINER_SET = 1 << 1


class DeviceFlag(enum.IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1
    PLATFORM = 1 << 2
    AMBA = 1 << 3
    CCW = 1 << 4
    AP = 1 << 5
    FSL_MC = 1 << 6
    CAPS = 1 << 7
    CDX = 1 << 8


class DeviceInfoCap(enum.IntEnum):
    ZPCI_BASE = 1
    ZPCI_GROUP = 2
    ZPCI_UTIL = 3
    ZPCI_PFIP = 4
    PCI_ATOMIC_COMP = 5


class PciAtomicCompFlag(enum.IntFlag):
    """`flags` of vfio_device_info_cap_pci_atomic_comp: AtomicOp completer sizes."""

    COMP32 = 1 << 0
    COMP64 = 1 << 1
    COMP128 = 1 << 2


class RegionFlag(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class RegionCap(enum.IntEnum):
    SPARSE_MMAP = 1
    TYPE = 2
    MSIX_MAPPABLE = 3
    NVLINK2_SSATGT = 4
    NVLINK2_LNKSPD = 5


VFIO_REGION_TYPE_PCI_VENDOR_TYPE = 1 << 31
VFIO_REGION_TYPE_PCI_VENDOR_MASK = 0xFFFF


class RegionType(enum.IntEnum):
    GFX = 1
    CCW = 2
    MIGRATION_DEPRECATED = 3


class IrqInfoFlag(enum.IntFlag):
    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlag(enum.IntFlag):
    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5
    DATA_TYPE_MASK = DATA_NONE | DATA_BOOL | DATA_EVENTFD
    ACTION_TYPE_MASK = ACTION_MASK | ACTION_UNMASK | ACTION_TRIGGER


class PciRegion(enum.IntEnum):
    """Region indexes of a vfio-pci device."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8
    NUM_REGIONS = 9


class PciIrq(enum.IntEnum):
    """IRQ indexes of a vfio-pci device."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4
    NUM_IRQS = 5


VFIO_PCI_DEVID_OWNED = 0
VFIO_PCI_DEVID_NOT_OWNED = -1


class HotResetFlag(enum.IntFlag):
    DEV_ID = 1 << 0
    DEV_ID_OWNED = 1 << 1


class DeviceFeatureFlag(enum.IntFlag):
    MASK = 0xFFFF
    GET = 1 << 16
    SET = 1 << 17
    PROBE = 1 << 18


class DeviceFeature(enum.IntEnum):
    PCI_VF_TOKEN = 0
    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    LOW_POWER_ENTRY = 3
    LOW_POWER_ENTRY_WITH_WAKEUP = 4
    LOW_POWER_EXIT = 5
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8
    MIG_DATA_SIZE = 9
    BUS_MASTER = 10


class BusMasterOp(enum.IntEnum):
    """`op` of vfio_device_feature_bus_master (DeviceFeature.BUS_MASTER)."""

    CLEAR = 0
    SET = 1


class IoeventfdFlag(enum.IntFlag):
    """Write width of a vfio_device_ioeventfd, in its `flags`."""

    SIZE_8 = 1 << 0
    SIZE_16 = 1 << 1
    SIZE_32 = 1 << 2
    SIZE_64 = 1 << 3
    SIZE_MASK = 0xF


class IommuInfoFlag(enum.IntFlag):
    PGSIZES = 1 << 0
    CAPS = 1 << 1


class IommuInfoCap(enum.IntEnum):
    IOVA_RANGE = 1
    MIGRATION = 2
    DMA_AVAIL = 3


class DmaMapFlag(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    VADDR = 1 << 2


class DmaUnmapFlag(enum.IntFlag):
    GET_DIRTY_BITMAP = 1 << 0
    ALL = 1 << 1
    VADDR = 1 << 2


# --- structures ---------------------------------------------------------------


class vfio_info_cap_header(ctypes.Structure):
    _fields_ = [("id", _u16), ("version", _u16), ("next", _u32)]


class vfio_group_status(ctypes.Structure):
    _fields_ = [("argsz", _u32), ("flags", _u32)]


class vfio_device_info(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("num_regions", _u32),
        ("num_irqs", _u32),
        ("cap_offset", _u32),
        ("pad", _u32),
    ]


class vfio_device_info_cap_pci_atomic_comp(ctypes.Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("flags", _u32),
        ("reserved", _u32),
    ]


class vfio_region_info(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("index", _u32),
        ("cap_offset", _u32),
        ("size", _u64),
        ("offset", _u64),
    ]


class vfio_region_sparse_mmap_area(ctypes.Structure):
    _fields_ = [("offset", _u64), ("size", _u64)]


class vfio_region_info_cap_sparse_mmap(ctypes.Structure):
    """Followed by `nr_areas` vfio_region_sparse_mmap_area."""

    _fields_ = [
        ("header", vfio_info_cap_header),
        ("nr_areas", _u32),
        ("reserved", _u32),
        ("areas", vfio_region_sparse_mmap_area * 0),
    ]


class vfio_region_info_cap_type(ctypes.Structure):
    _fields_ = [("header", vfio_info_cap_header), ("type", _u32), ("subtype", _u32)]


class vfio_irq_info(ctypes.Structure):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("index", _u32), ("count", _u32)]


class vfio_irq_set(ctypes.Structure):
    """Followed by `count` data items (u8 for BOOL, s32 for EVENTFD)."""

    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("index", _u32),
        ("start", _u32),
        ("count", _u32),
        ("data", _u8 * 0),
    ]


class _vfio_pci_dependent_device_id(ctypes.Union):
    """The anonymous union of vfio_pci_dependent_device: which one is meant
    depends on HotResetFlag.DEV_ID in the enclosing info's flags."""

    _fields_ = [("group_id", _u32), ("devid", _u32)]


class vfio_pci_dependent_device(ctypes.Structure):
    """`group_id` shares its storage with `devid` (an anonymous union in C):
    `devid` (an iommufd device id, or VFIO_PCI_DEVID_OWNED / _NOT_OWNED) when
    the hot-reset info has HotResetFlag.DEV_ID, else `group_id`."""

    _anonymous_ = ("_id",)
    _fields_ = [
        ("_id", _vfio_pci_dependent_device_id),
        ("segment", _u16),
        ("bus", _u8),
        ("devfn", _u8),
    ]


class vfio_pci_hot_reset_info(ctypes.Structure):
    """Followed by `count` vfio_pci_dependent_device."""

    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("count", _u32),
        ("devices", vfio_pci_dependent_device * 0),
    ]


class vfio_pci_hot_reset(ctypes.Structure):
    """Followed by `count` s32 group fds (or, with iommufd, none)."""

    _fields_ = [("argsz", _u32), ("flags", _u32), ("count", _u32), ("group_fds", _s32 * 0)]


class vfio_device_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("offset", _u64),
        ("data", _u64),
        ("fd", _s32),
        ("reserved", _u32),
    ]


class vfio_device_feature(ctypes.Structure):
    """Followed by the feature's data."""

    _fields_ = [("argsz", _u32), ("flags", _u32), ("data", _u8 * 0)]


class vfio_device_feature_bus_master(ctypes.Structure):
    _fields_ = [("op", _u32)]


class vfio_device_bind_iommufd(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("iommufd", _s32),
        ("out_devid", _u32),
    ]


class vfio_device_attach_iommufd_pt(ctypes.Structure):
    _fields_ = [("argsz", _u32), ("flags", _u32), ("pt_id", _u32)]


class vfio_device_detach_iommufd_pt(ctypes.Structure):
    _fields_ = [("argsz", _u32), ("flags", _u32)]


class vfio_iommu_type1_info(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("iova_pgsizes", _u64),
        ("cap_offset", _u32),
        ("pad", _u32),
    ]


class vfio_iova_range(ctypes.Structure):
    _fields_ = [("start", _u64), ("end", _u64)]


class vfio_iommu_type1_info_cap_iova_range(ctypes.Structure):
    """Followed by `nr_iovas` vfio_iova_range."""

    _fields_ = [
        ("header", vfio_info_cap_header),
        ("nr_iovas", _u32),
        ("reserved", _u32),
        ("iova_ranges", vfio_iova_range * 0),
    ]


class vfio_iommu_type1_info_cap_migration(ctypes.Structure):
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("flags", _u32),
        ("pgsize_bitmap", _u64),
        ("max_dirty_bitmap_size", _u64),
    ]


class vfio_iommu_type1_info_dma_avail(ctypes.Structure):
    _fields_ = [("header", vfio_info_cap_header), ("avail", _u32)]


class vfio_iommu_type1_dma_map(ctypes.Structure):
    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("vaddr", _u64),
        ("iova", _u64),
        ("size", _u64),
    ]


class vfio_iommu_type1_dma_unmap(ctypes.Structure):
    """Followed by a vfio_bitmap when GET_DIRTY_BITMAP is set (unused here)."""

    _fields_ = [
        ("argsz", _u32),
        ("flags", _u32),
        ("iova", _u64),
        ("size", _u64),
        ("data", _u8 * 0),
    ]


#: Every mirrored structure, for the golden test and the sim's decoders.
STRUCTS: tuple[type[ctypes.Structure], ...] = (
    vfio_info_cap_header,
    vfio_group_status,
    vfio_device_info,
    vfio_device_info_cap_pci_atomic_comp,
    vfio_region_info,
    vfio_region_sparse_mmap_area,
    vfio_region_info_cap_sparse_mmap,
    vfio_region_info_cap_type,
    vfio_irq_info,
    vfio_irq_set,
    vfio_pci_dependent_device,
    vfio_pci_hot_reset_info,
    vfio_pci_hot_reset,
    vfio_device_ioeventfd,
    vfio_device_feature,
    vfio_device_feature_bus_master,
    vfio_device_bind_iommufd,
    vfio_device_attach_iommufd_pt,
    vfio_device_detach_iommufd_pt,
    vfio_iommu_type1_info,
    vfio_iova_range,
    vfio_iommu_type1_info_cap_iova_range,
    vfio_iommu_type1_info_cap_migration,
    vfio_iommu_type1_info_dma_avail,
    vfio_iommu_type1_dma_map,
    vfio_iommu_type1_dma_unmap,
)
