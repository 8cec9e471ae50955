"""One DINO loop for both HIPT pretraining stages, run per Ray Train worker.

The stage only picks the backbone, the crops and the data (:class:`StageSpec`): stage 1 trains
ViT-256 on pixel crops of 256 px patches, stage 2 trains ViT-4K on crops of ``[384, 16, 16]``
token grids. One optimisation step is :func:`dino_step` (no Ray: unit-tested on its own). Rank 0
checkpoints student, teacher, optimiser, DINO centre, step, epoch and RNG state
every ``checkpoint_every_steps`` through ``ray.train.report``; a restarted worker group (lost
worker) or a rerun of the same run (lost driver) resumes from the newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hipt_ray.config import Config, validate_config
from hipt_ray.models import create_model
from hipt_ray.models.checkpoints import load_trusted
from hipt_ray.ssl import (
    DINOHead,
    DINOLoss,
    GridCrops,
    MultiCrop,
    PixelCrops,
    cancel_last_layer_gradients,
    cosine_schedule,
    ema_update,
    teacher_temperature_schedule,
)

log = logging.getLogger(__name__)
CKPT_FILE = "dino.pt"
STEP_LOG = "steps.jsonl"


@dataclass(frozen=True)
class StageSpec:
    """What differs between the two stages; everything else is one loop."""

    arch: str  # backbone in the model registry
    key: str  # the dataset column a batch's items come in
    channels_last: bool  # items are HWC (pixels) and become CHW
    transform: Callable[[torch.Tensor], list[torch.Tensor]]  # one item → its crops, global first


def stage_arch(cfg: Config) -> str:
    real = {"vit256": "vit256_s16", "vit4k": "vit4k_xs"}[cfg.pretrain.stage]
    return real if cfg.pretrain.size == "real" else f"{cfg.pretrain.stage}_tiny"


def stage_spec(cfg: Config) -> StageSpec:
    p = cfg.pretrain
    if p.stage == "vit256":
        return StageSpec(
            stage_arch(cfg),
            "patch",
            True,
            PixelCrops(n_local=p.n_local_crops, global_scale=p.global_crop_scale, local_scale=p.local_crop_scale),
        )
    return StageSpec(stage_arch(cfg), "grid", False, GridCrops(n_local=p.n_local_crops, rotate=p.rotate_grids))


def backbone_kwargs(cfg: Config, token_dim: int | None = None) -> dict:
    """Constructor arguments of the stage's backbone beyond the registry's: stage 2's ViT-4K
    takes ``token_dim``-d tokens, the width of the patch encoder that wrote them (384 for HIPT's
    ViT-256, 1024 for UNI, …); None keeps the registered width."""
    return {"in_dim": token_dim} if cfg.pretrain.stage == "vit4k" and token_dim else {}


def build_student_teacher(cfg: Config, token_dim: int | None = None) -> tuple[MultiCrop, MultiCrop]:
    p = cfg.pretrain
    arch, kw = stage_arch(cfg), backbone_kwargs(cfg, token_dim)
    student_bb = create_model(arch, drop_path_rate=p.drop_path, **kw)
    teacher_bb = create_model(arch, **kw)
    dim = student_bb.embed_dim
    student = MultiCrop(student_bb, DINOHead(in_dim=dim, out_dim=p.out_dim, norm_last_layer=p.norm_last_layer))
    teacher = MultiCrop(teacher_bb, DINOHead(in_dim=dim, out_dim=p.out_dim))
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Weight decay on matrices only, as DINO does (not on biases, norms, tokens' 1-d params)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def schedules(cfg: Config, steps_per_epoch: int, world_size: int) -> dict[str, np.ndarray]:
    p = cfg.pretrain
    base_lr = p.lr * p.batch_size_per_worker * world_size / 256.0
    kw = dict(epochs=p.epochs, steps_per_epoch=steps_per_epoch)
    return {
        "lr": cosine_schedule(base_lr, p.min_lr, warmup_epochs=p.warmup_epochs, **kw),
        "wd": cosine_schedule(p.weight_decay, p.weight_decay_end, **kw),
        "momentum": cosine_schedule(p.momentum_teacher, 1.0, **kw),
        "teacher_temp": teacher_temperature_schedule(
            p.warmup_teacher_temp, p.teacher_temp, warmup_epochs=p.warmup_teacher_temp_epochs, **kw
        ),
    }


def batch_crops(spec: StageSpec, batch: dict) -> list[torch.Tensor]:
    """A batch of patches or grids → per-crop-index stacked tensors (crop-major lists)."""
    views = []
    for item in batch[spec.key]:
        t = torch.from_numpy(np.array(item))
        if spec.channels_last:
            t = t.permute(2, 0, 1)  # HWC uint8 → CHW
        views.append(spec.transform(t))
    return [torch.stack([v[i] for v in views]) for i in range(len(views[0]))]


@dataclass
class DinoState:
    """Everything one DINO run updates, and what its checkpoint holds."""

    student: torch.nn.Module  # what trains (DDP-wrapped on several workers)
    teacher: MultiCrop
    optimizer: torch.optim.Optimizer
    loss_fn: DINOLoss
    step: int = 0

    @property
    def student_module(self) -> MultiCrop:
        return self.student.module if hasattr(self.student, "module") else self.student

    def state_dict(self, epoch: int, rng: dict) -> dict:
        return {
            "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "center": self.loss_fn.center.detach().cpu(),
            "step": self.step,
            "epoch": epoch,
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        """From :meth:`state_dict` (a checkpoint written with a ``scaler`` entry loads too)."""
        self.student_module.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss_fn.center.copy_(state["center"].to(self.loss_fn.center.device))
        self.step = state["step"]


def dino_step(
    state: DinoState,
    crops: list[torch.Tensor],
    sched: dict[str, np.ndarray],
    *,
    epoch: int,
    clip_grad: float,
    freeze_last_layer: int,
    use_amp: bool,
) -> float:
    """One DINO update at ``state.step``: the scheduled lr/wd, the teacher on the two global
    crops and the student on all, the loss, gradient clipping and the frozen last layer, then the
    EMA teacher. Returns the loss and advances ``state.step``."""
    step, device = state.step, crops[0].device
    for i, group in enumerate(state.optimizer.param_groups):
        group["lr"] = float(sched["lr"][step])
        if i == 0:  # weight decay on the matrices' group only
            group["weight_decay"] = float(sched["wd"][step])
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):  # bf16: no grad scaling
        teacher_out = state.teacher(crops[:2])
        student_out = state.student(crops)
        loss = state.loss_fn(student_out, teacher_out, float(sched["teacher_temp"][step]))
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at step {step}; lower pretrain.lr")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(state.student.parameters(), clip_grad)
    cancel_last_layer_gradients(state.student_module.head, epoch, freeze_last_layer)
    state.optimizer.step()
    ema_update(state.student_module, state.teacher, float(sched["momentum"][step]))
    state.step += 1
    return value


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain types, so the checkpoint loads with weights_only."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def train_loop(config: dict) -> None:
    """Ray Train worker entry point: ``config = {"cfg": Config dict, "steps_per_epoch": int,
    "tracking_uri": str | None, "run_dir": str, "token_dim": int | None}`` (stage 2: the width
    of the token grids)."""
    import ray.train
    from ray.train.torch import get_device

    cfg = validate_config(config["cfg"])
    p = cfg.pretrain
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    torch.manual_seed(p.seed + rank)
    np.random.seed(p.seed + rank)
    random.seed(p.seed + rank)
    torch.set_num_threads(max(1, int(os.cpu_count() or 1) // max(world, 1)))
    state = _build_state(cfg, device, config.get("token_dim"))
    _resume(state, cfg, rank)
    use_amp = device.type == "cuda"
    spe = int(config["steps_per_epoch"])
    sched = schedules(cfg, spe, world)
    total = len(sched["lr"])

    spec = stage_spec(cfg)
    shard = ray.train.get_dataset_shard("train")
    tracker = _Tracker(cfg, config, rank) if rank == 0 else None
    if tracker:
        tracker.event({"event": "start", "step": state.step, "world_size": world})
    t_last = time.perf_counter()

    while state.step < total:
        step_at_pass_start = state.step
        for batch in shard.iter_batches(
            batch_size=p.batch_size_per_worker,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=p.shuffle_buffer or None,
        ):
            if state.step >= total:
                break
            step, epoch = state.step, state.step // spe
            crops = [c.to(device, non_blocking=True) for c in batch_crops(spec, batch)]
            loss = dino_step(
                state,
                crops,
                sched,
                epoch=epoch,
                clip_grad=p.clip_grad,
                freeze_last_layer=p.freeze_last_layer,
                use_amp=use_amp,
            )
            now = time.perf_counter()
            metrics = {
                "loss": loss,
                "step": state.step,
                "epoch": epoch,
                "step_seconds": now - t_last,
                **{k: float(sched[k][step]) for k in ("lr", "wd", "momentum", "teacher_temp")},
            }
            t_last = now
            if tracker:
                tracker.step(metrics)
            if state.step % p.checkpoint_every_steps == 0 or state.step == total:
                _report(metrics, state, rank, world)
            if state.step % spe == 0:
                break  # epoch boundary: the next pass starts a new epoch
        if state.step == step_at_pass_start:
            raise ValueError(
                f"a pass over the training data gave no full batch of {p.batch_size_per_worker} per "
                f"worker ({world} workers); lower pretrain.batch_size_per_worker or add data"
            )
    if tracker:
        tracker.event({"event": "end", "step": state.step})
        tracker.close()


def _build_state(cfg: Config, device: torch.device, token_dim: int | None = None) -> DinoState:
    """Student (wrapped for DDP: gloo on CPU, NCCL on GPU, when world > 1), teacher, AdamW and the
    DINO loss on ``device``."""
    from ray.train.torch import prepare_model

    p = cfg.pretrain
    student, teacher = build_student_teacher(cfg, token_dim)
    teacher.to(device)
    loss_fn = DINOLoss(
        out_dim=p.out_dim, n_global=2, student_temp=p.student_temp, center_momentum=p.center_momentum
    ).to(device)
    student = prepare_model(student)
    return DinoState(student, teacher, torch.optim.AdamW(param_groups(student)), loss_fn)


def _resume(state: DinoState, cfg: Config, rank: int) -> None:
    """Load Ray Train's latest checkpoint into ``state`` (and this rank's RNG state), if any."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return
    with ckpt.as_directory() as d:
        saved = load_trusted(os.path.join(d, CKPT_FILE), allow_unsafe_pickle=cfg.model.allow_unsafe_pickle)
    state.load_state_dict(saved)
    if saved.get("rng") and saved["rng"].get(rank) is not None:
        _set_rng_state(saved["rng"][rank])
    log.info("rank %d resumed from step %d", rank, state.step)


def _report(metrics: dict, state: DinoState, rank: int, world: int) -> None:
    """Every rank reports; rank 0 with a checkpoint that holds every rank's RNG state."""
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    rng = [None] * world
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(rng, _rng_state())
    else:
        rng = [_rng_state()]
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state.state_dict(metrics["epoch"], dict(enumerate(rng))), os.path.join(d, CKPT_FILE))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


class _Tracker:
    """Rank 0's per-step log: MLflow (tracking URI from config) and a JSONL file in the run dir."""

    def __init__(self, cfg: Config, config: dict, rank: int) -> None:
        import mlflow

        self.mlflow = mlflow
        self.path = os.path.join(config["run_dir"], STEP_LOG)
        os.makedirs(config["run_dir"], exist_ok=True)
        self.fh = open(self.path, "a")
        self.active = False
        if config.get("tracking_uri"):
            mlflow.set_tracking_uri(config["tracking_uri"])
            mlflow.set_experiment(cfg.tracking.experiment)
            run_id = config.get("mlflow_run_id")
            mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=cfg.pretrain.run_name)
            self.active = True

    def event(self, record: dict) -> None:
        self.fh.write(json.dumps({**record, "time": time.time()}) + "\n")
        self.fh.flush()

    def step(self, metrics: dict) -> None:
        self.event(metrics)
        if self.active:
            self.mlflow.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def close(self) -> None:
        self.fh.close()
        if self.active:
            self.mlflow.end_run()
