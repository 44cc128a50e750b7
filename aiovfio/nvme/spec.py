"""NVMe 1.4 constants and structures the driver speaks: registers, entries, Identify.

Names follow the specification and Linux's `include/linux/nvme.h` so a reader
can grep one against the other. Pure data: nothing here does I/O.
"""

from __future__ import annotations

import enum
import struct

from attrs import frozen

__all__ = [
    "CC_IOCQES",
    "CC_IOSQES",
    "CQE_SIZE",
    "IDENTIFY_SIZE",
    "IO_SQE",
    "SQE",
    "SQE_SIZE",
    "AdminOpcode",
    "Cap",
    "Cns",
    "Csts",
    "FeatureId",
    "IdentifyController",
    "IdentifyNamespace",
    "IoOpcode",
    "Reg",
    "doorbell_offsets",
    "status_name",
]

SQE_SIZE = 64
CQE_SIZE = 16
IDENTIFY_SIZE = 4096
#: CC.IOSQES / CC.IOCQES: log2 of the I/O queue entry sizes.
CC_IOSQES = 6
CC_IOCQES = 4

#: A submission queue entry: opcode, flags, CID, NSID, 8 reserved bytes, MPTR,
#: PRP1, PRP2, CDW10..CDW15.
SQE = struct.Struct("<BBHI8xQQQ6I")
#: The same 64 bytes with its fields paired as the command paths build them (fewer
#: arguments to pack): opcode | CID << 16 (flags 0), NSID, 16 zero bytes (CDW2-3,
#: MPTR), PRP1, PRP2, CDW10 | CDW11 << 32 (a Read/Write's SLBA), CDW12 | CDW13 << 32,
#: 8 zero bytes (CDW14-15).
IO_SQE = struct.Struct("<II16xQQQQ8x")


class Reg(enum.IntEnum):
    """Controller register offsets in BAR0."""

    CAP = 0x00
    VS = 0x08
    INTMS = 0x0C
    INTMC = 0x10
    CC = 0x14
    CSTS = 0x1C
    AQA = 0x24
    ASQ = 0x28
    ACQ = 0x30
    DOORBELLS = 0x1000


@frozen
class Cap:
    """The CAP register, decoded."""

    mqes: int  # maximum queue entries, 0-based
    contiguous: bool  # CQR
    timeout: float  # TO, in seconds (the register counts 500 ms units)
    doorbell_stride: int  # bytes between doorbells: 4 << DSTRD
    css: int
    mpsmin: int  # log2(page) - 12
    mpsmax: int

    @classmethod
    def decode(cls, value: int) -> Cap:
        return cls(
            mqes=value & 0xFFFF,
            contiguous=bool(value >> 16 & 1),
            timeout=(value >> 24 & 0xFF) * 0.5,
            doorbell_stride=4 << (value >> 32 & 0xF),
            css=value >> 37 & 0xFF,
            mpsmin=value >> 48 & 0xF,
            mpsmax=value >> 52 & 0xF,
        )


class Cc:
    """CC bits."""

    EN = 1 << 0
    SHN_NORMAL = 1 << 14
    SHN_MASK = 3 << 14

    @staticmethod
    def enable(mps: int) -> int:
        """EN, NVM command set, page size 2^(12+mps), round robin, 64/16-byte entries."""
        return Cc.EN | mps << 7 | CC_IOSQES << 16 | CC_IOCQES << 20


class Csts(enum.IntFlag):
    RDY = 0x01
    CFS = 0x02
    SHST_MASK = 0x0C
    SHST_COMPLETE = 0x08


class AdminOpcode(enum.IntEnum):
    DELETE_SQ = 0x00
    CREATE_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_CQ = 0x04
    CREATE_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A


class IoOpcode(enum.IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02


class Cns(enum.IntEnum):
    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NS_LIST = 0x02


class FeatureId(enum.IntEnum):
    NUMBER_OF_QUEUES = 0x07


def doorbell_offsets(qid: int, stride: int) -> tuple[int, int]:
    """(SQ tail, CQ head) doorbell offsets of queue `qid` in BAR0."""
    sq = Reg.DOORBELLS + 2 * qid * stride
    return sq, sq + stride


def _text(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("ascii", "replace").strip()


@frozen
class IdentifyController:
    """The Identify Controller fields a driver uses (strings stripped)."""

    vid: int
    ssvid: int
    serial: str
    model: str
    firmware: str
    mdts: int  # log2 of the transfer limit in minimum pages; 0: no limit
    cntlid: int
    version: int
    sqes: int
    cqes: int
    nn: int
    subnqn: str

    @classmethod
    def decode(cls, data: bytes) -> IdentifyController:
        vid, ssvid = struct.unpack_from("<HH", data, 0x00)
        return cls(
            vid=vid,
            ssvid=ssvid,
            serial=_text(data[0x04:0x18]),
            model=_text(data[0x18:0x40]),
            firmware=_text(data[0x40:0x48]),
            mdts=data[0x4D],
            cntlid=struct.unpack_from("<H", data, 0x4E)[0],
            version=struct.unpack_from("<I", data, 0x50)[0],
            sqes=data[0x200],
            cqes=data[0x201],
            nn=struct.unpack_from("<I", data, 0x204)[0],
            subnqn=_text(data[0x300:0x400]),
        )


@frozen
class IdentifyNamespace:
    """Size and the LBA format in use of one namespace."""

    nsze: int
    ncap: int
    nuse: int
    block_size: int
    metadata_size: int

    @classmethod
    def decode(cls, data: bytes) -> IdentifyNamespace:
        nsze, ncap, nuse = struct.unpack_from("<QQQ", data, 0x00)
        flbas = data[0x1A]
        index = (flbas & 0xF) | (flbas >> 5 & 0x3) << 4
        metadata, lbads = struct.unpack_from("<HB", data, 0x80 + 4 * index)
        return cls(nsze, ncap, nuse, 1 << lbads if lbads else 0, metadata)


#: Status names by (SCT, SC), from the NVMe 1.4 base specification, figures 126-130.
_STATUS_NAMES: dict[tuple[int, int], str] = {
    (0, 0x00): "Successful Completion",
    (0, 0x01): "Invalid Command Opcode",
    (0, 0x02): "Invalid Field in Command",
    (0, 0x03): "Command ID Conflict",
    (0, 0x04): "Data Transfer Error",
    (0, 0x05): "Commands Aborted due to Power Loss Notification",
    (0, 0x06): "Internal Error",
    (0, 0x07): "Command Abort Requested",
    (0, 0x08): "Command Aborted due to SQ Deletion",
    (0, 0x09): "Command Aborted due to Failed Fused Command",
    (0, 0x0A): "Command Aborted due to Missing Fused Command",
    (0, 0x0B): "Invalid Namespace or Format",
    (0, 0x0C): "Command Sequence Error",
    (0, 0x0D): "Invalid SGL Segment Descriptor",
    (0, 0x0E): "Invalid Number of SGL Descriptors",
    (0, 0x0F): "Data SGL Length Invalid",
    (0, 0x10): "Metadata SGL Length Invalid",
    (0, 0x11): "SGL Descriptor Type Invalid",
    (0, 0x12): "Invalid Use of Controller Memory Buffer",
    (0, 0x13): "PRP Offset Invalid",
    (0, 0x14): "Atomic Write Unit Exceeded",
    (0, 0x15): "Operation Denied",
    (0, 0x16): "SGL Offset Invalid",
    (0, 0x18): "Host Identifier Inconsistent Format",
    (0, 0x19): "Keep Alive Timer Expired",
    (0, 0x1A): "Keep Alive Timeout Invalid",
    (0, 0x1B): "Command Aborted due to Preempt and Abort",
    (0, 0x1C): "Sanitize Failed",
    (0, 0x1D): "Sanitize In Progress",
    (0, 0x1E): "SGL Data Block Granularity Invalid",
    (0, 0x20): "Namespace is Write Protected",
    (0, 0x21): "Command Interrupted",
    (0, 0x22): "Transient Transport Error",
    (0, 0x80): "LBA Out of Range",
    (0, 0x81): "Capacity Exceeded",
    (0, 0x82): "Namespace Not Ready",
    (0, 0x83): "Reservation Conflict",
    (0, 0x84): "Format In Progress",
    (1, 0x00): "Completion Queue Invalid",
    (1, 0x01): "Invalid Queue Identifier",
    (1, 0x02): "Invalid Queue Size",
    (1, 0x03): "Abort Command Limit Exceeded",
    (1, 0x05): "Asynchronous Event Request Limit Exceeded",
    (1, 0x06): "Invalid Firmware Slot",
    (1, 0x07): "Invalid Firmware Image",
    (1, 0x08): "Invalid Interrupt Vector",
    (1, 0x09): "Invalid Log Page",
    (1, 0x0A): "Invalid Format",
    (1, 0x0B): "Firmware Activation Requires Conventional Reset",
    (1, 0x0C): "Invalid Queue Deletion",
    (1, 0x0D): "Feature Identifier Not Saveable",
    (1, 0x0E): "Feature Not Changeable",
    (1, 0x0F): "Feature Not Namespace Specific",
    (1, 0x80): "Conflicting Attributes",
    (1, 0x81): "Invalid Protection Information",
    (1, 0x82): "Attempted Write to Read Only Range",
    (2, 0x80): "Write Fault",
    (2, 0x81): "Unrecovered Read Error",
    (2, 0x82): "End-to-end Guard Check Error",
    (2, 0x83): "End-to-end Application Tag Check Error",
    (2, 0x84): "End-to-end Reference Tag Check Error",
    (2, 0x85): "Compare Failure",
    (2, 0x86): "Access Denied",
    (2, 0x87): "Deallocated or Unwritten Logical Block",
}
_SCT_NAMES = {
    0: "Generic",
    1: "Command Specific",
    2: "Media and Data Integrity",
    3: "Path Related",
    7: "Vendor Specific",
}


def status_name(sct: int, sc: int) -> str:
    """The specification's name for a status code (or a description of an unknown one)."""
    name = _STATUS_NAMES.get((sct, sc))
    if name is not None:
        return name
    return f"{_SCT_NAMES.get(sct, 'Reserved')} status {sc:#04x}"
