"""Backing stores for the nvme model's namespace.

`SparseStore` is QEMU's `null-co,read-zeroes=on` with memory: it reads zeros
until written and allocates only the chunks that were. `BufferStore` wraps a
caller's bytearray, or a file mapped with mmap (the `-drive file=nvm.img`
case): data written through the device lands in the file.
"""

from __future__ import annotations

import mmap
import os
from typing import Protocol

from attrs import define, field

from ...errors import InvalidArgument

__all__ = ["BufferStore", "SparseStore", "Store", "open_store"]

_CHUNK = 1 << 16
#: reads of unwritten memory up to this size share one zero-filled bytes object per length
_ZEROS_KEPT = 1 << 16


class Store(Protocol):
    """Byte-addressed storage of a fixed size."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def flush(self) -> None: ...


@define(eq=False)
class SparseStore:
    """Zeros until written; memory grows with what is written, in 64 KiB chunks."""

    size: int
    _chunks: dict[int, bytearray] = field(factory=dict, init=False, repr=False)
    #: length -> zeros of that length (bytes are immutable: every read may return the same)
    _zeros: dict[int, bytes] = field(factory=dict, init=False, repr=False)

    def read(self, offset: int, length: int) -> bytes:
        index, within = divmod(offset, _CHUNK)
        if within + length <= _CHUNK:  # inside one chunk: one copy (or none, for zeros)
            chunk = self._chunks.get(index)
            if chunk is not None:
                return bytes(chunk[within : within + length])
            zeros = self._zeros.get(length)
            if zeros is None:
                zeros = bytes(length)
                if length <= _ZEROS_KEPT and len(self._zeros) < 16:
                    self._zeros[length] = zeros
            return zeros
        out = bytearray(length)
        pos = 0
        while pos < length:
            index, within = divmod(offset + pos, _CHUNK)
            n = min(length - pos, _CHUNK - within)
            chunk = self._chunks.get(index)
            if chunk is not None:
                out[pos : pos + n] = chunk[within : within + n]
            pos += n
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            index, within = divmod(offset + pos, _CHUNK)
            n = min(len(data) - pos, _CHUNK - within)
            piece = data[pos : pos + n]
            chunk = self._chunks.get(index)
            if chunk is None:
                if not any(piece):
                    pos += n
                    continue  # zeros over zeros: stay sparse
                chunk = self._chunks[index] = bytearray(_CHUNK)
            chunk[within : within + n] = piece
            pos += n

    def flush(self) -> None:
        """Nothing to do: memory is the medium."""


@define(eq=False)
class BufferStore:
    """A caller's writable buffer (bytearray or mmap) as the medium."""

    buffer: memoryview
    mapping: mmap.mmap | None = None

    @property
    def size(self) -> int:
        return len(self.buffer)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.buffer[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self.buffer[offset : offset + len(data)] = data

    def flush(self) -> None:
        if self.mapping is not None:
            self.mapping.flush()


def open_store(
    backing: bytearray | str | os.PathLike[str] | None, size: int | None
) -> SparseStore | BufferStore:
    """The store for an `Nvme(backing=..., size=...)`."""
    if backing is None:
        return SparseStore(size if size is not None else 64 << 20)
    if isinstance(backing, bytearray):
        store = BufferStore(memoryview(backing))
    else:
        try:
            with open(backing, "r+b") as file:
                length = os.fstat(file.fileno()).st_size
                if length == 0:
                    raise InvalidArgument(f"nvme backing file {backing!r} is empty")
                mapping = mmap.mmap(file.fileno(), length)
        except OSError as exc:
            raise InvalidArgument(f"cannot open nvme backing file {backing!r}: {exc}") from exc
        store = BufferStore(memoryview(mapping), mapping)
    if size is not None and size != store.size:
        raise InvalidArgument(f"nvme size={size} differs from its backing's {store.size} bytes")
    return store
