"""The ioctl request-number formulas (`_IO`, `_IOR`, `_IOW`, `_IOWR`) and the
VFIO / iommufd numbers they give, pinned as literals.

The formulas are checked against the kernel's own macros (asm-generic/ioctl.h,
via a C probe compiled against the system headers) over a grid of types,
numbers, sizes and directions, and against well-known ioctls of other
subsystems. The literals hold without a compiler.
"""

from __future__ import annotations

import ctypes
import itertools
from pathlib import Path

import pytest
from _headers import run_probe, system_headers

from aiovfio._uapi import ioctl, iommufd, vfio
from aiovfio._uapi.ioctl import IO, IOR, IOW, IOWR
from aiovfio._uapi.iommufd import IommufdIoctl
from aiovfio._uapi.vfio import Ioctl

# --- literals --------------------------------------------------------------------

#: Every VFIO ioctl number, as `strace` prints it. Container and device
#: ioctls share numbers (the fd's kind decides), so several values repeat.
VFIO_NUMBERS = {
    "GET_API_VERSION": 0x3B64,  # 15204, rust-vmm's golden value
    "CHECK_EXTENSION": 0x3B65,
    "SET_IOMMU": 0x3B66,
    "GROUP_GET_STATUS": 0x3B67,
    "GROUP_SET_CONTAINER": 0x3B68,
    "GROUP_UNSET_CONTAINER": 0x3B69,
    "GROUP_GET_DEVICE_FD": 0x3B6A,
    "DEVICE_GET_INFO": 0x3B6B,
    "DEVICE_GET_REGION_INFO": 0x3B6C,
    "DEVICE_GET_IRQ_INFO": 0x3B6D,
    "DEVICE_SET_IRQS": 0x3B6E,
    "DEVICE_RESET": 0x3B6F,
    "DEVICE_GET_PCI_HOT_RESET_INFO": 0x3B70,
    "DEVICE_PCI_HOT_RESET": 0x3B71,
    "DEVICE_QUERY_GFX_PLANE": 0x3B72,
    "DEVICE_GET_GFX_DMABUF": 0x3B73,
    "DEVICE_IOEVENTFD": 0x3B74,  # 15220
    "DEVICE_FEATURE": 0x3B75,
    "DEVICE_BIND_IOMMUFD": 0x3B76,
    "DEVICE_ATTACH_IOMMUFD_PT": 0x3B77,
    "DEVICE_DETACH_IOMMUFD_PT": 0x3B78,
    "MIG_GET_PRECOPY_INFO": 0x3B79,
    "IOMMU_GET_INFO": 0x3B70,
    "IOMMU_MAP_DMA": 0x3B71,
    "IOMMU_UNMAP_DMA": 0x3B72,
    "IOMMU_ENABLE": 0x3B73,
    "IOMMU_DISABLE": 0x3B74,  # 15220, the same as DEVICE_IOEVENTFD
    "IOMMU_DIRTY_PAGES": 0x3B75,
}

IOMMUFD_NUMBERS = {
    "DESTROY": 0x3B80,
    "IOAS_ALLOC": 0x3B81,
    "IOAS_ALLOW_IOVAS": 0x3B82,
    "IOAS_COPY": 0x3B83,
    "IOAS_IOVA_RANGES": 0x3B84,
    "IOAS_MAP": 0x3B85,
    "IOAS_UNMAP": 0x3B86,
    "OPTION": 0x3B87,
    "VFIO_IOAS": 0x3B88,
}


def test_vfio_numbers_are_pinned() -> None:
    assert {name: int(m) for name, m in Ioctl.__members__.items()} == VFIO_NUMBERS


def test_iommufd_numbers_are_pinned() -> None:
    assert {name: int(m) for name, m in IommufdIoctl.__members__.items()} == IOMMUFD_NUMBERS


def test_the_numbers_people_quote() -> None:
    assert Ioctl.GET_API_VERSION == 15204 == 0x3B64
    assert Ioctl.IOMMU_MAP_DMA == 0x3B71
    assert Ioctl.DEVICE_SET_IRQS == 0x3B6E
    assert Ioctl.DEVICE_IOEVENTFD == Ioctl.IOMMU_DISABLE == 15220
    assert IommufdIoctl.IOAS_MAP == 0x3B85 == 15237
    assert ctypes.sizeof(vfio.vfio_iommu_type1_dma_map) == 32
    assert ctypes.sizeof(vfio.vfio_region_info) == 32
    assert ctypes.sizeof(iommufd.iommu_ioas_map) == 40
    assert vfio.VFIO_API_VERSION == 0


# --- the formulas ----------------------------------------------------------------

#: Well-known ioctls of other subsystems on x86-64: (name, header, ours, literal).
KNOWN = [
    ("TUNSETIFF", "linux/if_tun.h", IOW("T", 202, ctypes.sizeof(ctypes.c_int)), 0x400454CA),
    ("EVIOCGVERSION", "linux/input.h", IOR("E", 0x01, ctypes.sizeof(ctypes.c_int)), 0x80044501),
    ("FS_IOC_GETFLAGS", "linux/fs.h", IOR("f", 1, ctypes.sizeof(ctypes.c_long)), 0x80086601),
    ("BLKGETSIZE64", "linux/fs.h", IOR(chr(0x12), 114, ctypes.sizeof(ctypes.c_size_t)), 0x80081272),
    ("VIDIOC_QUERYCAP", "linux/videodev2.h", IOR("V", 0, 104), 0x80685600),
    ("UFFDIO_API", "linux/userfaultfd.h", IOWR(chr(0xAA), 0x3F, 24), 0xC018AA3F),
    ("KVM_GET_API_VERSION", "linux/kvm.h", IO(chr(0xAE), 0x00), 0xAE00),
    ("KVM_CREATE_VM", "linux/kvm.h", IO(chr(0xAE), 0x01), 0xAE01),
    ("VFIO_GET_API_VERSION", "linux/vfio.h", IO(";", 100), 0x3B64),
]


@pytest.mark.parametrize(("name", "header", "ours", "literal"), KNOWN, ids=[k[0] for k in KNOWN])
def test_known_ioctls(name: str, header: str, ours: int, literal: int) -> None:
    assert ours == literal, f"{name}: {ours:#x} != {literal:#x}"


TYPES = [0x00, 0x12, ord(";"), ord("V"), 0xAE, 0xFF]
NRS = [0, 1, 100, 0x85, 0xFF]
SIZES = [1, 4, 24, 104, 0x3FFF]
DIRECTIONS = {
    "_IOC_NONE": ioctl.IOC_NONE,
    "_IOC_READ": ioctl.IOC_READ,
    "_IOC_WRITE": ioctl.IOC_WRITE,
    "_IOC_READ|_IOC_WRITE": ioctl.IOC_READ | ioctl.IOC_WRITE,
}


def _expected() -> dict[str, tuple[str, int]]:
    """C expression per key, and what _uapi computes for it."""
    out: dict[str, tuple[str, int]] = {}
    for t, nr in itertools.product(TYPES, NRS):
        out[f"IO/{t}/{nr}"] = (f"_IO({t:#x}, {nr:#x})", IO(chr(t), nr))
        for size in SIZES:
            typ = f"char[{size}]"
            out[f"IOR/{t}/{nr}/{size}"] = (f"_IOR({t:#x}, {nr:#x}, {typ})", IOR(chr(t), nr, size))
            out[f"IOW/{t}/{nr}/{size}"] = (f"_IOW({t:#x}, {nr:#x}, {typ})", IOW(chr(t), nr, size))
            out[f"IOWR/{t}/{nr}/{size}"] = (
                f"_IOWR({t:#x}, {nr:#x}, {typ})",
                IOWR(chr(t), nr, size),
            )
    for c_dir, py_dir in DIRECTIONS.items():
        out[c_dir] = (c_dir, py_dir)
    for name, _header, ours, _literal in KNOWN:
        out[name] = (name, ours)
    return out


def test_formulas_match_the_kernel_macros(tmp_path: Path) -> None:
    expected = _expected()
    headers = sorted({k[1] for k in KNOWN} | {"linux/ioctl.h"})
    lines = ["#include <stdio.h>", *(f"#include <{h}>" for h in headers), "int main(void)", "{"]
    for key, (expr, _) in expected.items():
        lines.append(f'\tprintf("{key} %llu\\n", (unsigned long long)({expr}));')
    lines += ["\treturn 0;", "}", ""]
    output = run_probe("\n".join(lines), system_headers(), tmp_path, "ioctl_formulas")
    got = dict(line.split(" ") for line in output.splitlines())
    assert set(got) == set(expected)
    wrong = [
        f"  {expr}: C {int(got[key]):#x} != _uapi {ours:#x}"
        for key, (expr, ours) in expected.items()
        if int(got[key]) != ours
    ]
    assert not wrong, "ioctl formulas differ from asm-generic/ioctl.h:\n" + "\n".join(wrong)


def test_fields_decode_back() -> None:
    n = IOWR(";", 0x85, 40)
    assert n >> 30 == ioctl.IOC_READ | ioctl.IOC_WRITE
    assert (n >> 16) & 0x3FFF == 40
    assert (n >> 8) & 0xFF == ord(";")
    assert n & 0xFF == 0x85


@pytest.mark.parametrize(
    ("type_", "nr", "size"),
    [
        (";", 256, 0),
        (";", -1, 0),
        (";", 0, 1 << 14),
        (";", 0, -1),
        ("", 0, 0),
        (";;", 0, 0),
        ("\u0100", 0, 0),
    ],
)
def test_out_of_range_is_refused(type_: str, nr: int, size: int) -> None:
    with pytest.raises(ValueError, match="ioctl"):
        IOWR(type_, nr, size)
