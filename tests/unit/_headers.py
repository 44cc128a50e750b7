"""Find the kernel's uapi headers and run small C probes compiled against them.

Two header sets matter to the golden tests:

* the newest: `$AIOVFIO_UAPI_INCLUDE`, else the cache folder that `.ci/run`
  fills with Debian bookworm-backports' linux-libc-dev (6.12), else
  `/usr/include`. It must have `linux/iommufd.h` and the 6.6+ VFIO
  definitions; the tests that need it fail, never skip, when it lacks them.
* the system's: `/usr/include` (Debian 12: linux-libc-dev 6.1).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ENV = "AIOVFIO_UAPI_INCLUDE"
SYSTEM_INCLUDE = Path("/usr/include")


def cache_dir() -> Path:
    """Where `.ci/run` unpacks the newer linux-libc-dev (`dpkg -x`)."""
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


def how_to_get_headers(found: Headers) -> str:
    cache = cache_dir()
    return (
        f"the uapi headers in {found.describe()} lack linux/iommufd.h or the kernel 6.6+ "
        f"VFIO definitions (VFIO_DEVICE_BIND_IOMMUFD), so _uapi cannot be checked against "
        f"them. Get Debian bookworm-backports' linux-libc-dev beside the system headers, "
        f"as .ci/run does (as root, with the bookworm-backports apt source enabled):\n"
        f"    mkdir -p {cache} && cd {cache} && "
        f"apt-get download -t bookworm-backports linux-libc-dev && "
        f"dpkg -x linux-libc-dev_*.deb . && rm linux-libc-dev_*.deb\n"
        f"or set {ENV} to an include directory with linux/vfio.h and linux/iommufd.h "
        f"of kernel 6.12 or later."
    )


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
