"""Heads are tasks: each task chosen from the config, the survival report's field metrics
(scikit-survival), and small cohorts whose folds cannot be scored (undefined, never a crash)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from hipt_ray.config import HeadsConfig
from hipt_ray.heads.cohort import Cohort
from hipt_ray.heads.fit import cross_validate, make_folds
from hipt_ray.heads.metrics import evaluation_times, survival_metrics
from hipt_ray.heads.report import report
from hipt_ray.heads.tasks import CoxSurvival, DiscreteSurvival, Subtyping, task_for


def _survival_cohort(n: int = 60, dim: int = 8, seed: int = 0) -> Cohort:
    """Risk planted along feature 0; exponential event times, administrative censoring at 60."""
    rng = np.random.default_rng(seed)
    risk = rng.uniform(-1, 1, n)
    t = rng.exponential(30 * np.exp(-1.5 * risk))
    bags = []
    for r in risk:
        x = rng.standard_normal((int(rng.integers(2, 5)), dim)) * 0.3
        x[:, 0] += 2 * r
        bags.append(torch.from_numpy(x.astype(np.float32)))
    return Cohort(
        [f"c{i:02d}" for i in range(n)], bags, times=np.minimum(t, 60.0).round(2), events=(t < 60).astype(int)
    )


def test_the_task_is_chosen_once_from_the_config():
    assert type(task_for(HeadsConfig())) is Subtyping
    assert type(task_for(HeadsConfig(task="survival", survival_loss="cox"))) is CoxSurvival
    assert type(task_for(HeadsConfig(task="survival"))) is DiscreteSurvival
    cohort = _survival_cohort(n=10)
    assert task_for(HeadsConfig(task="survival", survival_loss="cox")).n_outputs(cohort) == 1
    assert task_for(HeadsConfig(task="survival", n_bins=6)).n_outputs(cohort) == 6
    assert np.array_equal(task_for(HeadsConfig(task="survival")).strata(cohort), cohort.events)


@pytest.mark.parametrize("loss", ["nll", "cox"])
def test_a_fold_without_a_comparable_pair_is_undefined_not_a_crash(tmp_path, caplog, loss):
    # issue 31: 4 cases, 2 folds; fold 1 holds a case censored at 5 and an event at 20, no pair
    # can be ordered, and the c-index (lifelines: ZeroDivisionError "No admissable pairs") crashed.
    cohort = Cohort(
        ["a", "b", "c", "d"],
        [torch.randn(3, 8) for _ in range(4)],
        times=np.array([5.0, 10, 20, 30]),
        events=np.array([0, 1, 1, 0]),
    )
    h = HeadsConfig(task="survival", survival_loss=loss, head="mean_mlp", epochs=2, val_fraction=0)
    folds, _ = make_folds(h, cohort)
    assert folds[1]["val"] == ["a", "c"]
    _, states, mean = list(cross_validate(h, cohort))[-1]
    assert np.isnan(states[1].last["metrics"]["c_index"]) and np.isfinite(states[0].last["metrics"]["c_index"])
    assert mean["c_index"] == states[0].last["metrics"]["c_index"]  # the mean over the folds that have one
    with caplog.at_level(logging.WARNING, logger="hipt_ray.heads.tasks"):
        rep = report(h, cohort, states, folds, str(tmp_path))
    assert "fold 1: c_index undefined (Data has no comparable pairs" in caplog.text
    assert np.isfinite(rep.summary["pooled"])  # over all 4 cases pairs exist
    assert set(rep.per_fold[1]) == {"c_index_ipcw", "td_auc", "ibs"} and np.isnan(rep.per_fold[1]["ibs"])


@pytest.mark.parametrize("loss", ["nll", "cox"])
def test_the_survival_report_has_the_field_metrics_per_fold_and_out_of_fold(tmp_path, loss):
    h = HeadsConfig(task="survival", survival_loss=loss, head="mean_mlp", epochs=30, lr=3e-3, val_fraction=0, folds=3)
    cohort = _survival_cohort()
    _, states, mean = list(cross_validate(h, cohort))[-1]
    rep = report(h, cohort, states, make_folds(h, cohort)[0], str(tmp_path))
    for fold in rep.per_fold:
        assert set(fold) == {"c_index_ipcw", "td_auc", "ibs"} and all(np.isfinite(v) for v in fold.values())
    s = rep.summary
    # The planted risk is learned: concordant by Harrell and Uno, time-dependent AUC above chance,
    # and a Brier score below 0.25 (what predicting S = 0.5 everywhere scores).
    assert mean["c_index"] > 0.65 and s["pooled"] > 0.65 and s["c_index_ipcw"] > 0.65, s
    assert s["td_auc"] > 0.65 and s["pooled_td_auc"] > 0.65 and 0 < s["ibs"] < 0.25 and 0 < s["pooled_ibs"] < 0.25, s
    assert {"c_index_ipcw_std", "pooled_c_index_ipcw", "cox_c_index", "logrank_p"} <= set(s)
    assert (tmp_path / "km.png").is_file() and (tmp_path / "predictions.csv").is_file()


def test_survival_curves_of_both_survival_heads():
    nll = DiscreteSurvival(HeadsConfig(task="survival", n_bins=3))
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    out = {"logits": logits.numpy()}
    s = nll.survival_at(out, {"bins": np.array([10.0, 20.0])}, {}, np.array([5.0, 10.0, 15.0, 25.0]))
    # before the first edge nobody has died; after it, the product of (1 − hazard) of the bins passed
    assert np.allclose(s[0], [1, 0.5, 0.5, 0.25]) and np.all(np.diff(s, axis=1) <= 0) and np.all(s[1] <= s[0])
    cox = CoxSurvival(HeadsConfig(task="survival", survival_loss="cox"))
    train = {
        "risk": np.array([0.0, 0.5, -0.5, 1.0]),
        "events": np.array([1, 0, 1, 1]),
        "times": np.array([5.0, 10, 20, 30]),
    }
    s = cox.survival_at({"risk": np.array([-1.0, 0.0, 1.0])}, {}, train, np.array([1.0, 6.0, 25.0, 99.0]))
    assert np.all(s[:, 0] == 1.0) and np.all(np.diff(s, axis=1) <= 0) and np.all(np.diff(s, axis=0) <= 0)


def test_undefined_survival_metrics_are_nan_with_a_reason():
    times, events = np.array([5.0, 10, 20, 30, 40]), np.array([1, 0, 1, 1, 0])
    # deciles 10–90 % of the event times 5, 20, 30 are 8, 11, 14, …, 28; the test part follows up 12–35
    assert list(evaluation_times(times, events, np.array([12.0, 35.0]))) == pytest.approx([14, 17, 20, 22, 24, 26, 28])
    assert len(evaluation_times(times, np.zeros(5), times)) == 0
    values, why = survival_metrics(
        times, events, np.array([8.0, 9.0]), np.array([0, 0]), np.array([1.0, 2.0]), np.ones((2, 0)), np.empty(0)
    )
    assert all(np.isnan(v) for v in values.values()) and set(why) == {"c_index", "c_index_ipcw", "td_auc", "ibs"}
    assert "censored" in why["c_index"] and "evaluation time" in why["td_auc"]
