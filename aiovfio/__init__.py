"""aiovfio: async-native Linux user-space device drivers on VFIO.

This module only re-exports; each name lives in a module named after its job.
"""

from . import errors
from ._open import ReleasePolicy as ReleasePolicy
from ._open import open_device as open_device
from ._version import __version__ as __version__
from .container import Container as Container
from .container import IommuInfo as IommuInfo
from .device import Device as Device
from .device import DeviceInfo as DeviceInfo
from .dma import DmaBuffer as DmaBuffer
from .dma import DmaMapping as DmaMapping
from .dma import DmaSpace as DmaSpace
from .errors import AlignmentError as AlignmentError
from .errors import AlreadyExists as AlreadyExists
from .errors import ApiVersionMismatch as ApiVersionMismatch
from .errors import BadAddress as BadAddress
from .errors import BusyResourceError as BusyResourceError
from .errors import CapabilityChainError as CapabilityChainError
from .errors import ClosedResourceError as ClosedResourceError
from .errors import DeviceFault as DeviceFault
from .errors import DeviceNotFound as DeviceNotFound
from .errors import DeviceReleaseRequested as DeviceReleaseRequested
from .errors import DmaSpaceExhausted as DmaSpaceExhausted
from .errors import GroupNotViable as GroupNotViable
from .errors import InvalidArgument as InvalidArgument
from .errors import InvalidRequest as InvalidRequest
from .errors import IommufdUnavailable as IommufdUnavailable
from .errors import IommuTypeUnsupported as IommuTypeUnsupported
from .errors import KernelBusy as KernelBusy
from .errors import KernelError as KernelError
from .errors import NoDeviceCdev as NoDeviceCdev
from .errors import NoiommuDmaError as NoiommuDmaError
from .errors import NoiommuRefused as NoiommuRefused
from .errors import NoiommuWarning as NoiommuWarning
from .errors import NoSpace as NoSpace
from .errors import NoSuchEntity as NoSuchEntity
from .errors import NotOffered as NotOffered
from .errors import NotSupportedByKernel as NotSupportedByKernel
from .errors import Offender as Offender
from .errors import OutOfMemory as OutOfMemory
from .errors import PermissionDenied as PermissionDenied
from .errors import RegionAccessError as RegionAccessError
from .errors import SetupError as SetupError
from .errors import UsageError as UsageError
from .errors import VfioError as VfioError
from .errors import VfioUnavailable as VfioUnavailable
from .group import Group as Group
from .irq import InterruptSet as InterruptSet
from .irq import InterruptStream as InterruptStream
from .irq import IrqInfo as IrqInfo
from .irq import IrqKind as IrqKind
from .kernel import Kernel as Kernel
from .kernel import LinuxKernel as LinuxKernel
from .pci import ConfigSpace as ConfigSpace
from .pci import PciCapability as PciCapability
from .region import Region as Region
from .region import RegionInfo as RegionInfo

__all__ = [
    "AlignmentError",
    "AlreadyExists",
    "ApiVersionMismatch",
    "BadAddress",
    "BusyResourceError",
    "CapabilityChainError",
    "ClosedResourceError",
    "ConfigSpace",
    "Container",
    "Device",
    "DeviceFault",
    "DeviceInfo",
    "DeviceNotFound",
    "DeviceReleaseRequested",
    "DmaBuffer",
    "DmaMapping",
    "DmaSpace",
    "DmaSpaceExhausted",
    "Group",
    "GroupNotViable",
    "InterruptSet",
    "InterruptStream",
    "InvalidArgument",
    "InvalidRequest",
    "IommuInfo",
    "IommuTypeUnsupported",
    "IommufdUnavailable",
    "IrqInfo",
    "IrqKind",
    "Kernel",
    "KernelBusy",
    "KernelError",
    "LinuxKernel",
    "NoDeviceCdev",
    "NoSpace",
    "NoSuchEntity",
    "NoiommuDmaError",
    "NoiommuRefused",
    "NoiommuWarning",
    "NotOffered",
    "NotSupportedByKernel",
    "Offender",
    "OutOfMemory",
    "PciCapability",
    "PermissionDenied",
    "Region",
    "RegionAccessError",
    "RegionInfo",
    "ReleasePolicy",
    "SetupError",
    "UsageError",
    "VfioError",
    "VfioUnavailable",
    "__version__",
    "open_device",
]


def _fix_module_names() -> None:
    # Tracebacks and reprs say `aiovfio.X`, not `aiovfio.device.X` (as trio does).
    for name in __all__:
        obj = globals()[name]
        if isinstance(obj, type) and obj.__module__.startswith("aiovfio."):
            obj.__module__ = __name__


_fix_module_names()
del _fix_module_names


def __getattr__(name: str) -> object:
    """The renamed errors' old names (`Unsupported`, `ResourceBusy`), with a DeprecationWarning."""
    return getattr(errors, name)
