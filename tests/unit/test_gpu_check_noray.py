"""``bench/gpu_check.sh`` where Ray and Lance cannot be imported (as on the device machines'
image): it switches to ``--no-ray`` itself and measures everything but the embed job on real
packed regions, small on the CPU (tiny model, two small slides). No Ray starts here: a meta-path
blocker in the subprocess refuses ``ray``/``lance`` and records any attempt to import them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKER = """
import atexit, importlib.abc, os, sys
tried = []
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"ray", "lance", "lance_ray"}:
            tried.append(name)
            raise ImportError(f"{name} is blocked (a machine without Ray or Lance)")
sys.meta_path.insert(0, _Block())
if os.environ.get("BLOCKED_LOG"):
    atexit.register(lambda: open(os.environ["BLOCKED_LOG"], "a").write("".join(n + "\\n" for n in tried)))
"""


@pytest.fixture(scope="module")
def no_ray_check(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-check-noray")
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(BLOCKER)
    out, log = tmp / "out", tmp / "blocked.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHON=sys.executable, PYTHONPATH=f"{tmp / 'site'}{os.pathsep}{ROOT}", OUT=str(out))
    # the script's own interpreter check (`import ray`) is refused too: that attempt is the only one
    env["BLOCKED_LOG"] = str(log)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    tried = log.read_text().split() if log.exists() else []
    return proc, json.loads((out / "gpu_check.json").read_text()), tried


def test_switches_to_no_ray_and_never_imports_ray_or_lance(no_ray_check):
    proc, r, tried = no_ray_check
    assert "running with --no-ray" in proc.stderr
    assert tried == ["ray"], tried  # gpu_check.sh's probe only; the check itself never asks
    assert r["mode"]["ray"] is False and r["status"] == "ok" and r["config"]["model"] == "hipt4k_tiny"


def test_no_ray_figures_on_real_packed_regions(no_ray_check):
    proc, r, _ = no_ray_check
    e, d, m = r["end_to_end"], r["decode"], r["model"]
    assert e["slides"] == e["slides_ok"] == 2 and e["regions_tiled"] >= e["regions_packed"] >= 1
    assert e["end_to_end_regions_per_s"] == "not measured in --no-ray mode"
    assert 0 < e["tile_bytes_per_region"] <= e["transfer_bytes_per_region"] <= 1.2 * e["tile_bytes_per_region"]
    assert e["pixel_bytes_per_region"] > 10 * e["transfer_bytes_per_region"]  # JPEG tiles, not pixels
    assert d["regions"] == e["regions_packed"] and d["gpu_regions"] >= 1
    assert d["gpu_ms_per_region"] > 0 and d["cpu_ms_per_region"] > 0
    assert d["pixels_max_abs_diff"] == 0  # torchvision's CPU decoder and the tile decoder: both libjpeg-turbo
    assert m["cosine_fp32_min"] >= 0.9999 and m["cosine_job_min"] >= 0.9999 and m["model_only_regions_per_s"] > 0
    assert r["mfu"]["end_to_end"] == "not measured in --no-ray mode" and "model_only" not in r["mfu"]
    lz = r["lanczos"]["resizes"]  # TCGA's 40× and 20× boxes, a quarter size: Pillow's pixels exactly
    assert [(z["box"], z["region_px"]) for z in lz] == [(2026, 1024), (1016, 1024)]
    assert all(z["max_abs_diff"] == 0 and z["device_ms"] > 0 and z["pil_cpu_ms"] > 0 for z in lz), lz
    texts = ("model-only:", "end-to-end: not measured in --no-ray mode", "a packed region row", "cosine", "Lanczos")
    for text in texts:
        assert text in proc.stdout, proc.stdout[-3000:]


def test_no_ray_report_prints_model_only_mfu_of_a_named_gpu(no_ray_check, monkeypatch):
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_check_noray as noray

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    u = noray.base.mfu(noray.base.GPU, {"model_only": 73.5}) | {"end_to_end": noray.NOT_MEASURED}
    assert u["model_only"] == pytest.approx(73.5 * 3145.39e9 / 989e12, abs=1e-4)  # bench/gpu.py's FLOPs
    _, r, _ = no_ray_check
    lines = noray.report({**r, "mfu": u})
    assert "MFU model-only: 23.4 %; end-to-end: not measured in --no-ray mode" in lines, lines
    assert noray.verdict({**r, "model": {**r["model"], "cosine_fp32_min": 0.99}}).startswith("embedding cosine 0.99")
    lz = r["lanczos"]["resizes"]
    bad = {**r, "lanczos": {"device": "cpu", "resizes": [{**lz[0], "max_abs_diff": 3}]}}
    assert noray.verdict(bad).startswith("Lanczos pixels differ from Pillow's")
