"""`aiovfio doctor`: is this machine ready for VFIO, and if not, what to do.

Each check reads files under `Roots` only (sysfs, /dev, /proc), so the tests
run it against a tree written by the simulated machine, and the QEMU-guest
tests against the real thing. A check never changes anything.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable
from pathlib import Path

from attrs import define, field, frozen

from .console import human_size
from .sysfs import VFIO_DRIVER, Roots, Sysfs

__all__ = ["DEFAULT_MEMLOCK", "Check", "Doctor", "Status", "VirtualMachine", "virtual_machine"]

#: What a small driver pins: queues, a few DMA buffers (override with --memlock).
DEFAULT_MEMLOCK = 64 << 20

_CAP_IPC_LOCK = 14


class Status(enum.Enum):
    OK = "ok"
    INFO = "info"
    WARN = "warn"
    FAIL = "fail"


@frozen
class Check:
    """One finding: what was checked, how it went, and how to fix it."""

    name: str
    status: Status
    summary: str
    fix: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "name": self.name,
            "status": self.status.value,
            "summary": self.summary,
            "fix": self.fix,
        }


def _read(path: os.PathLike[str] | str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@define
class Doctor:
    """Runs the checks for the whole machine, or for one function."""

    roots: Roots = field(factory=Roots)
    #: bytes of DMA memory the driver will pin, for the RLIMIT_MEMLOCK check
    memlock_need: int = DEFAULT_MEMLOCK
    sysfs: Sysfs = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.sysfs = Sysfs(self.roots)

    def run(self, address: str | None = None) -> list[Check]:
        """Every check, in the order a user fixes things."""
        checks: list[Callable[[], Check | list[Check]]] = [
            self.check_sysfs,
            self.check_machine,
            self.check_iommu,
            self.check_cmdline,
            self.check_modules,
            self.check_dev_vfio,
            self.check_memlock,
            lambda: self.check_groups(address),
            self.check_iommufd,
            self.check_noiommu,
            self.check_hugepages,
        ]
        if address is not None:
            checks.insert(8, lambda: self.check_device(address))
        out: list[Check] = []
        for check in checks:
            result = check()
            out.extend(result if isinstance(result, list) else [result])
        return out

    # --- the checks -------------------------------------------------------------

    def check_sysfs(self) -> Check:
        path = self.sysfs.pci_devices_dir
        if not path.is_dir():
            return Check(
                "sysfs",
                Status.FAIL,
                f"{path} does not exist",
                "mount sysfs (`mount -t sysfs sysfs /sys`) or fix --sysfs / AIOVFIO_SYSFS",
            )
        return Check("sysfs", Status.OK, f"{len(self.sysfs.addresses())} PCI functions")

    def check_machine(self) -> Check:
        vm = virtual_machine(self.roots)
        if vm is None:
            return Check("machine", Status.OK, "bare metal (no hypervisor flag, no VM in DMI)")
        return Check("machine", Status.INFO, f"a virtual machine: {vm.describe()}")

    def check_iommu(self) -> Check:
        units = sorted(p.name for p in _entries(self.roots.sysfs / "class" / "iommu"))
        groups = self.sysfs.groups()
        noiommu = self.sysfs.noiommu_groups()
        if groups and not units and len(noiommu) == len(groups):
            return Check(
                "iommu",
                Status.WARN,
                f"no IOMMU: {len(noiommu)} noiommu group(s) (VFIO's unsafe noiommu mode: "
                "the devices' DMA is not isolated)",
                "give the machine an IOMMU for isolation; to drive these devices anyway, "
                "pass --noiommu (`open_device(..., noiommu=True)`)",
            )
        if groups:
            where = f" ({', '.join(units)})" if units else ""
            return Check(
                "iommu",
                Status.OK,
                f"{len(units)} IOMMU unit(s){where}, {len(groups)} IOMMU groups",
            )
        summary = f"no IOMMU groups in {self.sysfs.groups_dir}" + (
            "" if units else f" and no IOMMU in {self.roots.sysfs / 'class' / 'iommu'}"
        )
        vm = virtual_machine(self.roots)
        if vm is not None:
            return Check(
                "iommu",
                Status.FAIL,
                f"{summary}: this virtual machine ({vm.name}) has no virtual IOMMU",
                "give the VM a virtual IOMMU: QEMU `-machine q35,kernel-irqchip=split "
                "-device intel-iommu,intremap=on,caching-mode=on` (libvirt: "
                "<iommu model='intel'/>), or a cloud instance type that exposes an IOMMU "
                "to its guest (a bare-metal one); the host's firmware settings "
                "do not reach a guest. Meanwhile: the simulated machine (aiovfio.sim, "
                "`aiovfio demo`, the `vfio_target` pytest fixture) runs drivers with no "
                "IOMMU, and `aiovfio vm -- CMD` runs CMD on real VFIO in a QEMU guest "
                "that has one",
            )
        return Check(
            "iommu",
            Status.FAIL,
            summary,
            "enable VT-d (Intel) or AMD-Vi/IOMMU (AMD) in the firmware, and add intel_iommu=on "
            "iommu=pt (Intel) or amd_iommu=on (AMD) to the kernel command line "
            "(GRUB_CMDLINE_LINUX in /etc/default/grub, `update-grub`, reboot); meanwhile "
            "`aiovfio vm -- CMD` runs CMD on real VFIO in a QEMU guest",
        )

    def check_cmdline(self) -> Check:
        cmdline = _read(self.roots.proc / "cmdline")
        if cmdline is None:
            return Check("cmdline", Status.INFO, f"{self.roots.proc / 'cmdline'} is unreadable")
        words = cmdline.split()
        flags = [w for w in words if re.match(r"(intel_iommu|amd_iommu|iommu)=", w)]
        off = [w for w in flags if w in ("intel_iommu=off", "amd_iommu=off", "iommu=off")]
        if off:
            return Check(
                "cmdline",
                Status.FAIL,
                f"the kernel command line turns the IOMMU off: {' '.join(off)}",
                "remove it and boot with intel_iommu=on (Intel) or amd_iommu=on (AMD)",
            )
        if flags:
            return Check("cmdline", Status.OK, " ".join(flags))
        if set(self.sysfs.groups()) - set(self.sysfs.noiommu_groups()):
            return Check(
                "cmdline", Status.OK, "no IOMMU options (the kernel enables it by default)"
            )
        if virtual_machine(self.roots) is not None:
            return Check(
                "cmdline",
                Status.INFO,
                "no intel_iommu=on or amd_iommu=on on the kernel command line",
                "once the VM has a virtual IOMMU (see the iommu check), add intel_iommu=on "
                "to the guest's kernel command line if its groups do not appear",
            )
        return Check(
            "cmdline",
            Status.WARN,
            "no intel_iommu=on or amd_iommu=on on the kernel command line",
            "add intel_iommu=on iommu=pt (Intel) or amd_iommu=on (AMD) and reboot",
        )

    def check_modules(self) -> Check:
        wanted = ("vfio", "vfio_pci", "vfio_iommu_type1")
        missing = [m for m in wanted if not self.sysfs.module_loaded(m)]
        if self.sysfs.driver_loaded(VFIO_DRIVER) and "vfio_pci" in missing:
            missing.remove("vfio_pci")  # built in without parameters
        if "vfio_iommu_type1" in missing and (self.roots.dev / "iommu").exists():
            # CONFIG_IOMMUFD_VFIO_CONTAINER: iommufd serves /dev/vfio/vfio, no type1 driver
            missing.remove("vfio_iommu_type1")
            if not missing:
                return Check(
                    "modules", Status.OK, "vfio, vfio_pci loaded; iommufd serves the container"
                )
        if not missing:
            return Check("modules", Status.OK, "vfio, vfio_pci, vfio_iommu_type1 loaded")
        return Check(
            "modules",
            Status.FAIL,
            f"not loaded: {', '.join(missing)}",
            "`modprobe vfio-pci` (it loads vfio and vfio_iommu_type1); "
            "`aiovfio bind --load` runs it",
        )

    def check_dev_vfio(self) -> Check:
        container = self.roots.dev / "vfio" / "vfio"
        if not container.exists():
            return Check(
                "dev-vfio",
                Status.FAIL,
                f"{container} does not exist",
                "`modprobe vfio-pci` creates it (needs a kernel with CONFIG_VFIO_CONTAINER)",
            )
        if not os.access(container, os.R_OK | os.W_OK):
            return Check(
                "dev-vfio",
                Status.FAIL,
                f"{container} is not readable and writable by this user",
                f"`chmod 0666 {container}` (the kernel's default)",
            )
        group_nodes = sorted(
            (
                p
                for p in _entries(self.roots.dev / "vfio")
                if p.name.removeprefix("noiommu-").isdigit()
            ),
            key=lambda p: int(p.name.removeprefix("noiommu-")),
        )
        denied = [n for n in group_nodes if not os.access(n, os.R_OK | os.W_OK)]
        if denied:
            names = " ".join(str(p) for p in denied)
            return Check(
                "dev-vfio",
                Status.WARN,
                f"no access to {names}",
                f"run as root, or `chown {_user()} {names}`; a udev rule "
                f'(SUBSYSTEM=="vfio", OWNER="{_user()}") keeps it across reboots',
            )
        groups = ", ".join(p.name for p in group_nodes) or "none"
        return Check("dev-vfio", Status.OK, f"{container} usable; group nodes: {groups}")

    def check_memlock(self) -> Check:
        need = self.memlock_need
        if _has_ipc_lock(self.roots):
            return Check("memlock", Status.OK, "CAP_IPC_LOCK: pinned memory is not limited")
        limit = _memlock_limit(self.roots)
        if limit is None:
            return Check("memlock", Status.OK, "RLIMIT_MEMLOCK is unlimited")
        if limit >= need:
            return Check(
                "memlock",
                Status.OK,
                f"RLIMIT_MEMLOCK {human_size(limit)} >= {human_size(need)} to pin",
            )
        return Check(
            "memlock",
            Status.FAIL,
            f"RLIMIT_MEMLOCK is {human_size(limit)}: mapping {human_size(need)} for DMA "
            "would fail with ENOMEM",
            "`ulimit -l unlimited` in the shell that runs the driver, a line "
            f"`{_user()} - memlock unlimited` in /etc/security/limits.conf, or "
            "LimitMEMLOCK=infinity in a systemd unit",
        )

    def check_groups(self, address: str | None) -> list[Check]:
        if not self.sysfs.pci_devices_dir.is_dir():
            return []
        if address is not None:
            function = self.sysfs.function(address)
            if function.iommu_group is None:
                return [
                    Check(
                        "group",
                        Status.FAIL,
                        f"{address} has no IOMMU group",
                        "turn the IOMMU on (see the iommu check)",
                    )
                ]
            numbers = [function.iommu_group]
        else:
            numbers = sorted(
                {
                    f.iommu_group
                    for f in self.sysfs.functions()
                    if f.driver == VFIO_DRIVER and f.iommu_group is not None
                }
            )
            if not numbers:
                return [
                    Check(
                        "groups",
                        Status.INFO,
                        "no function is bound to vfio-pci",
                        "`aiovfio bind BDF` (see `aiovfio ls`)",
                    )
                ]
        out = []
        for number in numbers:
            group = self.sysfs.group(number)
            names = ", ".join(m.address for m in group.members)
            if group.viable:
                out.append(Check(f"group {number}", Status.OK, f"viable ({names})"))
                continue
            who = ", ".join(f"{o.name} is bound to {o.driver}" for o in group.offenders)
            first = group.members[0].address if address is None else address
            each = ", ".join(f"`aiovfio bind {o.name}`" for o in group.offenders)
            out.append(
                Check(
                    f"group {number}",
                    Status.FAIL,
                    f"not viable: {who}",
                    f"`aiovfio bind --group {first}` (or one by one: {each})",
                )
            )
        return out

    def check_device(self, address: str) -> Check:
        function = self.sysfs.function(address)
        resets = self.sysfs.reset_methods(address)
        if resets:
            reset = f"opening it resets the function ({' '.join(resets)})"
        elif resets is None:
            reset = "its reset methods are unknown"
        else:
            reset = "it has no reset method, so its state survives open and close"
        if function.driver != VFIO_DRIVER:
            return Check(
                "device",
                Status.WARN,
                f"{address} is bound to {function.driver or 'no driver'}, not vfio-pci; {reset}",
                f"`aiovfio bind {address}`",
            )
        return Check("device", Status.OK, f"{address} is bound to vfio-pci; {reset}")

    def check_iommufd(self) -> Check:
        if (self.roots.dev / "iommu").exists():
            cdevs = [p.name for p in _entries(self.roots.dev / "vfio" / "devices")]
            extra = f"; device cdevs: {', '.join(cdevs)}" if cdevs else ""
            return Check("iommufd", Status.OK, f"{self.roots.dev / 'iommu'} present{extra}")
        return Check(
            "iommufd",
            Status.INFO,
            f"{self.roots.dev / 'iommu'} absent: this kernel has no iommufd (CONFIG_IOMMUFD); "
            "the legacy container is used",
        )

    def check_noiommu(self) -> Check:
        path = self.sysfs.noiommu_param
        value = _read(path)
        if value is None:
            return Check("noiommu", Status.OK, "unsafe no-IOMMU mode is not built in")
        if value.upper() in ("Y", "1"):
            return Check(
                "noiommu",
                Status.WARN,
                "unsafe no-IOMMU mode is on: devices get no DMA isolation and appear as "
                "/dev/vfio/noiommu-N (CAP_SYS_RAWIO needed)",
                f"`echo N > {path}` unless you mean it",
            )
        return Check("noiommu", Status.OK, "unsafe no-IOMMU mode is off")

    def check_hugepages(self) -> Check:
        base = self.roots.sysfs / "kernel" / "mm" / "hugepages"
        sizes = []
        total = 0
        for entry in _entries(base):
            count = int(_read(entry / "nr_hugepages") or 0)
            free = int(_read(entry / "free_hugepages") or 0)
            size = entry.name.removeprefix("hugepages-")
            sizes.append(f"{size}: {count} ({free} free)")
            total += count
        if not sizes:
            return Check("hugepages", Status.INFO, f"no hugepage sizes in {base}")
        if total:
            return Check("hugepages", Status.OK, ", ".join(sizes))
        names = [e.name for e in _entries(base)]
        size = "hugepages-2048kB" if "hugepages-2048kB" in names else names[0]
        first = base / size / "nr_hugepages"
        return Check(
            "hugepages",
            Status.INFO,
            "none reserved (optional: large DMA buffers pin fewer IOMMU entries with them)",
            f"`echo 64 > {first}`",
        )


# --- is this a virtual machine? ---------------------------------------------------

#: DMI vendor or product words that name a hypervisor (systemd-detect-virt's list, short).
_DMI_HYPERVISORS = (
    ("QEMU", "QEMU"),
    ("KVM", "KVM"),
    ("VMware", "VMware"),
    ("VirtualBox", "VirtualBox"),
    ("innotek", "VirtualBox"),
    ("Xen", "Xen"),
    ("Microsoft Corporation Virtual Machine", "Hyper-V"),
    ("Amazon EC2", "Amazon EC2"),
    ("Google Compute Engine", "Google Compute Engine"),
    ("Parallels", "Parallels"),
    ("BHYVE", "bhyve"),
    ("OpenStack", "OpenStack"),
    ("Bochs", "Bochs"),
)
_DMI_FIELDS = ("sys_vendor", "product_name", "board_vendor", "bios_vendor")


@frozen
class VirtualMachine:
    """What says this machine is virtual: the CPU's hypervisor flag and DMI strings."""

    name: str
    hypervisor_flag: bool
    dmi: str | None

    def describe(self) -> str:
        evidence = [
            *(["the CPU's hypervisor flag"] if self.hypervisor_flag else []),
            *([f"DMI {self.dmi!r}"] if self.dmi else []),
        ]
        return f"{self.name} ({', '.join(evidence)})"


def virtual_machine(roots: Roots) -> VirtualMachine | None:
    """A `VirtualMachine` when /proc/cpuinfo or DMI (or /sys/hypervisor) says so."""
    cpuinfo = _read(roots.proc / "cpuinfo") or ""
    flag = any(
        line.startswith("flags") and "hypervisor" in line.split() for line in cpuinfo.splitlines()
    )
    dmi_dir = roots.sysfs / "class" / "dmi" / "id"
    strings = [v for v in (_read(dmi_dir / f) for f in _DMI_FIELDS) if v]
    name = None
    dmi = None
    for text in strings:
        for word, hypervisor in _DMI_HYPERVISORS:
            if word.lower() in text.lower():
                name, dmi = hypervisor, text
                break
        if name:
            break
    if name is None:
        name = _read(roots.sysfs / "hypervisor" / "type")
        name = name.capitalize() if name else None
    if name is None and not flag:
        return None
    return VirtualMachine(name or "unknown hypervisor", flag, dmi)


# --- helpers ---------------------------------------------------------------------


def _entries(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError:
        return []


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (KeyError, ImportError):
        return str(os.geteuid())


def _has_ipc_lock(roots: Roots) -> bool:
    status = _read(roots.proc / "self" / "status") or ""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            try:
                return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
            except (IndexError, ValueError):
                return False
    return False


def _memlock_limit(roots: Roots) -> int | None:
    """The soft RLIMIT_MEMLOCK in bytes (None: unlimited), from /proc/self/limits."""
    limits = _read(roots.proc / "self" / "limits")
    if limits is not None:
        for line in limits.splitlines():
            if line.startswith("Max locked memory"):
                soft = line[len("Max locked memory") :].split()[0]
                return None if soft == "unlimited" else int(soft)
    import resource

    soft_limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    return None if soft_limit == resource.RLIM_INFINITY else soft_limit
