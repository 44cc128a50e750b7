"""PCI configuration-space constants (`linux/pci_regs.h`), for config-space
walks in the public layer and the config spaces the simulated devices build."""

from __future__ import annotations

import enum

__all__ = [
    "CAP_LIST_OFFSET",
    "CONFIG_SPACE_SIZE",
    "EXT_CAP_START",
    "EXT_CONFIG_SPACE_SIZE",
    "CapId",
    "Cfg",
    "Command",
    "ExtCapId",
    "MsiCtrl",
    "MsixCtrl",
    "Status",
]

CONFIG_SPACE_SIZE = 256
EXT_CONFIG_SPACE_SIZE = 4096
CAP_LIST_OFFSET = 0x34
EXT_CAP_START = 0x100


class Cfg(enum.IntEnum):
    """Offsets of the type-0 header fields."""

    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION_ID = 0x08
    CLASS_PROG = 0x09
    CLASS_DEVICE = 0x0A
    CACHE_LINE_SIZE = 0x0C
    LATENCY_TIMER = 0x0D
    HEADER_TYPE = 0x0E
    BIST = 0x0F
    BASE_ADDRESS_0 = 0x10
    SUBSYSTEM_VENDOR_ID = 0x2C
    SUBSYSTEM_ID = 0x2E
    ROM_ADDRESS = 0x30
    CAPABILITY_LIST = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D


class Command(enum.IntFlag):
    IO = 0x1
    MEMORY = 0x2
    MASTER = 0x4
    SPECIAL = 0x8
    INVALIDATE = 0x10
    VGA_PALETTE = 0x20
    PARITY = 0x40
    WAIT = 0x80
    SERR = 0x100
    FAST_BACK = 0x200
    INTX_DISABLE = 0x400


class Status(enum.IntFlag):
    IMM_READY = 0x01
    INTERRUPT = 0x08
    CAP_LIST = 0x10


class CapId(enum.IntEnum):
    """Standard capability ids (PCI_CAP_ID_*)."""

    PM = 0x01
    AGP = 0x02
    VPD = 0x03
    SLOTID = 0x04
    MSI = 0x05
    CHSWP = 0x06
    PCIX = 0x07
    HT = 0x08
    VNDR = 0x09
    DBG = 0x0A
    CCRC = 0x0B
    SHPC = 0x0C
    SSVID = 0x0D
    AGP3 = 0x0E
    SECDEV = 0x0F
    EXP = 0x10
    MSIX = 0x11
    SATA = 0x12
    AF = 0x13
    EA = 0x14


class ExtCapId(enum.IntEnum):
    """Extended capability ids (PCI_EXT_CAP_ID_*), a common subset."""

    ERR = 0x01
    VC = 0x02
    DSN = 0x03
    PWR = 0x04
    ACS = 0x0D
    ARI = 0x0E
    ATS = 0x0F
    SRIOV = 0x10
    LTR = 0x18
    PASID = 0x1B


class MsiCtrl(enum.IntFlag):
    """Bits of the MSI Message Control word (cap + 2)."""

    ENABLE = 0x0001
    QMASK = 0x000E
    QSIZE = 0x0070
    ADDR64 = 0x0080
    MASKBIT = 0x0100


class MsixCtrl(enum.IntFlag):
    """Bits of the MSI-X Message Control word (cap + 2)."""

    QSIZE = 0x07FF
    MASKALL = 0x4000
    ENABLE = 0x8000
