"""Case-level k-fold splits: stratified, seeded, hashed, and checked for leakage."""

from __future__ import annotations

import hashlib
import json

import numpy as np


def case_folds(
    case_ids: list[str], strata: list, *, k: int, seed: int = 0, train_fraction: float = 1.0
) -> tuple[list[dict[str, list[str]]], str]:
    """``k`` folds of ``{"train": [...], "val": [...]}`` case ids, stratified by ``strata`` (one
    value per case: the label, or the event indicator for survival), and the splits' content hash.

    ``train_fraction`` < 1 keeps that (stratified, seeded) share of each training part.

    Raises:
        ValueError: duplicate cases, too few cases per stratum, or a case in two parts of a fold.
    """
    from sklearn.model_selection import StratifiedKFold, train_test_split

    cases = np.asarray(case_ids)
    if len(set(case_ids)) != len(case_ids):
        raise ValueError("case_ids must be unique (one stratum value per case)")
    y = np.asarray(strata)
    folds = []
    for train_idx, val_idx in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(cases, y):
        if train_fraction < 1.0:
            train_idx, _ = train_test_split(
                train_idx, train_size=train_fraction, random_state=seed, stratify=y[train_idx]
            )
        fold = {"train": sorted(cases[train_idx].tolist()), "val": sorted(cases[val_idx].tolist())}
        if set(fold["train"]) & set(fold["val"]):
            raise ValueError(f"case(s) {sorted(set(fold['train']) & set(fold['val']))} in both parts of a fold")
        folds.append(fold)
    digest = hashlib.sha256(json.dumps(folds, sort_keys=True).encode()).hexdigest()[:16]
    return folds, digest
