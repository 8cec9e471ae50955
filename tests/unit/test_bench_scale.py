"""bench/scale.py's TCGA projection in its small mode: no sweep (the driver's figures from the
saved one in bench/results/), regions of 512 px measured here; and its driver fit."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from ..conftest import ROOT

SCRIPT = ROOT / "bench" / "scale.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_driver_fit_recovers_the_loop_and_the_per_region_cost():
    runs = [
        {"n": n, "pipeline_s": s, "regions": r, "driver_cpu_s": 0.3 * s + 0.002 * r, "commit_s": 0.1 * c, "commits": c}
        for n, s, r, c in ((8, 10.0, 12, 2), (64, 30.0, 96, 4), (256, 70.0, 384, 16))
    ]
    fit = _module().driver_fit(runs)
    assert fit["loop_cores"] == pytest.approx(0.3) and fit["cpu_s_per_region"] == pytest.approx(0.002)
    assert fit["s_per_commit"] == pytest.approx(0.1) and fit["commits_per_slide"] == pytest.approx(16 / 256)


def _number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in:\n{text}"
    return float(found.group(1).replace(",", ""))


def test_the_small_mode_prints_the_tcga_projection_from_measured_rates(tmp_path):
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--project-only", "--measure-px", "512"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert re.search(r"driver figures from .*bench/results/scale_\S+\.json", out)  # a named results file
    rate = _number(r"GPU rate ([\d.]+) regions/s \(bf16 \+ compile.*gpu_h100_2026-11-26\.json", out)
    assert _number(r"GPU time: ([\d.]+) GPU-hours", out) == pytest.approx(408_218 / rate / 3600, abs=0.05)
    assert _number(r"uint8 pixels \(embed.decode=reader\): ([\d.]+) MB", out) == pytest.approx(50.3)
    synthetic = _number(r"compressed tiles, synthetic 20×: ([\d.]+) MB a region", out)
    assert 0.2 < synthetic < 50.3 / 4  # compressed, measured: JPEG tiles are many times smaller
    assert _number(r"compressed tiles, TCGA 20× \(issue #28\): ([\d.]+) MB", out) == 3.1
    per_region = _number(r"decode on CPUs \(20×\): ([\d.]+) core-s a region", out)
    cores = _number(r"decode on CPUs \(20×\): [\d.]+ core-s a region → [\d,]+ core-hours; ([\d.]+) cores a GPU", out)
    assert cores == pytest.approx(rate * per_region, abs=0.1)
    targets = re.findall(r"target, CPU decode at 20× \((.+?)\): .*?→ GPUs (\d+)% busy: (holds|does not hold)", out)
    assert [t[0] for t in targets] == [
        "synthetic, measured",
        "TCGA, issue #28's 0.11 core-s",
        "synthetic at 0.504 µm/px, Lanczos, measured",
        "synthetic at 0.504 µm/px, tiling.mpp_tolerance=0.02, measured",
    ], out
    lanczos = _number(r"decode on CPUs \(20× at 0.504 µm/px\): ([\d.]+) core-s a region", out)
    assert lanczos > per_region  # the same decode plus a Lanczos resize
    assert _number(r"decode on CPUs \(40× at 0.2527 µm/px\): ([\d.]+) core-s a region", out) > 0
    tolerant = _number(r"decode on CPUs \(20× at 0.504 µm/px, tiling.mpp_tolerance=0.02\): ([\d.]+) core-s", out)
    assert tolerant < lanczos  # read whole: no resize
    assert all((int(busy) >= 80) == (says == "holds") for _, busy, says in targets), targets
    assert "target, GPU decode at 20×" in out and "not measured here" in out
