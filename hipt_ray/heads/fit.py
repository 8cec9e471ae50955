"""Cross-validated fitting of a slide-level head: the folds train in lock-step, epoch by epoch,
so a sweep can report (and stop on) per-epoch validation metrics."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from hipt_ray.config import ConfigError, HeadsConfig
from hipt_ray.heads.cohort import Cohort
from hipt_ray.heads.features import FeatureTransform
from hipt_ray.heads.models import create_head, forward_bags
from hipt_ray.heads.splits import case_folds
from hipt_ray.heads.tasks import Task, task_for
from hipt_ray.models import create_model, load_checkpoint

EVAL_BAGS = 32  # bags evaluated in one padded call


@dataclass
class FoldState:
    train: np.ndarray  # indices into the cohort: the inner training part the head learns from
    val: np.ndarray  # the outer (test) fold: never used for training, preprocessing or selection
    head: torch.nn.Module
    optimizer: torch.optim.Optimizer | None  # None for folds restored from a finished run
    aux: dict = field(default_factory=dict)  # Task.fold_aux: class weights, survival bin edges
    last: dict | None = None  # outer-fold outputs of the selected epoch
    inner: np.ndarray | None = None  # inner validation cases (part of the outer training fold)
    inner_metrics: dict = field(default_factory=dict)  # of the selected epoch
    best_loss: float = float("inf")
    best_epoch: int = 0
    best_state: dict | None = None
    train_loss: float = float("nan")
    done: bool = False  # early-stopped

    @property
    def fit_cases(self) -> np.ndarray:
        """Every case of the outer training fold (inner training + inner validation)."""
        return self.train if self.inner is None else np.concatenate([self.train, self.inner])


def make_folds(h: HeadsConfig, cohort: Cohort) -> tuple[list[dict], str]:
    task = task_for(h)
    strata = task.strata(cohort)
    # Never more folds than the smallest stratum has cases.
    k = max(2, min(h.folds or task.default_folds, int(np.bincount(strata).min())))
    return case_folds(cohort.case_ids, list(strata), k=k, seed=h.seed, train_fraction=h.train_fraction)


def evaluate(task: Task, head: torch.nn.Module, cohort: Cohort, idx: np.ndarray, aux: dict | None = None) -> dict:
    """Outputs and metrics of ``head`` on the cases ``idx``; with the fold's ``aux`` also the loss,
    as training computes it (NaN without)."""
    head.eval()
    with torch.no_grad():
        logits = torch.cat(
            [
                forward_bags(head, [cohort.inputs[i] for i in idx[k : k + EVAL_BAGS]])
                for k in range(0, len(idx), EVAL_BAGS)
            ]
        )
        loss = float(task.loss(logits, cohort, list(idx), aux)) if aux is not None else float("nan")
    out = task.outputs(logits, cohort, idx)
    out["metrics"] = task.metrics(out)
    out["loss"] = loss
    return out


def fit_transform(h: HeadsConfig, cohort: Cohort, cases: np.ndarray, head: torch.nn.Module | None = None):
    """The fold's feature preprocessing, fitted on every region of ``cases`` (its training part):
    on emb4k, or with a frozen local ViT-4K on what ``head``'s own ViT makes of the token grids
    (standardisation only, the aggregator's width is the ViT's). None when there is nothing to fit
    (nothing asked for, or a ViT-4K being fine-tuned: its outputs move)."""

    if not h.local_vit:
        rows = torch.cat([cohort.bags[i] for i in cases])
        return FeatureTransform.fit(rows, standardize=h.standardize, pca=h.pca, whiten=h.whiten)
    if h.pca:
        raise ConfigError("heads.pca reduces emb4k and cannot be combined with heads.local_vit")
    if not h.freeze_local or not h.standardize:
        return None
    head.eval()
    with torch.no_grad():
        rows = torch.cat([head.embed_regions(cohort.inputs[i]) for i in cases])
    return FeatureTransform.fit(rows, standardize=True)


def build_head(h: HeadsConfig, cohort: Cohort, transform: torch.nn.Module | None = None) -> torch.nn.Module:
    """A fresh head for ``h`` sized for the cohort's embeddings (or its local ViT-4K), running
    ``transform`` (a fitted ``FeatureTransform``) on its inputs first."""
    if h.local_vit and h.head != "hipt_lgp":
        raise ConfigError(f"heads.local_vit runs HIPT's own ViT-4K and needs heads.head=hipt_lgp (got {h.head})")
    if h.local_vit:
        dim = create_model(h.local_vit).embed_dim
    else:
        dim = transform.out_dim if transform is not None else cohort.bags[0].shape[-1]
    kwargs = {"n_classes": task_for(h).n_outputs(cohort), "dim": dim, "dropout": h.dropout}
    if h.head == "hipt_lgp":  # 3 heads as published (192-d); fewer for small test models
        kwargs["n_heads"] = 3 if dim % 3 == 0 else (2 if dim % 2 == 0 else 1)
        if h.local_vit:
            grids = cohort.token_bags[0] if cohort.token_bags else []
            kwargs.update(
                local_vit=h.local_vit,
                local_in_dim=grids[0].shape[0] if grids else None,  # the patch encoder's width
                freeze_local=h.freeze_local,
                seed=h.seed,
            )
    else:
        kwargs["hidden"] = h.hidden
    head = create_head(h.head, **kwargs)
    if h.local_vit and h.local_vit_checkpoint:  # the module holds no file access: its weights are loaded here
        load_checkpoint(head.local_vit, h.local_vit_checkpoint)
    if transform is not None:
        head.prep = transform
    return head


def inner_split(h: HeadsConfig, cohort: Cohort, train: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``(inner training, inner validation)`` cases of one outer training fold: stratified by
    label (or event), seeded, at least one case of each stratum left on both sides when it can; a
    stratum with one case only stays on the training side."""
    if h.val_fraction <= 0:
        return train, None
    from sklearn.model_selection import train_test_split

    task = task_for(h)
    strata = task.strata(cohort)[train]
    # A class with a single case here stays on the training side: held out, the head would never
    # see it, and the outer fold it is then scored on would hold a class it never trained on.
    single = np.isin(strata, np.flatnonzero(np.bincount(strata) == 1))
    pool, strata = train[~single], strata[~single]
    counts = np.bincount(strata) if len(strata) else np.zeros(1, int)
    present = int((counts > 0).sum())
    n_val = max(int(round(h.val_fraction * len(train))), present)
    if n_val >= len(pool) - present:
        return train, None  # too few cases to hold any out
    stratify = strata if counts[counts > 0].min() >= 2 else None
    tr, va = train_test_split(pool, test_size=n_val, random_state=h.seed * 1000 + fold, stratify=stratify)
    if not task.can_validate(cohort, va):
        return train, None  # e.g. no event to validate on: the last epoch
    return np.sort(np.concatenate([tr, train[single]])), np.sort(va)


def fold_means(per_fold: list[dict], prefix: str = "") -> dict:
    """Mean and std over the folds where each metric is defined (NaN where it is in none)."""
    out = {}
    for k in sorted({k for m in per_fold for k in m}):
        vals = [m[k] for m in per_fold if k in m and np.isfinite(m[k])]
        out[f"{prefix}{k}"] = float(np.mean(vals)) if vals else float("nan")
        out[f"{prefix}{k}_std"] = float(np.std(vals)) if vals else float("nan")
    return out


def start_fold(h: HeadsConfig, task: Task, cohort: Cohort, fold: dict, f: int) -> FoldState:
    """Fold ``f`` before its first epoch: inner split, preprocessing fitted on the inner training
    part, a fresh head and optimiser, the task's ``aux`` (class weights, bin edges)."""
    index = {c: i for i, c in enumerate(cohort.case_ids)}
    train, inner = inner_split(h, cohort, np.array([index[c] for c in fold["train"]]), f)
    torch.manual_seed(h.seed * 1000 + f)
    if h.local_vit:  # fitted on the embeddings of the head's own frozen ViT-4K
        head = build_head(h, cohort)
        head.prep = fit_transform(h, cohort, train, head) or head.prep
    else:
        head = build_head(h, cohort, fit_transform(h, cohort, train))
    # fused: one kernel for all parameters (hipt_lgp 4.8 → 2.7 ms a step on CPU, 1 thread)
    opt = torch.optim.AdamW(
        [p for p in head.parameters() if p.requires_grad], lr=h.lr, weight_decay=h.weight_decay, fused=True
    )
    return FoldState(
        train, np.array([index[c] for c in fold["val"]]), head, opt, task.fold_aux(cohort, train), inner=inner
    )


def train_epoch(
    h: HeadsConfig, task: Task, cohort: Cohort, st: FoldState, epoch: int, rng: np.random.Generator
) -> None:
    """One epoch of one fold; keeps the epoch (and its outer-fold outputs) when its inner
    validation loss improved, and stops the fold after ``heads.patience`` epochs without."""
    st.head.train()
    order = rng.permutation(st.train)
    size = task.bags_per_step(len(order))
    losses = []
    for start in range(0, len(order), size):
        group = list(order[start : start + size])
        loss = task.loss(forward_bags(st.head, [cohort.inputs[i] for i in group]), cohort, group, st.aux)
        st.optimizer.zero_grad()
        loss.backward()
        st.optimizer.step()
        losses.append(float(loss.detach()) * len(group))
    st.train_loss = sum(losses) / len(order)
    val = None if st.inner is None else evaluate(task, st.head, cohort, st.inner, st.aux)
    if val is None or val["loss"] < st.best_loss:
        st.best_loss = val["loss"] if val else st.train_loss
        st.best_epoch = epoch
        st.inner_metrics = {"loss": st.best_loss, **(val["metrics"] if val else {})}
        st.best_state = {k: v.detach().clone() for k, v in st.head.state_dict().items()}
        st.last = evaluate(task, st.head, cohort, st.val)
    elif h.patience and epoch - st.best_epoch >= h.patience:
        st.done = True


def cross_validate(h: HeadsConfig, cohort: Cohort) -> Iterator[tuple[int, list[FoldState], dict]]:
    """Yield ``(epoch, folds, mean metrics)`` after each epoch of training every fold.

    Each fold trains on its inner training part; the epoch with the lowest inner-validation loss
    is the fold's model (``last`` holds its outer-fold outputs, ``inner_metrics`` its validation
    metrics, reported as ``val_*``). After the last epoch (or when every fold stopped early) the
    selected weights are loaded back into each head.
    """
    task = task_for(h)
    folds, _ = make_folds(h, cohort)
    states = [start_fold(h, task, cohort, fold, f) for f, fold in enumerate(folds)]
    rng = np.random.default_rng(h.seed)
    for epoch in range(1, h.epochs + 1):
        for st in states:
            if not st.done:
                train_epoch(h, task, cohort, st, epoch, rng)
        final = is_final(h, epoch, states)
        if final:
            for st in states:
                st.head.load_state_dict(st.best_state)
        yield epoch, states, summarise(states)
        if final:
            return


def is_final(h: HeadsConfig, epoch: int, states: list[FoldState]) -> bool:
    """The epoch after which :func:`cross_validate` stops, with the selected weights loaded."""
    return epoch == h.epochs or all(st.done for st in states)


def load_head(h: HeadsConfig, cohort: Cohort, state_dict: dict) -> torch.nn.Module:
    """A head saved as ``state_dict`` (its fitted preprocessing included), rebuilt for ``cohort``."""

    head = build_head(h, cohort, FeatureTransform.from_state_dict(state_dict))
    head.load_state_dict(state_dict)
    return head


def summarise(states: list[FoldState]) -> dict:
    """Mean ± std over folds of the outer-fold and inner-validation metrics of the selected epochs."""
    mean = fold_means([st.last["metrics"] for st in states])
    mean.update(fold_means([st.inner_metrics for st in states], prefix="val_"))
    mean["train_loss"] = float(np.mean([st.train_loss for st in states]))
    mean["best_epoch"] = float(np.mean([st.best_epoch for st in states]))
    return mean


def restore_folds(h: HeadsConfig, cohort: Cohort, saved: dict) -> list[FoldState]:
    """``FoldState``s from trained folds saved by :func:`hipt_ray.heads.saved.save_folds`: each head
    rebuilt with its weights and its outer-fold outputs evaluated again (evaluation is
    deterministic: the same outputs the run scored). Raises ValueError when they were trained on
    other folds than ``h`` gives for ``cohort``."""
    _, split_hash = make_folds(h, cohort)
    if saved.get("split_hash") != split_hash:
        raise ValueError(
            f"the saved folds were split differently (split {saved.get('split_hash', '-')}, now {split_hash})"
        )
    task = task_for(h)
    index = {c: i for i, c in enumerate(cohort.case_ids)}
    states = []
    for r in saved["folds"]:
        try:
            train, val, inner = (np.array([index[c] for c in r[k]], dtype=int) for k in ("train", "val", "inner_val"))
        except KeyError as exc:
            raise ValueError(f"the saved folds hold case {exc} that this cohort lacks") from None
        # aux is a function of the training part (class counts, event-time quantiles): made again
        st = FoldState(
            train,
            val,
            load_head(h, cohort, r["state_dict"]),
            optimizer=None,
            aux=task.fold_aux(cohort, train),
            inner=inner if len(inner) else None,
            inner_metrics=dict(r["inner_metrics"]),
            best_loss=r["best_loss"],
            best_epoch=r["epoch"],
            train_loss=r["train_loss"],
        )
        st.last = evaluate(task, st.head, cohort, val)
        states.append(st)
    return states
