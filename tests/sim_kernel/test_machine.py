"""Machine: topology, validation of models, driver binding, repr, lifecycle."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence

import pytest

import aiovfio
from aiovfio._uapi.pci import CapId
from aiovfio.sim import IrqSpec, Machine, RegionSpec

from .rig import NAME, PAGE, Toy


def test_add_device_numbers_groups(machine: Machine) -> None:
    machine.add_device(Toy(), name="0000:00:04.0")
    machine.add_device(Toy(), name="0000:00:05.0")
    machine.add_device(Toy(), name="0000:00:05.1", group=11)
    k = machine.kernel
    assert k.iommu_group("0000:00:04.0") == 10
    assert k.group_devices(11) == ("0000:00:05.0", "0000:00:05.1")
    assert machine.device_names == ("0000:00:04.0", "0000:00:05.0", "0000:00:05.1")


@pytest.mark.parametrize(
    "name", ["00:04.0", "0000:00:04.8", "0000:00:20.0", "0000:00:0A.0", "0000:0:04.0", 4]
)
def test_add_device_validates_the_address(machine: Machine, name: object) -> None:
    with pytest.raises(ValueError, match="PCI address"):
        machine.add_device(Toy(), name=name)  # type: ignore[arg-type]


def test_add_device_refuses_duplicates(machine: Machine) -> None:
    toy = Toy()
    machine.add_device(toy, name=NAME)
    with pytest.raises(ValueError, match="already"):
        machine.add_device(Toy(), name=NAME)
    with pytest.raises(ValueError, match="already plugged"):
        machine.add_device(toy, name="0000:00:05.0")
    with pytest.raises(aiovfio.InvalidArgument):
        machine.add_device(object(), name="0000:00:06.0")  # type: ignore[arg-type]


class Custom(Toy):
    def __init__(self, regions: Sequence[RegionSpec], irqs: Sequence[IrqSpec] = ()) -> None:
        super().__init__()
        self._regions = regions
        self._irqs = irqs

    def regions(self) -> Sequence[RegionSpec]:
        return self._regions

    def irqs(self) -> Sequence[IrqSpec]:
        return self._irqs


@pytest.mark.parametrize(
    ("regions", "message"),
    [
        ((RegionSpec(index=7, size=256),), "BARs 0-5"),
        ((RegionSpec(index=0, size=0x1000), RegionSpec(index=0, size=0x1000)), "twice"),
        ((RegionSpec(index=0, size=0x1800),), "power of two"),
        ((RegionSpec(index=0, size=8),), "power of two"),
        ((RegionSpec(index=0, size=0x4000, mmap_areas=((0x10, PAGE),)),), "page aligned"),
        ((RegionSpec(index=0, size=PAGE, mmap_areas=((0, 2 * PAGE),)),), "inside"),
        ((RegionSpec(index=5, size=PAGE, is_64bit=True),), "64-bit"),
        ((RegionSpec(index=0, size=PAGE, is_64bit=True), RegionSpec(index=1, size=PAGE)), "64-bit"),
        ((RegionSpec(index=6, size=PAGE, mmap_areas=((0, PAGE),)),), "ROM"),
    ],
)
def test_add_device_validates_regions(
    machine: Machine, regions: Sequence[RegionSpec], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        machine.add_device(Custom(regions), name=NAME)
    assert machine.device_names == ()


def test_add_device_checks_irq_counts_against_config(machine: Machine) -> None:
    bad = Custom((RegionSpec(index=0, size=PAGE),), (IrqSpec(1, 2),))  # config says 4
    with pytest.raises(ValueError, match="MSI has 2"):
        machine.add_device(bad, name=NAME)


def test_capabilities_must_fit(machine: Machine) -> None:
    class Big(Toy):
        def capabilities(self) -> Sequence[tuple[int, bytes]]:
            return [(CapId.VNDR, bytes(100))] * 3

    with pytest.raises(ValueError, match="do not fit"):
        machine.add_device(Big(), name=NAME)


def test_msix_table_location_is_decoded(machine: Machine) -> None:
    machine.add_device(Toy(), name=NAME)
    table = machine._devices[NAME].config.msix_table
    assert table is not None and (table.bar, table.offset, table.size) == (0, 0x800, 128)


def test_bar_addresses_are_aligned_and_distinct(machine: Machine) -> None:
    machine.add_device(Toy(), name="0000:00:04.0")
    machine.add_device(Toy(), name="0000:00:05.0")
    bars = [b for n in machine.device_names for b in machine._devices[n].bars.values()]
    for bar in bars:
        assert bar.address % bar.size == 0
    spans = sorted((b.address, b.address + b.size) for b in bars)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    config = machine._devices["0000:00:04.0"].config
    assert struct.unpack_from("<I", config.phys, 0x10)[0] == bars[0].address


def test_set_driver(machine: Machine) -> None:
    machine.add_device(Toy(), name=NAME)
    machine.set_driver(NAME, "e1000e")
    assert machine.kernel.driver(NAME) == "e1000e"
    with pytest.raises(LookupError):
        machine.set_driver("0000:09:00.0", None)
    with pytest.raises(ValueError, match="driver"):
        machine.set_driver(NAME, "bad/name")


def test_repr_shows_the_topology(machine: Machine) -> None:
    machine.add_device(Toy(), name="0000:00:04.0")
    machine.add_device(Toy(), name="0000:00:04.1", group=10, driver="e1000e")
    text = repr(machine)
    assert "group 10 (not viable)" in text
    assert "0000:00:04.0 1af4:10f0 driver=vfio-pci model=Toy" in text
    assert "driver=e1000e" in text


def test_model_lookup(machine: Machine) -> None:
    toy = Toy()
    machine.add_device(toy, name=NAME)
    assert machine.model(NAME) is toy


def test_closed_machine(machine: Machine) -> None:
    machine.add_device(Toy(), name=NAME)
    machine.close()
    with pytest.raises(OSError, match="closed"):
        machine.kernel.open_container()
    with pytest.raises(aiovfio.ClosedResourceError, match="closed"):
        machine.add_device(Toy(), name="0000:00:05.0")
    assert "closed" in repr(machine)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dma_entry_limit": -1},
        {"page_size": 1000},
        {"iova_ranges": ((10, 5),)},
        {"iova_ranges": ((0, 10), (5, 20))},
        {"io_width": 2},
        {"memlock_limit": -1},
    ],
)
def test_machine_arguments_are_checked(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Machine(**kwargs)  # type: ignore[arg-type]


def test_memlock_default_follows_linux(machine: Machine) -> None:
    import resource

    from aiovfio.sim.iommu import _has_cap_ipc_lock

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    expected = None if _has_cap_ipc_lock() or soft == resource.RLIM_INFINITY else soft
    assert machine._memlock.limit == expected


@pytest.mark.parametrize(
    ("driver", "viable"),
    [
        (None, True),
        ("vfio-pci", True),
        ("mlx5_vfio_pci", True),
        ("pci-stub", True),
        ("pcieport", True),
        ("vfio_ap", False),  # not a driver_managed_dma PCI driver: the old public rule said viable
        ("e1000e", False),
    ],
)
def test_one_viability_rule(machine: Machine, driver: str | None, viable: bool) -> None:
    """The sim and the public layer answer from one rule (aiovfio.kernel.viability)."""
    from aiovfio._util import keeps_group_viable

    assert keeps_group_viable(driver) is viable
    machine.add_device(Toy(), name=NAME, group=3)
    machine.add_device(Toy(), name="0000:00:04.1", group=3, driver=driver)
    assert machine.topology.groups[3].viable is viable
