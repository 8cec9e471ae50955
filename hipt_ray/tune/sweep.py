"""``hipt-ray sweep``: Ray Tune (ASHA) over head configurations; every trial runs all folds,
reports per-epoch mean validation metrics through ``tune.report`` and is an MLflow run. The best
configuration is then refitted by ``train-head`` for its predictions and ROC/KM plots."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass

from hipt_ray import console
from hipt_ray.config import Config, ConfigError, validate_config
from hipt_ray.heads.cohort import load_cohort
from hipt_ray.heads.fit import cross_validate, is_final, make_folds
from hipt_ray.heads.run import run_dir_for, train_head
from hipt_ray.heads.saved import HEADS_FILE, load_folds, save_folds
from hipt_ray.heads.tasks import task_for
from hipt_ray.tracking import CrossValidationLog, check_store_reaches_workers, for_workers, setup_tracking

log = logging.getLogger(__name__)
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


def search_space(space: dict[str, dict[str, list]]) -> dict:
    from ray import tune

    out = {}
    for key, spec in space.items():
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"sweep.space.{key}: give one of {', '.join(DISTRIBUTIONS)} with its values")
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            out[key] = tune.choice(values)
        elif kind == "grid":  # every value, each num_samples times
            out[key] = tune.grid_search(values)
        else:
            out[key] = getattr(tune, kind)(*values)
    return out


def _trial(
    config: dict,
    *,
    base: dict,
    cohort,
    tracking_uri: str,
    experiment: str,
    sweep_name: str,
    parent_run_id: str,
    threads: int,
) -> None:
    import mlflow
    import torch
    from ray import tune

    torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS=1 in workers; a trial owns its CPUs
    cfg = validate_config({**base, "heads": {**base["heads"], **config}})
    h = cfg.heads
    folds, split_hash = make_folds(h, cohort)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    trial = tune.get_context().get_trial_name()
    # A child of the sweep's run (MLflow's nesting: the parent's id as a tag, across processes).
    with mlflow.start_run(run_name=trial, tags={"sweep": sweep_name, "mlflow.parentRunId": parent_run_id}):
        cv_log = CrossValidationLog.of_cohort(h, cohort, split_hash=split_hash, n_folds=len(folds))
        for epoch, states, mean in cross_validate(h, cohort):
            metrics = {**cv_log.log_epoch(states, mean, step=epoch), "epoch": epoch}
            if is_final(h, epoch, states):  # the selected weights are loaded
                # The trained folds go with the last report (ASHA may stop the trial at it), so the
                # refit of the best configuration takes them instead of training it again.
                with tempfile.TemporaryDirectory() as d:
                    save_folds(os.path.join(d, HEADS_FILE), cfg, cohort, states, split_hash)
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
            else:
                tune.report(metrics)


def trained_folds(result, cfg: Config) -> dict | None:
    """The best trial's trained folds from its last checkpoint; None when it has none (stopped by
    ASHA before its last epoch)."""

    if result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as d:
        path = os.path.join(d, HEADS_FILE)
        if not os.path.isfile(path):
            return None
        return load_folds(path, allow_unsafe_pickle=cfg.model.allow_unsafe_pickle)


def nested_score(rows: list[dict], key: str, n_folds: int) -> tuple[float, list[int]]:
    """The honest score of a sweep: for each outer fold, the trial whose model was best on that
    fold's *inner* validation cases (ties: lower validation loss), scored on that fold's test cases;
    mean over folds. ``rows`` are the trials' last reports; returns the score and the trial index
    chosen per fold."""
    picks, scores = [], []
    for f in range(n_folds):
        vk, lk, ok = f"fold{f}_val_{key}", f"fold{f}_val_loss", f"fold{f}_{key}"
        cands = [i for i, r in enumerate(rows) if _finite(r.get(vk)) and _finite(r.get(ok))]
        if not cands:
            continue
        best = max(cands, key=lambda i: (rows[i][vk], -(rows[i][lk] if _finite(rows[i].get(lk)) else math.inf)))
        picks.append(best)
        scores.append(rows[best][ok])
    return (float(sum(scores) / len(scores)) if scores else float("nan")), picks


def pick_best(results: list, metric: str):
    """The trial with the highest ``metric`` at its last report; ties (inner validation sets are
    small: many trials reach AUC 1.0) go to the lower validation loss."""
    if not results:
        raise ValueError(f"no trial reported {metric}: see the trials' errors above")
    return max(
        results,
        key=lambda r: (
            r.metrics[metric],
            -r.metrics.get("val_loss", math.inf) if _finite(r.metrics.get("val_loss")) else -math.inf,
        ),
    )


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


@dataclass
class SweepResult:
    best_config: dict
    best_metric: float
    metric: str
    table_csv: str
    table: str
    refit_lines: list[str]
    honest: float = float("nan")
    best_outer: float = float("nan")
    n_trials: int = 0
    parent_run_id: str = ""
    refit_reused: bool = False

    def lines(self) -> list[str]:
        key = self.metric.removeprefix("val_")
        return [
            self.table,
            f"{self.n_trials} trials; best {self.metric}: {self.best_metric:.3f} (inner validation: "
            f"model selection) with {self.best_config}",
            f"honest {key}: {self.honest:.3f} (nested: each outer fold scored by the trial best on its "
            f"inner validation); the best trial's out-of-fold {key}: {self.best_outer:.3f}",
            f"results table: {self.table_csv}",
            f"MLflow sweep run: {self.parent_run_id}",
            "refit of the best configuration"
            + (" (the best trial's trained folds, not trained again):" if self.refit_reused else ":"),
            *self.refit_lines,
        ]


def _n_trials(s) -> int:
    """Trials a sweep runs: ``num_samples`` draws of every combination of its grid values."""
    n = s.num_samples
    for spec in s.space.values():
        n *= len(spec.get("grid", [None]))
    return n


def _top(df, n: int = 5) -> str:
    """The ``n`` best trials as a text table (every trial is in results.csv)."""
    head = df.head(n).to_string(index=False)
    return head if len(df) <= n else f"{head}\n(the best {n} of {len(df)} trials; every trial in results.csv)"


def _TrialProgress(n_trials: int, metric: str):
    """A Tune callback drawing one line: trials ended of ``n_trials``, failed ones, the best
    ``metric`` so far (a factory: Tune's Callback is imported only where a sweep runs)."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        def __init__(self):
            self.progress = console.Progress("sweep", total=n_trials, unit="trials")
            self.best, self.errors = -math.inf, 0

        def _ended(self, trial, failed: bool = False) -> None:
            self.errors += failed
            value = (trial.last_result or {}).get(metric)
            if _finite(value):
                self.best = max(self.best, float(value))
            self.progress.update(
                advance=1,
                best=f"{metric} {self.best:.3f}" if math.isfinite(self.best) else None,
                failed=self.errors or None,
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._ended(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._ended(trial, failed=True)

        def on_experiment_end(self, trials, **info):
            self.progress.close()

    return TrialProgress()


def run_sweep(cfg: Config) -> SweepResult:
    """Tune the heads of ``cfg.sweep.space``, pick the best trial on inner validation, score the
    sweep honestly (nested), and refit the best configuration with ``train-head``."""
    import mlflow

    s, h = cfg.sweep, cfg.heads
    key = task_for(h).metric
    # Trials are chosen on the inner validation split of each training fold, never on the test folds.
    metric = s.metric or f"val_{key}"
    space = search_space(s.space)
    check_store_reaches_workers(cfg, "sweep")  # before the cohort loads: one line, no work lost
    cohort = load_cohort(cfg)
    n_folds = len(make_folds(h, cohort)[0])
    uri = setup_tracking(cfg)  # the experiment is created on the driver, before the trials
    run_dir = run_dir_for(cfg, s.name)
    with mlflow.start_run(run_name=s.name, tags={"sweep": s.name, "kind": "sweep"}) as parent:
        mlflow.log_params(
            {
                "sweep.space": str(s.space)[:6000],
                "sweep.num_samples": s.num_samples,
                "sweep.metric": metric,
                "heads.task": h.task,
                "n_cases": len(cohort.case_ids),
            }
        )
        results = _tuner(cfg, cohort, space, uri, parent.info.run_id, metric, run_dir).fit()
        rows = [r.metrics or {} for r in results]
        best = pick_best([r for r in results if r.metrics and _finite(r.metrics.get(metric))], metric)
        honest, _ = nested_score(rows, key, n_folds)
        table_df = _results_table(results.get_dataframe(), metric, key)  # the last report of every trial
        table_csv = os.path.join(run_dir, "results.csv")
        table_df.to_csv(table_csv, index=False)
        best_outer = float(best.metrics.get(key, math.nan))
        _log_selection(best, metric, key, honest, best_outer)
        mlflow.log_artifact(table_csv)
        refit = _refit(cfg, best, parent.info.run_id)
        return SweepResult(
            best_config=best.config,
            best_metric=float(best.metrics[metric]),
            metric=metric,
            table_csv=table_csv,
            table=_top(table_df),
            refit_lines=refit.lines(),
            honest=honest,
            best_outer=best_outer,
            n_trials=len(rows),
            parent_run_id=parent.info.run_id,
            refit_reused=refit.reused,
        )


def _log_selection(best, metric: str, key: str, honest: float, best_outer: float) -> None:
    """The parent run's record of the choice: the selection metric, the best trial's own outer
    score, the honest (nested) score — the finite ones — and the best configuration."""
    import mlflow

    scores = {
        f"selection_{metric}": float(best.metrics[metric]),
        f"best_trial_{key}": best_outer,
        f"honest_{key}": honest,
    }
    mlflow.log_metrics({k: v for k, v in scores.items() if math.isfinite(v)})
    mlflow.log_params({f"best.{k}": v for k, v in best.config.items()})


def _tuner(cfg: Config, cohort, space: dict, tracking_uri: str, parent_run_id: str, metric: str, run_dir: str):
    """Ray Tune's tuner of the sweep: one trial per drawn configuration (all folds each), ASHA
    stopping on ``metric`` per epoch, reproducible draws."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s, h = cfg.sweep, cfg.heads
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            base=cfg.to_dict(),
            cohort=cohort,
            tracking_uri=for_workers(tracking_uri),
            experiment=cfg.tracking.experiment,
            sweep_name=s.name,
            parent_run_id=parent_run_id,
            threads=max(1, int(s.cpus_per_trial)),
        ),
        {"cpu": s.cpus_per_trial},
    )
    epochs = max([h.epochs] + [int(max(v)) for k, spec in s.space.items() if k == "epochs" for v in spec.values()])
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="max",
            num_samples=s.num_samples,
            search_alg=BasicVariantGenerator(random_state=h.seed),  # reproducible draws
            scheduler=ASHAScheduler(max_t=epochs, grace_period=min(s.grace_period, epochs)),
            max_concurrent_trials=s.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=s.name,
            storage_path=os.path.join(run_dir, "tune"),
            verbose=2 if console.verbose() else 0,  # Tune's tables only with --verbose
            callbacks=[_TrialProgress(_n_trials(s), metric)],
        ),
    )


def _results_table(df, metric: str, key: str):
    """The trials' configurations and metrics, best first."""
    cols = [c for c in df.columns if c.startswith("config/")] + [metric, key, f"{key}_std", "epoch"]
    return df[[c for c in dict.fromkeys(cols) if c in df.columns]].sort_values(metric, ascending=False)


def _refit(cfg: Config, best, parent_run_id: str):
    """``train-head`` on the best configuration, taking the best trial's trained folds when it has them."""
    import torch

    best_cfg = validate_config({**cfg.to_dict(), "heads": {**cfg.to_dict()["heads"], **best.config}})
    trained = trained_folds(best, cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.sweep.cpus_per_trial)))  # as in the trial: the same sums, the same epochs
    try:
        return train_head(best_cfg, run_name=f"{cfg.sweep.name}-best", parent_run_id=parent_run_id, trained=trained)
    finally:
        torch.set_num_threads(threads)
