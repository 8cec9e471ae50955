"""bench/encoders.py in its tiny mode (one-block twins on the CPU): the FLOP counts against the
ViT formula, the projection's arithmetic and what it says about where its GPU figures come from."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_encoders", ROOT / "bench" / "encoders.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_encoders"] = module
    spec.loader.exec_module(module)
    return module


def _vit_gflop(*, depth: int, dim: int, tokens: int, patches: int, patch: int) -> float:
    """A plain ViT (MLP ratio 4): 24·T·D² per block in Linears, 4·T²·D in attention, and the
    patch embedding."""
    return (depth * (24 * tokens * dim**2 + 4 * tokens**2 * dim) + 2 * 3 * patch**2 * dim * patches) / 1e9


def test_tiny_run_counts_flops_and_projects_tcga(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    result = bench.main(
        ["--tiny", "--reps", "1", "--encoders", "vit256_s16,kaiko_vits16,h_optimus_0,h_optimus_1", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == result
    rows = {r["encoder"]: r for r in result["encoders"]}
    # HIPT's ViT-S/16 at 256 px: 12.28 GFLOP (bench/models.py); kaiko's at 224 px (196 patches)
    assert rows["vit256_s16"]["gflop_per_patch"] == pytest.approx(
        _vit_gflop(depth=12, dim=384, tokens=257, patches=256, patch=16), abs=0.01
    )
    assert rows["vit256_s16"]["gflop_per_patch"] == pytest.approx(12.28, abs=0.01)
    assert rows["kaiko_vits16"]["gflop_per_patch"] == pytest.approx(
        _vit_gflop(depth=12, dim=384, tokens=197, patches=196, patch=16), abs=0.01
    )
    assert rows["h_optimus_0"]["params_m"] == pytest.approx(1134.8, abs=0.1)  # real size, not the twin
    assert rows["h_optimus_1"]["measured_as"] == "h_optimus_0"
    assert rows["h_optimus_1"]["cpu_patches_per_s"] == rows["h_optimus_0"]["cpu_patches_per_s"] > 0
    assert all(r["gpu_patches_per_s"] is None for r in rows.values())  # no GPU here

    ref_rate, _ = bench.h100_reference()
    for p in result["projection"]:
        rate = ref_rate * 12.28 / rows[p["encoder"]]["gflop_per_patch"]
        assert p["gpu_patches_per_s"] == pytest.approx(rate, rel=1e-3)
        assert p["hours"] == pytest.approx(408_218 * 256 / (16 * p["gpu_patches_per_s"]) / 3600, rel=1e-3)
        assert "FLOP-scaled estimate" in p["how"] and "not a measurement" in p["how"]
    printed = capsys.readouterr().out
    assert "TINY one-block twins" in printed and "FLOP-scaled estimate" in printed


def test_h100_reference_is_the_compiled_bf16_figure(bench):
    rate, name = bench.h100_reference()
    assert name.startswith("gpu_h100_") and rate == 18805.0
