"""NVMe constants and structures the nvme model speaks (NVMe 1.4, as QEMU).

Names follow the specification and Linux's `include/linux/nvme.h` so that a
reader can grep one against the other. Only what the model implements is
here; everything is a named constant so the controller code reads as prose.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

__all__ = [
    "CQE",
    "DNR",
    "IDENTIFY_SIZE",
    "NSID_BROADCAST",
    "SQE",
    "AdminOpcode",
    "Cap",
    "Cc",
    "Cns",
    "Command",
    "Csts",
    "FeatureId",
    "IdCtrl",
    "IdNs",
    "IoOpcode",
    "LogId",
    "Reg",
    "Smart",
    "Status",
    "field_get",
]

#: Do Not Retry, bit 14 of the 15-bit status QEMU keeps (bit 31 of CQE DW3).
DNR = 0x4000
#: Every Identify data structure is 4 KiB.
IDENTIFY_SIZE = 4096
#: "All namespaces".
NSID_BROADCAST = 0xFFFF_FFFF


class Reg(enum.IntEnum):
    """Controller register offsets in BAR0."""

    CAP = 0x00
    VS = 0x08
    INTMS = 0x0C
    INTMC = 0x10
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20
    AQA = 0x24
    ASQ = 0x28
    ACQ = 0x30
    #: The register file (`NvmeBar`) is 4 KiB; the doorbells follow it.
    DOORBELLS = 0x1000


def field_get(value: int, shift: int, width: int) -> int:
    """Bits [shift + width - 1 : shift] of `value`."""
    return (value >> shift) & ((1 << width) - 1)


class Cap:
    """CAP field positions: (shift, width)."""

    MQES = (0, 16)
    CQR = (16, 1)
    AMS = (17, 2)
    TO = (24, 8)
    DSTRD = (32, 4)
    NSSRS = (36, 1)
    CSS = (37, 8)
    MPSMIN = (48, 4)
    MPSMAX = (52, 4)

    #: CSS bits: the NVM command set, I/O command sets (CSI), admin only.
    CSS_NVM = 1 << 0
    CSS_CSI = 1 << 6
    CSS_ADMIN_ONLY = 1 << 7


class Cc:
    """CC field positions: (shift, width), and SHN values."""

    EN = (0, 1)
    CSS = (4, 3)
    MPS = (7, 4)
    AMS = (11, 3)
    SHN = (14, 2)
    IOSQES = (16, 4)
    IOCQES = (20, 4)

    SHN_NONE = 0
    #: 64-byte SQ entries and 16-byte CQ entries, as log2.
    SQES = 6
    CQES = 4


class Csts(enum.IntFlag):
    """CSTS bits."""

    RDY = 0x01
    CFS = 0x02
    SHST_MASK = 0x0C
    SHST_COMPLETE = 0x08
    NSSRO = 0x10
    PP = 0x20


class Status(enum.IntEnum):
    """Status codes as (SCT << 8) | SC; OR in `DNR` where QEMU does."""

    SUCCESS = 0x0000
    INVALID_OPCODE = 0x0001
    INVALID_FIELD = 0x0002
    DATA_TRANSFER_ERROR = 0x0004
    INTERNAL_ERROR = 0x0006
    ABORT_REQUESTED = 0x0007
    ABORTED_SQ_DELETION = 0x0008
    INVALID_NSID = 0x000B
    COMMAND_SEQUENCE_ERROR = 0x000C
    INVALID_PRP_OFFSET = 0x0013
    LBA_OUT_OF_RANGE = 0x0080
    INVALID_CQID = 0x0100
    INVALID_QID = 0x0101
    INVALID_QUEUE_SIZE = 0x0102
    ASYNC_EVENT_LIMIT_EXCEEDED = 0x0105
    INVALID_VECTOR = 0x0108
    INVALID_QUEUE_DELETION = 0x010C
    FEATURE_NOT_SAVEABLE = 0x010D
    FEATURE_NOT_CHANGEABLE = 0x010E
    FEATURE_NOT_NS_SPECIFIC = 0x010F


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
    ASYNC_EVENT_REQUEST = 0x0C


class IoOpcode(enum.IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_ZEROES = 0x08


class Cns(enum.IntEnum):
    """Identify CNS values."""

    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NS_LIST = 0x02
    NS_DESCRIPTOR_LIST = 0x03


class LogId(enum.IntEnum):
    ERROR_INFO = 0x01
    SMART = 0x02
    FIRMWARE_SLOT = 0x03


class FeatureId(enum.IntEnum):
    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    TEMPERATURE_THRESHOLD = 0x04
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    ASYNC_EVENT_CONFIG = 0x0B


class IdCtrl(enum.IntEnum):
    """Identify Controller byte offsets."""

    VID = 0x000
    SSVID = 0x002
    SN = 0x004
    MN = 0x018
    FR = 0x040
    RAB = 0x048
    IEEE = 0x049
    MDTS = 0x04D
    CNTLID = 0x04E
    VER = 0x050
    OAES = 0x05C
    CNTRLTYPE = 0x06F
    ACL = 0x102
    AERL = 0x103
    FRMW = 0x104
    LPA = 0x105
    ELPE = 0x106
    WCTEMP = 0x10E
    CCTEMP = 0x110
    SQES = 0x200
    CQES = 0x201
    MAXCMD = 0x202
    NN = 0x204
    ONCS = 0x208
    VWC = 0x20D
    SGLS = 0x218
    SUBNQN = 0x300
    PSD0 = 0x800


class IdNs(enum.IntEnum):
    """Identify Namespace byte offsets."""

    NSZE = 0x00
    NCAP = 0x08
    NUSE = 0x10
    NSFEAT = 0x18
    NLBAF = 0x19
    FLBAS = 0x1A
    LBAF0 = 0x80


class Smart(enum.IntEnum):
    """SMART / Health Information log byte offsets (the log is 512 bytes)."""

    CRITICAL_WARNING = 0
    TEMPERATURE = 1
    AVAILABLE_SPARE = 3
    AVAILABLE_SPARE_THRESHOLD = 4
    DATA_UNITS_READ = 32
    DATA_UNITS_WRITTEN = 48
    HOST_READ_COMMANDS = 64
    HOST_WRITE_COMMANDS = 80
    POWER_CYCLES = 112
    SIZE = 512


#: Submission queue entry: DW0 (opcode, flags, CID), NSID, 2 reserved dwords,
#: MPTR, PRP1, PRP2, CDW10..15.
SQE = struct.Struct("<BBHI8xQQQ6I")
#: Completion queue entry: DW0 result, DW1 reserved, SQHD, SQID, CID, status|phase.
CQE = struct.Struct("<IIHHHH")

_PSDT_SHIFT, _PSDT_WIDTH = 6, 2  # in the flags byte (DW0 bits 15:14)
_FUSE_WIDTH = 2  # DW0 bits 9:8
_FUSE_MASK, _PSDT_MASK = (1 << _FUSE_WIDTH) - 1, (1 << _PSDT_WIDTH) - 1


class Command(NamedTuple):
    """A decoded submission queue entry (a tuple: decoding runs for every command)."""

    opcode: int
    fuse: int
    psdt: int
    cid: int
    nsid: int
    prp1: int
    prp2: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int

    @classmethod
    def decode(cls, raw: bytes | memoryview, offset: int = 0) -> Command:
        """The entry at `offset` of `raw` (a fetched entry, or a ring seen through a view)."""
        op, flags, cid, nsid, _mptr, prp1, prp2, c10, c11, c12, c13, c14, c15 = SQE.unpack_from(
            raw, offset
        )
        return _new_command(
            cls,
            (
                op,
                flags & _FUSE_MASK,  # field_get, inline: every command is decoded
                flags >> _PSDT_SHIFT & _PSDT_MASK,
                cid,
                nsid,
                prp1,
                prp2,
                c10,
                c11,
                c12,
                c13,
                c14,
                c15,
            ),
        )


_new_command = tuple.__new__  # a NamedTuple's own __new__ is one more Python frame
