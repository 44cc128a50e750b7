"""ctypes mirrors of `linux/iommufd.h`: the IOAS subset aiovfio uses.

iommufd (kernel >= 6.2; the VFIO device cdev >= 6.6) does the container's
job through IO address space (IOAS) objects on `/dev/iommu`.

Field names are the header's, `__reserved` included: inside a class body
Python mangles `arg.__reserved`, so read it there with
`getattr(arg, "__reserved")`.
"""

from __future__ import annotations

import ctypes
import enum

from .ioctl import IO

__all__ = [
    "IOMMUFD_TYPE",
    "STRUCTS",
    "IoasMapFlag",
    "IommufdCmd",
    "IommufdIoctl",
    "IommufdOption",
    "IommufdOptionOp",
    "IommufdVfioIoasOp",
    "iommu_destroy",
    "iommu_ioas_alloc",
    "iommu_ioas_allow_iovas",
    "iommu_ioas_copy",
    "iommu_ioas_iova_ranges",
    "iommu_ioas_map",
    "iommu_ioas_unmap",
    "iommu_iova_range",
    "iommu_option",
    "iommu_vfio_ioas",
]

IOMMUFD_TYPE = ";"

_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64


class IommufdCmd(enum.IntEnum):
    DESTROY = 0x80
    IOAS_ALLOC = 0x81
    IOAS_ALLOW_IOVAS = 0x82
    IOAS_COPY = 0x83
    IOAS_IOVA_RANGES = 0x84
    IOAS_MAP = 0x85
    IOAS_UNMAP = 0x86
    OPTION = 0x87
    VFIO_IOAS = 0x88


class IommufdIoctl(enum.IntEnum):
    DESTROY = IO(IOMMUFD_TYPE, IommufdCmd.DESTROY)
    IOAS_ALLOC = IO(IOMMUFD_TYPE, IommufdCmd.IOAS_ALLOC)
    IOAS_ALLOW_IOVAS = IO(IOMMUFD_TYPE, IommufdCmd.IOAS_ALLOW_IOVAS)
    IOAS_COPY = IO(IOMMUFD_TYPE, IommufdCmd.IOAS_COPY)
    IOAS_IOVA_RANGES = IO(IOMMUFD_TYPE, IommufdCmd.IOAS_IOVA_RANGES)
    IOAS_MAP = IO(IOMMUFD_TYPE, IommufdCmd.IOAS_MAP)
    IOAS_UNMAP = IO(IOMMUFD_TYPE, IommufdCmd.IOAS_UNMAP)
    OPTION = IO(IOMMUFD_TYPE, IommufdCmd.OPTION)
    VFIO_IOAS = IO(IOMMUFD_TYPE, IommufdCmd.VFIO_IOAS)


class IoasMapFlag(enum.IntFlag):
    FIXED_IOVA = 1 << 0
    WRITEABLE = 1 << 1
    READABLE = 1 << 2


class IommufdOption(enum.IntEnum):
    RLIMIT_MODE = 0
    HUGE_PAGES = 1


class IommufdOptionOp(enum.IntEnum):
    SET = 0
    GET = 1


class IommufdVfioIoasOp(enum.IntEnum):
    """`op` of iommu_vfio_ioas: the IOAS that the VFIO container compat uses."""

    GET = 0
    SET = 1
    CLEAR = 2


class iommu_destroy(ctypes.Structure):
    _fields_ = [("size", _u32), ("id", _u32)]


class iommu_ioas_alloc(ctypes.Structure):
    _fields_ = [("size", _u32), ("flags", _u32), ("out_ioas_id", _u32)]


class iommu_iova_range(ctypes.Structure):
    _fields_ = [("start", _u64), ("last", _u64)]


class iommu_ioas_iova_ranges(ctypes.Structure):
    """`allowed_iovas` is a user pointer to `num_iovas` iommu_iova_range."""

    _fields_ = [
        ("size", _u32),
        ("ioas_id", _u32),
        ("num_iovas", _u32),
        ("__reserved", _u32),
        ("allowed_iovas", _u64),
        ("out_iova_alignment", _u64),
    ]


class iommu_ioas_allow_iovas(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("ioas_id", _u32),
        ("num_iovas", _u32),
        ("__reserved", _u32),
        ("allowed_iovas", _u64),
    ]


class iommu_ioas_map(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("flags", _u32),
        ("ioas_id", _u32),
        ("__reserved", _u32),
        ("user_va", _u64),
        ("length", _u64),
        ("iova", _u64),
    ]


class iommu_ioas_copy(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("flags", _u32),
        ("dst_ioas_id", _u32),
        ("src_ioas_id", _u32),
        ("length", _u64),
        ("dst_iova", _u64),
        ("src_iova", _u64),
    ]


class iommu_ioas_unmap(ctypes.Structure):
    _fields_ = [("size", _u32), ("ioas_id", _u32), ("iova", _u64), ("length", _u64)]


class iommu_option(ctypes.Structure):
    _fields_ = [
        ("size", _u32),
        ("option_id", _u32),
        ("op", _u16),
        ("__reserved", _u16),
        ("object_id", _u32),
        ("val64", _u64),
    ]


class iommu_vfio_ioas(ctypes.Structure):
    _fields_ = [("size", _u32), ("ioas_id", _u32), ("op", _u16), ("__reserved", _u16)]


STRUCTS: tuple[type[ctypes.Structure], ...] = (
    iommu_destroy,
    iommu_ioas_alloc,
    iommu_iova_range,
    iommu_ioas_iova_ranges,
    iommu_ioas_allow_iovas,
    iommu_ioas_map,
    iommu_ioas_copy,
    iommu_ioas_unmap,
    iommu_option,
    iommu_vfio_ioas,
)
