"""The kernel's ioctl request-number formulas (asm-generic/ioctl.h)."""

from __future__ import annotations

__all__ = ["IO", "IOC_NONE", "IOC_READ", "IOC_WRITE", "IOR", "IOW", "IOWR"]

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2


def _ioc(direction: int, type_: str, nr: int, size: int) -> int:
    """`_IOC(dir, type, nr, size)`: `type_` is one character, e.g. `';'`
    (`chr(0xAE)` for a type the kernel writes as a number)."""
    if len(type_) != 1 or not 0 <= ord(type_) < (1 << _IOC_TYPEBITS):
        raise ValueError(f"ioctl type {type_!r} is not one 8-bit character")
    if not 0 <= nr < (1 << _IOC_NRBITS):
        raise ValueError(f"ioctl nr {nr} out of range")
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl size {size} out of range")
    return (
        (direction << _IOC_DIRSHIFT)
        | (ord(type_) << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def IO(type_: str, nr: int) -> int:
    """`_IO(type, nr)`: an ioctl with no data direction (all of VFIO's)."""
    return _ioc(IOC_NONE, type_, nr, 0)


def IOR(type_: str, nr: int, size: int) -> int:
    """`_IOR(type, nr, size)`: the kernel writes `size` bytes back."""
    return _ioc(IOC_READ, type_, nr, size)


def IOW(type_: str, nr: int, size: int) -> int:
    """`_IOW(type, nr, size)`: the kernel reads `size` bytes."""
    return _ioc(IOC_WRITE, type_, nr, size)


def IOWR(type_: str, nr: int, size: int) -> int:
    """`_IOWR(type, nr, size)`: both directions."""
    return _ioc(IOC_READ | IOC_WRITE, type_, nr, size)
