"""Interactive use: `attach()` a device in an async REPL; everything is released at exit.

In `aiovfio repl` (or `python -m asyncio` after `import aiovfio.repl`)::

    >>> dev = await attach("0000:00:04.0")     # a real device bound to vfio-pci
    >>> dev = await attach("sim")              # a simulated machine with an edu device
    >>> hex(dev.bar(0).read32(0))

Every attached device lives on one `contextlib.AsyncExitStack` (the
`session`), closed when `aiovfio repl` exits, by `await release()`, or, under
a plain `python -m asyncio`, by an `atexit` hook.
"""

from __future__ import annotations

import ast
import asyncio
import atexit
import code
import concurrent.futures
import contextlib
import importlib
import inspect
import sys
import threading
import types
from typing import TYPE_CHECKING, Any

from attrs import define, field

from . import _log
from ._util import normalize_bdf

if TYPE_CHECKING:
    from .kernel import Kernel

__all__ = ["SIM_EDU_ADDRESS", "Session", "attach", "release", "run", "session"]

#: Where `attach("sim")` puts its edu device.
SIM_EDU_ADDRESS = "0000:00:04.0"


@define(eq=False)
class Session:
    """The devices and simulated machines attached in this process, and their exit stack."""

    #: the kernel `attach(address)` opens real devices on (None: aiovfio's default)
    kernel: Kernel | None = None
    stack: contextlib.AsyncExitStack = field(factory=contextlib.AsyncExitStack, repr=False)
    devices: list[Any] = field(factory=list)
    machines: list[Any] = field(factory=list)
    #: machines `attach("sim")` made: closed with the session
    _owned: list[Any] = field(factory=list, repr=False)
    _atexit: bool = field(default=False, repr=False)

    def __repr__(self) -> str:
        names = ", ".join(str(getattr(d, "name", d)) for d in self.devices) or "nothing"
        return f"<aiovfio session: {names} attached>"

    async def aclose(self) -> None:
        """Close every attached device, newest first; a second call is a no-op."""
        stack, self.stack = self.stack, contextlib.AsyncExitStack()
        self.devices.clear()
        machines, self.machines = self.machines, []
        owned, self._owned = self._owned, []
        try:
            await stack.aclose()
        finally:
            for machine in machines:
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
    device = await session.stack.enter_async_context(open_device(address, kernel=kernel))
    session.devices.append(device)
    if not session._atexit and not _InRepl.active:
        atexit.register(_close_at_exit, _backend())
        session._atexit = True
    return device


async def release() -> None:
    """Close everything `attach` opened."""
    await session.aclose()


def _backend() -> str:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return "trio"
    return "asyncio"


def _close_at_exit(backend: str) -> None:
    """Best effort for a plain `python -m asyncio`: close the session on a fresh loop."""
    if not session.devices and not session.machines:
        return
    import anyio

    try:
        anyio.run(session.aclose, backend=backend)
    except Exception as exc:  # the interpreter is exiting: report, never raise
        print(f"aiovfio: releasing attached devices failed: {exc}", file=sys.stderr)


# --- the REPL --------------------------------------------------------------------


class _InRepl:
    active = False


class _AsyncConsole(code.InteractiveConsole):
    """`code.InteractiveConsole` that runs top-level `await` on an event loop.

    The console reads input in its own thread; each statement is compiled with
    PyCF_ALLOW_TOP_LEVEL_AWAIT and run on the loop in the main thread, which is
    what `python -m asyncio` does.
    """

    def __init__(self, namespace: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(namespace)
        self.compile.compiler.flags |= ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        self.loop = loop
        self.running: concurrent.futures.Future[Any] | None = None
        self.task: asyncio.Task[Any] | None = None

    def runcode(self, code_object: types.CodeType) -> None:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def start() -> None:
            func = types.FunctionType(code_object, self.locals)
            try:
                result = func()
            except BaseException as exc:
                future.set_exception(exc)
                return
            if not inspect.iscoroutine(result):
                future.set_result(result)
                return
            task = self.loop.create_task(result)

            def done(t: asyncio.Task[Any]) -> None:
                if t.cancelled():
                    future.cancel()
                elif t.exception() is not None:
                    future.set_exception(t.exception())
                else:
                    future.set_result(t.result())

            task.add_done_callback(done)
            self.task = task

        self.task = None
        self.running = future
        self.loop.call_soon_threadsafe(start)
        try:
            future.result()
        except SystemExit:
            raise
        except concurrent.futures.CancelledError:
            self.write("\nCancelled\n")
        except BaseException:
            self.showtraceback()
        finally:
            self.running = None

    def cancel_running(self) -> bool:
        """Cancel the statement being awaited (Ctrl-C); False when none runs."""
        task = self.task
        if self.running is not None and task is not None and not task.done():
            task.cancel()
            return True
        return False


def run(*, backend: str = "asyncio", kernel: Kernel | None = None) -> int:
    """`aiovfio repl`: an asyncio REPL with aiovfio, `attach` and `release` ready."""
    import aiovfio

    session.kernel = kernel
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    namespace: dict[str, Any] = {
        "__name__": "__console__",
        "__builtins__": __builtins__,
        "asyncio": asyncio,
        "aiovfio": aiovfio,
        "attach": attach,
        "release": release,
        "session": session,
    }
    console = _AsyncConsole(namespace, loop)
    banner = (
        f"aiovfio {aiovfio.__version__} asyncio REPL (Python {sys.version.split()[0]})\n"
        'Use "await" directly. dev = await attach("sim") or await attach("0000:01:00.0");\n'
        "everything attached is released at exit (Ctrl-D)."
    )
    status: list[int] = [0]

    def interact() -> None:
        try:
            console.interact(banner=banner, exitmsg="releasing attached devices")
        except SystemExit as exc:
            status[0] = exc.code if isinstance(exc.code, int) else 0
        finally:
            loop.call_soon_threadsafe(loop.stop)

    _InRepl.active = True
    thread = threading.Thread(target=interact, name="aiovfio-repl", daemon=True)
    thread.start()
    try:
        while True:
            try:
                loop.run_forever()
            except KeyboardInterrupt:
                if not console.cancel_running():
                    console.write("\nKeyboardInterrupt (Ctrl-D exits)\n>>> ")
                continue
            break
        loop.run_until_complete(session.aclose())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        _InRepl.active = False
        asyncio.set_event_loop(None)
        loop.close()
    return status[0]
