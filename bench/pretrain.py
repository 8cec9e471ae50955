"""DINO pretraining throughput on Ray Train, measured side by side in one run.

    .venv/bin/python bench/pretrain.py [--steps 6]

Stage 1: steps/s and images/s for the tiny and the real ViT-256 (ViT-S/16, out_dim 65536,
2 × 224 px + 8 × 96 px crops) with 1 and 2 Ray Train workers on this machine's CPUs.
Stage 2: grids/s for the real ViT-4K on [384, 16, 16] token grids (random tokens written to a
Lance table in the embed layout). Medians of per-step times from the run's step log, so Ray
start-up and data loading before the first step are excluded; the first two steps (warm-up)
are dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _fake_embed_output(out: Path, n: int) -> None:
    """``n`` full regions with random ViT-256 tokens, in the layout `embed` writes."""
    import numpy as np
    import pyarrow as pa

    from hipt_ray.config import load_config
    from hipt_ray.store import REGIONS_SCHEMA, Store, embedding_fields

    spec = load_config().tiling_spec_hash()
    rng = np.random.default_rng(0)
    schema = pa.schema(list(REGIONS_SCHEMA) + embedding_fields(192, 384))
    rows = [
        {
            "slide_id": f"s{i // 4}",
            "region_index": i % 4,
            "x": 0,
            "y": 0,
            "read_w": 4096,
            "read_h": 4096,
            "spec_hash": spec,
            "model_id": "bench",
            "emb4k": rng.standard_normal(192).astype("float32"),
            "mean256": rng.standard_normal(384).astype("float32"),
            "tokens256": rng.standard_normal(256 * 384).astype("float16"),
        }
        for i in range(n)
    ]
    slides = [
        {
            "slide_id": f"s{i}",
            "uri": f"s{i}",
            "status": "ok",
            "spec_hash": spec,
            "model_id": "bench",
            "n_regions": 4,
            "time": None,
        }
        for i in range((n + 3) // 4)
    ]
    Store(str(out)).append_slides(slides, pa.Table.from_pylist(rows, schema=schema), schema)


def _run(args_list: list[str], out: Path) -> tuple[float, int]:
    from hipt_ray.cli import main

    assert main(args_list) == 0
    log = [json.loads(x) for x in (out / "pretrain" / "hipt-pretrain" / "steps.jsonl").read_text().splitlines()]
    times = [e["step_seconds"] for e in log if "loss" in e][2:]
    return statistics.median(times), len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    import ray

    from hipt_ray.slides import synthetic

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    work = Path(tempfile.mkdtemp(prefix="pretrain-bench-"))
    slides = work / "slides"
    slides.mkdir()
    for i in range(2):
        synthetic.make_slide(slides / f"b{i}.tiff", width_um=4100, height_um=2050, seed=200 + i, n_blobs=3)
    steps = args.steps + 2
    print(f"{ray.cluster_resources().get('CPU')} CPUs; {args.steps} timed steps per configuration")
    print("\nstage 1 (ViT-256, 2 × 224 + 8 × 96 px crops):")
    results = {}
    for size, batch, out_dim in (("tiny", 16, 1024), ("real", 8, 65536)):
        for workers in (1, 2):
            out = work / f"s1-{size}-{workers}"
            sec, n = _run(
                [
                    "pretrain",
                    "--stage",
                    "vit256",
                    "--slides",
                    str(slides),
                    "--out",
                    str(out),
                    f"storage.cache_dir={work / 'c'}",
                    f"pretrain.size={size}",
                    f"pretrain.out_dim={out_dim}",
                    f"pretrain.num_workers={workers}",
                    f"pretrain.batch_size_per_worker={batch}",
                    "pretrain.cache_dataset=true",
                    "pretrain.patches_per_region=32",
                    "pretrain.epochs=1",
                    f"pretrain.steps_per_epoch={steps}",
                    "pretrain.warmup_epochs=0",
                    f"pretrain.checkpoint_every_steps={steps}",
                    "tiling.min_tissue_fraction=0.05",
                ],
                out,
            )
            results[(size, workers)] = workers * batch / sec
            print(
                f"  {size:<4} {workers} worker(s) × batch {batch:>2}: {1 / sec:6.3f} steps/s, "
                f"{workers * batch / sec:6.2f} images/s (median of {n} steps)",
                flush=True,
            )
    for size in ("tiny", "real"):
        print(f"  {size}: 2 workers / 1 worker images/s = {results[(size, 2)] / results[(size, 1)]:.2f}×")

    print("\nstage 2 (ViT-4K XS on [384, 16, 16] grids, 2 × 14² + 8 × 6² crops):")
    out = work / "s2"
    _fake_embed_output(out, 64)
    sec, n = _run(
        [
            "pretrain",
            "--stage",
            "vit4k",
            "--out",
            str(out),
            "pretrain.batch_size_per_worker=16",
            "pretrain.cache_dataset=true",
            "pretrain.epochs=1",
            f"pretrain.steps_per_epoch={steps}",
            "pretrain.warmup_epochs=0",
            f"pretrain.checkpoint_every_steps={steps}",
        ],
        out,
    )
    print(f"  1 worker × batch 16: {1 / sec:6.3f} steps/s, {16 / sec:6.2f} grids/s (median of {n} steps)")
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
