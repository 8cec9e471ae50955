"""Training of slide-level heads on small cohorts: preprocessing fitted on the training cases
only and saved with the head, the inner validation split, epoch selection, class weights, the
sweep's nested score and bootstrap CIs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hipt_ray.config import HeadsConfig
from hipt_ray.heads.cohort import Cohort
from hipt_ray.heads.features import FeatureTransform
from hipt_ray.heads.fit import build_head, cross_validate, inner_split, make_folds, restore_folds, summarise
from hipt_ray.heads.metrics import bootstrap_ci, classification_metrics
from hipt_ray.heads.saved import load_folds, save_folds
from hipt_ray.heads.tasks import class_weights as _class_weights
from hipt_ray.tune.sweep import nested_score


def _cohort(n: int = 40, dim: int = 16, seed: int = 0, imbalance: bool = False) -> Cohort:
    """Features far from standardised (offset 50, scale 20) with the class along one axis."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % (4 if imbalance else 2) == 0).astype(int) if imbalance else np.arange(n) % 2
    bags = []
    for y in labels:
        x = rng.standard_normal((int(rng.integers(2, 6)), dim))
        x[:, 0] += 1.5 * y
        bags.append(torch.from_numpy((50 + 20 * x).astype(np.float32)))
    return Cohort([f"c{i:02d}" for i in range(n)], bags, labels=labels, classes=["a", "b"])


def test_the_transform_standardises_whitens_and_survives_a_save():
    rows = torch.randn(500, 8, dtype=torch.float64) * torch.arange(1, 9) + 3
    t = FeatureTransform.fit(rows, standardize=True)
    z = t(rows.float())
    assert torch.allclose(z.mean(0), torch.zeros(8), atol=1e-4) and torch.allclose(z.std(0), torch.ones(8), atol=1e-3)
    w = FeatureTransform.fit(rows, pca=4, whiten=True)
    zw = w(rows.float()).double()
    assert w.out_dim == 4 and torch.allclose(torch.cov(zw.T), torch.eye(4, dtype=torch.float64), atol=1e-3)
    assert FeatureTransform.fit(rows, standardize=False) is None
    head = build_head(HeadsConfig(head="abmil"), _cohort(dim=8), w)
    again = build_head(HeadsConfig(head="abmil"), _cohort(dim=8), FeatureTransform.from_state_dict(head.state_dict()))
    again.load_state_dict(head.state_dict())
    bag = rows[:5].float()
    head.eval(), again.eval()
    assert torch.equal(head(bag)[0], again(bag)[0])
    assert FeatureTransform.from_state_dict(build_head(HeadsConfig(head="abmil"), _cohort(dim=8)).state_dict()) is None


def test_the_inner_split_is_inside_the_training_fold_stratified_and_seeded():
    h = HeadsConfig(folds=4, val_fraction=0.25)
    cohort = _cohort()
    folds, _ = make_folds(h, cohort)
    index = {c: i for i, c in enumerate(cohort.case_ids)}
    for f, fold in enumerate(folds):
        train = np.array([index[c] for c in fold["train"]])
        tr, va = inner_split(h, cohort, train, f)
        assert set(tr) | set(va) == set(train) and not set(tr) & set(va)
        assert not set(va) & {index[c] for c in fold["val"]}  # never the outer test fold
        assert len(va) == round(0.25 * len(train)) and sorted(set(cohort.labels[va])) == [0, 1]
        assert np.array_equal(va, inner_split(h, cohort, train, f)[1])
    assert inner_split(HeadsConfig(val_fraction=0), cohort, np.arange(10), 0)[1] is None


def test_preprocessing_sees_only_training_cases_and_the_selected_epoch_is_kept():
    h = HeadsConfig(head="mean_mlp", folds=4, epochs=12, lr=3e-3, val_fraction=0.25)
    cohort = _cohort()
    epoch, states, mean = list(cross_validate(h, cohort))[-1]
    assert epoch == 12 and {"auc", "val_auc", "val_loss", "train_loss", "best_epoch"} <= set(mean)
    for st in states:
        rows = torch.cat([cohort.bags[i] for i in st.train]).double()
        assert torch.allclose(st.head.prep.mean.double(), rows.mean(0), atol=1e-3)  # inner training cases only
        assert not set(st.train) & (set(st.val) | set(st.inner))
        assert all(torch.equal(v, st.best_state[k]) for k, v in st.head.state_dict().items())
        assert 1 <= st.best_epoch <= 12 and st.inner_metrics["loss"] == st.best_loss
    # standardised, the planted axis is learned; raw features at 50 ± 20 swamp a fresh head
    assert mean["auc"] > 0.8, mean


def test_trained_folds_saved_and_restored_give_the_same_outputs_and_summary(tmp_path):
    from hipt_ray.config import validate_config

    h = HeadsConfig(head="abmil", folds=3, epochs=4, val_fraction=0.25)
    cohort = _cohort(n=30)
    _, states, mean = list(cross_validate(h, cohort))[-1]
    cfg = validate_config({"heads": h.model_dump(mode="json")})
    save_folds(str(tmp_path / "heads.pt"), cfg, cohort, states, make_folds(h, cohort)[1])
    records = load_folds(str(tmp_path / "heads.pt"))  # weights_only, as heatmap and the sweep's refit load it
    assert records["folds"][0]["val"] == [cohort.case_ids[i] for i in states[0].val]  # heatmaps: case ids
    again = restore_folds(h, cohort, records)
    for st, re in zip(states, again):
        assert np.array_equal(st.val, re.val) and np.array_equal(st.fit_cases, re.fit_cases)
        assert np.allclose(st.last["probs"], re.last["probs"], atol=1e-6) and st.last["metrics"] == re.last["metrics"]
    assert summarise(again) == mean
    with pytest.raises(ValueError, match="split differently"):  # other folds: not these heads
        restore_folds(HeadsConfig(head="abmil", folds=3, seed=1), cohort, records)


def test_early_stopping_ends_when_no_fold_improves():
    h = HeadsConfig(head="mean_mlp", folds=3, epochs=200, lr=3e-2, patience=3)
    epochs = [e for e, _, _ in cross_validate(h, _cohort(n=30))]
    assert epochs[-1] < 200 and epochs == list(range(1, len(epochs) + 1))


def test_class_weights_balance_an_imbalanced_training_part():
    cohort = _cohort(imbalance=True)
    w = _class_weights(HeadsConfig(), cohort, np.arange(len(cohort.case_ids)))
    counts = np.bincount(cohort.labels)
    assert np.allclose(w.numpy() * counts, counts.sum() / 2)  # each class weighs the same in total
    assert _class_weights(HeadsConfig(class_weights=False), cohort, np.arange(4)) is None


def test_nested_score_takes_each_fold_from_the_trial_best_on_its_inner_validation():
    rows = [
        {"fold0_val_auc": 0.9, "fold0_auc": 0.6, "fold1_val_auc": 0.5, "fold1_auc": 0.99},
        {"fold0_val_auc": 0.8, "fold0_auc": 0.95, "fold1_val_auc": 0.7, "fold1_auc": 0.7},
        {
            "fold0_val_auc": 0.9,
            "fold0_val_loss": 0.1,
            "fold0_auc": 0.8,
            "fold1_val_auc": float("nan"),
            "fold1_auc": 1.0,
        },
    ]
    score, picks = nested_score(rows, "auc", 2)
    # fold 0: trials 0 and 2 tie on 0.9 and trial 2 reported a validation loss (none counts as the
    # worst); fold 1: trial 1, not trial 0's 0.99 or trial 2's 1.0 on the test cases
    assert picks == [2, 1] and score == pytest.approx((0.8 + 0.7) / 2)


def test_bootstrap_ci_brackets_the_pooled_metric():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + 0.25 * rng.standard_normal(200), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    auc = classification_metrics(y, probs)["auc"]
    lo, hi = bootstrap_ci(lambda a, b: classification_metrics(a, b)["auc"], y, probs, n=300)
    assert lo < auc < hi and hi - lo < 0.25


def test_no_fold_meets_a_class_its_training_part_never_saw():
    # a rare class of 2 cases among 40, 10 folds asked for: the folds drop to what the rarest
    # class allows, so every outer and inner training part holds every class
    n = 40
    labels = np.where(np.arange(n) < 2, 2, np.arange(n) % 2)
    base = _cohort(n, dim=4)
    cohort = Cohort(base.case_ids, base.inputs, labels=labels, classes=["a", "b", "rare"])
    index = {c: i for i, c in enumerate(cohort.case_ids)}
    for seed in range(10):  # the inner split used to hold the lone rare case out in ~1 fold of 4
        h = HeadsConfig(folds=10, val_fraction=0.2, seed=seed)
        folds, _ = make_folds(h, cohort)
        assert len(folds) == 2
        for f, fold in enumerate(folds):
            train = np.array([index[c] for c in fold["train"]])
            assert set(cohort.labels[train]) == {0, 1, 2}
            assert set(cohort.labels[[index[c] for c in fold["val"]]]) <= set(cohort.labels[train])
            tr, va = inner_split(h, cohort, train, f)
            assert set(cohort.labels[tr]) == {0, 1, 2} and set(tr) | set(va) == set(train)


def test_the_builder_loads_the_local_vit_checkpoint_not_the_module(tmp_path):
    import inspect

    from hipt_ray.heads.models import HIPTLGP
    from hipt_ray.models import create_model
    from hipt_ray.models.checkpoints import export_checkpoint

    assert "local_vit_checkpoint" not in inspect.signature(HIPTLGP).parameters  # no file access in the module
    torch.manual_seed(7)
    vit = create_model("vit4k_tiny")
    export_checkpoint(vit, str(tmp_path / "vit4k.pth"))
    cohort = Cohort(["a", "b"], [torch.zeros(1, 4)] * 2, labels=np.array([0, 1]), classes=["a", "b"])
    h = HeadsConfig(local_vit="vit4k_tiny", local_vit_checkpoint=str(tmp_path / "vit4k.pth"))
    head = build_head(h, cohort)
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in head.local_vit.state_dict().items())
    random = build_head(h.model_copy(update={"local_vit_checkpoint": None}), cohort)
    assert not torch.equal(random.local_vit.state_dict()["cls_token"], vit.state_dict()["cls_token"])
