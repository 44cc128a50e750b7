"""What a forked child inherits from aiovfio, made safe (`os.register_at_fork`).

A child of `os.fork()` (multiprocessing's "fork" start method too) gets
copies of the parent's fds (sharing the same open files: a group the child
keeps open stays busy for the parent too), of its BAR mappings (live MMIO to
the parent's device) and of its DMA memory. So:

* DMA memory is `MADV_WIPEONFORK`: the child's copy is fresh zero pages, the
  parent's pinned pages are never shared copy-on-write (what DONTFORK is for)
  and never absent in the child (a DONTFORK area faults with SIGSEGV there).
  Where the kernel refuses WIPEONFORK (hugetlb memory) the area is DONTFORK
  and the child maps zero pages at its address (`wipe_in_child`).
* Every open handle is in the lifecycle's registry (`_resource.live_resources`)
  and, in the child only, told `_forget_after_fork()` (an `os.register_at_fork`
  hook in `_resource`): it marks itself closed, closes the child's copies of
  its fds with a plain close(2), and drops or wipes its mappings (a DMA
  buffer's and a still-exported BAR mapping's become zero pages). It never makes a
  VFIO call, never touches an event loop (the child shares the parent's
  epoll instance) and never calls into the simulated machine (its locks may
  be held by a parent thread that does not exist in the child).

What a child may do: exit or exec; use its own memory, including any view of
a DMA buffer it holds (it reads zeros: the parent's data is not there); open
devices of its own once the parent has released them. What it may not do:
use anything aiovfio gave the parent. Every inherited object is closed:
register access, DMA buffer views, interrupt streams and new children raise
ClosedResourceError; leaving an inherited `async with` does nothing. The
parent's buffers, mappings, interrupts and device are untouched.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os

__all__ = [
    "protect_memory",
    "close_in_child",
    "wipe_in_child",
    "address_of",
]


#: linux/mman.h (asm-generic/mman-common.h); Python's mmap module does not name it
_MADV_WIPEONFORK = getattr(mmap, "MADV_WIPEONFORK", 18)


def protect_memory(mem: mmap.mmap) -> bool:
    """Make `mem` (private anonymous) zero-filled in a forked child.

    True when that is done by the kernel (WIPEONFORK); False when it fell back
    to DONTFORK (the child's copy is then absent until `wipe_in_child`).
    """
    try:
        mem.madvise(_MADV_WIPEONFORK)
    except OSError:  # hugetlb, kernels before 4.14
        mem.madvise(mmap.MADV_DONTFORK)
        return False
    return True


def close_in_child(fd: int) -> None:
    """close(2) the child's copy of `fd` (the open file stays the parent's)."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


_libc: ctypes.CDLL | None = None


def wipe_in_child(address: int, length: int) -> None:
    """Map fresh zero pages over [address, address + length) in the child.

    For an area the child did not inherit (DONTFORK) or must not use (a BAR
    mapping some view still exports): a held view then reads zeros instead of
    faulting.
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = _libc.mmap
    fn.restype = ctypes.c_void_p
    fn.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED
    fn(address, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)


_MAP_FIXED = 0x10


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


def address_of(mem: mmap.mmap) -> int:
    """The address of an mmap's first byte, read-only mappings included."""
    view = _PyBuffer()
    get = ctypes.pythonapi.PyObject_GetBuffer
    get.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
    get.restype = ctypes.c_int
    if get(mem, ctypes.byref(view), 0) != 0:  # pragma: no cover - raises instead
        raise ValueError("not a buffer")
    try:
        return int(view.buf or 0)
    finally:
        release = ctypes.pythonapi.PyBuffer_Release
        release.argtypes = [ctypes.POINTER(_PyBuffer)]
        release.restype = None
        release(ctypes.byref(view))
