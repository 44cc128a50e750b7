"""Where a test's devices live: the simulated machine, or the real kernel.

A test written against a `Target` runs unchanged on both: on the host the
target is a fresh `aiovfio.sim.Machine` with an edu and an nvme device; inside
the aiovfio QEMU guest (`AIOVFIO_GUEST=1`) it is Linux itself with QEMU's edu
and nvme bound to vfio-pci. `leaks()` means the same on both: what the test
left open, mapped or enabled ([] when clean); on Linux it compares the
process's open fds with those at the start, on the sim it asks the machine.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from attrs import define, field

from ..kernel import Kernel, LinuxKernel

if TYPE_CHECKING:
    from ..sim import Machine

__all__ = ["Target", "sim_target", "real_target", "in_guest", "open_fds", "SIM_EDU", "SIM_NVME"]

SIM_EDU = "0000:00:04.0"
SIM_NVME = "0000:00:05.0"


_VFIO = ("/dev/vfio", "/dev/iommu", "anon_inode:[vfio-device]", "anon_inode:vfio")


def in_guest() -> bool:
    """Whether this process runs inside the aiovfio QEMU guest."""
    return os.environ.get("AIOVFIO_GUEST") == "1"


def open_fds() -> set[int]:
    """The process's open file descriptors."""
    return {int(n) for n in os.listdir("/proc/self/fd")}


@define(eq=False)
class Target:
    """A kernel, the PCI addresses of its edu and nvme devices, and a leak check."""

    kernel: Kernel
    edu: str
    nvme: str | None
    machine: Machine | None = None
    _fds_at_start: set[int] = field(factory=open_fds, repr=False)

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

    def close(self) -> None:
        if self.machine is not None:
            self.machine.close()


def sim_target(**machine_options: object) -> Target:
    """A fresh simulated machine with edu at 00:04.0 and nvme at 00:05.0, own groups."""
    from ..sim import Machine
    from ..sim.models import Edu, Nvme

    machine = Machine(**machine_options)  # type: ignore[arg-type]
    machine.add_device(Edu(), name=SIM_EDU)
    machine.add_device(Nvme(), name=SIM_NVME)
    return Target(machine.kernel, SIM_EDU, SIM_NVME, machine)


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
