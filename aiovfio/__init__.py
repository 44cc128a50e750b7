"""aiovfio: async-native Linux user-space device drivers on VFIO.

This module only re-exports; each name lives in a module named after its job.
"""


from ._version import __version__ as __version__
from .errors import (
    AlignmentError as AlignmentError,
)
from .errors import (
    BusyResourceError as BusyResourceError,
)
from .errors import (
    ClosedResourceError as ClosedResourceError,
)
from .errors import (
    DeviceNotFound as DeviceNotFound,
)
from .errors import (
    GroupNotViable as GroupNotViable,
)
from .errors import (
    KernelError as KernelError,
)
from .errors import (
    RegionAccessError as RegionAccessError,
)
from .errors import (
    SetupError as SetupError,
)
from .errors import (
    UsageError as UsageError,
)
from .errors import (
    VfioError as VfioError,
)

__all__ = [
    "AlignmentError",
    "BusyResourceError",
    "ClosedResourceError",
    "DeviceNotFound",
    "GroupNotViable",
    "KernelError",
    "RegionAccessError",
    "SetupError",
    "UsageError",
    "VfioError",
    "__version__",
]


def _fix_module_names() -> None:
    # Tracebacks and reprs say `aiovfio.X`, not `aiovfio.errors.X` (as trio does).
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("aiovfio."):
            try:
                obj.__module__ = __name__
            except (AttributeError, TypeError):  # pragma: no cover - builtins
                pass


_fix_module_names()
del _fix_module_names
