"""``make demo``: synthetic slides → ``hipt-ray tile`` → ``hipt-ray embed`` → two-stage DINO
pretraining (stage 1, embed with its ViT-256, stage 2) on the embedded default (a local Ray).

Each step goes through the same CLI a user types, so the demo shows the real commands.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from hipt_ray.cli import main as cli
from hipt_ray.console import quiet_ray
from hipt_ray.runtime import ray_address, start_ray

_TIMES: list[tuple[str, float]] = []  # (command, wall seconds) of each step run


def _step(argv: list[str]) -> int:
    print(f"\n$ hipt-ray {shlex.join(argv)}", flush=True)
    t0 = time.perf_counter()
    try:
        return cli(argv)
    finally:
        _TIMES.append((argv[0], time.perf_counter() - t0))


def _times() -> str:
    """One line: where the demo's time went, step by step."""
    total = sum(t for _, t in _TIMES)
    steps = " · ".join(f"{name} {t:.0f} s" for name, t in _TIMES)
    return f"wall time per step: {steps} · total {int(total // 60)}:{int(total % 60):02d}"


def _commands(data: Path, tables: Path, ssl: Path) -> list[tuple[str, tuple[int, ...]]]:
    """The demo's pipeline as a user types it, and the exit codes each step may end with (tile
    and embed: 3 when some slides failed, which the demo's cohort allows)."""
    slides, tab, labels = (shlex.quote(str(p)) for p in (data / "slides", tables, data / "labels.csv"))
    stage1 = shlex.quote(str(ssl / "pretrain" / "demo-vit256" / "teacher_vit256.pth"))
    q_ssl = shlex.quote(str(ssl))
    return [
        (f"tile --slides {slides} --out {tab} --config demo", (0, 3)),
        (f"embed --slides {slides} --out {tab} --config demo", (0, 3)),
        # Pretraining: stage 1 on the slides' patches, embed with the stage-1 ViT-256 into a
        # separate output, stage 2 on the token grids of that output.
        (f"pretrain --stage vit256 --slides {slides} --out {q_ssl} --run-name demo-vit256 --config demo", (0,)),
        (f"embed --slides {slides} --out {q_ssl} --checkpoint-256 {stage1} --config demo", (0, 3)),
        (f"pretrain --stage vit4k --out {q_ssl} --run-name demo-vit4k --config demo", (0,)),
        # Slide-level heads: small sweeps for subtyping and survival on the first embeddings.
        *(
            (f"sweep --out {tab} --labels {labels} --task {task} --config demo sweep.name=demo-{task}", (0,))
            for task in ("subtyping", "survival")
        ),
    ]


def _look_at_it(data: Path, tables: Path, figures: Path) -> list[str]:
    """A region's attention, an attention head's attention over each slide, and the regions
    most like that region across every slide (the region: the one with the most tissue)."""
    # Lance is imported after Ray has started (it warns about forks made after its import), as
    # the CLI imports the stages
    from hipt_ray.store import Store
    from hipt_ray.store.tables import resolve_embedding

    store = Store(str(tables))
    mid, spec = resolve_embedding(store)
    regions = store.regions(spec, model_id=mid, columns=["slide_id", "region_index", "x", "y", "tissue_fraction"])
    best = max(regions.to_pylist(), key=lambda r: r["tissue_fraction"])
    uri = shlex.quote(store.completed(spec, mid)[best["slide_id"]])
    tab, labels, at = shlex.quote(str(tables)), shlex.quote(str(data / "labels.csv")), f"{best['x']},{best['y']}"
    fig = {k: shlex.quote(str(figures / k)) for k in ("region", "slides", "search")}
    return [
        f"heatmap --slide {uri} --region {at} --out {fig['region']} --config demo",
        # An attention head (the sweep's best may be mean pooling, which has no attention to show).
        f"train-head --out {tab} --labels {labels} --run-name demo-abmil --config demo heads.head=abmil",
        f"heatmap --head-run {shlex.quote(str(tables / 'heads' / 'demo-abmil'))} --out {fig['slides']} --config demo",
        # 8 rows in the console, not 16; the CSV and mosaic show the same 8
        f"search --out {tab} --slide {shlex.quote(best['slide_id'])} --region {at} --labels {labels} "
        f"--dest {fig['search']} --config demo search.k=8",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--n-slides", type=int, default=40)
    args = parser.parse_args(argv)
    _TIMES.clear()  # this run's steps only, if main runs twice in one process
    out = Path(args.out).resolve()
    data, tables, ssl, figures = out / "data", out / "tables", out / "ssl", out / "figures"
    # One Ray for every step, with its dashboard: pretraining's Ray Train asks the State API it
    # serves (without it Train's placement-group cleaner logs a warning every few seconds).
    quiet_ray()
    start_ray(address=ray_address(), dashboard=True)
    if not (data / "labels.csv").is_file():
        # Small slides (1–4 regions each) so that the cohort has enough cases for the heads.
        make = f"make-demo-data {shlex.quote(str(data))} --n-slides {args.n_slides} --seed 0 --size-um 2100 4200"
        if code := _step(shlex.split(make)):
            return code
    for command, allowed in _commands(data, tables, ssl):
        if (code := _step(shlex.split(command))) not in allowed:
            return code
    for command in _look_at_it(data, tables, figures):
        if code := _step(shlex.split(command)):
            return code
    print(f"""
{_times()}

demo outputs under {out}:
  slides + labels : {data}/slides/, {data}/labels.csv
  Lance tables    : {tables}/slides.lance (one row per slide and model), {tables}/regions.lance
                    (tiled regions, and the same regions with emb4k / mean256 / tokens256;
                    the demo embeds with the tiny model's random weights: no weights can be
                    downloaded here — pass --checkpoint-256/--checkpoint-4k for real ones)
  QC thumbnails   : {tables}/qc/<slide_id>.png (tissue contour green, regions blue)
  pretraining     : {ssl}/pretrain/demo-vit256/teacher_vit256.pth (stage 1, official HIPT layout),
                    {ssl}/pretrain/demo-vit4k/teacher_vit4k.pth (stage 2), embeddings of the
                    stage-1 model in {ssl}/regions.lance, per-step logs in {ssl}/pretrain/*/steps.jsonl
  heads           : {tables}/heads/demo-<task>/results.csv (every trial), {tables}/heads/demo-<task>-best/
                    (out-of-fold predictions, roc.png / km.png of the best configuration)
  QC page         : {tables}/qc/overview.png (every slide: tissue contour, regions, failure reasons)
  figures         : {figures}/region/*_hierarchical.png, *_vit256.png, *_vit4k.png (region attention),
                    {figures}/slides/<slide_id>_slide_attention.png (abmil attention over each slide),
                    {figures}/search/*_mosaic.png (nearest regions across all slides, query framed red)
  MLflow          : .venv/bin/mlflow ui --backend-store-uri sqlite:///{tables}/mlflow.db  (sweeps)
                    .venv/bin/mlflow ui --backend-store-uri sqlite:///{ssl}/mlflow.db  (pretraining)
read them with:   .venv/bin/python -c "from hipt_ray.store import read_embeddings; print(read_embeddings('{tables}'))"
                  .venv/bin/python -c "import lance; print(lance.dataset('{tables}/regions.lance').to_table())"
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
