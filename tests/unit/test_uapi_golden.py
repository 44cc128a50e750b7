"""Golden tests: `aiovfio._uapi` is a byte-exact mirror of the kernel's VFIO ABI.

A C probe is generated from _uapi's own lists (`STRUCTS`, every IntEnum/IntFlag
class and constant in each module's `__all__`),
compiled with gcc against the real `linux/vfio.h` and `linux/iommufd.h`, and
run: it prints sizeof/alignof of every mirrored structure, offsetof/size/
signedness of every field (nested and anonymous-union members too), the
offset and item size of every flexible array (a zero-length ctypes array in
_uapi), and the value of every ioctl
number, flag, enum and constant. Each is compared with _uapi.

Adding a structure, enum or constant to _uapi adds it here; a C name the
header does not have is a compile error, so a failure, never a skip.

Two header sets (see `_headers.py`): "newest" (6.12 from bookworm-backports,
must be complete) and "system" (/usr/include: 6.1 on Debian 12, compared for
the subset it has; what 6.1 lacks is listed in NOT_IN_6_1, and that list is
itself checked against the 6.1 header text).
"""

from __future__ import annotations

import ctypes
import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from _headers import (
    Headers,
    complete,
    how_to_get_headers,
    newest_headers,
    run_probe,
    system_headers,
)

from aiovfio._uapi import iommufd, vfio

MODULES: tuple[ModuleType, ...] = (vfio, iommufd)
HEADER_FILE = {vfio: "linux/vfio.h", iommufd: "linux/iommufd.h"}

#: How the member names of each enum class become C names ("{}": the member).
ENUM_C_NAMES: dict[type[enum.Enum], str] = {
    vfio.Extension: "VFIO_{}",
    vfio.Ioctl: "VFIO_{}",
    vfio.GroupFlag: "VFIO_GROUP_FLAGS_{}",
    vfio.DeviceFlag: "VFIO_DEVICE_FLAGS_{}",
    vfio.DeviceInfoCap: "VFIO_DEVICE_INFO_CAP_{}",
    vfio.PciAtomicCompFlag: "VFIO_PCI_ATOMIC_{}",
    vfio.RegionFlag: "VFIO_REGION_INFO_FLAG_{}",
    vfio.RegionCap: "VFIO_REGION_INFO_CAP_{}",
    vfio.RegionType: "VFIO_REGION_TYPE_{}",
    vfio.IrqInfoFlag: "VFIO_IRQ_INFO_{}",
    vfio.IrqSetFlag: "VFIO_IRQ_SET_{}",
    vfio.PciRegion: "VFIO_PCI_{}_REGION_INDEX",
    vfio.PciIrq: "VFIO_PCI_{}_IRQ_INDEX",
    vfio.HotResetFlag: "VFIO_PCI_HOT_RESET_FLAG_{}",
    vfio.IoeventfdFlag: "VFIO_DEVICE_IOEVENTFD_{}",
    vfio.DeviceFeatureFlag: "VFIO_DEVICE_FEATURE_{}",
    vfio.DeviceFeature: "VFIO_DEVICE_FEATURE_{}",
    vfio.BusMasterOp: "VFIO_DEVICE_FEATURE_{}_MASTER",
    vfio.IommuInfoFlag: "VFIO_IOMMU_INFO_{}",
    vfio.IommuInfoCap: "VFIO_IOMMU_TYPE1_INFO_CAP_{}",
    vfio.DmaMapFlag: "VFIO_DMA_MAP_FLAG_{}",
    vfio.DmaUnmapFlag: "VFIO_DMA_UNMAP_FLAG_{}",
    iommufd.IommufdCmd: "IOMMUFD_CMD_{}",
    iommufd.IommufdIoctl: "IOMMU_{}",
    iommufd.IoasMapFlag: "IOMMU_IOAS_MAP_{}",
    iommufd.IommufdOption: "IOMMU_OPTION_{}",
    iommufd.IommufdOptionOp: "IOMMU_OPTION_OP_{}",
    iommufd.IommufdVfioIoasOp: "IOMMU_VFIO_IOAS_{}",
}

#: Members whose C name breaks their class's pattern ("Class.MEMBER": a C
#: expression). Aliases and masks that C spells as macros follow the pattern
#: (Ioctl.IOMMU_GET_INFO, IrqSetFlag.DATA_TYPE_MASK) and need no entry.
C_NAME_OVERRIDES: dict[str, str] = {
    "PciRegion.NUM_REGIONS": "VFIO_PCI_NUM_REGIONS",
    "PciIrq.NUM_IRQS": "VFIO_PCI_NUM_IRQS",
    "IommuInfoCap.DMA_AVAIL": "VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL",
    "IoeventfdFlag.SIZE_8": "VFIO_DEVICE_IOEVENTFD_8",
    "IoeventfdFlag.SIZE_16": "VFIO_DEVICE_IOEVENTFD_16",
    "IoeventfdFlag.SIZE_32": "VFIO_DEVICE_IOEVENTFD_32",
    "IoeventfdFlag.SIZE_64": "VFIO_DEVICE_IOEVENTFD_64",
}

#: Python field names that differ from the C member's ("struct.py": "c").
#: None today: ctypes takes `__reserved` verbatim (read it with getattr()
#: inside a class body, where Python would mangle `arg.__reserved`).
C_FIELD_NAMES: dict[str, str] = {}

#: Names in the probe (C spelling) that linux-libc-dev 6.1 does not have;
#: a structure excludes its fields. test_not_in_6_1_is_exact proves each one
#: absent from the 6.1 header text, and the "newest" run proves each present.
NOT_IN_6_1 = frozenset(
    {
        # structures
        "vfio_device_info_cap_pci_atomic_comp",
        "vfio_device_feature_bus_master",
        "vfio_device_bind_iommufd",
        "vfio_device_attach_iommufd_pt",
        "vfio_device_detach_iommufd_pt",
        # fields added to existing structures (tail padding made explicit, unions)
        "vfio_device_info.pad",
        "vfio_iommu_type1_info.pad",
        "vfio_device_ioeventfd.reserved",
        "vfio_pci_dependent_device.devid",
        # constants
        "VFIO_DEVICE_FLAGS_CDX",
        "VFIO_DEVICE_INFO_CAP_PCI_ATOMIC_COMP",
        "VFIO_PCI_ATOMIC_COMP32",
        "VFIO_PCI_ATOMIC_COMP64",
        "VFIO_PCI_ATOMIC_COMP128",
        "VFIO_PCI_DEVID_OWNED",
        "VFIO_PCI_DEVID_NOT_OWNED",
        "VFIO_PCI_HOT_RESET_FLAG_DEV_ID",
        "VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED",
        "VFIO_DEVICE_BIND_IOMMUFD",
        "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
        "VFIO_DEVICE_DETACH_IOMMUFD_PT",
        "VFIO_MIG_GET_PRECOPY_INFO",
        "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE",
        "VFIO_DEVICE_FEATURE_BUS_MASTER",
        "VFIO_DEVICE_FEATURE_CLEAR_MASTER",
        "VFIO_DEVICE_FEATURE_SET_MASTER",
    }
)

#: Headers at least this new must have everything _uapi mirrors.
COMPLETE_SINCE = (6, 12)

#: sizeof of every mirrored structure on x86-64 (Linux 6.12), pinned as
#: literals so that they hold without a compiler too (rust-vmm style).
PINNED_SIZES = {
    "vfio_info_cap_header": 8,
    "vfio_group_status": 8,
    "vfio_device_info": 24,
    "vfio_device_info_cap_pci_atomic_comp": 16,
    "vfio_region_info": 32,
    "vfio_region_sparse_mmap_area": 16,
    "vfio_region_info_cap_sparse_mmap": 16,
    "vfio_region_info_cap_type": 16,
    "vfio_irq_info": 16,
    "vfio_irq_set": 20,
    "vfio_pci_dependent_device": 8,
    "vfio_pci_hot_reset_info": 12,
    "vfio_pci_hot_reset": 12,
    "vfio_device_ioeventfd": 32,
    "vfio_device_feature": 8,
    "vfio_device_feature_bus_master": 4,
    "vfio_device_bind_iommufd": 16,
    "vfio_device_attach_iommufd_pt": 12,
    "vfio_device_detach_iommufd_pt": 8,
    "vfio_iommu_type1_info": 24,
    "vfio_iova_range": 16,
    "vfio_iommu_type1_info_cap_iova_range": 16,
    "vfio_iommu_type1_info_cap_migration": 32,
    "vfio_iommu_type1_info_dma_avail": 12,
    "vfio_iommu_type1_dma_map": 32,
    "vfio_iommu_type1_dma_unmap": 24,
    "iommu_destroy": 8,
    "iommu_ioas_alloc": 12,
    "iommu_iova_range": 16,
    "iommu_ioas_iova_ranges": 32,
    "iommu_ioas_allow_iovas": 24,
    "iommu_ioas_map": 40,
    "iommu_ioas_copy": 40,
    "iommu_ioas_unmap": 24,
    "iommu_option": 24,
    "iommu_vfio_ioas": 12,
}

_NON_MIRRORS = {"STRUCTS"}


# --- what _uapi mirrors ----------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One thing to compare: C expressions printed by the probe, and _uapi's values."""

    key: str  # C spelling: "vfio_region_info", "vfio_region_info.size", "VFIO_BASE"
    kind: str  # "struct" | "field" | "flexible array" | "constant"
    struct: str  # the enclosing structure ("" for a constant)
    py: str  # where _uapi defines it, for messages
    labels: tuple[str, ...]  # what each value is
    c_exprs: tuple[str, ...]
    expected: tuple[int, ...]


def _is_enum(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, enum.Enum) and issubclass(obj, int)


def _is_struct(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, ctypes.Structure)


def _is_constant(name: str, obj: object) -> bool:
    return name.isupper() and isinstance(obj, int | str) and not isinstance(obj, enum.Enum)


def _signed(ctype: Any) -> int:
    return int(ctype(-1).value < 0)


def _is_scalar(ctype: Any) -> bool:
    return issubclass(ctype, ctypes._SimpleCData)


def _is_flexible(ctype: Any) -> bool:
    return issubclass(ctype, ctypes.Array) and ctype._length_ == 0


def _fields(
    cls: Any, base: int = 0, c_prefix: str = "", py_prefix: str = ""
) -> Iterator[tuple[str, str, int, int, Any]]:
    """(C path, Python path, offset, size, ctype) of every field, recursively.

    Members of an `_anonymous_` union or structure are named directly, as
    in C; nested structures yield themselves and then their fields; a
    flexible array (zero-length ctypes array) yields itself.
    """
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for name, ctype, *_ in cls._fields_:
        desc = getattr(cls, name)
        offset = base + desc.offset
        if name in anonymous:
            yield from _fields(ctype, offset, c_prefix, py_prefix)
            continue
        c_name = C_FIELD_NAMES.get(f"{cls.__name__}.{name}", name)
        yield (c_prefix + c_name, py_prefix + name, offset, desc.size, ctype)
        if issubclass(ctype, ctypes.Structure | ctypes.Union):
            yield from _fields(ctype, offset, f"{c_prefix}{c_name}.", f"{py_prefix}{name}.")


def _c_value_name(cls: type[enum.Enum], member: str) -> str:
    return C_NAME_OVERRIDES.get(f"{cls.__name__}.{member}") or ENUM_C_NAMES[cls].format(member)


def _align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _flexible_probe(
    short: str, s: str, py_path: str, c_path: str, offset: int, ctype: Any
) -> Probe:
    """A flexible array: where it starts, and its item's size and signedness.
    (C has no sizeof for the member itself; its items start at sizeof.)"""
    t = f"struct {s}"
    item = ctype._type_
    labels: tuple[str, ...] = ("offset", "item size")
    exprs: tuple[str, ...] = (f"offsetof({t}, {c_path})", f"sizeof((({t} *)0)->{c_path}[0])")
    values: tuple[int, ...] = (offset, ctypes.sizeof(item))
    if _is_scalar(item):
        labels += ("item signed",)
        exprs += (f"SIGNED((({t} *)0)->{c_path}[0])",)
        values += (_signed(item),)
    return Probe(
        f"{s}.{c_path}[]", "flexible array", s, f"{short}.{s}.{py_path}", labels, exprs, values
    )


def build_probes(modules: tuple[ModuleType, ...], exclude: frozenset[str]) -> list[Probe]:
    probes: list[Probe] = []
    for mod in modules:
        short = mod.__name__.rsplit(".", 1)[-1]
        for cls in mod.STRUCTS:
            s = cls.__name__
            if s in exclude:
                continue
            t = f"struct {s}"
            ends = [0]
            for c_path, py_path, offset, size, ctype in _fields(cls):
                key = f"{s}.{c_path}"
                if key in exclude:
                    continue
                if _is_flexible(ctype):
                    probes.append(_flexible_probe(short, s, py_path, c_path, offset, ctype))
                    continue
                ends.append(offset + size)
                labels: tuple[str, ...] = ("offset", "size")
                exprs: tuple[str, ...] = (
                    f"offsetof({t}, {c_path})",
                    f"sizeof((({t} *)0)->{c_path})",
                )
                values: tuple[int, ...] = (offset, size)
                if _is_scalar(ctype):
                    labels += ("signed",)
                    exprs += (f"SIGNED((({t} *)0)->{c_path})",)
                    values += (_signed(ctype),)
                probes.append(
                    Probe(key, "field", s, f"{short}.{s}.{py_path}", labels, exprs, values)
                )
            size = ctypes.sizeof(cls)
            if any(k.startswith(f"{s}.") for k in exclude):
                # An older header without the (tail) fields added since: its
                # structure ends where the last field it has ends, padded.
                size = _align_up(max(ends), ctypes.alignment(cls))
            probes.append(
                Probe(
                    s,
                    "struct",
                    s,
                    f"{short}.{s}",
                    ("sizeof", "alignof"),
                    (f"sizeof({t})", f"_Alignof({t})"),
                    (size, ctypes.alignment(cls)),
                )
            )
        for name in mod.__all__:
            obj = getattr(mod, name)
            consts: list[tuple[str, str, Any]] = []
            if _is_enum(obj):
                for member, value in obj.__members__.items():
                    consts.append((_c_value_name(obj, member), f"{obj.__name__}.{member}", value))
            elif _is_constant(name, obj):
                consts.append((name, name, obj))
            for c_name, py_name, value in consts:
                if c_name in exclude:
                    continue
                v = ord(value) if isinstance(value, str) else int(value)
                probes.append(
                    Probe(
                        c_name,
                        "constant",
                        "",
                        f"{short}.{py_name}",
                        ("value",),
                        (f"({c_name})", f"sizeof({c_name})"),
                        (v,),
                    )
                )
    return probes


def c_source(probes: list[Probe], modules: tuple[ModuleType, ...]) -> str:
    lines = [
        "/* Generated by tests/unit/test_uapi_golden.py from aiovfio._uapi. */",
        "#include <stddef.h>",
        "#include <stdio.h>",
        *(f"#include <{HEADER_FILE[m]}>" for m in modules),
        "",
        "/* 1 if the type of x is signed (x is not evaluated) */",
        "#define SIGNED(x) (((__typeof__(x))-1) > ((__typeof__(x))0) ? 0 : 1)",
        "",
        "int main(void)",
        "{",
    ]
    for p in probes:
        fmt = "|".join([p.key, *("%lld" for _ in p.c_exprs)])
        args = ", ".join(f"(long long)({e})" for e in p.c_exprs)
        lines.append(f'\tprintf("{fmt}\\n", {args});')
    lines += ["\treturn 0;", "}", ""]
    return "\n".join(lines)


def parse(output: str) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for line in output.splitlines():
        key, *values = line.split("|")
        out[key] = tuple(int(v) for v in values)
    return out


def _same_constant(py: int, c: int, c_size: int) -> bool:
    """Equal, or the same bits at the C expression's width: `(1 << 31)` is
    an int in C (negative) and the u32 2**31 in _uapi."""
    return py == c or (c < 0 and py == c + (1 << (8 * c_size)))


def mismatches(probes: list[Probe], got: dict[str, tuple[int, ...]], kinds: set[str]) -> list[str]:
    rows = []
    for p in probes:
        if p.kind not in kinds:
            continue
        c = got[p.key]
        if p.kind == "constant":
            if not _same_constant(p.expected[0], c[0], c[1]):
                rows.append(f"  {p.key:<48} C {c[0]:#x} != _uapi {p.expected[0]:#x}   ({p.py})")
            continue
        for label, want, have in zip(p.labels, p.expected, c, strict=True):
            if want != have:
                rows.append(f"  {p.key:<48} {label}: C {have} != _uapi {want}   ({p.py})")
    return rows


# --- the probe, once per header set ---------------------------------------------


@dataclass(frozen=True)
class Golden:
    headers: Headers
    probes: list[Probe]
    got: dict[str, tuple[int, ...]]
    source: Path

    def check(self, kinds: set[str]) -> None:
        rows = mismatches(self.probes, self.got, kinds)
        assert not rows, (
            f"_uapi differs from the kernel headers in {self.headers.describe()} "
            f"(probe source: {self.source}):\n" + "\n".join(rows)
        )
        assert any(p.kind in kinds for p in self.probes)


@pytest.fixture(scope="module", params=["newest", "system"])
def golden(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Golden:
    if request.param == "newest":
        headers = newest_headers()
        if not complete(headers):
            pytest.fail(how_to_get_headers(headers), pytrace=False)
        modules, exclude = MODULES, frozenset[str]()
    else:
        headers = system_headers()
        modules = MODULES if headers.has("linux/iommufd.h") else (vfio,)
        exclude = frozenset() if headers.version >= COMPLETE_SINCE else NOT_IN_6_1
    probes = build_probes(modules, exclude)
    workdir = tmp_path_factory.mktemp(f"uapi-{request.param}")
    output = run_probe(c_source(probes, modules), headers, workdir, "uapi_golden")
    got = parse(output)
    assert set(got) == {p.key for p in probes}, "the probe printed other names than asked"
    return Golden(headers, probes, got, workdir / "uapi_golden.c")


def test_struct_sizes(golden: Golden) -> None:
    golden.check({"struct"})


def test_field_layout(golden: Golden) -> None:
    golden.check({"field"})


def test_flexible_arrays(golden: Golden) -> None:
    golden.check({"flexible array"})


def test_constants(golden: Golden) -> None:
    golden.check({"constant"})


# --- the tables above stay honest ------------------------------------------------


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", " ", text, flags=re.DOTALL)


def _struct_body(text: str, name: str) -> str | None:
    m = re.search(rf"\bstruct\s+{re.escape(name)}\s*\{{", text)
    if m is None:
        return None
    depth, i = 1, m.end()
    while depth and i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[m.end() : i - 1]


def test_not_in_6_1_is_exact() -> None:
    """Every NOT_IN_6_1 entry is really absent from the 6.1 vfio.h."""
    headers = system_headers()
    if headers.version[:2] != (6, 1):
        # Not a skip: the 6.1 subset is what Debian 12 (the CI platform) ships,
        # and a run that cannot check it has not checked it.
        pytest.fail(
            f"the system headers are {headers.version_str}, not 6.1: this check proves "
            f"NOT_IN_6_1 against Debian 12's linux-libc-dev; run it on Debian 12"
        )
    text = _strip_comments(headers.text("linux/vfio.h"))
    present = []
    for key in sorted(NOT_IN_6_1):
        struct, _, field = key.partition(".")
        if field:
            body = _struct_body(text, struct)
            assert body is not None, f"{key}: no struct {struct} in 6.1 at all"
            if re.search(rf"\b{re.escape(field)}\b", body):
                present.append(key)
        elif re.search(rf"\b{re.escape(key)}\b", text):
            present.append(key)
    assert not present, f"NOT_IN_6_1 lists names that 6.1 has: {present}"
    keys = {p.key for p in build_probes((vfio,), frozenset())}
    assert keys >= NOT_IN_6_1, f"stale NOT_IN_6_1 entries: {sorted(NOT_IN_6_1 - keys)}"


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.__name__)
def test_every_public_name_is_compared(mod: ModuleType) -> None:
    """Whatever a module exports is a structure, an enum or a constant that
    the probe compares: nothing is exported unchecked."""
    unclassified = []
    for name in mod.__all__:
        obj = getattr(mod, name)
        if _is_struct(obj):
            assert obj in mod.STRUCTS, f"{name} is not in {mod.__name__}.STRUCTS"
        elif _is_enum(obj):
            assert obj in ENUM_C_NAMES, f"add {name}'s C name pattern to ENUM_C_NAMES"
        elif not (_is_constant(name, obj) or name in _NON_MIRRORS):
            unclassified.append(name)
    assert not unclassified
    for cls in mod.STRUCTS:
        assert cls.__name__ in mod.__all__
        flexible = [name for name, ctype, *_ in cls._fields_ if _is_flexible(ctype)]
        assert flexible in ([], [cls._fields_[-1][0]]), f"{cls.__name__}: flexible array not last"
        assert ctypes.sizeof(cls) == getattr(cls, cls._fields_[-1][0]).offset or not flexible


def test_override_tables_have_no_stale_entries() -> None:
    members = {
        f"{cls.__name__}.{name}"
        for mod in MODULES
        for cls in ENUM_C_NAMES
        for name in cls.__members__
    }
    assert set(C_NAME_OVERRIDES) <= members
    fields = {
        f"{cls.__name__}.{name}"
        for mod in MODULES
        for cls in mod.STRUCTS
        for name, *_ in cls._fields_
    }
    assert set(C_FIELD_NAMES) <= fields


def test_pinned_struct_sizes() -> None:
    """Literal sizes, independent of any compiler or header."""
    sizes = {cls.__name__: ctypes.sizeof(cls) for mod in MODULES for cls in mod.STRUCTS}
    assert sizes == PINNED_SIZES


def test_anonymous_union_of_dependent_device() -> None:
    dev = vfio.vfio_pci_dependent_device(segment=1, bus=2, devfn=3)
    dev.devid = 0xFFFFFFFF
    assert dev.group_id == 0xFFFFFFFF
    assert bytes(dev) == b"\xff\xff\xff\xff\x01\x00\x02\x03"
