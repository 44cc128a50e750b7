"""Device regions (PCI BARs, ROM, config space) and exact-width register access.

Register accessors are synchronous: a register access is one CPU load or
store through an mmap, or one pread/pwrite of exactly that width on a
trapped region. Bounds, alignment and value range are checked before any
syscall. Where the region offers mmap (the MMAP flag, or sparse areas), the
mapped parts are accessed through typed memoryviews (one aligned load or
store of the exact width); everything else goes through pread/pwrite.
"""

from __future__ import annotations

import ctypes
import mmap
import types
from collections.abc import Callable
from typing import TYPE_CHECKING

from attrs import define, field, frozen

from . import _fork, _ki, _log, errors
from ._resource import Resource
from ._uapi import caps
from ._uapi import vfio as uapi
from ._util import kcall

if TYPE_CHECKING:
    from .kernel import Kernel

__all__ = ["Region", "MappedRegion", "RegionInfo", "query_region_info"]


@frozen
class RegionInfo:
    """What VFIO_DEVICE_GET_REGION_INFO says about one region."""

    index: int
    flags: uapi.RegionFlag
    size: int
    #: where the region starts in the device fd (for pread/pwrite/mmap)
    offset: int
    #: (offset, size) areas that may be mmap'd; the whole region when MMAP
    #: is set without a sparse-mmap capability
    mmap_areas: tuple[tuple[int, int], ...] = ()
    #: (type, subtype) from the region-type capability, None without one
    type: tuple[int, int] | None = None
    #: the MSI-X table in this BAR may be mmap'd (MSIX_MAPPABLE capability)
    msix_mappable: bool = False

    @property
    def readable(self) -> bool:
        return bool(self.flags & uapi.RegionFlag.READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & uapi.RegionFlag.WRITE)

    @property
    def mappable(self) -> bool:
        return bool(self.flags & uapi.RegionFlag.MMAP) and bool(self.mmap_areas)

    def __repr__(self) -> str:
        names = [f.name for f in uapi.RegionFlag if f & self.flags and f.name]
        areas = ", ".join(f"{o:#x}+{s:#x}" for o, s in self.mmap_areas)
        extra = f" mmap=[{areas}]" if areas else ""
        if self.type is not None:
            extra += f" type={self.type[0]:#x}/{self.type[1]:#x}"
        if self.msix_mappable:
            extra += " msix-mappable"
        return (
            f"RegionInfo(index={self.index}, size={self.size:#x}, "
            f"flags={'|'.join(names) or '0'}{extra})"
        )


def query_region_info(kernel: Kernel, fd: int, index: int, target: str) -> RegionInfo:
    """VFIO_DEVICE_GET_REGION_INFO with the two-call dance for capability chains."""
    head = ctypes.sizeof(uapi.vfio_region_info)
    buf = bytearray(uapi.vfio_region_info(argsz=head, index=index))
    op = "VFIO_DEVICE_GET_REGION_INFO"
    kcall(op, f"{target} region {index}", kernel.device_get_region_info, fd, buf)
    need = uapi.vfio_region_info.from_buffer_copy(buf).argsz
    if need > head:
        buf = bytearray(uapi.vfio_region_info(argsz=need, index=index)) + bytes(need - head)
        kcall(op, f"{target} region {index}", kernel.device_get_region_info, fd, buf)
    info = uapi.vfio_region_info.from_buffer_copy(buf)
    flags = uapi.RegionFlag(info.flags & 0xF)
    areas: tuple[tuple[int, int], ...] = ()
    rtype: tuple[int, int] | None = None
    msix = False
    if flags & uapi.RegionFlag.MMAP:
        areas = ((0, int(info.size)),)
    if flags & uapi.RegionFlag.CAPS and info.cap_offset:
        for cap in caps.walk(buf, info.cap_offset, start=head):
            if cap.id == uapi.RegionCap.SPARSE_MMAP:
                areas = tuple(caps.sparse_mmap_areas(cap))
            elif cap.id == uapi.RegionCap.TYPE:
                rtype = caps.region_type(cap)
            elif cap.id == uapi.RegionCap.MSIX_MAPPABLE:
                msix = True
    return RegionInfo(
        index=index,
        flags=flags,
        size=int(info.size),
        offset=int(info.offset),
        mmap_areas=tuple((int(o), int(s)) for o, s in areas if s),
        type=rtype,
        msix_mappable=msix,
    )


#: exclusive upper bound of a value of each access width
_LIMIT = {1: 1 << 8, 2: 1 << 16, 4: 1 << 32, 8: 1 << 64}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@define(eq=False, repr=False)
class _Area:
    """One mmap'd part of a region, with typed views for each width."""

    start: int
    end: int
    mm: mmap.mmap
    views: dict[int, memoryview[int]]

    def release(self) -> None:
        for v in self.views.values():
            v.release()
        self.views.clear()
        try:
            self.mm.close()
        except BufferError:  # a caller still holds a view from read()/`mapped`
            _log.logger.warning("region.mmap_still_referenced", start=hex(self.start))

    def drop_in_child(self) -> None:
        """In a forked child: unmap the child's copy (no log: a parent thread may hold
        its lock); one still exported gets zero pages instead of the device's BAR."""
        for v in self.views.values():
            v.release()
        self.views.clear()
        try:
            self.mm.close()
        except BufferError:
            _fork.wipe_in_child(_fork.address_of(self.mm), len(self.mm))


@define(eq=False, repr=False, slots=False)
class Region(Resource):
    """One region of an open device: `device.bar(0)`, `device.config`.

    `read8`..`read64` and `write8`..`write64` access exactly that width at a
    naturally aligned offset; `read` and `write` move bulk bytes. Created open
    by its device (which keeps its fd open until its regions are closed).
    """

    info: RegionInfo
    _kernel: Kernel = field(alias="kernel")
    _fd: int = field(alias="fd")
    #: "device 0000:00:04.0 BAR0", for messages
    _label: str = field(alias="label")
    _areas: list[_Area] = field(factory=list, init=False)
    # MappedRegion's fast path: when one area covers the whole region, its typed views.
    _v8: memoryview[int] | None = field(default=None, init=False)
    _v16: memoryview[int] | None = field(default=None, init=False)
    _v32: memoryview[int] | None = field(default=None, init=False)
    _v64: memoryview[int] | None = field(default=None, init=False)
    # The same views for writes, only when the region is writable.
    _w8: memoryview[int] | None = field(default=None, init=False)
    _w16: memoryview[int] | None = field(default=None, init=False)
    _w32: memoryview[int] | None = field(default=None, init=False)
    _w64: memoryview[int] | None = field(default=None, init=False)
    _base: int = field(default=0, init=False)
    _closed: bool = field(default=False, init=False)
    # The info's size and READ/WRITE flags as plain values: the trapped path tests
    # them on every access, and an IntFlag `&` is a Python-level call.
    _size: int = field(default=0, init=False)
    _readable: bool = field(default=False, init=False)
    _writable: bool = field(default=False, init=False)
    #: config space is always pread/pwrite, whatever the flags say
    mmap_allowed = True

    def __attrs_post_init__(self) -> None:
        self._base = self.info.offset
        self._size = self.info.size
        self._readable = self.info.readable
        self._writable = self.info.writable

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("mmap" if self._v32 is not None else "trapped")
        if self._areas and self._v32 is None and not self._closed:
            state = "sparse mmap"
        return f"<Region {self.label} size={self.info.size:#x} {state}>"

    # --- description ---------------------------------------------------------------

    @property
    def label(self) -> str:
        return self._label

    @property
    def index(self) -> int:
        return self.info.index

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def flags(self) -> uapi.RegionFlag:
        return self.info.flags

    @property
    def mappable(self) -> bool:
        return self.info.mappable

    @property
    def mapped(self) -> bool:
        """Whether accesses go through an mmap (whole region) rather than the kernel."""
        return self._v32 is not None

    # --- set-up and tear-down ----------------------------------------------------------

    def open(self) -> None:
        """Register with the device and mmap what the region offers (done by `Device.bar`)."""
        self._open_now()
        if self.mmap_allowed:
            self.map()

    def map(self) -> None:
        """mmap every area the region offers."""
        if not self.info.mappable:
            return
        writable = self.info.writable
        try:
            for off, size in self.info.mmap_areas:
                try:
                    mm = self._kernel.mmap(self._fd, size, self._base + off, writable=writable)
                except OSError as exc:
                    where = f"{self.label} area {off:#x}+{size:#x}"
                    raise errors.from_oserror(exc, "mmap", where) from exc
                raw = memoryview(mm)
                views = {1: raw.cast("B"), 2: raw.cast("H"), 4: raw.cast("I"), 8: raw.cast("Q")}
                raw.release()
                self._areas.append(_Area(off, off + size, mm, views))
        except BaseException:
            self.close()
            raise
        if (
            len(self._areas) == 1
            and self._areas[0].start == 0
            and self._areas[0].end == self.info.size
        ):
            v = self._areas[0].views
            self._v8, self._v16, self._v32, self._v64 = v.get(1), v.get(2), v.get(4), v.get(8)
            if writable:
                self._w8, self._w16, self._w32, self._w64 = (
                    self._v8,
                    self._v16,
                    self._v32,
                    self._v64,
                )

    async def _release(self) -> None:
        self._unmap_all()

    def _release_on_gc(self) -> None:
        self._unmap_all()

    def close(self) -> None:
        """Unmap now; later accesses raise ClosedResourceError. A second call does nothing."""
        if self.closed:
            return
        self._state = self._state.CLOSING
        try:
            self._unmap_all()
        finally:
            self._finish_close()

    def _forget_after_fork(self) -> None:
        super()._forget_after_fork()
        self._closed = True
        self._v8 = self._v16 = self._v32 = self._v64 = None
        self._w8 = self._w16 = self._w32 = self._w64 = None
        areas, self._areas = self._areas, []
        for area in areas:
            area.drop_in_child()

    def _unmap_all(self) -> None:
        self._closed = True
        self._v8 = self._v16 = self._v32 = self._v64 = None
        self._w8 = self._w16 = self._w32 = self._w64 = None
        areas, self._areas = self._areas, []
        for area in areas:
            area.release()

    # --- errors --------------------------------------------------------------------

    def _bad(self, offset: object, width: int, what: str) -> errors.VfioError:
        if self._closed:
            return errors.ClosedResourceError(f"{self.label} is closed (its device was closed)")
        if not isinstance(offset, int) or isinstance(offset, bool):
            return errors.InvalidArgument(
                f"{what} on {self.label}: offset {offset!r} is not an int"
            )
        if offset < 0 or offset + width > self.info.size:
            return errors.RegionAccessError(
                f"{what} at {offset:#x} is outside {self.label} (size {self.info.size:#x}); "
                f"offsets run from 0 to {self.info.size - width:#x} for {width}-byte access"
            )
        if offset % width:
            return errors.AlignmentError(
                f"{what} at {offset:#x} on {self.label} is not {width}-byte aligned"
            )
        if not self.info.readable and what.startswith("read"):
            return errors.RegionAccessError(f"{self.label} is not readable")
        if not self.info.writable and what.startswith("write"):
            return errors.RegionAccessError(f"{self.label} is not writable")
        return errors.RegionAccessError(f"{what} at {offset:#x} on {self.label} failed")

    def _bad_store(self, offset: object, width: int, value: object) -> errors.VfioError:
        """Why a write was refused: the offset's fault first, then the value's."""
        err = self._bad(offset, width, f"write{width * 8}")
        if isinstance(err, errors.RegionAccessError) and "failed" in str(err):
            assert isinstance(offset, int)
            return self._bad_value(value, width, offset)
        return err

    def _bad_value(self, value: object, width: int, offset: int) -> errors.VfioError:
        return errors.InvalidArgument(
            f"write{width * 8} of {value!r} at {offset:#x} on {self.label}: the value must be "
            f"an int in [0, {(1 << (width * 8)) - 1:#x}]"
        )

    # --- the slow path: areas and the kernel -----------------------------------------------

    def _load(self, offset: int, width: int) -> int:
        for area in self._areas:
            if area.start <= offset and offset + width <= area.end:
                return int(area.views[width][(offset - area.start) // width])
        if not self._readable:
            raise self._bad(offset, width, f"read{width * 8}")
        try:
            data = self._kernel.pread(self._fd, width, self._base + offset)
        except OSError as exc:
            raise errors.from_oserror(exc, "pread", f"{self.label} at {offset:#x}") from exc
        return int.from_bytes(data, "little")

    def _store(self, offset: int, width: int, value: int) -> None:
        if not self._writable:
            raise self._bad(offset, width, f"write{width * 8}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad_value(value, width, offset)
        try:
            data = value.to_bytes(width, "little")
        except OverflowError:
            raise self._bad_value(value, width, offset) from None
        for area in self._areas:
            if area.start <= offset and offset + width <= area.end:
                area.views[width][(offset - area.start) // width] = value
                return
        try:
            self._kernel.pwrite(self._fd, data, self._base + offset)
        except OSError as exc:
            raise errors.from_oserror(exc, "pwrite", f"{self.label} at {offset:#x}") from exc

    # --- exact-width accessors (hot path) ---------------------------------------------------

    def read8(self, offset: int) -> int:
        return self._trapped_load(offset, 1, "read8")

    def read16(self, offset: int) -> int:
        return self._trapped_load(offset, 2, "read16")

    def read32(self, offset: int) -> int:
        # _trapped_load inline, as write32: a status register is the hottest read.
        if (
            offset.__class__ is int
            and 0 <= offset <= self._size - 4
            and not offset & 3
            and self._readable
            and not self._areas
            and not self._closed
        ):
            try:
                data = self._kernel.pread(self._fd, 4, self._base + offset)
            except OSError as exc:
                raise errors.from_oserror(exc, "pread", f"{self.label} at {offset:#x}") from exc
            return int.from_bytes(data, "little")
        return self._checked_load(offset, 4, "read32")

    def read64(self, offset: int) -> int:
        return self._trapped_load(offset, 8, "read64")

    def write8(self, offset: int, value: int) -> None:
        self._trapped_store(offset, 1, value, "write8")

    def write16(self, offset: int, value: int) -> None:
        self._trapped_store(offset, 2, value, "write16")

    def write32(self, offset: int, value: int) -> None:
        # _trapped_store inline: a doorbell is the hottest register write.
        if (
            offset.__class__ is int
            and value.__class__ is int
            and 0 <= offset <= self._size - 4
            and not offset & 3
            and 0 <= value <= 0xFFFF_FFFF
            and self._writable
            and not self._areas
            and not self._closed
        ):
            try:
                self._kernel.pwrite(self._fd, value.to_bytes(4, "little"), self._base + offset)
            except OSError as exc:
                raise errors.from_oserror(exc, "pwrite", f"{self.label} at {offset:#x}") from exc
            return
        self._checked_store(offset, 4, value, "write32")

    def write64(self, offset: int, value: int) -> None:
        self._trapped_store(offset, 8, value, "write64")

    def writer32(self, offset: int) -> Callable[[int], None]:
        """`write32` at a fixed `offset`, the offset checked once: a doorbell's writer.

        The offset is checked now, as `write32` checks it (same errors); each call
        checks only the value and that the region is still open, then does one
        store through the mmap or one pwrite. A refused call goes through
        `write32`, which explains. About half of `write32`'s Python steps, on the
        hottest register write a driver makes.
        """
        self._checked_offset(offset, 4, "write32")
        if not self._writable:
            raise self._bad(offset, 4, "write32")
        if type(self).write32 is not Region.write32:
            # a subclass adds to write32 (ConfigSpace's COMMAND hook): every call takes it
            write32 = self.write32

            def write(value: int) -> None:
                write32(offset, value)

            return write
        for area in self._areas:
            if area.start <= offset and offset + 4 <= area.end:
                return _mapped_writer32(self, area.views[4], (offset - area.start) >> 2, offset)
        return _trapped_writer32(self, offset)

    def _checked_offset(self, offset: object, width: int, what: str) -> None:
        if not (
            isinstance(offset, int)
            and offset is not True
            and offset is not False
            and 0 <= offset <= self._size - width
            and not offset % width
            and not self._closed
        ):
            raise self._bad(offset, width, what)

    def _trapped_load(self, offset: int, width: int, what: str) -> int:
        """One pread of `width` bytes; mmap'd areas, odd types and errors go the slow way."""
        if (
            offset.__class__ is int
            and 0 <= offset <= self._size - width
            and not offset % width
            and self._readable
            and not self._areas
            and not self._closed
        ):
            try:
                data = self._kernel.pread(self._fd, width, self._base + offset)
            except OSError as exc:
                raise errors.from_oserror(exc, "pread", f"{self.label} at {offset:#x}") from exc
            return int.from_bytes(data, "little")
        return self._checked_load(offset, width, what)

    def _trapped_store(self, offset: int, width: int, value: int, what: str) -> None:
        """One pwrite of `width` bytes; mmap'd areas, odd types and errors go the slow way."""
        if (
            offset.__class__ is int
            and value.__class__ is int
            and 0 <= offset <= self._size - width
            and not offset % width
            and 0 <= value < _LIMIT[width]
            and self._writable
            and not self._areas
            and not self._closed
        ):
            try:
                self._kernel.pwrite(self._fd, value.to_bytes(width, "little"), self._base + offset)
            except OSError as exc:
                raise errors.from_oserror(exc, "pwrite", f"{self.label} at {offset:#x}") from exc
            return
        self._checked_store(offset, width, value, what)

    def _checked_load(self, offset: int, width: int, what: str) -> int:
        if not (
            isinstance(offset, int)
            and offset is not True
            and offset is not False
            and 0 <= offset <= self._size - width
            and not offset % width
            and not self._closed
        ):
            raise self._bad(offset, width, what)
        return self._load(offset, width)

    def _checked_store(self, offset: int, width: int, value: int, what: str) -> None:
        if not (
            isinstance(offset, int)
            and offset is not True
            and offset is not False
            and 0 <= offset <= self._size - width
            and not offset % width
            and not self._closed
        ):
            raise self._bad(offset, width, what)
        self._store(offset, width, value)

    # --- bulk ----------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (for RAM-like areas; registers want readN)."""
        self._check_span(offset, length, "read")
        if not self.info.readable:
            raise errors.RegionAccessError(f"{self.label} is not readable")
        for area in self._areas:
            if area.start <= offset and offset + length <= area.end:
                return bytes(area.views[1][offset - area.start : offset - area.start + length])
        if length == 0:
            return b""
        try:
            return self._kernel.pread(self._fd, length, self._base + offset)
        except OSError as exc:
            raise errors.from_oserror(exc, "pread", f"{self.label} at {offset:#x}") from exc

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at `offset` (for RAM-like areas; registers want writeN)."""
        try:  # a buffer only: bytes(5) would be five zeros, bytes([300]) a ValueError
            payload = memoryview(data).tobytes()
        except TypeError:
            raise errors.InvalidArgument(
                f"write on {self.label}: data must be bytes-like, not {type(data).__name__}"
            ) from None
        except ValueError as exc:  # a released memoryview, a closed mmap
            raise errors.UsageError(
                f"write on {self.label}: the data buffer was released or closed ({exc})"
            ) from None
        self._check_span(offset, len(payload), "write")
        if not self.info.writable:
            raise errors.RegionAccessError(f"{self.label} is not writable")
        if not payload:
            return
        for area in self._areas:
            if area.start <= offset and offset + len(payload) <= area.end:
                area.views[1][offset - area.start : offset - area.start + len(payload)] = payload
                return
        try:
            self._kernel.pwrite(self._fd, payload, self._base + offset)
        except OSError as exc:
            raise errors.from_oserror(exc, "pwrite", f"{self.label} at {offset:#x}") from exc

    def _check_span(self, offset: int, length: int, what: str) -> None:
        if self._closed:
            raise errors.ClosedResourceError(f"{self.label} is closed (its device was closed)")
        if not (_is_int(offset) and _is_int(length)):
            raise errors.InvalidArgument(f"{what} on {self.label}: offset and length must be ints")
        if length < 0 or offset < 0 or offset + length > self.info.size:
            raise errors.RegionAccessError(
                f"{what} of {length:#x} bytes at {offset:#x} is outside {self.label} "
                f"(size {self.info.size:#x})"
            )


@define(eq=False, repr=False)
class MappedRegion(Region):
    """A region mmap'd whole: each access is one typed memoryview load or store.

    The checks ride on the memoryview's own: a happy access costs one
    alignment test, one sign test (small-int operations: a single AND with a
    63-bit mask measured 25% more instructions) and one index; anything else
    falls through to `Region._bad`, which says precisely what was wrong.
    """

    def read8(self, offset: int) -> int:
        try:
            if offset >= 0 and offset is not True and offset is not False:
                return self._v8[offset]  # type: ignore[index]
        except (IndexError, ValueError, TypeError):
            pass
        raise self._bad(offset, 1, "read8")

    def read16(self, offset: int) -> int:
        try:
            if not offset & 1 and offset >= 0 and offset is not False:
                return self._v16[offset >> 1]  # type: ignore[index]
        except (IndexError, ValueError, TypeError):
            pass
        raise self._bad(offset, 2, "read16")

    def read32(self, offset: int) -> int:
        try:
            if not offset & 3 and offset >= 0 and offset is not False:
                return self._v32[offset >> 2]  # type: ignore[index]
        except (IndexError, ValueError, TypeError):
            pass
        raise self._bad(offset, 4, "read32")

    def read64(self, offset: int) -> int:
        try:
            if not offset & 7 and offset >= 0 and offset is not False:
                return self._v64[offset >> 3]  # type: ignore[index]
        except (IndexError, ValueError, TypeError):
            pass
        raise self._bad(offset, 8, "read64")

    def write8(self, offset: int, value: int) -> None:
        try:
            if (
                offset >= 0
                and offset is not True
                and offset is not False
                and value is not True
                and value is not False
            ):
                self._w8[offset] = value  # type: ignore[index]
                return
        except (IndexError, ValueError, TypeError):
            pass
        raise self._bad_store(offset, 1, value)

    def write16(self, offset: int, value: int) -> None:
        try:
            if (
                not offset & 1
                and offset >= 0
                and offset is not False
                and value is not True
                and value is not False
            ):
                self._w16[offset >> 1] = value  # type: ignore[index]
                return
        except (IndexError, ValueError, TypeError):
            pass
        raise self._bad_store(offset, 2, value)

    def write32(self, offset: int, value: int) -> None:
        try:
            if (
                not offset & 3
                and offset >= 0
                and offset is not False
                and value is not True
                and value is not False
            ):
                self._w32[offset >> 2] = value  # type: ignore[index]
                return
        except (IndexError, ValueError, TypeError):
            pass
        raise self._bad_store(offset, 4, value)

    def writer32(self, offset: int) -> Callable[[int], None]:
        self._checked_offset(offset, 4, "write32")
        if self._w32 is None:
            raise self._bad(offset, 4, "write32")
        return _mapped_writer32(self, self._w32, offset >> 2, offset)

    def write64(self, offset: int, value: int) -> None:
        try:
            if (
                not offset & 7
                and offset >= 0
                and offset is not False
                and value is not True
                and value is not False
            ):
                self._w64[offset >> 3] = value  # type: ignore[index]
                return
        except (IndexError, ValueError, TypeError):
            pass
        raise self._bad_store(offset, 8, value)


def _trapped_writer32(region: Region, offset: int) -> Callable[[int], None]:
    """`Region.writer32` for an offset the kernel traps: one pwrite per call."""
    kernel, fd, position = region._kernel, region._fd, region._base + offset

    def write32(value: int) -> None:
        if value.__class__ is int and 0 <= value <= 0xFFFF_FFFF and not region._closed:
            try:
                kernel.pwrite(fd, value.to_bytes(4, "little"), position)
            except OSError as exc:
                raise errors.from_oserror(exc, "pwrite", f"{region.label} at {offset:#x}") from exc
            return
        region.write32(offset, value)  # refused: write32 explains

    return write32


def _mapped_writer32(
    region: Region, view: memoryview[int], index: int, offset: int
) -> Callable[[int], None]:
    """`Region.writer32` for an offset inside an mmap'd area: one typed store per call."""

    def write32(value: int) -> None:
        if value.__class__ is int and not region._closed:
            try:
                view[index] = value
            except ValueError:  # out of range for "I"
                pass
            else:
                return
        region.write32(offset, value)  # refused: write32 explains

    return write32


def _protect_inner(factory: Callable[..., object]) -> None:
    """KI-protect the function `factory` makes (its code object), as write32 is."""
    code = next(c for c in factory.__code__.co_consts if isinstance(c, types.CodeType))
    cells = tuple(types.CellType() for _ in code.co_freevars)
    _ki.protect(types.FunctionType(code, globals(), code.co_name, None, cells))


_ki.protect_module(__name__)
_protect_inner(_trapped_writer32)
_protect_inner(_mapped_writer32)
