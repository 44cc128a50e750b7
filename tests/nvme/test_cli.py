"""`aiovfio nvme identify|perf --sim` through the aiovfio command line."""

from __future__ import annotations

import json

import pytest

from aiovfio.cli import main


def test_identify_on_the_sim(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nvme", "identify", "--sim", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "QEMU NVMe Ctrl"
    assert data["serial"] == "aiovfio-sim"
    assert data["namespaces"] == [
        {"nsid": 1, "blocks": 2097152, "block_size": 512, "bytes": 1 << 30}
    ]


def test_identify_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nvme", "identify", "--sim"]) == 0
    out = capsys.readouterr().out
    assert "QEMU NVMe Ctrl" in out
    assert "2097152 blocks of 512 B (1.00 GiB)" in out


@pytest.mark.parametrize("mode", [[], ["--poll"], ["--hybrid", "50"], ["--tasks"]])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_perf_on_the_sim(capsys: pytest.CaptureFixture[str], mode: list[str], backend: str) -> None:
    argv = ["nvme", "perf", "--sim", "--qd", "4", "--seconds", "0.3", "--queues", "2"]
    assert main([*argv, "--backend", backend, "--json", *mode]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["ios"] > 0 and data["iops"] > 0 and data["queues"] == 2
    assert 0 < data["p50_us"] <= data["p99_us"] <= data["p99_9_us"]
    assert "randread 4k qd 4, 2 queue(s)" in captured.err


def test_perf_table_and_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nvme", "perf", "--sim", "--qd", "2", "--seconds", "0.2", "--size", "8k"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["Device", "mode", "IOPS", "MB/s"]
    assert main(["nvme", "perf", "--sim", "--size", "100", "--seconds", "0.2"]) != 0
    assert "multiple of the block size" in capsys.readouterr().err
    assert main(["nvme", "identify"]) != 0  # neither BDF nor --sim
    assert "--sim" in capsys.readouterr().err


def test_nvme_without_a_tool_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nvme"]) == 2  # as argparse exits for a usage error
    err = capsys.readouterr().err
    assert err.startswith("usage:") and "choose a tool: identify, perf" in err
