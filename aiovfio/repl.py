"""Interactive use: `attach()` a device, `hold()` what it opens; all released at exit.

In `aiovfio repl` (asyncio, or `--backend trio`), with line editing, history
and tab completion::

    >>> dev = await attach("sim")              # a simulated machine with an edu device
    >>> dev = await attach("0000:00:04.0")     # or a real device bound to vfio-pci
    >>> hex(dev.bar(0).read32(0))
    >>> irq, = await hold(dev.interrupts("msi"))    # stays enabled across lines
    >>> buf = await hold(dev.dma_buffer(4096))

An `async with` typed at the prompt closes when its block ends; `hold(cm)`
enters the context manager and keeps it open until the session ends. Every
attached device and held context lives on one `contextlib.AsyncExitStack`
(the `session`), closed newest first when `aiovfio repl` exits, by
`await release()`, or, under `python -m asyncio` / `python -m trio` (import
`attach` and `hold` from here), by an `atexit` hook: there, `await release()`
before leaving is the reliable way.
"""

from __future__ import annotations

import ast
import atexit
import code
import contextlib
import importlib
import inspect
import os
import signal
import sys
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import define, field

from . import _log
from ._util import normalize_bdf

if TYPE_CHECKING:
    from .kernel import Kernel

__all__ = ["SIM_EDU_ADDRESS", "Session", "attach", "hold", "release", "run", "session"]

#: Where `attach("sim")` puts its edu device.
SIM_EDU_ADDRESS = "0000:00:04.0"


@define(eq=False)
class Session:
    """The devices and simulated machines attached in this process, and their exit stack."""

    #: the kernel `attach(address)` opens real devices on (None: aiovfio's default)
    kernel: Kernel | None = None
    stack: contextlib.AsyncExitStack = field(factory=contextlib.AsyncExitStack, repr=False)
    devices: list[Any] = field(factory=list)
    #: what `hold()` entered and returned, oldest first
    held: list[Any] = field(factory=list)
    machines: list[Any] = field(factory=list)
    #: machines `attach("sim")` made: closed with the session
    _owned: list[Any] = field(factory=list, repr=False)
    _atexit: bool = field(default=False, repr=False)

    def __repr__(self) -> str:
        names = ", ".join(str(getattr(d, "name", d)) for d in self.devices) or "nothing"
        held = f", {len(self.held)} held" if self.held else ""
        return f"<aiovfio session: {names} attached{held}>"

    async def aclose(self) -> None:
        """Close every attached device, newest first; a second call is a no-op."""
        stack, self.stack = self.stack, contextlib.AsyncExitStack()
        self.devices.clear()
        self.held.clear()
        machines, self.machines = self.machines, []
        owned, self._owned = self._owned, []
        try:
            await stack.aclose()
        finally:
            for machine in [*machines, *owned]:
                leaks = machine.leaks() if hasattr(machine, "leaks") else []
                if leaks:
                    _log.logger.warning("repl.leaks", leaks=leaks)
            for machine in owned:
                machine.close()


session = Session()


def _new_sim_machine() -> Any:
    # Looked up at run time: the REPL works (for real devices) without the sim.
    sim = importlib.import_module("aiovfio.sim")
    models = importlib.import_module("aiovfio.sim.models")
    machine = sim.Machine()
    machine.add_device(models.Edu(), name=SIM_EDU_ADDRESS)
    return machine


def _first_device_name(machine: Any) -> str:
    for attr in ("device_names", "devices"):
        names = getattr(machine, attr, None)
        if names:
            first = next(iter(names))
            return str(getattr(first, "name", first))
    return SIM_EDU_ADDRESS


async def attach(target: Any = "sim", *, name: str | None = None) -> Any:
    """Open a device for interactive use and return it.

    `target` is a PCI address (a real device bound to vfio-pci), "sim" (a new
    simulated machine with an edu device), or a simulated `Machine` (its
    device `name`, or its first device). The device stays open until the
    session closes.
    """
    from . import open_device

    kernel: Kernel | None
    if isinstance(target, str) and target == "sim":
        target = _new_sim_machine()
        session._owned.append(target)
    if isinstance(target, str):
        address = normalize_bdf(target if name is None else name)
        kernel = session.kernel
    else:
        machine = target
        address = normalize_bdf(name) if name else _first_device_name(machine)
        kernel = machine.kernel
        if machine not in session.machines:
            session.machines.append(machine)
    # Each REPL statement is its own task: no task may watch REQ across them.
    device = await session.stack.enter_async_context(
        open_device(address, kernel=kernel, on_release_request="ignore")
    )
    session.devices.append(device)
    _close_at_exit_once()
    return device


async def hold(cm: Any) -> Any:
    """Enter the (async) context manager `cm`, keep it open across lines; return its value.

    `irq, = await hold(dev.interrupts("msi"))` keeps the vector enabled;
    `buf = await hold(dev.dma_buffer(4096))` keeps the buffer mapped. The
    session's end (or `await release()`) exits them, newest first, with the
    devices they came from.
    """
    if hasattr(cm, "__aenter__"):
        value = await session.stack.enter_async_context(cm)
    elif hasattr(cm, "__enter__"):
        value = session.stack.enter_context(cm)
    else:
        from .errors import InvalidArgument

        raise InvalidArgument(
            f"hold() takes a context manager (dev.interrupts('msi'), dev.dma_buffer(4096)), "
            f"not {type(cm).__name__}: call it without await first"
        )
    session.held.append(value)
    _close_at_exit_once()
    return value


def _close_at_exit_once() -> None:
    if not session._atexit and not _InRepl.active:
        atexit.register(_close_at_exit, _backend())
        session._atexit = True


async def release() -> None:
    """Close everything `attach` opened."""
    await session.aclose()


def _backend() -> str:
    """The async library running the caller: trio, else asyncio."""
    trio = sys.modules.get("trio")
    if trio is not None and trio.lowlevel.in_trio_run():
        return "trio"
    return "asyncio"


def _close_at_exit(backend: str) -> None:
    """Best effort for a plain `python -m asyncio`: close the session on a fresh loop."""
    if not session.devices and not session.machines and not session.held:
        return
    import anyio

    try:
        anyio.run(session.aclose, backend=backend)
    except Exception as exc:  # the interpreter is exiting: report, never raise
        print(f"aiovfio: releasing attached devices failed: {exc}", file=sys.stderr)


# --- the REPL --------------------------------------------------------------------


class _InRepl:
    active = False


class _Runner:
    """Runs each statement on the event loop, in a cancel scope Ctrl-C cancels."""

    def __init__(self) -> None:
        self.scope: Any = None

    async def run(self, code_object: types.CodeType, namespace: dict[str, Any]) -> Any:
        """The statement's exception (returned, to be shown), "cancelled", or None."""
        import anyio

        cancelled = anyio.get_cancelled_exc_class()
        with anyio.CancelScope() as scope:
            self.scope = scope
            try:
                result = types.FunctionType(code_object, namespace)()
                if inspect.iscoroutine(result):
                    await result
            except cancelled:
                raise
            except BaseException as exc:  # the user's error, SystemExit included: report it
                return exc
            finally:
                self.scope = None
        return "cancelled" if scope.cancelled_caught else None


class _Console(code.InteractiveConsole):
    """`code.InteractiveConsole` (in a thread) whose statements may `await` (on the loop).

    Each statement is compiled with PyCF_ALLOW_TOP_LEVEL_AWAIT and run through
    an anyio BlockingPortal on the event loop in the main thread, asyncio's or
    trio's; what `python -m asyncio` and `python -m trio` do.
    """

    def __init__(self, namespace: dict[str, Any], portal: Any, runner: _Runner) -> None:
        super().__init__(namespace)
        self.compile.compiler.flags |= ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        self.portal = portal
        self.runner = runner

    def runcode(self, code_object: types.CodeType) -> None:
        outcome = self.portal.call(self.runner.run, code_object, self.locals)
        if outcome == "cancelled":
            self.write("Cancelled\n")
        elif isinstance(outcome, SystemExit):
            raise outcome
        elif isinstance(outcome, BaseException):
            tb = outcome.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
                tb = tb.tb_next  # the REPL's own frames
            self.write("".join(traceback.format_exception(type(outcome), outcome, tb)))


HELPERS = {
    "attach": 'dev = await attach("sim") or attach("0000:01:00.0"): open a device',
    "hold": 'irq, = await hold(dev.interrupts("msi")): keep a context manager open',
    "release": "await release(): close everything attached and held, newest first",
    "session": "what is attached and held",
    "aiovfio": "the package (aiovfio.sim, aiovfio.sim.models too)",
    "anyio": "sleep, move_on_after, fail_after, ...",
}


def _banner(backend: str) -> str:
    import aiovfio

    width = max(map(len, HELPERS))
    lines = [
        f"aiovfio {aiovfio.__version__} REPL on {backend} (Python {sys.version.split()[0]}). "
        'Use "await" directly; Tab completes, Up recalls.',
        *(f"  {name.ljust(width)}  {text}" for name, text in HELPERS.items()),
        "Everything attached or held is released at exit (Ctrl-D); Ctrl-C cancels a statement.",
    ]
    return "\n".join(lines)


def history_file() -> Path:
    """Where the REPL keeps its history: $AIOVFIO_HISTORY, else under $XDG_STATE_HOME."""
    env = os.environ.get("AIOVFIO_HISTORY")
    if env:
        return Path(env)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "aiovfio" / "repl_history"


def _line_editing(namespace: dict[str, Any]) -> Callable[[], None]:
    """readline: editing, history (loaded now, saved by the returned function), Tab completion."""
    try:
        import readline
        import rlcompleter
    except ImportError:  # pragma: no cover - a Python without readline
        return lambda: None
    readline.set_completer(rlcompleter.Completer(namespace).complete)
    if "libedit" in (readline.__doc__ or ""):  # pragma: no cover - macOS
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
    path = history_file()
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(2000)

    def save() -> None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)

    return save


def run(*, backend: str = "asyncio", kernel: Kernel | None = None) -> int:
    """`aiovfio repl`: an async REPL with aiovfio, `attach`, `hold` and `release` ready.

    Returns the exit status: 0 after Ctrl-D or `exit()`, else `exit(n)`'s.
    """
    import anyio

    session.kernel = kernel
    _InRepl.active = True
    try:
        status: int = anyio.run(_serve, backend, backend=backend)
    finally:
        _InRepl.active = False
    return status


async def _serve(backend: str) -> int:
    import anyio
    import anyio.from_thread

    import aiovfio

    namespace: dict[str, Any] = {
        "__name__": "__console__",
        "__builtins__": __builtins__,
        "aiovfio": aiovfio,
        "anyio": anyio,
        "attach": attach,
        "hold": hold,
        "release": release,
        "session": session,
    }
    namespace[backend] = importlib.import_module(backend)
    save_history = _line_editing(namespace)
    runner = _Runner()
    call_soon = _call_soon_threadsafe(backend)
    status = 0
    async with anyio.from_thread.BlockingPortal() as portal:
        console = _Console(namespace, portal, runner)

        def interact() -> int:
            try:
                console.interact(
                    banner=_banner(backend), exitmsg="releasing what is attached and held"
                )
            except SystemExit as exc:
                return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            finally:
                save_history()
            return 0

        def on_sigint(signum: int, frame: Any) -> None:
            scope = runner.scope
            if scope is not None:
                call_soon(scope.cancel)
            else:
                sys.stderr.write("\nKeyboardInterrupt (Ctrl-D exits)\n>>> ")
                sys.stderr.flush()

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            status = await anyio.to_thread.run_sync(interact)
        finally:
            signal.signal(signal.SIGINT, previous)
            what = f"{len(session.held)} held, {len(session.devices)} device(s)"
            with anyio.CancelScope(shield=True):
                await session.aclose()
            sys.stderr.write(f"released {what}, newest first\n")
    return status


def _call_soon_threadsafe(backend: str) -> Callable[[Callable[[], object]], object]:
    """The running loop's signal-safe way to run a callback on it."""
    if backend == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    import asyncio

    return asyncio.get_running_loop().call_soon_threadsafe
