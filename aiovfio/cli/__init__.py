"""The `aiovfio` command line and its helpers (sysfs reading, binding, doctor, console).

`main` is the entry point (`aiovfio`, `python -m aiovfio`). Nothing in the
public layer imports this package: it sits on top, beside `aiovfio.testing`.
"""

from __future__ import annotations

from .main import main

__all__ = ["main"]
