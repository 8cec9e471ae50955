"""``hipt-ray sweep``: Ray Tune (ASHA) over head configurations; every trial runs all folds,
reports per-epoch mean validation metrics through ``tune.report`` and is an MLflow run. The best
configuration is then refitted by ``train-head`` for its predictions and ROC/KM plots."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from hipt_ray.config import Config, ConfigError, validate_config

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


def _trial(config: dict, *, base: dict, cohort, tracking_uri: str, experiment: str, sweep_name: str) -> None:
    import mlflow
    from ray import tune

    from hipt_ray.heads.fit import cross_validate, make_folds

    cfg = validate_config({**base, "heads": {**base["heads"], **config}})
    h = cfg.heads
    _, split_hash = make_folds(h, cohort)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    trial = tune.get_context().get_trial_name()
    with mlflow.start_run(run_name=trial, tags={"sweep": sweep_name}):
        mlflow.log_params({f"heads.{k}": v for k, v in h.model_dump(mode="json").items()})
        mlflow.log_params({"split_hash": split_hash, "model_id": cohort.model_id,
                           "regions_table_version": cohort.table_version, "n_cases": len(cohort.case_ids)})
        for epoch, states, mean in cross_validate(h, cohort):
            mlflow.log_metrics(mean, step=epoch)
            for f, st in enumerate(states):
                mlflow.log_metrics({f"fold{f}_{k}": v for k, v in st.last["metrics"].items()}, step=epoch)
            tune.report({**mean, "epoch": epoch})


@dataclass
class SweepResult:
    best_config: dict
    best_metric: float
    metric: str
    table_csv: str
    table: str
    refit_lines: list[str]

    def lines(self) -> list[str]:
        return [self.table, f"best {self.metric}: {self.best_metric:.3f} with {self.best_config}",
                f"results table: {self.table_csv}", "refit of the best configuration:", *self.refit_lines]


def run_sweep(cfg: Config) -> SweepResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from hipt_ray.heads.cohort import load_cohort
    from hipt_ray.heads.run import run_dir_for, train_head
    from hipt_ray.tracking import setup_tracking

    s, h = cfg.sweep, cfg.heads
    metric = s.metric or ("auc" if h.task == "subtyping" else "c_index")
    space = search_space(s.space)
    cohort = load_cohort(cfg)
    uri = setup_tracking(cfg)  # the experiment is created on the driver, before the trials
    run_dir = run_dir_for(cfg, s.name)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=cfg.to_dict(), cohort=cohort, tracking_uri=uri,
                             experiment=cfg.tracking.experiment, sweep_name=s.name),
        {"cpu": s.cpus_per_trial},
    )
    epochs = max([h.epochs] + [int(max(v)) for k, spec in s.space.items() if k == "epochs" for v in spec.values()])
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=s.num_samples,
                                    search_alg=BasicVariantGenerator(random_state=h.seed),  # reproducible draws
                                    scheduler=ASHAScheduler(max_t=epochs, grace_period=min(s.grace_period, epochs)),
                                    max_concurrent_trials=s.max_concurrent),
        run_config=tune.RunConfig(name=s.name, storage_path=os.path.join(run_dir, "tune")),
    )
    results = tuner.fit()
    best = results.get_best_result(metric=metric, mode="max", scope="all")
    df = results.get_dataframe(filter_metric=metric, filter_mode="max")
    cols = [c for c in df.columns if c.startswith("config/")] + [metric, f"{metric}_std", "epoch"]
    table_df = df[[c for c in cols if c in df.columns]].sort_values(metric, ascending=False)
    table_csv = os.path.join(run_dir, "results.csv")
    table_df.to_csv(table_csv, index=False)
    best_cfg = validate_config({**cfg.to_dict(), "heads": {**cfg.to_dict()["heads"], **best.config}})
    refit = train_head(best_cfg, run_name=f"{s.name}-best")
    return SweepResult(best_config=best.config, best_metric=float(best.metrics[metric]), metric=metric,
                       table_csv=table_csv, table=table_df.to_string(index=False), refit_lines=refit.lines())
