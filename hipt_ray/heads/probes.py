"""Linear and KNN probes on mean slide embeddings with the same case-level folds (the paper's
evaluation of self-supervised features)."""

from __future__ import annotations

import numpy as np

from hipt_ray.heads.cohort import Cohort
from hipt_ray.heads.metrics import classification_metrics


def probe(cohort: Cohort, folds: list[dict], *, k: int = 20, seed: int = 0) -> dict[str, float]:
    """Mean ± std over folds of the AUC of a KNN and a logistic-regression probe trained on each
    case's mean region embedding (subtyping only)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.stack([bag.mean(dim=0).numpy() for bag in cohort.bags])
    y = cohort.labels
    index = {c: i for i, c in enumerate(cohort.case_ids)}
    scores: dict[str, list[float]] = {"knn": [], "logreg": []}
    for fold in folds:
        tr = np.array([index[c] for c in fold["train"]])
        va = np.array([index[c] for c in fold["val"]])
        if len(set(y[va])) < 2:
            continue
        models = {
            "knn": KNeighborsClassifier(n_neighbors=min(k, len(tr))),
            "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)),
        }
        for name, model in models.items():
            model.fit(x[tr], y[tr])
            probs = np.zeros((len(va), len(cohort.classes)))
            probs[:, model.classes_] = model.predict_proba(x[va])
            scores[name].append(classification_metrics(y[va], probs)["auc"])
    out = {}
    for name, vals in scores.items():
        if vals:
            out[f"probe_{name}_auc"] = float(np.mean(vals))
            out[f"probe_{name}_auc_std"] = float(np.std(vals))
    return out
