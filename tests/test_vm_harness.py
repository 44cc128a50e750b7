"""The QEMU-guest harness on the host, without a guest.

Argument handling, the initramfs, the QEMU command line, the job file the
guest sources, provisioning helpers, and the run protocol (exit codes,
timings, console tail) against a stand-in for QEMU.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from aiovfio.errors import SetupError
from aiovfio.testing import vm, vm_kernel, vm_setup
from aiovfio.testing.vm_setup import KernelImage, VmSetupError

RELEASE = "6.1.0-99-amd64"


# --- fixtures ----------------------------------------------------------------------


def _static_elf() -> bytes:
    """A 64-bit ELF header with no program headers: "static" to the harness."""
    header = bytearray(64)
    header[:5] = b"\x7fELF\x02"
    header[54:56] = (56).to_bytes(2, "little")
    return bytes(header)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A kernel cache with one fake 6.1 kernel (vmlinux, modules, modules.dep)."""
    root = tmp_path / "cache" / "linux-6.1"
    modules = root / "lib" / "modules" / RELEASE
    kernel = modules / "kernel"
    kernel.mkdir(parents=True)
    files = {
        "virtio_ring.ko": b"ring",
        "virtio.ko": b"virtio",
        "virtio_pci.ko": b"vpci",
        "9pnet.ko": b"9pnet",
        "9pnet_virtio.ko": b"9pv",
        "9p.ko": b"9p",
    }
    for name, data in files.items():
        (kernel / name).write_bytes(data)
    (kernel / "overlay.ko.xz").write_bytes(lzma.compress(b"overlay"))
    (modules / "modules.dep").write_text(
        textwrap.dedent(
            """\
            kernel/virtio_ring.ko:
            kernel/virtio.ko: kernel/virtio_ring.ko
            kernel/virtio_pci.ko: kernel/virtio.ko kernel/virtio_ring.ko
            kernel/9pnet.ko:
            kernel/9pnet_virtio.ko: kernel/9pnet.ko kernel/virtio.ko kernel/virtio_ring.ko
            kernel/9p.ko: kernel/9pnet.ko
            kernel/overlay.ko.xz:
            kernel/unrelated.ko: kernel/9p.ko
            """
        )
    )
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinux-{RELEASE}").write_bytes(_static_elf())
    meta = {"release": RELEASE, "package": f"linux-image-{RELEASE}", "version": "6.1.999-1"}
    (root / "kernel.json").write_text(json.dumps(meta))
    return tmp_path / "cache"


@pytest.fixture
def image(cache: Path) -> KernelImage:
    return vm_setup.find_kernel("6.1", cache)


@pytest.fixture
def busybox(tmp_path: Path) -> Path:
    path = tmp_path / "busybox"
    path.write_bytes(_static_elf() + b"busybox")
    return path


def _cpio_entries(blob: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, rdev) of a newc archive."""
    entries: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    pos = 0
    while True:
        assert blob[pos : pos + 6] == b"070701"
        fields = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmajor, rminor, namesize = (
            fields[1],
            fields[6],
            fields[9],
            fields[10],
            fields[11],
        )
        name = blob[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        data = blob[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(blob)
            return entries
        entries[name] = (mode, data, (rmajor, rminor))


# --- command line ------------------------------------------------------------------


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert vm.main(["--help"]) == 0
    assert "124 timeout" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kernel", "5.10", "--", "true"], "unknown kernel flavour '5.10'"),
        (["--edu", "two", "--", "true"], "invalid int value"),
        ([], "no command given"),
        (["--"], "no command given"),
        (["--setup", "--", "true"], "--setup takes no command"),
        (["--kernel", "6.1", "--kernel", "6.12", "--", "true"], "one --kernel"),
        (["--edu", "20", "--", "true"], "--edu and --nvme"),
        (["--mem", "lots", "--", "true"], "--mem"),
        (["--timeout", "-1", "--", "true"], "--timeout"),
    ],
)
def test_bad_usage_is_exit_2_with_one_message(
    argv: list[str],
    message: str,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AIOVFIO_VM_CACHE", str(cache))
    monkeypatch.setattr(shutil, "which", lambda name, path=None: "/usr/bin/" + name)
    assert vm.main(argv) == vm.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err
    assert len(err.splitlines()) == 1, err


def test_missing_cache_says_to_run_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AIOVFIO_VM_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(shutil, "which", lambda name, path=None: "/usr/bin/" + name)
    assert vm.main(["--kernel", "6.12", "--", "true"]) == vm.EXIT_USAGE
    err = capsys.readouterr().err
    assert "kernel 6.12 is not in the cache" in err
    assert "aiovfio vm --setup" in err


def test_missing_qemu_is_exit_2(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AIOVFIO_VM_CACHE", str(cache))
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)
    assert vm.main(["--", "true"]) == vm.EXIT_USAGE
    assert "qemu-system-x86_64 is not installed" in capsys.readouterr().err


def test_setup_error_is_an_aiovfio_setup_error() -> None:
    assert issubclass(VmSetupError, SetupError)
    with pytest.raises(VmSetupError, match="unknown kernel flavour"):
        vm_setup.find_kernel("4.19")


def test_the_module_runs_as_a_script() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "aiovfio.testing.vm", "--kernel", "nope", "--", "true"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == vm.EXIT_USAGE
    assert done.stderr == (
        "aiovfio vm: unknown kernel flavour 'nope'; choose one of 6.1, 6.12, 6.12-iommufd\n"
    )


def test_a_bad_flavour_is_named_before_the_host_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a fresh machine: no QEMU, no cache; the typo is still what gets reported
    monkeypatch.setenv("AIOVFIO_VM_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)
    assert vm.main(["--kernel", "nope", "--", "true"]) == vm.EXIT_USAGE
    assert "unknown kernel flavour 'nope'" in capsys.readouterr().err


def test_noiommu_needs_the_built_kernel(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AIOVFIO_VM_CACHE", str(cache))
    monkeypatch.setattr(shutil, "which", lambda name, path=None: "/usr/bin/" + name)
    assert vm.main(["--kernel", "6.1", "--iommu", "none", "--", "true"]) == vm.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--iommu none needs a kernel with VFIO's noiommu mode" in err
    assert "--kernel 6.12-iommufd" in err


def test_on_names_kernel_and_iommu_so_they_cannot_be_given_too(
    cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AIOVFIO_VM_CACHE", str(cache))
    assert vm.main(["--on", "noiommu", "--kernel", "6.1", "--", "true"]) == vm.EXIT_USAGE
    assert "give no --kernel or --iommu" in capsys.readouterr().err


def test_the_built_kernel_missing_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(VmSetupError, match=r"run `aiovfio vm --setup --kernel 6\.12-iommufd`"):
        vm_setup.find_kernel("6.12-iommufd", tmp_path)


def _built_cache(cache: Path, key: str) -> Path:
    root = cache / "linux-6.12-iommufd"
    release = "6.12.117-aiovfio"
    modules = root / "lib" / "modules" / release
    modules.mkdir(parents=True)
    builtin = [f"kernel/x/{m}.ko" for m in ("virtio_pci", "9pnet_virtio", "9p", "overlay")]
    (modules / "modules.builtin").write_text("\n".join(builtin) + "\n")
    (modules / "modules.dep").write_text("")
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinux-{release}").write_bytes(_static_elf())
    meta = {"release": release, "package": "linux-source-6.12", "version": "6.12.117-1", "key": key}
    (root / "kernel.json").write_text(json.dumps(meta))
    return root


def test_a_kernel_built_with_another_recipe_is_rebuilt(cache: Path) -> None:
    _built_cache(cache, "0123456789ab")
    with pytest.raises(VmSetupError, match=r"another recipe.*--setup --kernel 6\.12-iommufd"):
        vm_setup.find_kernel("6.12-iommufd", cache)


def test_the_built_kernel_has_iommufd_and_an_initramfs_without_modules(
    cache: Path, busybox: Path, tmp_path: Path
) -> None:
    _built_cache(cache, vm_kernel.config_key())
    image = vm_setup.find_kernel("6.12-iommufd", cache)
    assert image.built and image.iommufd
    assert not vm_setup.find_kernel("6.1", cache).iommufd
    entries = _cpio_entries(
        vm.build_initramfs(image, tmp_path / "initramfs", busybox=busybox).read_bytes()
    )
    assert entries["etc/modules"][1] == b"\n"  # all built in: init loads nothing
    assert not [name for name in entries if name.endswith(".ko")]


def test_the_build_recipe_is_checked_and_keyed() -> None:
    assert "IOMMUFD_VFIO_CONTAINER" in vm_kernel.CONFIG_FRAGMENT
    assert {"MODULES", "VFIO_CONTAINER"} <= set(vm_kernel.CONFIG_DISABLE)
    assert len(vm_kernel.config_key()) == 12
    assert vm_kernel.config_key() == vm_kernel.config_key()


def test_a_config_that_lost_an_option_is_refused(tmp_path: Path) -> None:
    config = tmp_path / ".config"
    lines = [f"CONFIG_{n}=y" for n in vm_kernel.CONFIG_FRAGMENT if n != "VFIO_DEVICE_CDEV"]
    config.write_text(
        "\n".join([*lines, "# CONFIG_VFIO_DEVICE_CDEV is not set", "CONFIG_MODULES=y"])
    )
    with pytest.raises(vm_kernel.BuildError) as caught:
        vm_kernel._check_config(config)
    assert "CONFIG_VFIO_DEVICE_CDEV is unset" in str(caught.value)
    assert "CONFIG_MODULES is y" in str(caught.value)
    config.write_text("\n".join(f"CONFIG_{n}=y" for n in vm_kernel.CONFIG_FRAGMENT))
    vm_kernel._check_config(config)


def test_a_build_without_tools_or_space_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def runner(*args: object, **kwargs: object) -> str:
        raise AssertionError("nothing may run")

    build = {
        "source_deb": tmp_path / "src.deb",
        "version": "1",
        "work": tmp_path / "work",
        "image_root": tmp_path / "image",
        "runner": runner,
        "progress": lambda message: None,
    }
    monkeypatch.setattr(vm_kernel, "BUILD_PACKAGES", {"flex": str(tmp_path / "no-flex")})
    with pytest.raises(vm_kernel.BuildError, match="needs flex: run `aiovfio vm --setup"):
        vm_kernel.build(**build)  # type: ignore[arg-type]
    monkeypatch.setattr(vm_kernel, "BUILD_PACKAGES", {})
    monkeypatch.setattr(vm_kernel, "NEEDED_SPACE", 1 << 60)
    with pytest.raises(vm_kernel.BuildError, match=r"GiB free in .*AIOVFIO_VM_CACHE"):
        vm_kernel.build(**build)  # type: ignore[arg-type]
    assert not (tmp_path / "work").exists()


def test_nox_knows_every_setup() -> None:
    import ast

    tree = ast.parse(Path(__file__).parent.parent.joinpath("noxfile.py").read_text())

    def constant(name: str) -> tuple[str, ...]:
        return tuple(
            next(
                ast.literal_eval(node.value)
                for node in ast.walk(tree)
                if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
            )
        )

    assert list(constant("VM_SETUPS")) == [s.name for s in vm.SETUPS]
    # CI (`nox -s vm` with no setup named) runs every setup, in an order of them all
    assert set(constant("VM_DEFAULT")) == set(constant("VM_SETUPS"))
    assert sorted(constant("VM_ORDER")) == sorted(constant("VM_SETUPS"))
    assert {s.kernel for s in vm.SETUPS} == set(vm_setup.FLAVOURS)


# --- devices, shares, QEMU ---------------------------------------------------------


def test_devices_sit_at_fixed_slots_from_4() -> None:
    devices = vm.guest_devices(2, 1)
    assert [(d.kind, d.bdf) for d in devices] == [
        ("edu", "0000:00:04.0"),
        ("edu", "0000:00:05.0"),
        ("nvme", "0000:00:06.0"),
    ]
    assert devices[2].ids == "1b36:0010"
    assert devices[2].pci_class == "0x010802"
    assert vm.guest_devices(0, 0) == ()


def test_shares_take_the_free_slots(tmp_path: Path) -> None:
    devices = vm.guest_devices(1, 1)
    rw = (tmp_path / "a", tmp_path / "b")
    shares = vm._shares(tmp_path / "run", rw, devices)
    assert [(s.tag, s.slot) for s in shares] == [
        ("hostroot", 1),
        ("aiovfio", 2),
        ("rw0", 3),
        ("rw1", 6),
    ]
    assert not shares[0].writable


def test_rw_folders_are_absolute_and_not_nested(tmp_path: Path) -> None:
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    assert vm._normalise_rw([inner, tmp_path / "a", tmp_path / "a"]) == (tmp_path / "a",)
    with pytest.raises(VmSetupError, match="no such folder"):
        vm._normalise_rw([tmp_path / "missing"])
    with pytest.raises(VmSetupError, match="read-only"):
        vm._normalise_rw(["/"])


def test_qemu_command(image: KernelImage, tmp_path: Path) -> None:
    run = tmp_path / "run,dir"
    devices = vm.guest_devices(1, 1)
    shares = vm._shares(run, (Path("/work/main"),), devices)
    argv = vm.qemu_command(
        qemu="qemu",
        image=image,
        initrd=tmp_path / "init.cpio",
        run_dir=run,
        devices=devices,
        shares=shares,
        append=["vfio_iommu_type1.dma_entry_limit=16"],
    )
    assert argv[argv.index("-kernel") + 1] == str(image.vmlinux)
    assert argv[argv.index("-accel") + 1] == "tcg"
    cmdline = argv[argv.index("-append") + 1]
    assert "intel_iommu=on" in cmdline.split()
    assert "vfio.enable_unsafe_noiommu_mode=1" not in cmdline
    assert cmdline.endswith("vfio_iommu_type1.dma_entry_limit=16")
    assert "stdio,id=out,signal=off" in argv
    # the IOMMU precedes every PCI device
    devs = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devs[0].startswith("intel-iommu")
    assert "edu,id=edu0,addr=0x4.0" in devs
    assert any(
        d.startswith("nvme,id=nvme0,serial=aiovfio0") and d.endswith("addr=0x5.0") for d in devs
    )
    # commas in paths are doubled for QEMU's option parser
    assert any(f"path={tmp_path}/run,,dir," in a for a in argv)


def test_qemu_command_without_an_iommu(image: KernelImage, tmp_path: Path) -> None:
    devices = vm.guest_devices(1, 0)
    argv = vm.qemu_command(
        qemu="qemu",
        image=image,
        initrd=tmp_path / "init.cpio",
        run_dir=tmp_path,
        devices=devices,
        shares=vm._shares(tmp_path, (), devices),
        iommu="none",
    )
    words = argv[argv.index("-append") + 1].split()
    assert "vfio.enable_unsafe_noiommu_mode=1" in words
    assert "intel_iommu=on" not in words
    assert not [a for a in argv if a.startswith("intel-iommu")]


# --- the job the guest sources -----------------------------------------------------


def test_job_round_trips_argv_env_and_settings(tmp_path: Path) -> None:
    argv = ["python3", "-c", "print('it''s $HOME')", "", "a b\nc", "*"]
    env = {"PLAIN": "1", "QUOTED": 'it\'s "x" $y `z`', "PWD": "/nope", "bad-name": "x", "vm_x": "1"}
    job = vm.job_script(
        argv,
        env=env,
        cwd=Path("/work/main"),
        timeout=90,
        devices=vm.guest_devices(1, 1),
        kernel="6.12",
        iommu="none",
    )
    (tmp_path / "job").write_text(job)
    script = (
        '. "$1"; printf "%s\\0" "$@"; printf "%s\\0" "$PLAIN" "$QUOTED" "${PWD:-}" '
        '"$AIOVFIO_GUEST" "$AIOVFIO_VM_EDU" "$AIOVFIO_VM_NVME" "$AIOVFIO_VM_KERNEL" '
        '"$AIOVFIO_VM_IOMMU" "$vm_cwd" "$vm_timeout" "$vm_devices" "${vm_x:-unset}"'
    )
    done = subprocess.run(
        ["/bin/sh", "-c", script, "sh", str(tmp_path / "job")],
        capture_output=True,
        env={"PATH": os.environ["PATH"]},
        check=True,
    )
    values = done.stdout.decode().split("\0")[:-1]
    assert values[: len(argv)] == argv
    assert values[len(argv) :] == [
        "1",
        'it\'s "x" $y `z`',
        str(Path.cwd()),  # the shell's own PWD, not the caller's
        "1",
        "0000:00:04.0",
        "0000:00:05.0",
        "6.12",
        "none",
        "/work/main",
        "90",
        "edu,0000:00:04.0,1234:11e8,0x00ff00 nvme,0000:00:05.0,1b36:0010,0x010802",
        "unset",
    ]


def test_guest_scripts_are_shipped_and_parse() -> None:
    for name in ("stage.sh", "bind.sh", "init"):
        text = vm._guest_file(name).decode()
        assert text.strip()
        subprocess.run(["/bin/sh", "-n", "-c", text], check=True)


# --- initramfs ---------------------------------------------------------------------


def test_module_order_puts_dependencies_first(image: KernelImage) -> None:
    order = vm._module_order(image.modules, ("virtio_pci", "9pnet_virtio", "9p", "overlay"))
    assert order == [
        "kernel/virtio_ring.ko",
        "kernel/virtio.ko",
        "kernel/virtio_pci.ko",
        "kernel/9pnet.ko",
        "kernel/9pnet_virtio.ko",
        "kernel/9p.ko",
        "kernel/overlay.ko.xz",
    ]
    with pytest.raises(VmSetupError, match="missing"):
        vm._module_order(image.modules, ("nosuchmodule",))


def test_initramfs_holds_busybox_init_nodes_and_modules(
    image: KernelImage, busybox: Path, tmp_path: Path
) -> None:
    out = vm.build_initramfs(image, tmp_path / "initramfs", busybox=busybox)
    entries = _cpio_entries(out.read_bytes())
    assert entries["init"][1] == vm._guest_file("init")
    assert entries["init"][0] == 0o100755
    assert entries["bin/busybox"][1] == busybox.read_bytes()
    assert entries["dev/console"][0] == 0o020600
    assert entries["dev/console"][2] == (5, 1)
    assert entries["dev/ttyS1"][2] == (4, 65)
    moddir = f"lib/modules/{RELEASE}"
    assert entries[f"{moddir}/overlay.ko"][1] == b"overlay"  # decompressed
    names = entries["etc/modules"][1].decode().split()
    assert names == [
        "virtio_ring",
        "virtio",
        "virtio_pci",
        "9pnet",
        "9pnet_virtio",
        "9p",
        "overlay",
    ]
    # in load order, without dependencies: `modprobe -a` loads them as listed
    dep = entries[f"{moddir}/modules.dep"][1].decode()
    assert dep.splitlines() == [f"{name}.ko:" for name in names]
    for folder in ("lower", "upper", "root"):
        assert stat.S_ISDIR(entries[folder][0])
    # cached by content
    assert vm.build_initramfs(image, tmp_path / "initramfs", busybox=busybox) == out


def test_initramfs_needs_a_static_busybox(image: KernelImage, tmp_path: Path) -> None:
    dynamic = tmp_path / "busybox"
    elf = bytearray(_static_elf()) + bytes(56)
    elf[32:40] = (64).to_bytes(8, "little")  # e_phoff
    elf[56:58] = (1).to_bytes(2, "little")  # e_phnum
    elf[64:68] = (3).to_bytes(4, "little")  # PT_INTERP
    dynamic.write_bytes(bytes(elf))
    with pytest.raises(VmSetupError, match="busybox-static"):
        vm.build_initramfs(image, tmp_path, busybox=dynamic)
    with pytest.raises(VmSetupError, match="missing"):
        vm.build_initramfs(image, tmp_path, busybox=tmp_path / "absent")


# --- provisioning helpers ----------------------------------------------------------


def test_extract_vmlinux_finds_the_compressed_elf(tmp_path: Path) -> None:
    elf = _static_elf() + bytes(range(256)) * 40
    bzimage = tmp_path / "vmlinuz"
    bzimage.write_bytes(b"MZ" + b"\0" * 500 + b"\xfd7zXZ\x00junk" + lzma.compress(elf) + b"tail")
    out = tmp_path / "vmlinux"
    vm_setup.extract_vmlinux(bzimage, out)
    assert out.read_bytes() == elf
    bzimage.write_bytes(b"MZ no kernel here")
    with pytest.raises(VmSetupError, match="no compressed ELF"):
        vm_setup.extract_vmlinux(bzimage, out)


def test_mirror_uri_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text(
        textwrap.dedent(
            """\
            Types: deb
            # a comment
            URIs: https://mirror.invalid/debian
            Suites: bookworm bookworm-updates
            Components: main

            Types: deb
            URIs: https://mirror.invalid/debian-security
            Suites: bookworm-security
            Components: main
            """
        )
    )
    legacy = tmp_path / "sources.list"
    legacy.write_text("deb [arch=amd64] https://other.invalid/debian trixie main\n")
    assert vm_setup.mirror_uri("bookworm", sources=sources, legacy=legacy) == (
        "https://mirror.invalid/debian"
    )
    assert vm_setup.mirror_uri("trixie", sources=sources, legacy=legacy) == (
        "https://other.invalid/debian"
    )
    with pytest.raises(VmSetupError, match="no apt source"):
        vm_setup.mirror_uri("sid", sources=sources, legacy=legacy)


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIOVFIO_VM_CACHE", str(tmp_path))
    assert vm_setup.cache_dir() == tmp_path
    monkeypatch.delenv("AIOVFIO_VM_CACHE")
    assert vm_setup.cache_dir() == Path.home() / ".cache" / "aiovfio-vm"


def test_incomplete_cache_entry_is_not_a_kernel(cache: Path) -> None:
    (cache / "linux-6.1" / "boot" / f"vmlinux-{RELEASE}").unlink()
    with pytest.raises(VmSetupError, match="aiovfio vm --setup"):
        vm_setup.find_kernel("6.1", cache)


# --- the run protocol, with a stand-in for QEMU ------------------------------------

FAKE_QEMU = """\
#!/bin/sh
# Stands in for QEMU: finds the run folder, plays the guest's part, exits.
for a in "$@"; do
    case $a in local,id=aiovfio,path=*) run=${a#local,id=aiovfio,path=}; run=${run%%,*} ;; esac
done
echo "[    0.1] booting" >"$run/console.log"
case $FAKE_GUEST in
ok)
    echo "guest says hello"
    printf 'stage 2.5\\nbound 3.0\\ndone 4.25\\n' >"$run/times"
    echo "edu 0000:00:04.0 group=4 driver=vfio-pci" >"$run/devices"
    echo 7 >"$run/rc" ;;
bind) echo 125 >"$run/rc"; echo "edu 0000:00:04.0 group=none driver=none" >"$run/devices" ;;
panic) echo "[    3.0] Kernel panic - not syncing" >>"$run/console.log"; echo "qemu: warning" >&2 ;;
crash) echo "stage 2.0" >"$run/times" ;;
hang) sleep 30 ;;
esac
"""


@pytest.fixture
def fake_qemu(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    qemu = bin_dir / "qemu-system-x86_64"
    qemu.write_text(FAKE_QEMU)
    qemu.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("AIOVFIO_VM_CACHE", str(cache))
    monkeypatch.setenv("FAKE_GUEST", "")
    monkeypatch.setattr(vm, "build_initramfs", lambda image, out_dir: tmp_path / "init.cpio")
    return qemu


def _run(guest: str, tmp_path: Path, timeout: float = 900.0) -> vm.GuestResult:
    os.environ["FAKE_GUEST"] = guest  # for the stand-in; monkeypatch restores it
    with (tmp_path / "stdout").open("wb") as stdout:
        return vm.run_in_guest(["true"], cwd=tmp_path, stdout=stdout, timeout=timeout)


def test_run_returns_the_command_code_output_and_timings(fake_qemu: Path, tmp_path: Path) -> None:
    result = _run("ok", tmp_path)
    assert result.returncode == 7
    assert not result.ok
    assert result.kernel == RELEASE
    assert (tmp_path / "stdout").read_text() == "guest says hello\n"
    assert (result.timings.boot, result.timings.bound, result.timings.done) == (2.5, 3.0, 4.25)
    assert result.timings.wall > 0
    assert result.devices == ("edu 0000:00:04.0 group=4 driver=vfio-pci",)


def test_run_reports_a_failed_binding(fake_qemu: Path, tmp_path: Path) -> None:
    result = _run("bind", tmp_path)
    assert result.returncode == vm.EXIT_BIND_FAILED
    assert result.devices == ("edu 0000:00:04.0 group=none driver=none",)


def test_a_guest_that_dies_is_99_with_its_console(fake_qemu: Path, tmp_path: Path) -> None:
    result = _run("panic", tmp_path)
    assert result.returncode == vm.EXIT_GUEST_DIED
    assert "Kernel panic" in result.console_tail
    assert "qemu: warning" in result.qemu_messages
    assert result.timings.done is None
    assert result.boots == vm.BOOT_ATTEMPTS  # it died before its stage: booted again


def test_a_guest_that_dies_after_booting_is_not_booted_again(
    fake_qemu: Path, tmp_path: Path
) -> None:
    result = _run("crash", tmp_path)
    assert result.returncode == vm.EXIT_GUEST_DIED
    assert result.boots == 1


def test_a_guest_past_its_time_is_killed_with_124(
    fake_qemu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vm, "BOOT_ALLOWANCE", 0.0)
    result = _run("hang", tmp_path, timeout=0.5)
    assert result.returncode == vm.EXIT_TIMEOUT
    assert result.timings.wall < 10


def test_main_prints_the_console_tail_on_failure(
    fake_qemu: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FAKE_GUEST", "panic")
    monkeypatch.chdir(tmp_path)
    assert vm.main(["--", "true"]) == vm.EXIT_GUEST_DIED
    err = capfd.readouterr().err
    assert "guest console (tail)" in err
    assert "Kernel panic" in err
    assert "exit 99" in err


def test_run_leaves_no_run_folder_behind(
    fake_qemu: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)
    _run("ok", tmp_path)
    assert list((tmp_path / "tmp").iterdir()) == []


# --- provisioning: refusals and the backports source -------------------------------


def test_setup_refuses_without_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm_setup, "_missing_packages", lambda packages: ["qemu-system-x86"])
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(VmSetupError, match="must run as root"):
        vm_setup.setup(cache=tmp_path)


def test_setup_with_everything_in_place_changes_nothing(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vm_setup, "_missing_packages", lambda packages: [])
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # so it cannot have tried apt
    assert [k.release for k in vm_setup.setup(["6.1"], cache=cache)] == [RELEASE]


def test_unreachable_registry_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "apt-get"
    fake.write_text("#!/bin/sh\necho 'E: Failed to fetch something' >&2\nexit 100\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(VmSetupError, match="registry reachable") as caught:
        vm_setup._Apt().update()
    assert "Failed to fetch" in str(caught.value)


def test_backports_are_added_once_from_the_configured_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = tmp_path / "sources.list.d"
    sources.mkdir()
    (sources / "debian.sources").write_text(
        "Types: deb\nURIs: https://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n"
    )
    monkeypatch.setattr(vm_setup, "_SOURCES_DIR", sources)
    monkeypatch.setattr(vm_setup, "_SOURCES_LIST", tmp_path / "sources.list")
    monkeypatch.setattr(vm_setup, "_DEBIAN_SOURCES", sources / "debian.sources")
    monkeypatch.setattr(vm_setup, "_BACKPORTS_SOURCES", sources / "aiovfio-backports.sources")
    assert vm_setup._ensure_backports("bookworm")
    added = (sources / "aiovfio-backports.sources").read_text()
    assert "URIs: https://mirror.invalid/debian\n" in added
    assert "Suites: bookworm-backports\n" in added
    assert not vm_setup._ensure_backports("bookworm")


def test_a_stopped_build_is_resumed_with_the_same_source(tmp_path: Path) -> None:
    work = tmp_path / "build"
    tree = work / "linux-source-6.12"
    tree.mkdir(parents=True)
    (tree / "Makefile").write_text("# kernel\n")
    assert vm_kernel._unpacked_tree(work, "6.12.117-1") is None  # no stamp: start afresh
    (work / "configured").write_text("6.12.117-1\n")
    assert vm_kernel._unpacked_tree(work, "6.12.117-1") == tree  # reconfigured, then make
    assert vm_kernel._unpacked_tree(work, "6.12.118-1") is None  # another source
