"""Provisioning for the QEMU guest: host packages and Debian's kernels.

`setup()` is one idempotent step (`aiovfio vm --setup`). As root it

1. installs qemu-system-x86 busybox-static cpio kmod zstd linux-libc-dev when
   one is missing (`apt-get update` once, only then);
2. adds `<codename>-backports` as an apt source when no source names it,
   reusing the mirror URI of the configured `<codename>` suite;
3. fetches each Debian kernel flavour's `linux-image-*` package with
   `apt-get download`, unpacks it with `dpkg -x` into the cache folder
   (`$AIOVFIO_VM_CACHE`, default `~/.cache/aiovfio-vm`), runs `depmod -b`
   and extracts the uncompressed `vmlinux` (booted through PVH, which skips
   the in-guest decompression). Nothing is installed into /boot.
4. for "6.12-iommufd" (only when asked for: `--kernel 6.12-iommufd`), installs
   the build tools, fetches `linux-source-6.12` and builds the kernel with
   iommufd, the VFIO device cdev and noiommu (`vm_kernel`; about 15 minutes on
   two cores, once per machine).

A run that finds everything in place changes nothing and needs no network.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import subprocess
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from attrs import frozen

from .. import _log
from ..errors import SetupError
from . import vm_kernel

__all__ = [
    "DEBIAN_FLAVOURS",
    "FLAVOURS",
    "PACKAGES",
    "KernelImage",
    "VmSetupError",
    "cache_dir",
    "check_flavour",
    "extract_vmlinux",
    "find_kernel",
    "mirror_uri",
    "setup",
]

#: Debian's kernel flavours: a `linux-image-amd64` version prefix each.
DEBIAN_FLAVOURS: tuple[str, ...] = ("6.1", "6.12")
#: Every flavour: Debian's, and the one built here with iommufd (`vm_kernel`).
FLAVOURS: tuple[str, ...] = (*DEBIAN_FLAVOURS, vm_kernel.FLAVOUR)
#: Host packages the guest needs.
PACKAGES: tuple[str, ...] = (
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "zstd",
    "linux-libc-dev",
)

_SOURCES_LIST = Path("/etc/apt/sources.list")
_SOURCES_DIR = Path("/etc/apt/sources.list.d")
_DEBIAN_SOURCES = _SOURCES_DIR / "debian.sources"
_BACKPORTS_SOURCES = _SOURCES_DIR / "aiovfio-backports.sources"
_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
_MARKER = "kernel.json"

Progress = Callable[[str], None]


class VmSetupError(SetupError):
    """The guest cannot be provisioned or started; the message says what to do."""


@frozen
class KernelImage:
    """One unpacked Debian kernel in the cache."""

    flavour: str  # "6.1"
    release: str  # `uname -r` in the guest, e.g. "6.1.0-56-amd64"
    package: str  # e.g. "linux-image-6.1.0-56-amd64" (or "linux-source-6.12" when built)
    version: str  # the package's version
    root: Path  # the `dpkg -x` tree
    built: bool = False  # built here: everything built in, no loadable modules

    @property
    def iommufd(self) -> bool:
        """The kernel has iommufd, the VFIO device cdev and noiommu."""
        return self.built

    @property
    def vmlinux(self) -> Path:
        """The uncompressed ELF kernel (PVH boot)."""
        return self.root / "boot" / f"vmlinux-{self.release}"

    @property
    def modules(self) -> Path:
        """`lib/modules/<release>` inside the unpacked tree."""
        for lib in ("lib", "usr/lib"):
            path = self.root / lib / "modules" / self.release
            if path.is_dir():
                return path
        return self.root / "lib" / "modules" / self.release


def cache_dir() -> Path:
    """`$AIOVFIO_VM_CACHE`, or `~/.cache/aiovfio-vm`."""
    env = os.environ.get("AIOVFIO_VM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "aiovfio-vm"


def check_flavour(flavour: str) -> None:
    """`VmSetupError` unless `flavour` is one of `FLAVOURS`."""
    if flavour not in FLAVOURS:
        raise VmSetupError(
            f"unknown kernel flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}"
        )


def find_kernel(flavour: str, cache: Path | None = None) -> KernelImage:
    """The cached kernel of `flavour`, or `VmSetupError` telling to run the setup."""
    check_flavour(flavour)
    root = (cache or cache_dir()) / f"linux-{flavour}"
    command = "aiovfio vm --setup" + ("" if flavour in DEBIAN_FLAVOURS else f" --kernel {flavour}")
    hint = f"kernel {flavour} is not in the cache {root.parent}: run `{command}`"
    try:
        meta = json.loads((root / _MARKER).read_text())
        image = KernelImage(
            flavour=flavour,
            release=str(meta["release"]),
            package=str(meta["package"]),
            version=str(meta["version"]),
            root=root,
            built=flavour not in DEBIAN_FLAVOURS,
        )
        key = meta.get("key")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise VmSetupError(hint) from None
    if image.built and key != vm_kernel.config_key():
        raise VmSetupError(
            f"kernel {flavour} in {root} was built with another recipe ({key}, now "
            f"{vm_kernel.config_key()}): run `{command}` to rebuild it"
        )
    if not image.vmlinux.is_file() or not (image.modules / "modules.dep").is_file():
        raise VmSetupError(hint)
    return image


def _cached(flavour: str, cache: Path) -> KernelImage | None:
    try:
        return find_kernel(flavour, cache)
    except VmSetupError:
        return None


# --- apt ---------------------------------------------------------------------------


def _run(argv: Sequence[str], *, what: str, cwd: Path | None = None) -> str:
    """Run a host command, return its stdout; `VmSetupError` with its stderr tail."""
    _log.debug("vm.setup.run", argv=list(argv))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        done = subprocess.run(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
    except FileNotFoundError:
        raise VmSetupError(f"{what}: `{argv[0]}` not found (is this Debian?)") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise VmSetupError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def _missing_packages(packages: Iterable[str]) -> list[str]:
    names = list(packages)
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n", *names],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    installed = {
        line.split()[0] for line in done.stdout.splitlines() if line.split()[1:2] == ["ii"]
    }
    return [n for n in names if n not in installed]


def _codename() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return "bookworm"
    found = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.MULTILINE)
    return found.group(1) if found else "bookworm"


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for raw in [*text.splitlines(), ""]:
        line = raw.rstrip()
        if not line:
            if current:
                stanzas.append(current)
            current = {}
        elif not line.startswith("#") and ":" in line and not line[0].isspace():
            key, _, value = line.partition(":")
            current[key.strip().lower()] = value.strip()
    return stanzas


def mirror_uri(suite: str, *, sources: Path | None = None, legacy: Path | None = None) -> str:
    """The mirror URI the configured apt sources use for `suite` (e.g. "bookworm").

    Read from `debian.sources` (deb822), else from `sources.list`.
    """
    sources = sources or _DEBIAN_SOURCES
    legacy = legacy or _SOURCES_LIST
    try:
        for stanza in _deb822_stanzas(sources.read_text()):
            if (
                "deb" in stanza.get("types", "").split()
                and suite in stanza.get("suites", "").split()
            ):
                return stanza["uris"].split()[0]
    except (OSError, KeyError, IndexError):
        pass
    try:
        for line in legacy.read_text().splitlines():
            words = [w for w in line.split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return words[1]
    except OSError:
        pass
    raise VmSetupError(
        f"no apt source for {suite!r} in {sources} or {legacy}: cannot add backports"
    )


def _has_suite(suite: str) -> bool:
    files = [_SOURCES_LIST, *sorted(_SOURCES_DIR.glob("*.list")), *_SOURCES_DIR.glob("*.sources")]
    pattern = re.compile(rf"(^|\s){re.escape(suite)}(\s|$)", re.MULTILINE)
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if pattern.search(
            "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
        ):
            return True
    return False


def _ensure_backports(codename: str) -> bool:
    """Add `<codename>-backports` as a source when none names it; True if added."""
    suite = f"{codename}-backports"
    if _has_suite(suite):
        return False
    uri = mirror_uri(codename)
    _BACKPORTS_SOURCES.write_text(
        f"Types: deb\nURIs: {uri}\nSuites: {suite}\nComponents: main\nSigned-By: {_KEYRING}\n"
    )
    _log.debug("vm.setup.backports", path=str(_BACKPORTS_SOURCES))
    return True


class _Apt:
    """apt-get with `update` run at most once per setup."""

    def __init__(self) -> None:
        self.updated = False

    def update(self) -> None:
        if not self.updated:
            _run(
                ["apt-get", "update", "-q", "--error-on=any"],
                what="apt-get update (is the Debian package registry reachable?)",
            )
            self.updated = True

    def candidates(self, flavour: str) -> list[str]:
        """`linux-image-amd64` versions for `flavour`, newest first."""
        out = _run(["apt-cache", "madison", "linux-image-amd64"], what="apt-cache madison")
        versions = [cols[1].strip() for ln in out.splitlines() if len(cols := ln.split("|")) >= 3]
        return [v for v in versions if v.startswith(flavour + ".")]

    def image_package(self, meta_version: str) -> str:
        """The `linux-image-<release>` package a `linux-image-amd64` version depends on."""
        out = _run(
            ["apt-cache", "show", f"linux-image-amd64={meta_version}"], what="apt-cache show"
        )
        for line in out.splitlines():
            if line.startswith("Depends:"):
                for dep in line.partition(":")[2].split(","):
                    name = dep.split()[0] if dep.split() else ""
                    if name.startswith("linux-image-"):
                        return name
        raise VmSetupError(f"linux-image-amd64 {meta_version} names no linux-image package")


# --- kernels -----------------------------------------------------------------------


def extract_vmlinux(vmlinuz: Path, out: Path) -> None:
    """Write the ELF kernel embedded (xz, zstd or gzip) in a bzImage to `out`."""
    blob = vmlinuz.read_bytes()
    attempts: list[tuple[bytes, Callable[[bytes], bytes]]] = [
        (b"\xfd7zXZ\x00", lambda data: lzma.LZMADecompressor().decompress(data)),
        (b"\x28\xb5\x2f\xfd", _unzstd),
        (b"\x1f\x8b\x08", lambda data: zlib.decompressobj(wbits=31).decompress(data)),
    ]
    for magic, decompress in attempts:
        at = blob.find(magic)
        while at >= 0:
            try:
                elf = decompress(blob[at:])
            except (lzma.LZMAError, zlib.error, OSError, VmSetupError):
                elf = b""
            if elf[:4] == b"\x7fELF":
                tmp = out.with_suffix(".tmp")
                tmp.write_bytes(elf)
                tmp.replace(out)
                return
            at = blob.find(magic, at + 1)
    raise VmSetupError(f"no compressed ELF kernel found in {vmlinuz}")


def _unzstd(data: bytes) -> bytes:
    done = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True)
    if done.returncode != 0 and not done.stdout:
        raise VmSetupError("zstd failed")
    return done.stdout


def _fetch_kernel(flavour: str, cache: Path, apt: _Apt, progress: Progress) -> KernelImage:
    versions = apt.candidates(flavour)
    if not versions:
        apt.update()
        versions = apt.candidates(flavour)
    if not versions:
        raise VmSetupError(
            f"apt knows no linux-image-amd64 {flavour}.x (is {_codename()}-backports enabled?)"
        )
    package = apt.image_package(versions[0])
    release = package.removeprefix("linux-image-")
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    progress(f"kernel {flavour}: downloading {package}")
    for old in debs.glob(f"{package}_*.deb"):
        old.unlink()
    _run(
        ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package],
        what=f"apt-get download {package} (is the Debian package registry reachable?)",
        cwd=debs,
    )
    deb = max(debs.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    version = deb.name.split("_")[1]
    root = cache / f"linux-{flavour}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    _run(["dpkg", "-x", str(deb), str(root)], what=f"dpkg -x {deb.name}")
    image = KernelImage(
        flavour=flavour, release=release, package=package, version=version, root=root
    )
    if not image.modules.is_dir():
        raise VmSetupError(f"{deb.name} has no modules for {release}")
    _run(["depmod", "-b", str(root), release], what="depmod")
    progress(f"kernel {flavour}: extracting vmlinux")
    extract_vmlinux(root / "boot" / f"vmlinuz-{release}", image.vmlinux)
    meta = {"release": release, "package": package, "version": version}
    (root / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    deb.unlink()
    return image


def _build_kernel(cache: Path, apt: _Apt, progress: Progress) -> KernelImage:
    """Fetch `linux-source-6.12` and build the iommufd kernel into the cache."""
    package = vm_kernel.SOURCE_PACKAGE
    out = _run(["apt-cache", "madison", package], what="apt-cache madison")
    if not out.strip():
        apt.update()
        out = _run(["apt-cache", "madison", package], what="apt-cache madison")
    versions = [cols[1].strip() for ln in out.splitlines() if len(cols := ln.split("|")) >= 3]
    if not versions:
        raise VmSetupError(
            f"apt knows no {package} (is {_codename()}-backports or -security enabled?)"
        )
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    deb_name = f"{package}_{versions[0].replace(':', '%3a')}_all.deb"
    if not (debs / deb_name).is_file():
        progress(f"kernel {vm_kernel.FLAVOUR}: downloading {package} {versions[0]}")
        for old in debs.glob(f"{package}_*.deb"):
            old.unlink()
        _run(
            [
                "apt-get",
                "download",
                "-q",
                "-o",
                "APT::Sandbox::User=root",
                f"{package}={versions[0]}",
            ],
            what=f"apt-get download {package} (is the Debian package registry reachable?)",
            cwd=debs,
        )
    deb = max(debs.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
    root = cache / f"linux-{vm_kernel.FLAVOUR}"
    staging = cache / f"linux-{vm_kernel.FLAVOUR}.new"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        built = vm_kernel.build(
            source_deb=deb,
            version=versions[0],
            work=cache / f"build-{vm_kernel.FLAVOUR}",
            image_root=staging,
            runner=_run,
            progress=progress,
        )
    except vm_kernel.BuildError as exc:
        raise VmSetupError(str(exc)) from None
    meta = {
        "release": built.release,
        "package": built.package,
        "version": built.version,
        "key": built.key,
        "build_seconds": round(built.seconds, 1),
    }
    (staging / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    if root.exists():
        shutil.rmtree(root)
    staging.replace(root)
    deb.unlink()
    return find_kernel(vm_kernel.FLAVOUR, cache)


def setup(
    flavours: Sequence[str] = DEBIAN_FLAVOURS,
    *,
    cache: Path | None = None,
    progress: Progress | None = None,
) -> list[KernelImage]:
    """Make the host ready to boot guests of `flavours`; returns the kernels.

    Debian's flavours by default; name "6.12-iommufd" to build that one too.
    """
    say: Progress = progress or (lambda _msg: None)
    for flavour in flavours:
        check_flavour(flavour)
    root = cache or cache_dir()
    images = {f: image for f in flavours if (image := _cached(f, root)) is not None}
    wanted = list(PACKAGES)
    if vm_kernel.FLAVOUR in flavours and vm_kernel.FLAVOUR not in images:
        wanted += [p for p in vm_kernel.missing_tools() if p not in wanted]
    missing = _missing_packages(wanted)
    if not missing and len(images) == len(flavours):
        return [images[f] for f in flavours]
    if os.geteuid() != 0:
        raise VmSetupError(
            "`aiovfio vm --setup` must run as root (it installs "
            f"{', '.join(missing) or 'nothing'} and downloads kernels with apt)"
        )
    apt = _Apt()
    if _ensure_backports(_codename()):
        say(f"added {_codename()}-backports to {_BACKPORTS_SOURCES}")
        apt.update()
    if missing:
        say(f"installing {' '.join(missing)}")
        apt.update()
        _run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            what="apt-get install",
        )
    for flavour in flavours:
        if flavour not in images:
            if flavour in DEBIAN_FLAVOURS:
                images[flavour] = _fetch_kernel(flavour, root, apt, say)
            else:
                images[flavour] = _build_kernel(root, apt, say)
    return [images[f] for f in flavours]
