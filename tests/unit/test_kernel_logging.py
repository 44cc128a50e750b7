"""LinuxKernel logs every kernel interaction at debug level, once the
application has configured structlog; the library never configures it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import termios

import pytest
from structlog.testing import capture_logs

from aiovfio import _log
from aiovfio._uapi import vfio as uapi
from aiovfio.kernel import LinuxKernel
from aiovfio.kernel.linux import _ioctl


def test_ioctls_are_logged_with_arguments_and_result() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"abc")
        buf = bytearray(4)
        with capture_logs() as logs:
            # a configuration takes effect at aiovfio's next event, or at once with refresh()
            _log.refresh()
            assert _ioctl("FIONREAD", r, termios.FIONREAD, buf) == 0
            with pytest.raises(OSError) as info:
                LinuxKernel().group_get_status(r, uapi.vfio_group_status(argsz=8))
        assert info.value.errno == errno.ENOTTY
    finally:
        os.close(r)
        os.close(w)
    assert logs[0] == {
        "event": "kernel.ioctl",
        "log_level": "debug",
        "op": "FIONREAD",
        "fd": r,
        "result": 0,
        "len": 4,
    }
    assert logs[1] == {
        "event": "kernel.ioctl",
        "log_level": "debug",
        "op": "VFIO_GROUP_GET_STATUS",
        "fd": r,
        "errno": errno.ENOTTY,
    }


def test_eventfds_and_closes_are_logged() -> None:
    kernel = LinuxKernel()
    with capture_logs() as logs:
        fd = kernel.eventfd()
        kernel.close(fd)
    assert [e["event"] for e in logs] == ["kernel.eventfd", "kernel.close"]
    assert logs[0]["fd"] == logs[1]["fd"] == fd
    assert kernel.open_eventfds == set()


def test_the_library_never_configures_structlog_and_stays_quiet() -> None:
    # A fresh interpreter: drive a whole edu session on the simulated machine.
    code = (
        "import anyio, structlog, aiovfio\n"
        "from aiovfio.testing.target import sim_target\n"
        "async def main():\n"
        "    t = sim_target()\n"
        "    async with aiovfio.open_device(t.edu, kernel=t.kernel) as dev:\n"
        "        async with dev.interrupts('msi') as (irq,), dev.dma_buffer(4096):\n"
        "            irq.trigger(); await irq.receive()\n"
        "    t.close()\n"
        "anyio.run(main)\n"
        "print('configured:', structlog.is_configured())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout == "configured: False\n"  # and no log line was printed
