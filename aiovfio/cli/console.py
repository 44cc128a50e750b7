"""Plain-text output for the command line: aligned tables, sizes, one-line errors."""

from __future__ import annotations

import errno
from collections.abc import Sequence

from ..errors import VfioError

__all__ = ["human_size", "one_line", "table"]


def one_line(exc: BaseException) -> str:
    """What went wrong and what to do, on one line."""
    if isinstance(exc, VfioError) or not isinstance(exc, OSError):
        text = str(exc)
    else:
        where = f": {exc.filename}" if exc.filename else ""
        text = f"{exc.strerror or exc}{where}"
        if exc.errno in (errno.EACCES, errno.EPERM):
            text += "; run it as root (sudo), or see `aiovfio doctor`"
        elif exc.errno == errno.EBUSY:
            text += "; another process holds it"
        elif exc.errno == errno.ENOENT:
            text += "; see `aiovfio doctor`"
    return " ".join(text.split())


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, indent: str = "") -> str:
    """Left-aligned columns separated by two spaces; no trailing blanks."""
    cells = [[str(h) for h in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        text = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        lines.append(indent + text.rstrip())
    return "\n".join(lines)


def human_size(size: int) -> str:
    """1048576 -> '1 MiB', 16384 -> '16 KiB', 4095 -> '4095 B'."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.1f} {unit}"
    return f"{size} B"
