"""Slide-level heads on the demo cohort: time and quality of one trial per head and batch of bags,
and the shipped 16-trial sweep.

    .venv/bin/python bench/heads.py [--out OUT --labels LABELS] [--batch-bags 1,8] [--sweep]

Without ``--out`` it builds the suite's demo cohort once (100 synthetic slides with subtype and
risk planted, 67 cases, 1024-px regions, the tiny HIPT with random weights: what
tests/integration/test_demo_cohort.py embeds) under the temp folder and reuses it afterwards.

For each head and ``heads.batch_bags`` it runs what one sweep trial runs — every fold of the
task's shipped configuration (hipt_ray/configs/heads/<task>.yaml: 10 folds, 50 epochs, inner validation,
early stopping) on one thread, as a trial with one CPU has — and prints the wall time (median of
``--repeat``), the ratio to batch 1, the mean out-of-fold AUC (or c-index), the inner validation
loss and the epochs run. ``--sweep`` then times ``hipt-ray sweep`` with the shipped space and
16 trials, end to end (Ray start, trials, refit), as a user runs it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORK = Path(tempfile.gettempdir()) / "hipt-ray-bench-heads"


def build_demo_cohort() -> tuple[str, str]:
    out, data = WORK / "tables", WORK / "data"
    if not (out / "slides.lance").exists():
        from hipt_ray.slides.synthetic import make_demo_data

        make_demo_data(data, n_slides=100, seed=3, size_um=(900, 1500))
        code = subprocess.call(
            [
                sys.executable,
                "-m",
                "hipt_ray.cli",
                "embed",
                "--slides",
                str(data / "slides"),
                "--out",
                str(out),
                "--config",
                str(ROOT / "hipt_ray" / "configs" / "tiny.yaml"),
                "tiling.region_px=1024",
                "tiling.min_tissue_fraction=0.05",
            ]
        )
        if code:
            raise SystemExit(f"embedding the demo cohort failed (exit {code})")
    return str(out), str(data / "labels.csv")


def one_trial(out: str, labels: str, task: str, head: str, batch_bags: int, extra: list[str] = ()) -> dict:
    import numpy as np

    from hipt_ray.config import load_config
    from hipt_ray.heads.cohort import load_cohort
    from hipt_ray.heads.fit import cross_validate

    cfg = load_config(
        files=[str(ROOT / "hipt_ray" / "configs" / "heads" / f"{task}.yaml")],
        values={"out": out, "heads": {"labels": labels}},
        overrides=["heads.label_column=subtype", f"heads.head={head}", f"heads.batch_bags={batch_bags}", *extra],
    )
    cohort = load_cohort(cfg)
    t0 = time.perf_counter()
    epoch, states, mean = list(cross_validate(cfg.heads, cohort))[-1]
    key = "auc" if task == "subtyping" else "c_index"
    return {
        "seconds": time.perf_counter() - t0,
        key: mean[key],
        "val_loss": mean["val_loss"],
        "epochs": epoch,
        "best_epoch": float(np.mean([st.best_epoch for st in states])),
        "key": key,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out")
    parser.add_argument("--labels")
    parser.add_argument("--task", default="subtyping", choices=["subtyping", "survival"])
    parser.add_argument("--heads", default="abmil,mean_mlp,hipt_lgp")
    parser.add_argument("--batch-bags", default="1,8")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides, e.g. heads.lr=0.002")
    parser.add_argument("--sweep", action="store_true", help="also time the shipped 16-trial sweep")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as a sweep trial with one CPU
    out, labels = (args.out, args.labels) if args.out else build_demo_cohort()
    print(
        f"cohort: {out} (labels {labels}), task {args.task}, hipt_ray/configs/heads/{args.task}.yaml "
        f"{' '.join(args.set)}, 1 thread"
    )
    print(
        f"{'head':>9} {'batch':>5} {'s/trial':>8} {'× b1':>6} {'metric':>7} {'val loss':>8} "
        f"{'epochs':>6} {'best ep':>7}"
    )
    for head in args.heads.split(","):
        base = None
        for b in (int(v) for v in args.batch_bags.split(",")):
            runs = [one_trial(out, labels, args.task, head, b, args.set) for _ in range(args.repeat)]
            r = runs[0]
            secs = statistics.median(x["seconds"] for x in runs)
            base = base or secs
            print(
                f"{head:>9} {b:>5} {secs:>8.1f} {base / secs:>6.2f} {r[r['key']]:>7.3f} {r['val_loss']:>8.3f} "
                f"{r['epochs']:>6} {r['best_epoch']:>7.1f}",
                flush=True,
            )
    if args.sweep:
        t0 = time.perf_counter()
        code = subprocess.call(
            [
                sys.executable,
                "-m",
                "hipt_ray.cli",
                "sweep",
                "--out",
                out,
                "--labels",
                labels,
                "--task",
                args.task,
                "heads.label_column=subtype",
                f"sweep.name=bench-{args.task}-{int(time.time())}",
            ]
        )
        print(
            f"sweep of 16 trials (shipped space, ASHA, refit of the best): {time.perf_counter() - t0:.0f} s, "
            f"exit {code}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
