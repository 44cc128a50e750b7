"""The machine's clock: manual (deterministic) and thread (real time, no idle thread)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest

from aiovfio.sim import DeviceContext, DeviceModel, IrqSpec, Machine, RegionSpec

NAME = "0000:00:04.0"


class Timer(DeviceModel):
    """Writing N to register 0 schedules work N ms later; `log` records the order."""

    vendor_id = 0x1AF4
    device_id = 0x0001
    interrupt_pin = 0

    def __init__(self) -> None:
        self.log: list[str] = []
        self.ctx: DeviceContext | None = None
        self.done = threading.Event()

    def regions(self) -> Sequence[RegionSpec]:
        return (RegionSpec(index=0, size=0x100),)

    def irqs(self) -> Sequence[IrqSpec]:
        return ()

    def capabilities(self) -> Sequence[tuple[int, bytes]]:
        return ()

    def attach(self, ctx: DeviceContext) -> None:
        self.ctx = ctx

    def read(self, region: int, offset: int, size: int) -> int:
        return len(self.log)

    def write(self, region: int, offset: int, size: int, value: int) -> None:
        assert self.ctx is not None
        self.ctx.schedule(value / 1000, lambda: self._fire(value))
        self.log.append(f"write {value}")

    def _fire(self, value: int) -> None:
        self.log.append(f"fired {value}")
        self.done.set()


def _open(machine: Machine) -> tuple[Machine, int]:
    k = machine.kernel
    c = k.open_container()
    g = k.open_group(10)
    k.group_set_container(g, c)
    k.set_iommu(c, 3)
    return machine, k.group_get_device_fd(g, NAME)


def _write(machine: Machine, d: int, value: int) -> None:
    machine.kernel.pwrite(d, value.to_bytes(4, "little"), 0)


@pytest.fixture
def manual() -> Iterator[tuple[Machine, Timer, int]]:
    m = Machine(clock="manual")
    timer = Timer()
    m.add_device(timer, name=NAME, group=10)
    _, d = _open(m)
    yield m, timer, d
    m.close()


def test_manual_runs_nothing_until_advanced(manual: tuple[Machine, Timer, int]) -> None:
    m, timer, d = manual
    _write(m, d, 10)
    assert timer.log == ["write 10"]
    assert m.clock.pending == 1
    assert m.advance(0.009) == 0
    assert m.now == pytest.approx(0.009)
    assert m.advance(0.001) == 1
    assert timer.log == ["write 10", "fired 10"]


def test_manual_runs_in_due_order(manual: tuple[Machine, Timer, int]) -> None:
    m, timer, d = manual
    for value in (30, 10, 20, 10):
        _write(m, d, value)
    assert m.run_until_idle() == 4
    assert timer.log[4:] == ["fired 10", "fired 10", "fired 20", "fired 30"]
    assert m.now == pytest.approx(0.030)


def test_manual_chained_work_lands_at_its_due_time(manual: tuple[Machine, Timer, int]) -> None:
    m, timer, _ = manual
    assert timer.ctx is not None
    times: list[float] = []

    def first() -> None:
        times.append(m.now)
        timer.ctx.schedule(0.5, lambda: times.append(m.now))  # type: ignore[union-attr]

    timer.ctx.schedule(1.0, first)
    m.advance(2.0)
    assert times == [pytest.approx(1.0), pytest.approx(1.5)]
    assert m.now == pytest.approx(2.0)


def test_manual_callback_errors_reach_the_test(manual: tuple[Machine, Timer, int]) -> None:
    m, timer, _ = manual
    assert timer.ctx is not None

    def boom() -> None:
        raise RuntimeError("model bug")

    timer.ctx.schedule(0, boom)
    with pytest.raises(RuntimeError, match="model bug"):
        m.run_until_idle()


def test_manual_run_until_idle_gives_up_on_endless_work(manual: tuple[Machine, Timer, int]) -> None:
    m, timer, _ = manual
    ctx = timer.ctx
    assert ctx is not None

    def again() -> None:
        ctx.schedule(0.001, again)

    ctx.schedule(0, again)
    m.clock.max_idle_steps = 1000
    with pytest.raises(RuntimeError, match="rescheduling"):
        m.run_until_idle()


def test_advance_needs_the_manual_clock() -> None:
    with Machine() as m, pytest.raises(RuntimeError, match="manual"):
        m.advance(1)


def test_close_drops_pending_work(manual: tuple[Machine, Timer, int]) -> None:
    m, timer, d = manual
    _write(m, d, 5)
    m.close()
    assert m.clock.pending == 0
    assert timer.log == ["write 5"]


def _clock_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "aiovfio-sim-clock"]


def test_thread_clock_runs_work_after_the_write_returns() -> None:
    with Machine() as m:
        timer = Timer()
        m.add_device(timer, name=NAME, group=10)
        _, d = _open(m)
        _write(m, d, 0)
        assert timer.done.wait(10)
        m.run_until_idle()
        assert timer.log == ["write 0", "fired 0"]  # never inside the write


def test_thread_clock_stays_warm_while_a_device_is_open() -> None:
    m = Machine()
    timer = Timer()
    m.add_device(timer, name=NAME, group=10)
    assert _clock_threads() == []  # an idle machine with nothing open has no thread
    _, d = _open(m)
    (worker,) = _clock_threads()  # started on open, ready for the first command
    _write(m, d, 1)
    _write(m, d, 2)
    m.run_until_idle()
    assert timer.log[-2:] == ["fired 1", "fired 2"]
    assert _clock_threads() == [worker]  # the same thread, still waiting
    m.kernel.close(d)  # the last device closes: the worker exits once idle
    worker.join(5)
    assert not worker.is_alive()
    m.close()
    assert _clock_threads() == []


def test_thread_clock_records_callback_errors() -> None:
    with Machine() as m:
        timer = Timer()
        m.add_device(timer, name=NAME, group=10)
        assert timer.ctx is not None

        def boom() -> None:
            raise ValueError("model bug")

        timer.ctx.schedule(0, boom)
        timer.ctx.schedule(0, lambda: timer._fire(7))
        assert timer.done.wait(10)
        m.run_until_idle()
        assert [str(e) for e in m.errors] == ["model bug"]


def test_thread_clock_close_with_work_pending() -> None:
    m = Machine()
    timer = Timer()
    m.add_device(timer, name=NAME, group=10)
    _, d = _open(m)
    _write(m, d, 60_000)  # a minute away
    m.close()
    assert _clock_threads() == []
    assert timer.log == ["write 60000"]


def test_bad_clock_kind() -> None:
    with pytest.raises(ValueError, match="thread"):
        Machine(clock="sundial")  # type: ignore[arg-type]


def test_thread_run_until_idle_timeout() -> None:
    with Machine() as m:
        timer = Timer()
        m.add_device(timer, name=NAME, group=10)
        _, d = _open(m)
        _write(m, d, 60_000)
        with pytest.raises(TimeoutError):
            m.run_until_idle(timeout=0)


def test_thread_run_until_idle_is_woken_when_the_work_ends() -> None:
    """The worker notifies wait_idle only when a waiter is there; one that is, is woken."""
    with Machine() as m:
        timer = Timer()
        m.add_device(timer, name=NAME, group=10)
        _, d = _open(m)
        assert timer.ctx is not None
        started = threading.Event()

        def slow() -> None:
            started.set()
            threading.Event().wait(0.05)  # busy in a callback while the test waits
            timer.log.append("slow done")

        timer.ctx.schedule(0, slow)
        assert started.wait(10)
        assert m.run_until_idle(timeout=10) == 0  # returns when the callback ends, not at 10 s
        assert timer.log == ["slow done"]
        _write(m, d, 0)  # later work still runs, and a later wait still returns
        assert timer.done.wait(10)
        m.run_until_idle(timeout=10)
        assert timer.log == ["slow done", "write 0", "fired 0"]
