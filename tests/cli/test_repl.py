"""`aiovfio.repl.attach`, the `aiovfio repl` console, `aiovfio demo`, and `info` through VFIO.

These need the simulated machine (`aiovfio.sim.Machine`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

import aiovfio.repl
from aiovfio.cli import main


def machine_class() -> Any:
    from aiovfio.sim import Machine

    return Machine


@pytest.fixture
def fresh_session(monkeypatch: pytest.MonkeyPatch) -> aiovfio.repl.Session:
    machine_class()
    session = aiovfio.repl.Session()
    monkeypatch.setattr(aiovfio.repl, "session", session)
    monkeypatch.setattr(aiovfio.repl._InRepl, "active", True)  # no atexit hook from tests
    return session


@pytest.mark.anyio
async def test_attach_sim_and_release(fresh_session: aiovfio.repl.Session) -> None:
    dev = await aiovfio.repl.attach("sim")
    assert dev.name == aiovfio.repl.SIM_EDU_ADDRESS
    assert dev.bar(0).read32(0) == 0x010000ED
    assert "0000:00:04.0" in repr(dev)
    assert repr(fresh_session) == "<aiovfio session: 0000:00:04.0 attached>"
    (machine,) = fresh_session.machines
    await aiovfio.repl.release()
    assert fresh_session.devices == []
    assert dev.closed
    assert machine.closed
    await aiovfio.repl.release()  # twice is fine


@pytest.mark.anyio
async def test_attach_a_machine_of_ones_own(fresh_session: aiovfio.repl.Session) -> None:
    from aiovfio.sim.models import Edu

    machine_cls = machine_class()
    with machine_cls() as machine:
        machine.add_device(Edu(), name="0000:00:07.0")
        machine.add_device(Edu(), name="0000:00:08.0")
        first = await aiovfio.repl.attach(machine)
        second = await aiovfio.repl.attach(machine, name="08.0")
        assert (first.name, second.name) == ("0000:00:07.0", "0000:00:08.0")
        await aiovfio.repl.release()
        assert machine.leaks() == []
        assert not machine.closed  # not ours to close


def test_repl_runs_awaits_and_releases_at_exit() -> None:
    machine_class()
    script = (
        'dev = await attach("sim")\n'
        "print(hex(dev.bar(0).read32(0)))\n"
        "session\n"
        "1/0\n"
        "print('still here')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "aiovfio", "repl"],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "0x10000ed" in proc.stdout
    assert "<aiovfio session: 0000:00:04.0 attached>" in proc.stdout
    assert "ZeroDivisionError" in proc.stderr
    assert "still here" in proc.stdout
    assert "released 0 held, 1 device(s), newest first" in proc.stderr
    assert "leak" not in proc.stderr


def test_demo_runs_the_edu_example(capsys: pytest.CaptureFixture[str]) -> None:
    machine_class()
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "liveness" in out
    assert "DMA round trip" in out


def test_demo_on_trio(capsys: pytest.CaptureFixture[str]) -> None:
    machine_class()
    pytest.importorskip("trio")
    assert main(["demo", "--backend", "trio"]) == 0
    assert "closed everything" in capsys.readouterr().out


def test_demo_without_the_example(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import aiovfio.cli.commands

    monkeypatch.setattr(aiovfio.cli.commands, "_find_example", lambda name: None)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert err.strip().startswith("aiovfio: the edu demo (examples/edu.py) is not in this")


@pytest.mark.anyio
async def test_info_collects_through_vfio() -> None:
    from aiovfio.cli import info
    from aiovfio.sim.models import Edu

    machine_cls = machine_class()
    with machine_cls() as machine:
        machine.add_device(Edu(), name="0000:00:04.0")
        data = await info.collect("0000:00:04.0", machine.kernel)
        assert machine.leaks() == []
    bar0 = next(r for r in data["regions"] if r["name"] == "BAR0")
    assert bar0["size"] == 1 << 20
    assert "read" in bar0["flags"]
    irqs = {i["name"]: i["count"] for i in data["irqs"]}
    assert (irqs["intx"], irqs["msi"]) == (1, 1)
    assert [c["name"] for c in data["capabilities"]] == ["MSI"]
