"""The demo cohort end to end: synthetic slides with subtype and risk planted in their content →
tile → embed (tiny HIPT twin, random weights) → Ray Tune sweeps of slide-level heads, similar-
region search over the vector index, and slide heatmaps of the best head.

Regions are 1024 px (4×4 patches) so that ~100 slides embed in about a minute here; everything
else is the real pipeline through the CLI.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hipt_ray.cli import main
from hipt_ray.slides.synthetic import make_demo_data
from hipt_ray.store import Store
from hipt_ray.store.tables import resolve_embedding
from hipt_ray.store.vectors import index_info

from ..conftest import TINY

pytestmark = [pytest.mark.ray, pytest.mark.slow]
N_SLIDES = 100
COMMON = ["--config", TINY, "tiling.region_px=1024", "tiling.min_tissue_fraction=0.05", "search.min_rows=150"]


@pytest.fixture(scope="module")
def demo(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-cohort")
    make_demo_data(root / "data", n_slides=N_SLIDES, seed=3, size_um=(900, 1500))
    slides, out = root / "data" / "slides", str(root / "tables")
    # Embed the first half, then everything: the second run must fold its regions into the index.
    printed = []
    for pattern in ("demo-0[0-4]*", "*"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(["embed", "--slides", str(slides / pattern), "--out", out, *COMMON])
        printed.append(buf.getvalue())
        assert code == 0, printed[-1]
    return {"root": root, "out": out, "labels": str(root / "data" / "labels.csv"), "printed": printed}


def test_the_index_is_built_then_refreshed_when_new_slides_are_embedded(demo, capsys):
    first, second = demo["printed"]
    assert re.search(r"search: vector index built over \d+ embedded regions \(IVF_PQ\)", first), first
    assert "search: vector index refreshed" in second, second
    store = Store(demo["out"])
    info = index_info(store)
    assert info and info["unindexed"] == 0 and info["type"] == "IVF_PQ"
    # A region of a slide from the second run is found by the index (distance ~0, ranked first).
    mid, spec = resolve_embedding(store)
    last = store.regions(spec, ["demo-099"], model_id=mid, columns=["slide_id", "region_index", "x", "y"]).to_pylist()[
        0
    ]
    code = main(
        [
            "search",
            "--out",
            demo["out"],
            "--slide",
            "demo-099",
            "--region",
            f"{last['x']},{last['y']}",
            "-k",
            "5",
            *COMMON[2:],
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "vector index up to date" in printed
    table = pd.read_csv(Path(demo["out"]) / "search" / f"demo-099_{last['x']}_{last['y']}.csv")
    assert table["slide_id"][0] == "demo-099" and table["distance"][0] < 1e-6


def _sweep(demo, task: str, name: str, capsys) -> str:
    # The task's defaults (configs/heads/<task>.yaml: preprocessing, inner validation, epochs, lr)
    # over two heads; 5 folds to keep the suite short. No ASHA stopping, seeded draws.
    code = main(
        [
            "sweep",
            "--out",
            demo["out"],
            "--labels",
            demo["labels"],
            "--task",
            task,
            "heads.label_column=subtype",
            "heads.folds=5",
            "sweep.num_samples=1",
            f"sweep.name={name}",
            "sweep.grace_period=200",
            "sweep.cpus_per_trial=1",
            "sweep.space={head: {grid: [abmil, mean_mlp]}}",
        ]
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, printed + captured.err[-3000:]
    return printed


def _number(printed: str, after: str) -> float:
    return float(printed.split(after)[1].split(" ")[0].rstrip(";,"))


def test_swept_heads_match_the_linear_baselines_and_shuffled_labels_stay_at_chance(demo, capsys):
    printed = _sweep(demo, "subtyping", "demo-sub", capsys)
    honest = _number(printed, "honest auc: ")
    probe = _number(printed, "baseline logistic regression on mean embeddings: ")
    with capsys.disabled():
        print(f"demo cohort subtyping: honest sweep AUC {honest:.3f}, logistic probe {probe:.3f}")
    # Measured: honest 0.98–0.99, probe 0.995 (before standardisation and inner validation the
    # heads reached 0.75). Target: probe − 0.02; the margin below is fold noise on 67 cases.
    assert honest >= probe - 0.04, printed
    printed = _sweep(demo, "survival", "demo-surv", capsys)
    honest = _number(printed, "honest c_index: ")
    cox = _number(printed, "baseline penalised Cox on mean embeddings: ")
    with capsys.disabled():
        print(f"demo cohort survival: honest sweep c-index {honest:.3f}, penalised Cox {cox:.3f}")
    # Measured: honest ≈ 0.71–0.73 (Cox-loss heads), penalised Cox 0.688; the planted risk 0.75.
    assert honest >= cox - 0.04, printed

    # the sweep's abmil trial is abmil with the task's defaults (its out-of-fold AUC, 5 folds)
    trials = pd.read_csv(Path(demo["out"]) / "heads" / "demo-sub" / "results.csv")
    auc = float(trials.loc[trials["config/head"] == "abmil", "auc"].iloc[0])
    assert auc >= 0.95, trials  # measured 0.986
    labels = pd.read_csv(demo["labels"])
    cases = labels.groupby("case_id")[["subtype", "survival_months", "event"]].first()
    rng = np.random.default_rng(7)
    shuffled = dict(zip(cases.index, rng.permutation(len(cases))))
    for col in ("subtype", "survival_months", "event"):
        labels[col] = labels["case_id"].map(lambda c, col=col: cases[col].iloc[shuffled[c]])
    path = demo["root"] / "shuffled.csv"
    labels.to_csv(path, index=False)
    chance = {}
    for task, key in (("subtyping", "auc"), ("survival", "c_index")):
        code = main(
            [
                "train-head",
                "--out",
                demo["out"],
                "--labels",
                str(path),
                "--run-name",
                f"shuffled-{task}",
                "--task",
                task,
                "heads.label_column=subtype",
                "heads.head=abmil",
                "heads.folds=5",
            ]
        )
        printed = capsys.readouterr().out
        assert code == 0, printed
        chance[key] = _number(printed, f"{key}: ")
    with capsys.disabled():
        print(f"demo cohort with shuffled labels: {chance}")
    assert all(0.35 < v < 0.65 for v in chance.values()), chance  # chance is 0.5: the gain is not leakage


def test_search_puts_the_query_first_and_its_planted_class_ahead(demo, capsys):
    store = Store(demo["out"])
    mid, spec = resolve_embedding(store)
    labels = pd.read_csv(demo["labels"]).set_index("slide_id")["subtype"].to_dict()
    regions = store.regions(spec, model_id=mid, columns=["slide_id", "region_index", "x", "y"]).to_pylist()
    queries = [next(r for r in regions if r["slide_id"] == s) for s in sorted({r["slide_id"] for r in regions})[::10]]
    precisions = []
    for q in queries:
        code = main(
            [
                "search",
                "--out",
                demo["out"],
                "--slide",
                q["slide_id"],
                "--region",
                f"{q['x']},{q['y']}",
                "-k",
                "11",
                "--labels",
                demo["labels"],
                "heads.label_column=subtype",
                *COMMON[2:],
            ]
        )
        printed = capsys.readouterr().out
        assert code == 0, printed
        table = pd.read_csv(Path(demo["out"]) / "search" / f"{q['slide_id']}_{q['x']}_{q['y']}.csv")
        assert (table["slide_id"][0], table["region_index"][0]) == (q["slide_id"], q["region_index"])
        assert list(table["distance"]) == sorted(table["distance"])
        others = table.iloc[1:]
        precisions.append(float((others["slide_id"].map(labels) == labels[q["slide_id"]]).mean()))
    precision = float(np.mean(precisions))
    with capsys.disabled():
        print(f"search precision@10 (same planted subtype): {precision:.3f} over {len(queries)} queries")
    # Two subtypes in about equal numbers: chance ≈ 0.5. Measured 0.83 with the random tiny twin.
    assert precision > 0.7, precisions
    mosaic = Image.open(
        Path(demo["out"]) / "search" / f"{queries[0]['slide_id']}_{queries[0]['x']}_{queries[0]['y']}_mosaic.png"
    )
    assert mosaic.width > 6 * 192 and np.asarray(mosaic).std() > 10


def test_slide_heatmaps_of_the_best_head(demo, capsys):
    run = Path(demo["out"]) / "heads" / "demo-sub-best"
    if not (run / "heads.pt").is_file():
        _sweep(demo, "subtyping", "demo-sub", capsys)
    out = demo["root"] / "slide-heatmaps"
    code = main(["heatmap", "--head-run", str(run), "--out", str(out), "--slide", "demo-004"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    img = np.asarray(Image.open(out / "demo-004_slide_attention.png").convert("RGB"))
    assert img.shape[0] > 400 and img.shape[1] > 600
    # The regions are coloured (jet), not only the grey/white slide.
    sat = img.max(-1).astype(int) - img.min(-1).astype(int)
    assert (sat > 120).mean() > 0.01
    # The same from the MLflow run id of the refit (heads.pt is one of its artifacts).
    import mlflow

    uri = f"sqlite:///{Path(demo['out']) / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    run_id = mlflow.search_runs(
        experiment_names=["hipt-ray"], output_format="list", filter_string="attributes.run_name = 'demo-sub-best'"
    )[0].info.run_id
    code = main(
        [
            "heatmap",
            "--head-run",
            run_id,
            "--out",
            str(out / "by-id"),
            "--slide",
            "demo-004",
            f"tracking.mlflow_uri={uri}",
        ]
    )
    assert code == 0 and (out / "by-id" / "demo-004_slide_attention.png").is_file()
    assert main(["heatmap", "--head-run", "0123abc", "--out", str(out), f"tracking.mlflow_uri={uri}"]) == 2
    assert "tracking.mlflow_uri" in capsys.readouterr().err


def test_hipt_lgp_runs_its_own_vit4k_over_the_stored_tokens(demo, capsys):
    """heads.local_vit: bags of tokens256 grids embedded by the head's own (frozen, random) ViT-4K."""
    code = main(
        [
            "train-head",
            "--out",
            demo["out"],
            "--labels",
            demo["labels"],
            "--run-name",
            "local-vit",
            "heads.label_column=subtype",
            "heads.head=hipt_lgp",
            "heads.local_vit=vit4k_tiny",
            "heads.folds=5",
            "heads.epochs=10",
            "heads.lr=0.0005",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    auc = float(printed.split("auc: ")[1].split(" ")[0])
    with capsys.disabled():
        print(f"demo cohort subtyping AUC, hipt_lgp over tokens256 with a frozen random ViT-4K: {auc:.3f}")
    # measured 0.981 (batches of 8 bags; 1.000 one bag a step) with standardisation fitted on the
    # frozen ViT-4K (0.583 without; chance 0.5)
    assert auc > 0.6, printed
    import torch

    saved = torch.load(Path(demo["out"]) / "heads" / "local-vit" / "heads.pt", weights_only=False)
    assert any(k.startswith("local_vit.") for k in saved["folds"][0]["state_dict"])
    assert (
        main(
            [
                "train-head",
                "--out",
                demo["out"],
                "--labels",
                demo["labels"],
                "heads.label_column=subtype",
                "heads.head=abmil",
                "heads.local_vit=vit4k_tiny",
            ]
        )
        == 2
    )
    assert "needs heads.head=hipt_lgp" in capsys.readouterr().err
