"""The real-kernel suite: it runs only inside the aiovfio QEMU guest.

    aiovfio vm --kernel 6.1 -- python -m pytest -p no:cacheprovider tests/vm

(`nox -s vm` does this for each Debian kernel.) The guest's stage exports
AIOVFIO_GUEST=1 and the PCI addresses of its devices in AIOVFIO_VM_EDU and
AIOVFIO_VM_NVME. A suite that proves the real kernel must never pass by not
running, so:

* collected outside the guest, this conftest fails the run;
* a missing device fails the tests that need it;
* inside the guest a skipped test counts as failed (mark what a kernel cannot
  do `xfail(strict=True)` instead), and a run that passes no test fails: the
  aiovfio pytest plugin does this for every test in the guest, not just these.

The tests elsewhere marked `@pytest.mark.kernel` run here too, with the same
bodies they run on the simulated machine (`nox -s vm` collects them).

The suite runs on five setups (`aiovfio vm --on NAME`). A test that cannot
apply to one says why with a marker, and is deselected there (listed with its
reason at the end of the run, never skipped silently):

* `@pytest.mark.needs_iommu("why")`: not under noiommu (`--iommu none`);
* `@pytest.mark.needs_noiommu("why")`: only under noiommu;
* `@pytest.mark.needs_type1("why")`: only where /dev/vfio/vfio is the real
  type1 container, not iommufd's emulation of it (the 6.12-iommufd kernel);
* `@pytest.mark.needs_iommufd("why")`: only on a kernel with iommufd (not
  Debian's);
* `@pytest.mark.needs_container("why")`: only where `open_device` takes the
  legacy container (not the setup that opens devices through their cdev).
"""

from __future__ import annotations

import os

import pytest

from aiovfio.kernel.linux import LinuxKernel

if os.environ.get("AIOVFIO_GUEST") != "1":
    raise pytest.UsageError(
        "tests/vm runs on the real kernel inside the aiovfio QEMU guest only: "
        "`aiovfio vm -- python -m pytest -p no:cacheprovider tests/vm` or `nox -s vm`"
    )


def pytest_configure(config: pytest.Config) -> None:
    """Under noiommu every open_device warns (NoiommuWarning, on purpose): shown, not an error."""
    if os.environ.get("AIOVFIO_VM_IOMMU") == "none":
        config.addinivalue_line("filterwarnings", "default::aiovfio.errors.NoiommuWarning")


def _not_here() -> dict[str, str]:
    """Marker name -> what this setup lacks, for the markers that cannot apply."""
    lacks = {}
    if os.environ.get("AIOVFIO_VM_IOMMU") == "none":
        lacks["needs_iommu"] = "no IOMMU in this guest (noiommu)"
    else:
        lacks["needs_noiommu"] = "this guest has an IOMMU (not VFIO's noiommu mode)"
    if os.environ.get("AIOVFIO_VM_KERNEL", "").endswith("-iommufd"):
        lacks["needs_type1"] = "/dev/vfio/vfio is iommufd's emulation of type1 here"
    else:
        lacks["needs_iommufd"] = "Debian's kernel has no iommufd"
    if os.environ.get("AIOVFIO_BACKEND") == "iommufd":
        lacks["needs_container"] = "open_device takes the device cdev and an IOAS here"
    return lacks


_deselected: list[tuple[str, str]] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests/vm real-kernel only; deselect what cannot apply to this setup."""
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.kernel)
    lacks = _not_here()
    keep, drop = [], []
    for item in items:
        why = [
            f"{lacks[m.name]}: {m.args[0] if m.args else m.name}"
            for m in item.iter_markers()
            if m.name in lacks
        ]
        if why:
            drop.append(item)
            _deselected.append((item.nodeid, "; ".join(why)))
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    setup = os.environ.get("AIOVFIO_VM_SETUP", "(no --on)")
    if _deselected:
        terminalreporter.section(f"deselected on setup {setup}")
        for nodeid, why in _deselected:
            terminalreporter.write_line(f"{nodeid}: {why}")


@pytest.fixture(scope="session")
def linux() -> LinuxKernel:
    """The real kernel boundary."""
    return LinuxKernel()


def _device(variable: str, what: str) -> str:
    bdfs = os.environ.get(variable, "").split()
    if not bdfs:
        pytest.fail(f"no {what} in this guest ({variable} is empty): boot it with --{what} 1")
    return bdfs[0]


@pytest.fixture(scope="session")
def edu_bdf() -> str:
    """The PCI address of the guest's first edu device, bound to vfio-pci."""
    return _device("AIOVFIO_VM_EDU", "edu")


@pytest.fixture(scope="session")
def nvme_bdf() -> str:
    """The PCI address of the guest's first nvme controller, bound to vfio-pci."""
    return _device("AIOVFIO_VM_NVME", "nvme")
