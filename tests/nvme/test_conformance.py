"""The nvme conformance script, on the simulated nvme and (in the guest) on QEMU's."""

from __future__ import annotations

import pytest

import aiovfio
from aiovfio.testing.target import Target

from .nvme_conformance import GUEST_BYTES, SIM_BYTES, check_nvme

pytestmark = pytest.mark.anyio


@pytest.mark.kernel
async def test_nvme_conformance(vfio_target: Target) -> None:
    if vfio_target.nvme is None:
        pytest.fail("the target has no nvme device")
    expected = GUEST_BYTES if vfio_target.real else SIM_BYTES
    async with aiovfio.open_device(vfio_target.nvme, kernel=vfio_target.kernel) as device:
        report = await check_nvme(device, expected_bytes=expected)
    print(report)
    assert report.ok, str(report)
