"""Run a command on real Linux VFIO inside a throw-away QEMU guest.

    aiovfio vm [--kernel 6.1|6.12|6.12-iommufd] [--iommu intel|none] [--edu N]
               [--nvme N] [--timeout S] [--mem SIZE] [--smp N] [--rw DIR]...
               [--nvme-null] [--append ARGS] [--keep] [-v] -- CMD...
    aiovfio vm --on SETUP [options] -- CMD...
    aiovfio vm --setup [--kernel K | --on SETUP]...

The guest boots one of Debian's kernels, or "6.12-iommufd" (Debian's 6.12
source built here with iommufd, the VFIO device cdev and noiommu:
`aiovfio.testing.vm_kernel`), as an uncompressed vmlinux (PVH) under TCG
with an emulated Intel IOMMU (`--iommu none`: no IOMMU, VFIO in its unsafe
noiommu mode; 6.12-iommufd only), QEMU `edu` devices (1234:11e8, at 00:04.0
and on) and `nvme` controllers (class 0x010802, after the edu devices). Its root is
this machine's / over virtio-9p, read-only under a tmpfs overlay, so CMD runs
with this machine's programs, interpreter and venvs; the working folder and
each `--rw DIR` are shared read-write at the same path. The devices are bound
to vfio-pci, CMD runs in the working folder with the caller's environment (plus
AIOVFIO_GUEST=1, AIOVFIO_VM_KERNEL, AIOVFIO_VM_IOMMU ("intel" or "none"),
AIOVFIO_VM_EDU and AIOVFIO_VM_NVME, which list the devices' PCI addresses),
and the guest powers off.

CMD's stdout and stderr arrive on this process's stdout; stdin is never read.
Exit codes: CMD's own, or

* 124: CMD ran out of `--timeout` seconds (or the guest did not finish in time);
* 125: binding the devices to vfio-pci failed;
* 99: the guest died without reporting (kernel panic, QEMU abort);
* 2: bad usage, or the host is not set up (run `aiovfio vm --setup`).

On 124, 125 and 99 the tail of the guest's console goes to stderr. A guest
that dies before its stage starts (a TCG boot flake) is booted once more.
`--on SETUP` picks one of the five setups of the project's guest suite
(`SETUPS`: 6.1, 6.12, iommufd, iommufd-compat, noiommu): a kernel, an IOMMU,
and the environment that selects aiovfio's backend.
The same is available from Python as `run_in_guest(argv, ...)`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.resources
import lzma
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

import attrs
import structlog
from attrs import frozen

from .. import _log
from .vm_setup import (
    DEBIAN_FLAVOURS,
    FLAVOURS,
    KernelImage,
    VmSetupError,
    cache_dir,
    check_flavour,
    find_kernel,
    setup,
)

__all__ = [
    "EXIT_BIND_FAILED",
    "EXIT_GUEST_DIED",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "IOMMU_MODES",
    "SETUPS",
    "GuestSetup",
    "GuestDevice",
    "GuestResult",
    "Share",
    "Timings",
    "build_initramfs",
    "guest_devices",
    "job_script",
    "main",
    "qemu_command",
    "run_in_guest",
]

#: CMD did not finish within its timeout.
EXIT_TIMEOUT = 124
#: The devices could not be bound to vfio-pci.
EXIT_BIND_FAILED = 125
#: The guest stopped without reporting an exit code.
EXIT_GUEST_DIED = 99
#: Bad usage or a host that is not set up.
EXIT_USAGE = 2

#: Bytes in each emulated nvme namespace.
NVME_DISK_SIZE = 1 << 30
_DEFAULT_MEM = "2G"
#: Boots tried when a guest dies before its stage starts (a TCG boot flake).
BOOT_ATTEMPTS = 2
#: Seconds the host waits beyond the command's timeout (boot, bind, power-off).
BOOT_ALLOWANCE = 60.0
#: Lines of the guest console kept in a result.
CONSOLE_LINES = 60
_MAX_DEVICES = 16
_MAX_SHARES = 8
_FIRST_DEVICE_SLOT = 4
_LAST_SLOT = 0x1E  # 00:1f is the q35 chipset's

#: Kernel modules the initramfs loads to mount its root (dependencies added).
_INIT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
#: The guest kernel's command line (before the caller's additions).
# no_timer_check: under TCG on a loaded host the IO-APIC timer check can fail,
# and with interrupt remapping that is a panic at boot.
_KERNEL_ARGS = (
    "no_timer_check",
    "console=ttyS0",
    "loglevel=4",
    "rdinit=/init",
    "panic=-1",
)
#: What each `--iommu` adds: QEMU arguments, kernel command-line words.
IOMMU_MODES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # the IOMMU comes before the PCI devices it translates for
    "intel": (
        ("-device", "intel-iommu,intremap=on,caching-mode=on"),
        ("intel_iommu=on", "iommu=pt"),
    ),
    # Without an IOMMU a DMA buffer must be physically contiguous: hugepages
    # reserved at boot are the noiommu DMA allocator's fallback (as DPDK's).
    "none": ((), ("vfio.enable_unsafe_noiommu_mode=1", "hugepages=24")),
}
#: Character devices in the initramfs: path -> (major, minor).
_INIT_NODES = {
    "dev/console": (5, 1),
    "dev/null": (1, 3),
    "dev/kmsg": (1, 11),
    "dev/ttyS0": (4, 64),
    "dev/ttyS1": (4, 65),
}
#: Environment names the guest does not take from the caller.
_ENV_SKIP = frozenset(
    {
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
        "TERM",
        "IFS",
        "PPID",
        "OPTIND",
        "OPTARG",
        "ENV",
        "PS1",
        "PS2",
        "PS4",
    }
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# --- values ------------------------------------------------------------------------


@frozen
class GuestSetup:
    """One real-kernel setup the guest suite runs on: a kernel, an IOMMU, a backend."""

    name: str
    kernel: str
    iommu: str  # a key of IOMMU_MODES
    env: tuple[tuple[str, str], ...] = ()  # what the suite's environment adds
    about: str = ""
    #: guest memory; None: the --mem default
    mem: str | None = None

    @property
    def environment(self) -> dict[str, str]:
        return {"AIOVFIO_VM_SETUP": self.name, **dict(self.env)}


#: The five setups of the guest suite (`nox -s vm` runs noxfile.VM_DEFAULT unless named).
SETUPS: tuple[GuestSetup, ...] = (
    GuestSetup("6.1", "6.1", "intel", about="Debian 6.1, legacy type1 container"),
    GuestSetup("6.12", "6.12", "intel", about="Debian 6.12, legacy type1 container"),
    GuestSetup(
        "iommufd",
        "6.12-iommufd",
        "intel",
        (("AIOVFIO_BACKEND", "iommufd"),),
        about="6.12 built here, iommufd through the VFIO device cdev",
    ),
    GuestSetup(
        "iommufd-compat",
        "6.12-iommufd",
        "intel",
        (("AIOVFIO_BACKEND", "container"),),
        about="6.12 built here, the legacy container API served by iommufd",
    ),
    GuestSetup(
        "noiommu",
        "6.12-iommufd",
        "none",
        (("AIOVFIO_NOIOMMU", "1"),),
        about="6.12 built here, no IOMMU: VFIO's unsafe noiommu mode",
        # Without an IOMMU a DMA address is a physical one: with 256 MiB all of
        # the guest's RAM is below edu's 28-bit DMA mask.
        mem="256M",
    ),
)


@frozen
class GuestDevice:
    """An emulated PCI function the guest binds to vfio-pci."""

    kind: str  # "edu" or "nvme"
    index: int
    slot: int
    #: nvme: a raw image backing the namespace (keeps data for the boot); None: null-co
    disk: Path | None = None

    @property
    def bdf(self) -> str:
        return f"0000:00:{self.slot:02x}.0"

    @property
    def ids(self) -> str:
        return {"edu": "1234:11e8", "nvme": "1b36:0010"}[self.kind]

    @property
    def pci_class(self) -> str:
        return {"edu": "0x00ff00", "nvme": "0x010802"}[self.kind]

    def qemu_args(self) -> list[str]:
        addr = f"addr={self.slot:#x}.0"
        if self.kind == "edu":
            return ["-device", f"edu,id=edu{self.index},{addr}"]
        node = f"nvm{self.index}"
        backing = f"driver=null-co,node-name={node},size={NVME_DISK_SIZE},read-zeroes=on"
        if self.disk is not None:
            path = _qemu_escape(str(self.disk))
            backing = f"driver=raw,node-name={node},file.driver=file,file.filename={path}"
        return [
            "-blockdev",
            backing,
            "-device",
            f"nvme,id=nvme{self.index},serial=aiovfio{self.index},drive={node},{addr}",
        ]


@frozen
class Share:
    """A host folder the guest mounts over virtio-9p, at the same path."""

    tag: str
    path: Path
    slot: int
    writable: bool = True

    def qemu_args(self) -> list[str]:
        opts = f"local,id={self.tag},path={_qemu_escape(str(self.path))},security_model=none"
        opts += ",readonly=on" if not self.writable else ""
        opts += ",multidevs=remap" if self.tag != "aiovfio" else ""
        return [
            "-fsdev",
            opts,
            "-device",
            f"virtio-9p-pci,fsdev={self.tag},mount_tag={self.tag},addr={self.slot:#x}.0",
        ]


@frozen
class Timings:
    """Where the time went, in seconds."""

    wall: float  # on the host: QEMU's start to its exit
    boot: float | None  # guest uptime when the stage started
    bound: float | None  # guest uptime once the devices were bound
    done: float | None  # guest uptime when CMD ended


@frozen
class GuestResult:
    """What one guest run gave."""

    returncode: int
    kernel: str  # the guest's `uname -r`
    timings: Timings
    devices: tuple[str, ...]  # "kind bdf group=N driver=D", as the guest bound them
    console_tail: str  # the end of the guest's kernel console
    qemu_messages: str  # what QEMU itself printed on stderr
    boots: int = 1  # 2 when the first boot died before the stage began

    @property
    def ok(self) -> bool:
        return self.returncode == 0


# --- building blocks ---------------------------------------------------------------


def _qemu_escape(value: str) -> str:
    return value.replace(",", ",,")


def guest_devices(edu: int, nvme: int) -> tuple[GuestDevice, ...]:
    """The edu devices, then the nvme controllers, from slot 00:04.0 on."""
    if edu < 0 or nvme < 0 or edu + nvme > _MAX_DEVICES:
        raise VmSetupError(f"--edu and --nvme take 0..{_MAX_DEVICES} devices in all")
    kinds = [("edu", i) for i in range(edu)] + [("nvme", i) for i in range(nvme)]
    return tuple(
        GuestDevice(kind=k, index=i, slot=_FIRST_DEVICE_SLOT + n) for n, (k, i) in enumerate(kinds)
    )


def _shares(run_dir: Path, rw: Sequence[Path], devices: Sequence[GuestDevice]) -> list[Share]:
    taken = {d.slot for d in devices}
    slots = (s for s in range(1, _LAST_SLOT + 1) if s not in taken)
    shares = [
        Share("hostroot", Path("/"), next(slots), writable=False),
        Share("aiovfio", run_dir, next(slots)),
    ]
    shares += [Share(f"rw{i}", path, next(slots)) for i, path in enumerate(rw)]
    return shares


def _normalise_rw(folders: Sequence[str | os.PathLike[str]]) -> tuple[Path, ...]:
    """Absolute, existing, de-duplicated folders, none inside another."""
    if len(folders) > _MAX_SHARES:
        raise VmSetupError(f"at most {_MAX_SHARES} --rw folders")
    found: list[Path] = []
    for folder in folders:
        path = Path(folder).resolve()
        if not path.is_dir():
            raise VmSetupError(f"--rw {folder}: no such folder")
        if path == Path("/"):
            raise VmSetupError("--rw /: the root is shared read-only; name a folder")
        found.append(path)
    outer = [p for p in found if not any(p != q and p.is_relative_to(q) for q in found)]
    return tuple(dict.fromkeys(outer))


def qemu_command(
    *,
    qemu: str,
    image: KernelImage,
    initrd: Path,
    run_dir: Path,
    devices: Sequence[GuestDevice],
    shares: Sequence[Share],
    mem: str = "2G",
    smp: int = 2,
    accel: str = "tcg",
    append: Sequence[str] = (),
    iommu: str = "intel",
) -> list[str]:
    """The QEMU command line of one guest."""
    qemu_iommu, kernel_iommu = IOMMU_MODES[iommu]
    cmdline = " ".join([*_KERNEL_ARGS, *kernel_iommu, *append])
    argv = [
        qemu,
        "-nodefaults",
        "-no-user-config",
        "-machine",
        "q35,kernel-irqchip=split",
        "-accel",
        accel,
        "-cpu",
        "max",
        "-smp",
        str(smp),
        "-m",
        mem,
        "-display",
        "none",
        "-vga",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-kernel",
        str(image.vmlinux),
        "-initrd",
        str(initrd),
        "-append",
        cmdline,
        "-serial",
        f"file:{run_dir / 'console.log'}",
        "-chardev",
        "stdio,id=out,signal=off",
        "-serial",
        "chardev:out",
        *qemu_iommu,
    ]
    for share in shares:
        argv += share.qemu_args()
    for device in devices:
        argv += device.qemu_args()
    return argv


def guest_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The caller's variables the guest can take (valid names, not shell state)."""
    return {
        k: v
        for k, v in env.items()
        if _NAME.match(k) and k not in _ENV_SKIP and not k.startswith("vm_")
    }


def job_script(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    timeout: float,
    devices: Sequence[GuestDevice],
    kernel: str,
    iommu: str = "intel",
) -> str:
    """The POSIX sh fragment the guest stage sources: environment, settings, "$@"."""
    q = shlex.quote
    extra = {
        "AIOVFIO_GUEST": "1",
        "TERM": "dumb",
        "AIOVFIO_VM_KERNEL": kernel,
        "AIOVFIO_VM_IOMMU": iommu,
        "AIOVFIO_VM_EDU": " ".join(d.bdf for d in devices if d.kind == "edu"),
        "AIOVFIO_VM_NVME": " ".join(d.bdf for d in devices if d.kind == "nvme"),
    }
    lines = ["# written by aiovfio.testing.vm for one guest run"]
    lines += [f"export {k}={q(v)}" for k, v in {**guest_environment(env), **extra}.items()]
    specs = " ".join(f"{d.kind},{d.bdf},{d.ids},{d.pci_class}" for d in devices)
    lines += [
        f"vm_devices={q(specs)}",
        f"vm_cwd={q(str(cwd))}",
        f"vm_timeout={timeout:g}",
        "set -- " + " ".join(q(a) for a in argv),
        "",
    ]
    return "\n".join(lines)


def _guest_file(name: str) -> bytes:
    return (
        importlib.resources.files(__package__ or "aiovfio.testing") / "_guest" / name
    ).read_bytes()


# --- initramfs ---------------------------------------------------------------------


class _Cpio:
    """A writer of the "newc" cpio format the kernel unpacks as its initramfs."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.inode = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self.inode += 1
        fields = (self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._add(header + name.encode() + b"\0")
        self._add(data)

    def _add(self, chunk: bytes) -> None:
        self.parts.append(chunk + b"\0" * (-len(chunk) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def _module_order(modules: Path, wanted: Sequence[str]) -> list[str]:
    """Module files (relative to `modules`) for `wanted`, dependencies first."""
    deps: dict[str, list[str]] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {_module_name(p): p for p in deps}
    try:
        builtin = {_module_name(p) for p in (modules / "modules.builtin").read_text().split()}
    except OSError:
        builtin = set()
    order: list[str] = []

    def visit(path: str) -> None:
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        if path not in order:
            order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            raise VmSetupError(f"kernel module {name} is missing from {modules}")
    return order


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    return base[: base.index(".ko")].replace("-", "_")


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return zlib.decompress(data, wbits=31)
    if path.suffix == ".zst":
        done = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=True)
        return done.stdout
    return data


def _is_static_elf(data: bytes) -> bool:
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit ELF only
        return False
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for i in range(phnum):
        p_type = int.from_bytes(data[phoff + i * phentsize : phoff + i * phentsize + 4], "little")
        if p_type == 3:  # PT_INTERP: needs a dynamic loader
            return False
    return True


def build_initramfs(
    image: KernelImage, out_dir: Path, *, busybox: Path = Path("/bin/busybox")
) -> Path:
    """The guest's initramfs for `image` (cached in `out_dir` by content)."""
    try:
        box = busybox.read_bytes()
    except OSError:
        raise VmSetupError(f"{busybox} is missing: run `aiovfio vm --setup`") from None
    if not _is_static_elf(box):
        raise VmSetupError(f"{busybox} is not a static binary: install busybox-static")
    init = _guest_file("init")
    order = _module_order(image.modules, _INIT_MODULES)
    key = hashlib.sha256(box + init + image.release.encode() + "\n".join(order).encode())
    out = out_dir / f"initramfs-{image.release}-{key.hexdigest()[:12]}.cpio"
    if out.is_file():
        return out
    cpio = _Cpio()
    moddir = f"lib/modules/{image.release}"
    for folder in ("bin", "dev", "etc", "lower", "upper", "root", "lib", "lib/modules", moddir):
        cpio.directory(folder)
    for node, (major, minor) in _INIT_NODES.items():
        cpio.chardev(node, major, minor)
    cpio.file("bin/busybox", box, 0o755)
    cpio.file("init", init, 0o755)
    names = [_module_name(rel) for rel in order]
    for rel, name in zip(order, names, strict=True):
        cpio.file(f"{moddir}/{name}.ko", _read_module(image.modules / rel))
    # Listed in load order, each without dependencies: one `modprobe -a` loads all.
    cpio.file(f"{moddir}/modules.dep", "".join(f"{n}.ko:\n" for n in names).encode())
    cpio.file("etc/modules", (" ".join(names) + "\n").encode())
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(cpio.finish())
    tmp.replace(out)
    _log.debug("vm.initramfs", path=str(out), modules=names)
    return out


# --- running -----------------------------------------------------------------------


def _resolve_program(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """`argv` with a pyenv shim replaced by the interpreter it stands for.

    A shim is a shell script that starts pyenv: seconds per call under TCG.
    """
    found = shutil.which(argv[0], path=env.get("PATH"))
    if found is None or Path(found).parent.name != "shims" or not shutil.which("pyenv"):
        return list(argv)
    done = subprocess.run(
        ["pyenv", "which", argv[0]], capture_output=True, text=True, env=dict(env), check=False
    )
    real = done.stdout.strip()
    if done.returncode == 0 and real and os.access(real, os.X_OK):
        _log.debug("vm.resolve", program=argv[0], real=real)
        return [real, *argv[1:]]
    return list(argv)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(text: str, lines: int = CONSOLE_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _uptimes(text: str) -> dict[str, float]:
    stamps: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            stamps[name] = float(value)
    return stamps


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill QEMU and anything it started (it leads its own session), and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()
    proc.wait()


@contextlib.contextmanager
def _run_dir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="aiovfio-vm."))
    try:
        yield path
    finally:
        if keep:
            print(f"aiovfio vm: run folder kept: {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _keep_blocking(stdout: int | IO[Any] | None) -> Iterator[None]:
    """Undo QEMU's O_NONBLOCK on a stdout this process shares with it."""
    if stdout is None:
        sys.stdout.flush()
        fd: int | None = 1
    elif isinstance(stdout, int):
        fd = stdout if stdout >= 0 else None
    else:
        stdout.flush()
        fd = stdout.fileno()
    blocking = os.get_blocking(fd) if fd is not None else None
    try:
        yield
    finally:
        if fd is not None and blocking is not None:
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)


def run_in_guest(
    argv: Sequence[str],
    *,
    kernel: str = "6.1",
    iommu: str = "intel",
    edu: int = 1,
    nvme: int = 1,
    timeout: float = 900.0,
    rw: Sequence[str | os.PathLike[str]] = (),
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    mem: str = "2G",
    smp: int = 2,
    append: Sequence[str] = (),
    stdout: int | IO[Any] | None = None,
    cache: Path | None = None,
    keep: bool = False,
    nvme_disk: bool = True,
) -> GuestResult:
    """Boot a guest, bind its devices to vfio-pci, run `argv`, power off.

    `cwd` (default: the current folder) is where `argv` runs and is shared
    read-write, as is each folder of `rw`. `env` defaults to `os.environ`.
    `append` adds kernel command-line words (e.g.
    "vfio_iommu_type1.dma_entry_limit=16"). `stdout` receives the command's
    output (default: this process's stdout). Each nvme namespace is a sparse
    1 GiB image in the run folder that keeps what is written for the boot;
    `nvme_disk=False` uses QEMU's null-co instead (reads zeros, drops writes).
    `iommu` "none" boots without an IOMMU, VFIO in noiommu mode (a kernel
    with CONFIG_VFIO_NOIOMMU: "6.12-iommufd"). A `timeout` of 0 means none.
    Raises `VmSetupError` when the host is not ready or the arguments are
    wrong; every guest outcome is a `GuestResult`.
    """
    check_flavour(kernel)  # before the host checks: a typo is reported as one
    if not argv:
        raise VmSetupError("no command given: aiovfio vm [options] -- CMD...")
    if timeout < 0 or smp < 1:
        raise VmSetupError("--timeout must be >= 0 and --smp >= 1")
    if not re.fullmatch(r"\d+[MG]?", mem):
        raise VmSetupError(f"--mem {mem!r}: give a size such as 2G or 1536M")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VmSetupError("qemu-system-x86_64 is not installed: run `aiovfio vm --setup`")
    if iommu not in IOMMU_MODES:
        raise VmSetupError(f"--iommu {iommu!r}: choose one of {', '.join(IOMMU_MODES)}")
    root = cache or cache_dir()
    image = find_kernel(kernel, root)
    if iommu == "none" and not image.iommufd:
        raise VmSetupError(
            f"--iommu none needs a kernel with VFIO's noiommu mode; kernel {kernel} "
            "(Debian's build) has none: use --kernel 6.12-iommufd"
        )
    workdir = Path(cwd if cwd is not None else os.getcwd()).resolve()
    environ = dict(os.environ if env is None else env)
    devices = guest_devices(edu, nvme)
    program = _resolve_program(argv, environ)
    plan = _Plan(
        qemu=qemu,
        image=image,
        initrd=build_initramfs(image, root / "initramfs"),
        devices=devices,
        folders=_normalise_rw([*([workdir] if workdir != Path("/") else []), *rw]),
        job=job_script(
            program,
            env=environ,
            cwd=workdir,
            timeout=timeout,
            devices=devices,
            kernel=kernel,
            iommu=iommu,
        ),
        timeout=timeout,
        mem=mem,
        smp=smp,
        append=tuple(append),
        iommu=iommu,
        nvme_disk=nvme_disk,
    )
    log = structlog.get_logger("aiovfio").bind(kernel=image.release)
    if _log.enabled():
        log.debug("vm.start", argv=list(program))
    for boots in range(1, BOOT_ATTEMPTS + 1):
        result = _boot(plan, stdout=stdout, keep=keep, boots=boots)
        if _log.enabled():
            log.debug("vm.done", returncode=result.returncode, timings=result.timings)
        if not (result.returncode == EXIT_GUEST_DIED and result.timings.boot is None):
            break
        # Died before the stage began: a boot-time flake of TCG under load
        # (e.g. the IO-APIC timer check), not anything CMD did. Boot again.
    return result


@frozen
class _Plan:
    """Everything one boot needs, prepared once for all attempts."""

    qemu: str
    image: KernelImage
    initrd: Path
    devices: tuple[GuestDevice, ...]
    folders: tuple[Path, ...]
    job: str
    timeout: float
    mem: str
    smp: int
    append: tuple[str, ...]
    iommu: str
    nvme_disk: bool = True


def _with_disk(device: GuestDevice, run_dir: Path) -> GuestDevice:
    if device.kind != "nvme":
        return device
    disk = run_dir / f"nvm{device.index}.img"
    with disk.open("wb") as f:
        f.truncate(NVME_DISK_SIZE)
    return attrs.evolve(device, disk=disk)


def _boot(plan: _Plan, *, stdout: int | IO[Any] | None, keep: bool, boots: int) -> GuestResult:
    with _run_dir(keep) as run_dir:
        devices = plan.devices
        if plan.nvme_disk:  # sparse images in the run folder: the data lasts the boot
            devices = tuple(_with_disk(d, run_dir) for d in devices)
        shares = _shares(run_dir, plan.folders, devices)
        conf = [f"modules\t{plan.image.modules}"]
        conf += [f"rw\t{s.tag}\t{s.path}" for s in shares[2:]]
        (run_dir / "init.conf").write_text("\n".join(conf) + "\n")
        (run_dir / "stage.sh").write_bytes(_guest_file("stage.sh"))
        (run_dir / "bind.sh").write_bytes(_guest_file("bind.sh"))
        (run_dir / "job").write_text(plan.job)
        command = qemu_command(
            qemu=plan.qemu,
            image=plan.image,
            initrd=plan.initrd,
            run_dir=run_dir,
            devices=devices,
            shares=shares,
            mem=plan.mem,
            smp=plan.smp,
            append=plan.append,
            iommu=plan.iommu,
        )
        _log.debug("vm.boot", attempt=boots, qemu=shlex.join(command))
        limit = plan.timeout + BOOT_ALLOWANCE if plan.timeout else None
        timed_out = False
        with (run_dir / "qemu.log").open("wb") as qemu_log, _keep_blocking(stdout):
            started = time.monotonic()
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=qemu_log,
                start_new_session=True,
            )
            try:
                proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                if proc.poll() is None:
                    _kill(proc)
            wall = time.monotonic() - started

        stamps = _uptimes(_read(run_dir / "times"))
        rc_text = _read(run_dir / "rc").strip()
        if timed_out:
            returncode = EXIT_TIMEOUT
        elif rc_text.isdigit():
            returncode = int(rc_text)
            ran = stamps.get("done", 0.0) - stamps.get("bound", 0.0)
            if returncode == 137 and plan.timeout and ran >= plan.timeout:
                returncode = EXIT_TIMEOUT  # killed after ignoring the timeout's SIGTERM
        else:
            returncode = EXIT_GUEST_DIED
        return GuestResult(
            returncode=returncode,
            kernel=plan.image.release,
            timings=Timings(
                wall=wall,
                boot=stamps.get("stage"),
                bound=stamps.get("bound"),
                done=stamps.get("done"),
            ),
            devices=tuple(_read(run_dir / "devices").splitlines()),
            console_tail=_tail(_read(run_dir / "console.log")),
            qemu_messages=_tail(_read(run_dir / "qemu.log")),
            boots=boots,
        )


# --- command line ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (a `VmSetupError`), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise VmSetupError(f"{message} (see `aiovfio vm --help`)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="aiovfio vm",
        description="Run CMD on real Linux VFIO in a QEMU guest with emulated edu and nvme.",
        epilog=(
            "exit status: CMD's, or 124 timeout, 125 binding to vfio-pci failed, "
            "99 guest died, 2 usage or host not set up"
        ),
    )
    parser.add_argument(
        "--setup", action="store_true", help="install QEMU and fetch the kernels (root)"
    )
    parser.add_argument(
        "--kernel",
        action="append",
        metavar="{" + ",".join(FLAVOURS) + "}",
        help="kernel flavour (default $AIOVFIO_VM_KERNEL or 6.1); 6.12-iommufd is built "
        "here once (`--setup --kernel 6.12-iommufd`, about 15 minutes on two cores)",
    )
    parser.add_argument(
        "--iommu",
        choices=tuple(IOMMU_MODES),
        help="the guest's IOMMU: an emulated Intel one (default), or none: VFIO's "
        "unsafe noiommu mode (6.12-iommufd only)",
    )
    parser.add_argument(
        "--on",
        action="append",
        choices=[s.name for s in SETUPS],
        metavar="SETUP",
        help="one of the guest suite's setups: "
        + "; ".join(f"{s.name}: {s.about}" for s in SETUPS),
    )
    parser.add_argument("--edu", type=int, default=1, metavar="N", help="edu devices (default 1)")
    parser.add_argument(
        "--nvme", type=int, default=1, metavar="N", help="nvme controllers (default 1)"
    )
    parser.add_argument(
        "--nvme-null",
        action="store_true",
        help="back nvme with QEMU's null-co (reads zeros, drops writes) instead of a "
        "sparse 1 GiB image that keeps data for the boot",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        metavar="S",
        help="limit for CMD, 0 for none (default 900)",
    )
    parser.add_argument(
        "--mem", default=_DEFAULT_MEM, metavar="SIZE", help="guest memory (default 2G)"
    )
    parser.add_argument("--smp", type=int, default=2, metavar="N", help="guest CPUs (default 2)")
    parser.add_argument(
        "--rw",
        action="append",
        default=[],
        metavar="DIR",
        help="also share DIR read-write (repeatable)",
    )
    parser.add_argument(
        "--append",
        action="append",
        default=[],
        metavar="ARGS",
        help="add to the kernel command line",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the run folder (console log, job)"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print console, devices, timings"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD...")
    return parser


def _report(result: GuestResult) -> None:
    err = sys.stderr
    if result.console_tail:
        print("----- guest console (tail) -----", file=err)
        print(result.console_tail, file=err)
    if result.qemu_messages:
        print("----- QEMU -----", file=err)
        print(result.qemu_messages, file=err)
    print("----- devices -----", file=err)
    print("\n".join(result.devices) or "(none bound)", file=err)
    t = result.timings

    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    print(
        f"aiovfio vm: kernel {result.kernel}, exit {result.returncode}; guest uptime at "
        f"stage {show(t.boot)} s, bound {show(t.bound)} s, done {show(t.done)} s; "
        f"host wall {t.wall:.2f} s",
        file=err,
    )


def _setup(kernels: Sequence[str], on: Sequence[str], command: Sequence[str]) -> int:
    if command:
        raise VmSetupError("--setup takes no command")
    by_name = {s.name: s for s in SETUPS}
    kernels = list(dict.fromkeys([*kernels, *(by_name[n].kernel for n in on)]))
    for image in setup(kernels or DEBIAN_FLAVOURS, progress=lambda m: print(m, file=sys.stderr)):
        print(f"kernel {image.flavour}: {image.release} ({image.package} {image.version})")
    return 0


def _run(args: argparse.Namespace, kernels: Sequence[str], command: Sequence[str]) -> int:
    on: list[str] = args.on or []
    if len(kernels) > 1 or len(on) > 1:
        raise VmSetupError("give one --kernel (or one --on) for a run")
    env = dict(os.environ)
    kernel = kernels[0] if kernels else os.environ.get("AIOVFIO_VM_KERNEL", "6.1")
    iommu = args.iommu or "intel"
    chosen = next((s for s in SETUPS if s.name in on), None)
    if chosen is not None:
        if kernels or args.iommu:
            raise VmSetupError("--on names a kernel and an IOMMU: give no --kernel or --iommu")
        check_flavour(chosen.kernel)
        kernel, iommu = chosen.kernel, chosen.iommu
        env.update(chosen.environment)
        if chosen.mem is not None and args.mem == _DEFAULT_MEM:
            args.mem = chosen.mem
    result = run_in_guest(
        command,
        kernel=kernel,
        iommu=iommu,
        env=env,
        edu=args.edu,
        nvme=args.nvme,
        timeout=args.timeout,
        rw=args.rw,
        mem=args.mem,
        smp=args.smp,
        append=[word for words in args.append for word in words.split()],
        keep=args.keep,
        nvme_disk=not args.nvme_null,
    )
    if result.boots > 1:
        print(
            f"aiovfio vm: the first boot died early; booted {result.boots} times", file=sys.stderr
        )
    failed = result.returncode in (EXIT_TIMEOUT, EXIT_BIND_FAILED, EXIT_GUEST_DIED)
    if args.verbose or failed:
        _report(result)
    elif chosen is not None:
        print(
            f"aiovfio vm: setup {chosen.name} ({chosen.about}): kernel {result.kernel}, "
            f"exit {result.returncode}, host wall {result.timings.wall:.1f} s",
            file=sys.stderr,
        )
    return result.returncode


def main(argv: list[str] | None = None) -> int:
    """`aiovfio vm`: returns the exit status described in the module docstring."""
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        if args.verbose and not structlog.is_configured():
            # the command line's own choice; library code never configures structlog
            structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        kernels: list[str] = args.kernel or []
        if args.setup:
            return _setup(kernels, args.on or [], command)
        return _run(args, kernels, command)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except VmSetupError as exc:
        print(f"aiovfio vm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # QEMU is already gone: run_in_guest killed it
        print("aiovfio vm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
