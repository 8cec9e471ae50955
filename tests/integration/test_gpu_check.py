"""``bench/gpu_check.sh`` (issue #28 item 5) in its small CPU mode, end to end as a person runs
it: make-demo-data, the embed job on its own local Ray, the decode comparison (torchvision's
batched decoder on ``device="cpu"`` against the CPU decoder) and the model figures, with the JSON
it writes. The GPU branch's MFU and report lines are checked with the GPU's name faked (no GPU
here); the script's GPU run itself needs a GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the script starts its own Ray
    env.update(PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads((out / "gpu_check.json").read_text())


def test_cpu_mode_embeds_every_region_and_reports_each_figure(cpu_check):
    stdout, r = cpu_check
    assert r["status"] == "ok" and r["device"] == "cpu" and r["config"]["model"] == "hipt4k_tiny"
    e = r["end_to_end"]
    assert e["slides"] == e["slides_ok"] == 2 and e["regions"] == e["regions_tiled"] > 0
    assert e["decoded"] == {"cpu": e["regions"]}  # a CPU actor decodes the packed tiles itself
    assert 0 < e["transfer_bytes_per_region"] <= 1.2 * e["tile_bytes_per_region"]
    assert e["end_to_end_regions_per_s"] > 0 and e["in_pipeline_model_s_per_region"] > 0
    d = r["decode"]
    assert 1 <= d["regions"] <= 4 and d["where"] == {"gpu": d["gpu_regions"]}
    assert d["gpu_ms_per_region"] > 0 and d["cpu_ms_per_region"] > 0
    # torchvision's CPU decoder and the tile decoder are both libjpeg-turbo: the same pixels
    assert d["pixels_max_abs_diff"] == 0
    m = r["model"]
    assert m["cosine_fp32_min"] >= 0.9999 and m["cosine_job_min"] >= 0.9999 and m["model_only_regions_per_s"] > 0
    assert "model_only" not in r["mfu"] and r["mfu"]["gpu"] is None
    assert all(z["max_abs_diff"] == 0 for z in r["lanczos"]["resizes"]) and len(r["lanczos"]["resizes"]) == 2
    for text in ("model-only:", "end-to-end (the embed job)", "transfer:", "embedding cosine", "MFU: not printed"):
        assert text in stdout, stdout[-3000:]


def test_mfu_uses_the_peak_of_the_named_gpu_only(cpu_check, monkeypatch):
    gc = gpu_check_module()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    u = gc.mfu(gc.GPU, {"model_only": 73.5, "end_to_end_steady": 50.0, "end_to_end": None})
    assert u["model_only"] == pytest.approx(73.5 * 3145.39e9 / 989e12, abs=1e-4)  # bench/gpu.py's FLOPs
    assert u["end_to_end_steady"] == pytest.approx(50 / 73.5 * u["model_only"], abs=1e-4)
    assert u["end_to_end"] is None and "datasheet" in u["peak_source"]
    _, r = cpu_check
    lines = gc.report({**r, "mfu": u})
    assert any("MFU: model-only 23.4 %, end-to-end 15.9 % steady" in line for line in lines), lines
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 PCIe")  # another peak
    u = gc.mfu(gc.GPU, {"model_only": 73.5})
    assert "model_only" not in u and "NVIDIA H100 PCIe" in u["peak_source"]
    lines = gc.report({**r, "mfu": u})
    assert any(line.startswith("MFU: not printed (no peak for 'NVIDIA H100 PCIe'") for line in lines), lines
