"""Find the kernel's uapi headers and run small C probes compiled against them.

Two header sets matter to the golden tests:

* the newest: `$AIOVFIO_UAPI_INCLUDE`, else the cache folder that
  `python tests/unit/_headers.py` fills with Debian bookworm-backports'
  linux-libc-dev (6.12), else `/usr/include`. It must have `linux/iommufd.h`
  and the 6.6+ VFIO definitions; the tests that need it fail, never skip,
  when it lacks them.
* the system's: `/usr/include` (Debian 12: linux-libc-dev 6.1).

Run as a script (`nox -s tests` does, before pytest), this module prepares
both: it installs gcc, libc6-dev and linux-libc-dev when they are missing
(root only) and unpacks bookworm-backports' linux-libc-dev into the cache.
The download uses a private apt state folder holding only the backports
source, whose mirror is the one this machine's bookworm source names, so the
system's apt configuration is left as it is and no root is needed for it.
Where it cannot (no registry, not Debian), it says so and the golden tests
fail with the command to run.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ENV = "AIOVFIO_UAPI_INCLUDE"
SYSTEM_INCLUDE = Path("/usr/include")


def cache_dir() -> Path:
    """Where `python tests/unit/_headers.py` unpacks the newer linux-libc-dev (`dpkg -x`)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aiovfio" / "headers"


@dataclass(frozen=True)
class Headers:
    """One set of kernel uapi headers: the directory holding `linux/vfio.h`."""

    include: Path
    origin: str

    @property
    def version(self) -> tuple[int, int, int]:
        """The kernel version of the headers, from `linux/version.h`."""
        text = self.text("linux/version.h")
        parts = [
            re.search(rf"#define\s+LINUX_VERSION_{k}\s+(\d+)", text)
            for k in ("MAJOR", "PATCHLEVEL", "SUBLEVEL")
        ]
        if all(parts):
            a, b, c = (int(m.group(1)) for m in parts if m)
            return (a, b, c)
        code = re.search(r"#define\s+LINUX_VERSION_CODE\s+(\d+)", text)
        if code is None:
            pytest.fail(f"no LINUX_VERSION_CODE in {self.include / 'linux/version.h'}")
        n = int(code.group(1))
        return (n >> 16, (n >> 8) & 0xFF, n & 0xFF)

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))

    def has(self, relpath: str) -> bool:
        return (self.include / relpath).is_file()

    def text(self, relpath: str) -> str:
        return (self.include / relpath).read_text(encoding="utf-8", errors="replace")

    def cflags(self) -> list[str]:
        """`-I` options that put these headers before the system's."""
        if self.include.resolve() == SYSTEM_INCLUDE.resolve():
            return []
        flags = ["-I", str(self.include)]
        arch = _multiarch()
        if arch and (self.include / arch / "asm").is_dir():
            flags += ["-I", str(self.include / arch)]
        return flags

    def describe(self) -> str:
        return f"{self.include} ({self.origin}, kernel {self.version_str})"


def _usable(include: Path) -> bool:
    return (include / "linux" / "vfio.h").is_file()


def newest_headers() -> Headers:
    """The newest header set: $AIOVFIO_UAPI_INCLUDE, the cache, /usr/include."""
    env = os.environ.get(ENV)
    if env:
        include = Path(env)
        if not _usable(include):
            pytest.fail(f"${ENV}={env} has no linux/vfio.h")
        return Headers(include, f"${ENV}")
    cache = cache_dir()
    for include in (cache / "usr" / "include", cache):
        if _usable(include):
            return Headers(include, "bookworm-backports linux-libc-dev cache")
    return Headers(SYSTEM_INCLUDE, "system linux-libc-dev")


def system_headers() -> Headers:
    if not _usable(SYSTEM_INCLUDE):
        pytest.fail("no /usr/include/linux/vfio.h: apt-get install linux-libc-dev")
    return Headers(SYSTEM_INCLUDE, "system linux-libc-dev")


def complete(headers: Headers) -> bool:
    """Whether the headers have everything _uapi mirrors (iommufd, the 6.6+ VFIO cdev)."""
    return headers.has("linux/iommufd.h") and "VFIO_DEVICE_BIND_IOMMUFD" in headers.text(
        "linux/vfio.h"
    )


def how_to_get_headers(found: Headers) -> str:
    cache = cache_dir()
    return (
        f"the uapi headers in {found.describe()} lack linux/iommufd.h or the kernel 6.6+ "
        f"VFIO definitions (VFIO_DEVICE_BIND_IOMMUFD), so _uapi cannot be checked against "
        f"them. Fetch Debian bookworm-backports' linux-libc-dev into {cache} "
        f"(`nox -s tests` does this first; it needs the Debian package mirror):\n"
        f"    python tests/unit/_headers.py\n"
        f"or set {ENV} to an include directory with linux/vfio.h and linux/iommufd.h "
        f"of kernel 6.12 or later."
    )


# --- preparing the headers (run as a script) ----------------------------------------

#: What the golden tests compile with, as Debian packages.
BUILD_PACKAGES = ("gcc", "libc6-dev", "linux-libc-dev")
BACKPORTS = "bookworm-backports"
APT_SOURCES = (Path("/etc/apt/sources.list.d"), Path("/etc/apt/sources.list"))
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


class CannotPrepare(Exception):
    """The headers cannot be prepared here; the message says what to do."""


def debian_mirror(sources: tuple[Path, ...] = APT_SOURCES) -> str:
    """The first URI of this machine's `bookworm` apt source (deb822 or one-line)."""
    files: list[Path] = []
    for source in sources:
        files += sorted(source.glob("*.sources")) if source.is_dir() else [source]
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in stanza.splitlines())
                    if not k.startswith("#") and v
                }
                if "bookworm" in fields.get("suites", "").split() and fields.get("uris"):
                    return fields["uris"].split()[0]
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line).split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == "bookworm":
                    return parts[1]
    raise CannotPrepare(
        "no bookworm apt source in /etc/apt (this is not Debian 12?): get linux-libc-dev "
        f"6.12 or later by hand and set {ENV} to its include directory"
    )


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600, **kwargs)  # type: ignore[call-overload, no-any-return]


def _missing_packages() -> list[str]:
    if shutil.which("dpkg-query") is None:
        return []
    return [
        p
        for p in BUILD_PACKAGES
        if "install ok installed" not in _run(["dpkg-query", "-W", "-f=${Status}", p]).stdout
    ]


def install_build_packages() -> None:
    """apt-get install gcc, libc6-dev and linux-libc-dev where they are missing (root)."""
    missing = _missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise CannotPrepare(
            f"{', '.join(missing)} missing: run `apt-get install {' '.join(missing)}` as root"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"_headers: apt-get install {' '.join(missing)}", flush=True)
    _run(["apt-get", "update", "-qq"], env=env)
    done = _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)
    if done.returncode != 0:
        raise CannotPrepare(
            f"`apt-get install {' '.join(missing)}` failed: {done.stderr.strip()[-300:]}"
        )


def fetch_backports_headers(cache: Path | None = None) -> Path:
    """Unpack bookworm-backports' linux-libc-dev into the cache; returns its include dir.

    apt runs with a private state folder whose only source is the backports
    suite on this machine's own mirror: the system's apt lists and sources
    are not touched, and no root is needed.
    """
    cache = cache or cache_dir()
    mirror = debian_mirror()
    with tempfile.TemporaryDirectory(prefix="aiovfio-apt-") as tmp:
        state = Path(tmp)
        (state / "lists" / "partial").mkdir(parents=True)
        (state / "cache" / "archives" / "partial").mkdir(parents=True)
        (state / "deb").mkdir()
        sources = state / "backports.sources"
        sources.write_text(
            f"Types: deb\nURIs: {mirror}\nSuites: {BACKPORTS}\nComponents: main\n"
            f"Signed-By: {KEYRING}\n",
            encoding="utf-8",
        )
        options = [
            f"-oDir::Etc::SourceList={sources}",
            "-oDir::Etc::SourceParts=/nonexistent",
            f"-oDir::State::Lists={state / 'lists'}",
            f"-oDir::Cache={state / 'cache'}",
            "-oAPT::Sandbox::User=root" if os.geteuid() == 0 else "-oDebug::NoLocking=1",
        ]
        updated = _run(["apt-get", *options, "update", "-qq"])
        if updated.returncode != 0 or "Err:" in updated.stdout + updated.stderr:
            raise CannotPrepare(
                f"`apt-get update` of {BACKPORTS} failed (no package mirror reachable?): "
                f"{(updated.stderr or updated.stdout).strip()[-300:]}"
            )
        got = _run(["apt-get", *options, "download", "-qq", "linux-libc-dev"], cwd=state / "deb")
        debs = sorted((state / "deb").glob("linux-libc-dev_*.deb"))
        if got.returncode != 0 or not debs:
            raise CannotPrepare(
                f"`apt-get download linux-libc-dev` from {BACKPORTS} failed: "
                f"{(got.stderr or got.stdout).strip()[-300:]}"
            )
        unpacked = state / "unpacked"
        done = _run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)])
        if done.returncode != 0:
            raise CannotPrepare(f"`dpkg-deb -x {debs[-1].name}` failed: {done.stderr.strip()}")
        if cache.exists():
            shutil.rmtree(cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(unpacked), str(cache))
    return cache / "usr" / "include"


def prepare() -> int:
    """Make both header sets ready; 0 when they are, 1 (with what to do) when not."""
    try:
        install_build_packages()
        headers = newest_headers()
        if not complete(headers):
            print(f"_headers: fetching {BACKPORTS} linux-libc-dev into {cache_dir()}", flush=True)
            fetch_backports_headers()
            headers = newest_headers()
    except CannotPrepare as exc:
        print(f"_headers: cannot prepare the uapi headers: {exc}", file=sys.stderr)
        return 1
    if not complete(headers):
        print(f"_headers: {how_to_get_headers(headers)}", file=sys.stderr)
        return 1
    print(f"_headers: uapi headers for the golden test: {headers.describe()}")
    return 0


@functools.lru_cache(maxsize=1)
def _multiarch() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        return ""
    out = subprocess.run(
        [gcc, "-print-multiarch"], capture_output=True, text=True, check=False, timeout=60
    )
    return out.stdout.strip()


def run_probe(source: str, headers: Headers, workdir: Path, name: str = "probe") -> str:
    """Compile `source` against `headers` in `workdir`, run it, return its stdout.

    A compile error (e.g. a name _uapi mirrors that the header lacks) fails
    the calling test with gcc's diagnostics.
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed for the uapi golden tests: apt-get install gcc libc6-dev")
    src = workdir / f"{name}.c"
    exe = workdir / name
    src.write_text(source, encoding="utf-8")
    cmd = [gcc, "-std=gnu11", "-Wall", "-Werror", *headers.cflags(), "-o", str(exe), str(src)]
    built = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if built.returncode != 0:
        errors = [line for line in built.stderr.splitlines() if "error" in line]
        pytest.fail(
            f"the probe does not compile against {headers.describe()}: a name _uapi mirrors "
            f"is missing from the header or has another type.\n"
            + "\n".join(errors[:60])
            + f"\n(command: {' '.join(cmd)})",
            pytrace=False,
        )
    ran = subprocess.run([str(exe)], capture_output=True, text=True, check=False, timeout=60)
    if ran.returncode != 0:
        pytest.fail(f"{exe} exited {ran.returncode}: {ran.stderr}")
    return ran.stdout


if __name__ == "__main__":
    sys.exit(prepare())
