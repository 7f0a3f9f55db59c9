"""scripts/gpu_check.sh --dry-run: the GPU check rehearsed on the CPU, so that the one call a GPU
machine gets is not wasted on a broken script. Each step runs at toy scale or is reported skipped."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from train_support import REPO, subprocess_env

pytestmark = pytest.mark.slow


def test_the_dry_run_runs_or_reports_skipped_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    env = {**subprocess_env(), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        result.stdout[-3000:] + (out / "gpu_check.log").read_text()[-3000:]
    )
    report = json.loads((out / "gpu_check.json").read_text())
    status = {s["step"]: s["status"] for s in report["steps"]}
    # Every step runs at toy scale but two, which say that they did not run and why.
    assert status == {
        "inputs": "passed",
        "matmul": "passed",
        "train": "passed",
        "cuda": "skipped",
        "evaluate": "passed",
        "bench_eager": "passed",
        "bench_compile": "skipped",
    }
    reasons = {s["step"]: s.get("reason", "") for s in report["steps"]}
    assert "no CUDA device" in reasons["cuda"] and "CPU" in reasons["bench_compile"]
    assert "steps failed: none; skipped: cuda, bench_compile" in result.stdout
    tests = report["cuda_tests"]
    assert tests["tests"] >= 8 and tests["skipped"] == tests["tests"]  # collected; skipped: no GPU
    assert report["train"]["epochs"] >= 1 and report["evaluate"][0]["split"] == "test"
    assert report["bench_eager"]["results"]["tiny"]["ours"]["tokens_per_s"] > 0
    assert report["env"]["dry_run"] and report["matmul"]["tflops"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "train.log"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the real check would run")
def test_without_its_inputs_the_check_stops_within_seconds(tmp_path):
    out = tmp_path / "out"
    env = {**subprocess_env(), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)],  # not a dry run: needs CUDA
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1  # a step failed
    assert "error: no CUDA device" in result.stderr
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert [(s["step"], s["status"], s["rc"]) for s in steps] == [("inputs", "failed", 2)]
