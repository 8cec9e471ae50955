"""Cross-validated fitting of a slide-level head: the folds train in lock-step, epoch by epoch,
so a sweep can report (and stop on) per-epoch validation metrics."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hipt_ray.config import HeadsConfig
from hipt_ray.heads.cohort import Cohort
from hipt_ray.heads.losses import cox_loss, risk_from_logits, survival_bins, survival_nll
from hipt_ray.heads.metrics import classification_metrics, concordance
from hipt_ray.heads.models import create_head
from hipt_ray.heads.splits import case_folds


@dataclass
class FoldState:
    train: np.ndarray  # indices into the cohort
    val: np.ndarray
    head: torch.nn.Module
    optimizer: torch.optim.Optimizer
    bins: np.ndarray | None = None  # survival: inner bin edges of this fold's training part
    last: dict | None = None  # latest validation outputs


def n_outputs(h: HeadsConfig, cohort: Cohort) -> int:
    if h.task == "subtyping":
        return len(cohort.classes)
    return 1 if h.survival_loss == "cox" else h.n_bins


def make_folds(h: HeadsConfig, cohort: Cohort) -> tuple[list[dict], str]:
    k = h.folds or (10 if h.task == "subtyping" else 5)
    strata = cohort.labels if h.task == "subtyping" else cohort.events
    # Never more folds than the smallest stratum has cases.
    k = max(2, min(k, int(np.bincount(np.asarray(strata)).min())))
    return case_folds(cohort.case_ids, list(strata), k=k, seed=h.seed, train_fraction=h.train_fraction)


def _loss(h: HeadsConfig, logits: torch.Tensor, cohort: Cohort, idx: list[int], bins: np.ndarray | None):
    if h.task == "subtyping":
        return F.cross_entropy(logits, torch.as_tensor(cohort.labels[idx]))
    times = torch.as_tensor(cohort.times[idx], dtype=torch.float32)
    events = torch.as_tensor(cohort.events[idx])
    if h.survival_loss == "cox":
        return cox_loss(logits[:, 0], times, events)
    return survival_nll(logits, torch.as_tensor(np.digitize(cohort.times[idx], bins)), events, alpha=h.alpha_surv)


def risk_of(h: HeadsConfig, logits: torch.Tensor) -> torch.Tensor:
    """Per-case risk from a survival head's logits (the Cox score, or −Σ survival for the NLL head)."""
    return logits[:, 0] if h.survival_loss == "cox" else risk_from_logits(logits)


def evaluate(h: HeadsConfig, head: torch.nn.Module, cohort: Cohort, idx: np.ndarray) -> dict:
    head.eval()
    with torch.no_grad():
        logits = torch.cat([head(cohort.inputs[i])[0] for i in idx])
    if h.task == "subtyping":
        probs = F.softmax(logits, dim=1).numpy()
        out = {"probs": probs, "labels": cohort.labels[idx]}
        out["metrics"] = classification_metrics(cohort.labels[idx], probs) if len(set(cohort.labels[idx])) > 1 else {}
    else:
        risk = risk_of(h, logits).numpy()
        out = {"risk": risk, "times": cohort.times[idx], "events": cohort.events[idx]}
        out["metrics"] = {"c_index": concordance(cohort.times[idx], cohort.events[idx], risk)}
    return out


def build_head(h: HeadsConfig, cohort: Cohort) -> torch.nn.Module:
    """A fresh head for ``h`` sized for the cohort's embeddings (or its local ViT-4K)."""
    if h.local_vit and h.head != "hipt_lgp":
        raise ValueError(f"heads.local_vit runs HIPT's own ViT-4K and needs heads.head=hipt_lgp (got {h.head})")
    if h.local_vit:
        from hipt_ray.models import create_model

        dim = create_model(h.local_vit).embed_dim
    else:
        dim = cohort.bags[0].shape[-1]
    kwargs = {"n_classes": n_outputs(h, cohort), "dim": dim, "dropout": h.dropout}
    if h.head == "hipt_lgp":  # 3 heads as published (192-d); fewer for small test models
        kwargs["n_heads"] = 3 if dim % 3 == 0 else 2
        if h.local_vit:
            kwargs.update(local_vit=h.local_vit, local_vit_checkpoint=h.local_vit_checkpoint,
                          freeze_local=h.freeze_local, seed=h.seed)
    return create_head(h.head, **kwargs)


def cross_validate(h: HeadsConfig, cohort: Cohort) -> Iterator[tuple[int, list[FoldState], dict]]:
    """Yield ``(epoch, folds, mean metrics)`` after each epoch of training every fold."""
    folds, _ = make_folds(h, cohort)
    index = {c: i for i, c in enumerate(cohort.case_ids)}
    states = []
    for f, fold in enumerate(folds):
        torch.manual_seed(h.seed * 1000 + f)
        head = build_head(h, cohort)
        train = np.array([index[c] for c in fold["train"]])
        bins = (survival_bins(cohort.times[train], cohort.events[train], h.n_bins)
                if h.task == "survival" and h.survival_loss == "nll" else None)
        opt = torch.optim.AdamW(head.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        states.append(FoldState(train, np.array([index[c] for c in fold["val"]]), head, opt, bins))
    rng = np.random.default_rng(h.seed)
    for epoch in range(1, h.epochs + 1):
        for st in states:
            st.head.train()
            order = rng.permutation(st.train)
            # Cox needs risk sets: one step over the whole training part; bag-wise steps otherwise.
            groups = [order] if h.survival_loss == "cox" and h.task == "survival" else [[i] for i in order]
            for group in groups:
                logits = torch.cat([st.head(cohort.inputs[i])[0] for i in group])
                loss = _loss(h, logits, cohort, list(group), st.bins)
                st.optimizer.zero_grad()
                loss.backward()
                st.optimizer.step()
            st.last = evaluate(h, st.head, cohort, st.val)
        per_fold = [st.last["metrics"] for st in states]
        keys = sorted({k for m in per_fold for k in m})
        mean = {k: float(np.mean([m[k] for m in per_fold if k in m])) for k in keys}
        mean.update({f"{k}_std": float(np.std([m[k] for m in per_fold if k in m])) for k in keys})
        yield epoch, states, mean
