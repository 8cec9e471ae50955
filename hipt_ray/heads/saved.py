"""The one file format of trained folds (``heads.pt``): written by ``train-head`` next to its
predictions and by every sweep trial into its last checkpoint; read by ``heatmap --head-run``
(out-of-fold slide heatmaps) and by the sweep's refit (which takes the best trial's folds instead
of training them again). Tensors and plain types only, so it loads with ``weights_only``."""

from __future__ import annotations

import io

import torch

from hipt_ray.config import Config
from hipt_ray.heads.cohort import Cohort
from hipt_ray.models.checkpoints import load_trusted

HEADS_FILE = "heads.pt"
FORMAT = 2  # 1: heads.pt before the sweep's folds.pt was merged into it (no train/split_hash)


def save_folds(path: str, cfg: Config, cohort: Cohort, states: list, split_hash: str) -> str:
    """Every fold's selected head with what rebuilds it (the run's config, its classes) and which
    cases it trained on, selected its epoch on and never saw."""
    ids = cohort.case_ids
    torch.save(
        {
            "format": FORMAT,
            "config": cfg.to_dict(),
            "split_hash": split_hash,
            "classes": cohort.classes,
            "model_id": cohort.model_id,
            "cases": cohort.slides,
            "folds": [
                {
                    "train": [ids[i] for i in st.train],
                    "val": [ids[i] for i in st.val],
                    "inner_val": [ids[i] for i in (st.inner if st.inner is not None else [])],
                    "state_dict": st.head.state_dict(),
                    "epoch": int(st.best_epoch),
                    "inner_metrics": dict(st.inner_metrics),
                    "best_loss": float(st.best_loss),
                    "train_loss": float(st.train_loss),
                }
                for st in states
            ],
        },
        path,
    )
    return path


def load_folds(source: str | io.BytesIO, *, allow_unsafe_pickle: bool = False, name: str | None = None) -> dict:
    """A ``heads.pt`` written by :func:`save_folds` (tensors and plain types only unless
    ``allow_unsafe_pickle``); ``name`` is how errors refer to it."""
    return load_trusted(source, name=name, allow_unsafe_pickle=allow_unsafe_pickle)
