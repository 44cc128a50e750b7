"""The guest kernel aiovfio builds itself: Debian's 6.12 source with iommufd.

Debian's kernels have no CONFIG_IOMMUFD, no VFIO device cdev and no
noiommu mode, so the flavour "6.12-iommufd" is built here from Debian's
`linux-source-6.12` package: `make allnoconfig`, then `CONFIG_FRAGMENT` (what
the guest boots and mounts, what Python uses, iommufd serving the legacy
/dev/vfio/vfio too, the cdev, noiommu, the vIOMMU), everything built in, no
modules, no debug info, PVH so the uncompressed vmlinux boots directly. A
minimal configuration builds in a fraction of x86_64_defconfig's time, which
keeps `.ci/run` on a machine with an empty cache well inside its limit.

The result is cached (`<cache>/linux-6.12-iommufd`) under a key of the source
version and the configuration; it is built once per machine and reused until
the recipe changes. `aiovfio vm --setup --kernel 6.12-iommufd` builds it (as
root it installs the build tools first). A build needs about `NEEDED_SPACE`
bytes of free disk while it runs and keeps about 60 MB; `build()` refuses
before it starts when the space is missing, and stops with a clear error when
it runs past its time limit (`$AIOVFIO_VM_BUILD_TIMEOUT`, seconds).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from attrs import frozen

from .. import _log

__all__ = [
    "BUILD_PACKAGES",
    "CONFIG_DISABLE",
    "CONFIG_FRAGMENT",
    "FLAVOUR",
    "NEEDED_SPACE",
    "BuiltKernel",
    "build",
    "config_key",
    "missing_tools",
]

#: The flavour name `aiovfio vm --kernel` takes for this kernel.
FLAVOUR = "6.12-iommufd"
#: The Debian source package.
SOURCE_PACKAGE = "linux-source-6.12"
#: Options that must end up built in (`=y`), on top of `make allnoconfig`: what
#: the guest boots (PVH, ACPI, PCI with MSI and MMCONFIG, the serial console,
#: the initramfs, 9p over virtio, overlayfs, tmpfs, devtmpfs), what Python and
#: the suite use (futex, epoll, eventfd, signalfd, timerfd, AIO, io_uring, POSIX
#: timers, SysV IPC, Unix sockets, /proc/self/pagemap, hugetlbfs, memfd, THP, an
#: RTC), the kernel's nvme driver (the guest benchmark's fio baseline), and VFIO:
#: the vIOMMU with interrupt remapping, iommufd serving /dev/vfio/vfio too, the
#: device cdev, noiommu, vfio-pci.
CONFIG_FRAGMENT: tuple[str, ...] = (
    # the machine
    "64BIT", "SMP", "HYPERVISOR_GUEST", "PARAVIRT", "KVM_GUEST", "PVH", "X86_X2APIC",
    "ACPI", "PCI", "PCI_MSI", "PCI_MMCONFIG", "HIGH_RES_TIMERS", "NO_HZ_IDLE", "HZ_1000",
    "RTC_CLASS", "RTC_DRV_CMOS",
    # the console and the initramfs
    "TTY", "SERIAL_8250", "SERIAL_8250_CONSOLE", "UNIX98_PTYS", "PRINTK",
    "BINFMT_ELF", "BINFMT_SCRIPT", "BLK_DEV_INITRD",
    # file systems
    "PROC_FS", "PROC_SYSCTL", "PROC_PAGE_MONITOR", "SYSFS", "TMPFS", "TMPFS_POSIX_ACL",
    "TMPFS_XATTR", "SHMEM", "DEVTMPFS", "HUGETLBFS", "HUGETLB_PAGE", "MEMFD_CREATE",
    "TRANSPARENT_HUGEPAGE", "OVERLAY_FS", "NET", "UNIX", "NET_9P", "NET_9P_VIRTIO", "9P_FS",
    "VIRTIO_MENU", "VIRTIO", "VIRTIO_PCI",
    # system calls Python and the suite use
    "FUTEX", "EPOLL", "SIGNALFD", "TIMERFD", "EVENTFD", "AIO", "IO_URING", "ADVISE_SYSCALLS",
    "FILE_LOCKING", "POSIX_TIMERS", "MULTIUSER", "SYSVIPC", "INOTIFY_USER", "KALLSYMS",
    # the kernel's own nvme driver
    "BLOCK", "BLK_DEV_NVME",
    # VFIO
    "IOMMU_SUPPORT", "INTEL_IOMMU", "IRQ_REMAP", "IOMMUFD", "IOMMUFD_VFIO_CONTAINER",
    "VFIO", "VFIO_GROUP", "VFIO_DEVICE_CDEV", "VFIO_NOIOMMU", "VFIO_PCI_CORE", "VFIO_PCI",
    "VFIO_PCI_MMAP", "VFIO_PCI_INTX",
)  # fmt: skip
#: Options that must end up off: modules, the type1 container (so that
#: iommufd serves /dev/vfio/vfio) and debug info.
CONFIG_DISABLE: tuple[str, ...] = (
    "MODULES",
    "VFIO_CONTAINER",
    "DEBUG_INFO",
    "LOCALVERSION_AUTO",
)
#: Numeric options: CPUs the guest may have (`aiovfio vm --smp`).
CONFIG_VALUES: tuple[tuple[str, str], ...] = (("NR_CPUS", "8"),)
#: Built-in "modules" the guest's scripts load with modprobe (a no-op here).
GUEST_MODULES = ("vfio_pci", "virtio_pci", "9pnet_virtio", "9p", "overlay")
#: Debian packages the build needs, with a file each that proves it is there.
BUILD_PACKAGES: dict[str, str] = {
    "gcc": "/usr/bin/gcc",
    "make": "/usr/bin/make",
    "flex": "/usr/bin/flex",
    "bison": "/usr/bin/bison",
    "bc": "/usr/bin/bc",
    "perl": "/usr/bin/perl",
    "xz-utils": "/usr/bin/xz",
    "libelf-dev": "/usr/include/gelf.h",
    "libssl-dev": "/usr/include/openssl/opensslv.h",
}
#: Free disk the build needs while it runs (source, objects), in bytes.
NEEDED_SPACE = 6 * 1024**3
#: The default limit of one build, in seconds (`$AIOVFIO_VM_BUILD_TIMEOUT`): a
#: stopped build resumes where it stopped on the next `--setup`.
BUILD_TIMEOUT = 7200.0
#: Bumped whenever the recipe below changes in a way the config does not show.
_RECIPE = "2"  # 2: allnoconfig plus the fragment (was x86_64_defconfig, trimmed)
_LOCALVERSION = "-aiovfio"

Progress = Callable[[str], None]
Runner = Callable[..., str]


class BuildError(Exception):
    """Raised inside the build; vm_setup turns it into a VmSetupError."""


@frozen
class BuiltKernel:
    """What `build()` made, for vm_setup's cache marker."""

    release: str  # `uname -r` in the guest
    package: str  # the source package it came from
    version: str  # that package's version
    key: str  # config_key() at build time
    seconds: float  # wall time of the build


def config_key() -> str:
    """A short digest of the recipe: config fragment, disabled options, recipe."""
    values = [f"{name}={value}" for name, value in CONFIG_VALUES]
    text = "\n".join([_RECIPE, *CONFIG_FRAGMENT, "-", *CONFIG_DISABLE, *values, _LOCALVERSION])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def missing_tools() -> list[str]:
    """The Debian packages of `BUILD_PACKAGES` this machine lacks."""
    return [pkg for pkg, path in BUILD_PACKAGES.items() if not Path(path).exists()]


def _free(path: Path) -> int:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _check_space(where: Path) -> None:
    free = _free(where)
    if free < NEEDED_SPACE:
        raise BuildError(
            f"building kernel {FLAVOUR} needs {NEEDED_SPACE / 1024**3:.0f} GiB free in "
            f"{where}, there are {free / 1024**3:.1f} GiB: free some space or point "
            "$AIOVFIO_VM_CACHE at a larger disk, then run "
            f"`aiovfio vm --setup --kernel {FLAVOUR}`"
        )


def _timeout() -> float:
    raw = os.environ.get("AIOVFIO_VM_BUILD_TIMEOUT", "")
    try:
        return float(raw) if raw else BUILD_TIMEOUT
    except ValueError:
        raise BuildError(f"$AIOVFIO_VM_BUILD_TIMEOUT={raw!r} is not a number of seconds") from None


def _make(
    build_dir: Path, args: Sequence[str], *, log: Path, deadline: float, started: float
) -> None:
    """`nice make ARGS` in the source tree, output to `log`, within `deadline`."""
    argv = ["nice", "-n", "10", "make", "-C", str(build_dir), *args]
    _log.debug("vm.kernel.make", argv=argv)
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        # its own process group: a timeout stops every sub-make and compiler
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise BuildError(
                f"the build of kernel {FLAVOUR} ran out of its "
                f"{deadline - started:.0f} s ({log} has its output): run "
                f"`aiovfio vm --setup --kernel {FLAVOUR}` again, with more time "
                "(AIOVFIO_VM_BUILD_TIMEOUT=seconds) if need be; it resumes where "
                "it stopped, and the result is cached"
            ) from None
        except BaseException:  # Ctrl-C: stop the build too (it resumes next time)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise BuildError(f"make {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")


def _read_config(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("CONFIG_"):
            name, _, value = line.partition("=")
            values[name.removeprefix("CONFIG_")] = value
    return values


def _check_config(path: Path) -> None:
    values = _read_config(path)
    wrong = [
        f"CONFIG_{n} is {values.get(n, 'unset')}" for n in CONFIG_FRAGMENT if values.get(n) != "y"
    ]
    wrong += [f"CONFIG_{n} is {values[n]}" for n in CONFIG_DISABLE if values.get(n, "n") != "n"]
    if wrong:
        raise BuildError(
            f"the configuration of kernel {FLAVOUR} lost options it needs "
            f"({'; '.join(wrong)}); its dependencies are missing in this source"
        )


def _modules_tree(build_dir: Path, image_root: Path, release: str, runner: Runner) -> None:
    """`lib/modules/<release>` with only modules.builtin: modprobe succeeds for built-ins."""
    modules = image_root / "lib" / "modules" / release
    modules.mkdir(parents=True, exist_ok=True)
    builtin = build_dir / "modules.builtin"
    names = builtin.read_text().split() if builtin.is_file() else []
    have = {Path(n).name.split(".ko")[0].replace("-", "_") for n in names}
    names += [f"kernel/aiovfio/{m}.ko" for m in GUEST_MODULES if m not in have]
    (modules / "modules.builtin").write_text("".join(f"{n}\n" for n in names))
    info = build_dir / "modules.builtin.modinfo"
    if info.is_file():
        shutil.copyfile(info, modules / "modules.builtin.modinfo")
    (modules / "modules.order").write_text("")
    runner(["depmod", "-b", str(image_root), release], what="depmod")


def build(
    *,
    source_deb: Path,
    version: str,
    work: Path,
    image_root: Path,
    runner: Runner,
    progress: Progress,
    jobs: int | None = None,
) -> BuiltKernel:
    """Build the kernel from `source_deb` in `work`; install vmlinux into `image_root`.

    A tree a stopped build left in `work`, configured by this recipe, is
    resumed (make picks up where it stopped); otherwise `work` is emptied and
    the source unpacked and configured. `work` is removed after a successful
    build. Raises `BuildError` with what is missing and what to run.
    """
    missing = missing_tools()
    if missing:
        raise BuildError(
            f"building kernel {FLAVOUR} needs {', '.join(missing)}: run "
            f"`aiovfio vm --setup --kernel {FLAVOUR}` as root (it installs them)"
        )
    started = time.monotonic()
    deadline = started + _timeout()
    src = _unpacked_tree(work, version)
    log = work / "build.log"
    if src is None:
        _check_space(work.parent)
        src = _unpack(source_deb, version, work, runner, progress)
    else:
        progress(f"kernel {FLAVOUR}: resuming the build in {src} (log: {log})")
    _configure(src, log=log, runner=runner, progress=progress, deadline=deadline)
    cpus = jobs or len(os.sched_getaffinity(0))
    progress(f"kernel {FLAVOUR}: compiling with {cpus} jobs at nice 10 (log: {log})")
    _make(src, [f"-j{cpus}", "vmlinux"], log=log, deadline=deadline, started=started)
    release = runner(["make", "-s", "-C", str(src), "kernelrelease"], what="make kernelrelease")
    release = release.strip().splitlines()[-1]
    boot = image_root / "boot"
    boot.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "vmlinux", boot / f"vmlinux-{release}")
    shutil.copyfile(src / ".config", boot / f"config-{release}")
    _modules_tree(src, image_root, release, runner)
    seconds = time.monotonic() - started
    (image_root / "build.json").write_text(
        json.dumps({"seconds": round(seconds, 1), "jobs": cpus}, indent=2) + "\n"
    )
    shutil.rmtree(work)
    progress(f"kernel {FLAVOUR}: built {release} in {seconds:.0f} s")
    return BuiltKernel(
        release=release, package=SOURCE_PACKAGE, version=version, key=config_key(), seconds=seconds
    )


_STAMP = "configured"


def _unpacked_tree(work: Path, version: str) -> Path | None:
    """The source tree of `version` a stopped build left in `work`, or None.

    Reused whatever recipe configured it: `_configure` applies this one, and
    make rebuilds only what the change touches.
    """
    try:
        stamp = (work / _STAMP).read_text().split()
    except OSError:
        return None
    trees = [p for p in work.glob("linux-source-*") if (p / "Makefile").is_file()]
    if stamp[-1:] != [version] or len(trees) != 1:
        return None
    return trees[0]


def _unpack(source_deb: Path, version: str, work: Path, runner: Runner, progress: Progress) -> Path:
    """A fresh tree from the .deb (stamped with its version, for resuming)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    progress(f"kernel {FLAVOUR}: unpacking {source_deb.name}")
    runner(["dpkg", "-x", str(source_deb), str(work / "deb")], what=f"dpkg -x {source_deb.name}")
    tarballs = sorted((work / "deb" / "usr" / "src").glob("linux-source-*.tar.*"))
    if not tarballs:
        raise BuildError(f"{source_deb.name} holds no linux-source tarball")
    runner(["tar", "-xf", str(tarballs[0]), "-C", str(work)], what="unpacking the kernel source")
    shutil.rmtree(work / "deb")
    trees = [p for p in work.iterdir() if p.is_dir() and p.name.startswith("linux-source")]
    if len(trees) != 1:
        raise BuildError(f"{tarballs[0].name} did not unpack into one linux-source folder")
    (work / _STAMP).write_text(f"{version}\n")
    return trees[0]


def _configure(
    src: Path, *, log: Path, runner: Runner, progress: Progress, deadline: float
) -> None:
    """allnoconfig, then the recipe's options; checked."""
    started = time.monotonic()
    progress(f"kernel {FLAVOUR}: configuring (log: {log})")
    _make(src, ["allnoconfig"], log=log, deadline=deadline, started=started)
    config = [str(src / "scripts" / "config"), "--file", str(src / ".config")]
    for name in CONFIG_FRAGMENT:
        config += ["--enable", name]
    for name in CONFIG_DISABLE:
        config += ["--disable", name]
    for name, value in CONFIG_VALUES:
        config += ["--set-val", name, value]
    config += ["--set-str", "LOCALVERSION", _LOCALVERSION]
    runner(config, what="scripts/config")
    _make(src, ["olddefconfig"], log=log, deadline=deadline, started=started)
    _check_config(src / ".config")
