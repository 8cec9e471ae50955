"""MLflow tracking: the URI from config (a local SQLite store under --out by default) and an
experiment whose artifacts live beside that store (MLflow would otherwise put them in ./mlruns
of whatever directory the command ran in)."""

from __future__ import annotations

import os

from hipt_ray.config import Config
from hipt_ray.storage import local_output_dir


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    base = local_output_dir(cfg.out)
    return f"sqlite:///{os.path.abspath(os.path.join(base, 'mlflow.db'))}"


def setup_tracking(cfg: Config) -> str:
    """Point MLflow at the configured store and select (creating if needed) the experiment."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    name = cfg.tracking.experiment
    if mlflow.get_experiment_by_name(name) is None and uri.startswith("sqlite:///"):
        artifacts = os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
        mlflow.create_experiment(name, artifact_location=f"file://{artifacts}")
    mlflow.set_experiment(name)
    return uri
