"""The public namespace: what `aiovfio.__all__` lists exists, and says `aiovfio.X`."""

from __future__ import annotations

import aiovfio


def test_all_names_exist() -> None:
    for name in aiovfio.__all__:
        assert hasattr(aiovfio, name), name


def test_all_is_sorted_and_unique() -> None:
    assert list(aiovfio.__all__) == sorted(set(aiovfio.__all__))


def test_public_classes_say_aiovfio() -> None:
    for name in aiovfio.__all__:
        obj = getattr(aiovfio, name)
        if isinstance(obj, type):
            assert obj.__module__ == "aiovfio", (name, obj.__module__)


def test_no_private_module_leaks_into_namespace() -> None:
    public = {n for n in dir(aiovfio) if not n.startswith("_")}
    modules = {"errors", "kernel", "sim", "testing", "cli", "repl", "pci", "sysfs"}
    extra = public - set(aiovfio.__all__) - modules
    # submodules appear as attributes once imported; anything else must be in __all__
    assert not {n for n in extra if not isinstance(getattr(aiovfio, n), type(aiovfio))}
