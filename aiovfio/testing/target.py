"""Where a test's devices live: the simulated machine, or the real kernel.

A test written against a `Target` runs unchanged on both: on the host the
target is a fresh `aiovfio.sim.Machine` with an edu and an nvme device; inside
the aiovfio QEMU guest (`AIOVFIO_GUEST=1`) it is Linux itself with QEMU's edu
and nvme bound to vfio-pci.

* `open(name)`: an opened `aiovfio.Device`, as `async with target.open("edu")
  as dev:` or `dev = await target.open("edu")` (the target closes it after
  the test, inside the test's event loop, before the leak check).
* `leaks()`: what the test left open, mapped or enabled ([] when clean); on
  Linux it compares the process's VFIO fds with those at the start, on the
  sim it asks the machine.
* `faults()`: the sim's faults nobody declared; `expect_faults(kind, ...)`
  declares some for a block (a no-op on the real kernel, which cannot tell).
* `linux`: the kernel personality ("6.12" or "6.1"): the machine's, or the
  booted kernel's in the guest.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from attrs import define, field

from ..errors import InvalidArgument
from ..kernel import Kernel, LinuxKernel

if TYPE_CHECKING:
    from ..device import Device
    from ..sim import FaultRecord, Machine

__all__ = [
    "SIM_EDU",
    "SIM_NVME",
    "SIM_OPTIONS",
    "Target",
    "in_guest",
    "open_fds",
    "real_target",
    "sim_target",
]

SIM_EDU = "0000:00:04.0"
SIM_NVME = "0000:00:05.0"

#: Machine options a test may set with @pytest.mark.sim(...), besides `group_peers`.
SIM_OPTIONS = frozenset(
    {"clock", "memlock_limit", "linux", "page_size", "dma_entry_limit", "iova_ranges", "io_width"}
)

_VFIO = ("/dev/vfio", "/dev/iommu", "anon_inode:[vfio-device]", "anon_inode:vfio")


def in_guest() -> bool:
    """Whether this process runs inside the aiovfio QEMU guest."""
    return os.environ.get("AIOVFIO_GUEST") == "1"


def open_fds() -> set[int]:
    """The process's open file descriptors."""
    return {int(n) for n in os.listdir("/proc/self/fd")}


class _Opening:
    """`target.open(name)`: awaitable (the target owns the device) or an async CM."""

    def __init__(self, target: Target, name: str) -> None:
        self._target = target
        self._name = name
        self._cm: contextlib.AbstractAsyncContextManager[Device] | None = None

    def _open(self) -> contextlib.AbstractAsyncContextManager[Device]:
        from .._open import open_device

        return open_device(self._target.resolve(self._name), kernel=self._target.kernel)

    def __await__(self) -> Generator[Any, None, Device]:
        return self._target._enter(self._open()).__await__()

    async def __aenter__(self) -> Device:
        self._cm = self._open()
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc: object) -> bool | None:
        assert self._cm is not None
        return await self._cm.__aexit__(*exc)  # type: ignore[arg-type]


@define(eq=False)
class Target:
    """A kernel, the PCI addresses of its edu and nvme devices, and the test's checks."""

    kernel: Kernel
    edu: str
    nvme: str | None
    machine: Machine | None = None
    _fds_at_start: set[int] = field(factory=open_fds, repr=False)
    _owned: contextlib.AsyncExitStack | None = field(default=None, repr=False)
    #: how many of faults() the pytest plugin has reported already
    faults_reported: int = field(default=0, repr=False)

    @property
    def real(self) -> bool:
        return self.machine is None

    @property
    def linux(self) -> str:
        """The kernel personality this target behaves as ("6.12" or "6.1").

        On the sim the machine's; in the guest the booted kernel's
        (AIOVFIO_VM_KERNEL, else `uname -r`), so a kernel-marked test body can
        expect what that kernel does: `Personality.of(target.linux)`.
        """
        from ..sim.rules import personality_name

        if self.machine is not None:
            return self.machine.linux
        return personality_name(os.environ.get("AIOVFIO_VM_KERNEL") or os.uname().release)

    # --- devices -------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """ "edu", "nvme" or a PCI address -> the PCI address on this target."""
        if name == "edu":
            return self.edu
        if name == "nvme":
            if self.nvme is None:
                raise InvalidArgument("this target has no nvme device (AIOVFIO_VM_NVME is empty)")
            return self.nvme
        return name

    def open(self, name: str = "edu") -> _Opening:
        """An opened device: `async with target.open("nvme") as dev` or `await target.open()`."""
        return _Opening(self, name)

    async def _enter(self, cm: contextlib.AbstractAsyncContextManager[Device]) -> Device:
        if self._owned is None:
            self._owned = contextlib.AsyncExitStack()
        return await self._owned.enter_async_context(cm)

    def owns_devices(self) -> bool:
        """Whether devices from `await target.open()` are still open (closed after the test)."""
        return self._owned is not None

    async def aclose_owned(self) -> None:
        """Close the devices `await target.open()` gave (the plugin does, after the test)."""
        owned, self._owned = self._owned, None
        if owned is not None:
            await owned.aclose()

    # --- checks --------------------------------------------------------------------------

    def leaks(self) -> list[str]:
        """What is still open, mapped or enabled since the target was made."""
        if self.machine is not None:
            return self.machine.leaks()
        out = []
        for fd in sorted(open_fds() - self._fds_at_start):
            try:
                dest = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            # VFIO's own files; an event loop's fds may come and go meanwhile.
            if dest.startswith(_VFIO):
                out.append(f"fd {fd} -> {dest}")
        if isinstance(self.kernel, LinuxKernel):
            out += [f"eventfd {fd} still open" for fd in sorted(self.kernel.open_eventfds)]
        return out

    def faults(self) -> list[FaultRecord]:
        """The sim's faults that no test declared ([] on the real kernel)."""
        return [] if self.machine is None else self.machine.faults.undeclared()

    def expect_faults(self, *kinds: str) -> contextlib.AbstractContextManager[None]:
        """Declare faults of `kinds` for a block (see `Machine.expect_faults`)."""
        if self.machine is None:
            return contextlib.nullcontext()
        return self.machine.expect_faults(*kinds)

    def close(self) -> None:
        if self.machine is not None:
            self.machine.close()


def sim_target(*, group_peers: Sequence[str | None] = (), **machine_options: object) -> Target:
    """A fresh simulated machine with edu at 00:04.0 and nvme at 00:05.0, own groups.

    `group_peers` puts more functions in edu's group (00:04.1, 00:04.2, ...),
    each bound to the driver named (None: unbound), e.g. ("e1000e",) makes the
    group not viable. Other options go to `Machine` (`SIM_OPTIONS`).
    """
    from ..sim import Machine
    from ..sim.models import Edu, Nvme

    unknown = set(machine_options) - SIM_OPTIONS
    if unknown:
        raise InvalidArgument(
            f"unknown simulated-machine option(s) {', '.join(sorted(unknown))}; "
            f"use {', '.join(sorted(SIM_OPTIONS | {'group_peers'}))}"
        )
    if isinstance(group_peers, str) or len(group_peers) > 7:
        raise InvalidArgument(
            f"group_peers is a sequence of at most 7 driver names (or None), not {group_peers!r}"
        )
    machine = Machine(**machine_options)  # type: ignore[arg-type]
    try:
        machine.add_device(Edu(), name=SIM_EDU)
        group = machine.topology.devices[SIM_EDU].group.number
        for i, driver in enumerate(group_peers, start=1):
            machine.add_device(Edu(), name=f"0000:00:04.{i}", group=group, driver=driver)
        machine.add_device(Nvme(), name=SIM_NVME)
    except BaseException:
        machine.close()
        raise
    return Target(machine.kernel, SIM_EDU, SIM_NVME, machine)


def sim_options(markers: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """The options of the test's @pytest.mark.sim markers, closest last."""
    options: dict[str, object] = {}
    for kwargs in markers:
        options.update(kwargs)
    return options


def real_target() -> Target:
    """Linux, with the devices the guest bound to vfio-pci (AIOVFIO_VM_EDU/NVME)."""
    edus = os.environ.get("AIOVFIO_VM_EDU", "").split()
    nvmes = os.environ.get("AIOVFIO_VM_NVME", "").split()
    kernel = LinuxKernel()
    if not edus:
        edus = [b for b in kernel.pci_devices() if str(kernel.pci_ids(b)) == "1234:11e8"]
    if not edus:
        raise RuntimeError("no edu device (1234:11e8) bound to vfio-pci in this guest")
    return Target(kernel, edus[0], nvmes[0] if nvmes else None)
