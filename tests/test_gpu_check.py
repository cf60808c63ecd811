"""scripts/gpu-check.sh, the one-call GPU check, runs end to end on the CPU (``--device cpu
--quick``: bf16, 1 line per pair), so it is not broken when a GPU finally appears."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from jobs_fixtures import ROOT

SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def _gpu_check(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    done = _gpu_check("--device", "cpu", "--quick", "--no-install", out)
    assert done.returncode == 0, done.stdout + done.stderr
    timings = (out / "timings.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in timings] == ["phase env", "phase tests", "phase bench", "total"]
    assert all(" ok in " in line for line in timings[:3]) and timings[-1] in done.stdout
    tests = ET.parse(out / "tests.xml").getroot().find("testsuite")
    assert int(tests.get("tests")) == int(tests.get("skipped")) == 5  # the cuda tests, collected and skipped here
    bench = json.loads((out / "bench" / "bench.json").read_text())
    assert (bench["device"], bench["precision"], bench["batchings"]) == ("cpu", "bf16", ["batch 1", "batch 16", "batch 64"])
    assert [s["name"] for s in bench["suites"]] == ["deen", "summ"]
    for suite in bench["suites"]:
        variants = {r["variant"] for r in suite["rows"]}
        assert {"stock", "big", "bild-exact", "bild-tuned", "ct2-int8"} <= variants and suite["lines"] == 1
        assert suite["differences"]["bild-exact"]["margin"] == 0.16  # bf16's near-tie margin
    assert "device `cpu`, bf16" in (out / "bench" / "bench.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_gpu_check_on_cuda_without_a_gpu_stops_with_one_line(tmp_path):
    done = _gpu_check("--no-install", tmp_path / "out")
    assert done.returncode == 1
    assert "--device cuda, but torch sees no GPU here: run on a CUDA machine, or --device cpu" in done.stderr
    assert not (tmp_path / "out" / "bench").exists()


def test_a_phase_over_its_budget_is_stopped_and_named(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([str(SCRIPT), "--device", "cpu", "--quick", "--no-install", str(out)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                                                       "GPU_CHECK_BUDGET_TESTS": "1", "GPU_CHECK_BUDGET_BENCH": "1"})
    assert done.returncode == 1
    timings = (out / "timings.txt").read_text()
    assert "phase tests: OVERRAN its 1 s budget, stopped in " in timings
    assert "phase bench: OVERRAN its 1 s budget, stopped in " in timings
