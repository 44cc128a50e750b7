"""The edu conformance script, on the simulated edu and (in the guest) on QEMU's."""

from __future__ import annotations

import pytest

import aiovfio
from aiovfio.testing.target import Target

from .edu_conformance import check_edu

pytestmark = pytest.mark.anyio


@pytest.mark.kernel
async def test_edu_conformance(vfio_target: Target) -> None:
    async with aiovfio.open_device(vfio_target.edu, kernel=vfio_target.kernel) as device:
        report = await check_edu(device)
    print(report)
    assert report.ok, str(report)
