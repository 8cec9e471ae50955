"""``hipt-ray pretrain``: a DINO stage on Ray Train, then the teacher exported in the official
HIPT checkpoint layout."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from hipt_ray.config import Config, ConfigError
from hipt_ray.console import Progress
from hipt_ray.data.pretrain import build_grid_dataset, build_patch_dataset
from hipt_ray.models import create_model, export_checkpoint
from hipt_ray.models.checkpoints import load_state_dict_strict, load_trusted
from hipt_ray.models.geometry import apply_geometry
from hipt_ray.models.inference import cluster_wants_gpu
from hipt_ray.runtime import cluster_shape
from hipt_ray.slides.manifest import list_slides
from hipt_ray.storage import is_remote, join, local_path
from hipt_ray.tile.job import run as tile_run
from hipt_ray.tracking import check_store_reaches_workers, for_workers, setup_tracking, tracking_uri
from hipt_ray.train.dino import CKPT_FILE, STEP_LOG, backbone_kwargs, stage_arch, train_loop

log = logging.getLogger(__name__)


@dataclass
class PretrainSummary:
    stage: str
    steps: int
    steps_per_epoch: int
    final_loss: float
    seconds: float
    checkpoint: str
    export: str
    tracking_uri: str

    def lines(self) -> list[str]:
        return [
            f"stage {self.stage}: {self.steps} steps ({self.steps_per_epoch} per epoch), "
            f"final loss {self.final_loss:.4f}, {self.seconds:.1f} s",
            f"checkpoint: {self.checkpoint}",
            f"teacher backbone (official HIPT layout): {self.export}",
            f"MLflow: {self.tracking_uri}",
        ]


def _mlflow_run(cfg: Config, params: dict) -> str:
    """The MLflow run of this pretraining run (the same one again when a run is resumed)."""
    import mlflow

    setup_tracking(cfg)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    found = mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.hipt_run = '{cfg.pretrain.run_name}'", output_format="list"
    )
    if found:
        return found[0].info.run_id
    with mlflow.start_run(run_name=cfg.pretrain.run_name, tags={"hipt_run": cfg.pretrain.run_name}) as run:
        mlflow.log_params(params)
        return run.info.run_id


def export_teacher(cfg: Config, checkpoint_dir: str, uri: str, token_dim: int | None = None) -> torch.nn.Module:
    state = load_trusted(os.path.join(checkpoint_dir, CKPT_FILE), allow_unsafe_pickle=cfg.model.allow_unsafe_pickle)
    backbone = {k[len("backbone.") :]: v for k, v in state["teacher"].items() if k.startswith("backbone.")}
    model = create_model(stage_arch(cfg), **backbone_kwargs(cfg, token_dim))
    load_state_dict_strict(model, backbone, source=checkpoint_dir)
    export_checkpoint(
        model,
        uri,
        metadata={
            "stage": cfg.pretrain.stage,
            "step": int(state["step"]),
            "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3},
            **({"token_dim": token_dim} if token_dim else {}),
        },
    )
    return model


class _StepFollower:
    """The driver's progress line for a pretraining run: follows the rank-0 worker's step log
    (``run_dir/steps.jsonl``) where the driver can see it (the embedded default, or a worker on
    the driver's node); elsewhere the line shows only the time."""

    def __init__(self, path: str, total: int, stage: str):
        import threading

        self.path, self.progress = path, Progress(f"pretrain {stage}", total=total, unit="steps")
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0  # earlier runs' lines
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="pretrain-progress", daemon=True)

    def _read(self) -> None:
        import json

        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        whole = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next look
        self.offset += len(whole)
        for line in whole.decode().splitlines():
            rec = json.loads(line)
            if "loss" in rec:
                self.progress.update(int(rec["step"]), loss=f"{rec['loss']:.4f}", epoch=rec.get("epoch"))

    def _follow(self) -> None:
        while not self.stop.wait(1.0):
            self._read()

    def __enter__(self) -> _StepFollower:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._read()
        self.progress.close()


def run(cfg: Config) -> PretrainSummary:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    p = cfg.pretrain
    t0 = time.perf_counter()
    check_store_reaches_workers(cfg, "pretrain")  # its rank-0 worker logs each epoch to MLflow
    shape = cluster_shape()  # GPU nodes an autoscaler keeps at zero count: the workers ask for them
    use_gpu = cluster_wants_gpu(p.use_gpu, gpus=shape.most({"GPU": 1}), key="pretrain.use_gpu", source=shape.source)
    token_dim = None
    if p.stage == "vit256" and cfg.model.patch_encoder not in (None, "vit256_s16"):
        raise ConfigError(
            f"pretrain --stage vit256 trains HIPT's ViT-256; model.patch_encoder={cfg.model.patch_encoder} comes "
            "pretrained: embed with it, then run stage 2 (--stage vit4k) over its token grids"
        )
    if p.stage == "vit256":
        specs = list_slides(cfg.slides, endpoint_url=cfg.storage.s3_endpoint_url)
        tile_run(cfg, specs)  # reuses tiling already under --out
        ds, n_items = build_patch_dataset(cfg, specs)
    else:
        cfg = apply_geometry(cfg)  # a patch encoder's regions (the same model.* settings as embed's)
        ds, n_items, mid, token_dim = build_grid_dataset(cfg)
        log.info("stage 2 over %d-d token grids of model %s", token_dim, mid)
    if p.cache_dataset:
        ds = ds.materialize()
    spe = p.steps_per_epoch or max(1, n_items // (p.batch_size_per_worker * p.num_workers))
    storage = p.storage_path or join(cfg.out, "pretrain")
    if not is_remote(storage):
        storage = os.path.abspath(local_path(storage))
    run_dir = (
        os.path.join(storage, p.run_name)
        if not is_remote(storage)
        else os.path.join(tempfile.gettempdir(), "hipt-ray-runs", p.run_name)
    )
    uri = tracking_uri(cfg)
    params = {f"pretrain.{k}": v for k, v in p.model_dump(mode="json").items()}
    params.update(
        {"steps_per_epoch": spe, "items_per_epoch_estimate": n_items, "arch": stage_arch(cfg), "use_gpu": use_gpu}
    )
    run_id = _mlflow_run(cfg, params)
    resources = {"CPU": p.cpus_per_worker, **p.worker_resources} | ({"GPU": 1} if use_gpu else {})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "steps_per_epoch": spe,
            "tracking_uri": for_workers(uri),
            "mlflow_run_id": run_id,
            "run_dir": run_dir,
            "token_dim": token_dim,
        },
        scaling_config=ScalingConfig(num_workers=p.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=p.run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=p.num_to_keep),
            failure_config=FailureConfig(max_failures=p.max_failures),
        ),
        datasets={"train": ds},
    )
    with _StepFollower(os.path.join(run_dir, STEP_LOG), total=p.epochs * spe, stage=p.stage):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"pretraining run {p.run_name} ended without a checkpoint")
    export = join(cfg.out, "pretrain", p.run_name, f"teacher_{p.stage}.pth")
    with result.checkpoint.as_directory() as d:
        export_teacher(cfg, d, export, token_dim)
    return PretrainSummary(
        stage=p.stage,
        steps=int(result.metrics.get("step", 0)),
        steps_per_epoch=spe,
        final_loss=float(result.metrics.get("loss", float("nan"))),
        seconds=time.perf_counter() - t0,
        checkpoint=result.checkpoint.path,
        export=export,
        tracking_uri=uri,
    )
