"""Stage-2 DINO over the token grids of any patch encoder (#29 item 2): the ViT-4K student and
teacher take the grids' width, and a few steps on a fixed batch of 96-d grids (virchow2_tiny's
CLS ⊕ mean width) lower the loss as they do on HIPT's."""

from __future__ import annotations

import numpy as np
import torch

from hipt_ray.config import load_config
from hipt_ray.ssl import DINOLoss
from hipt_ray.train.dino import (
    DinoState,
    batch_crops,
    build_student_teacher,
    dino_step,
    param_groups,
    schedules,
    stage_spec,
)

from ...conftest import TINY


def test_vit4k_pretrains_over_grids_of_another_encoders_width():
    cfg = load_config(
        files=[TINY],
        overrides=["pretrain.stage=vit4k", "pretrain.epochs=1", "pretrain.momentum_teacher=0.9"],
    )
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg, token_dim=96)
    assert student.backbone.in_dim == teacher.backbone.in_dim == 96
    p = cfg.pretrain
    state = DinoState(
        student,
        teacher,
        torch.optim.AdamW(param_groups(student)),
        DINOLoss(out_dim=p.out_dim, n_global=2, student_temp=p.student_temp, center_momentum=p.center_momentum),
    )
    sched = schedules(cfg, 10, 1)
    batch = {"grid": np.random.default_rng(0).normal(size=(p.batch_size_per_worker, 96, 16, 16)).astype(np.float32)}
    spec = stage_spec(cfg)
    torch.manual_seed(1)
    losses = [
        dino_step(
            state, batch_crops(spec, batch), sched, epoch=1, clip_grad=p.clip_grad, freeze_last_layer=0, use_amp=False
        )
        for _ in range(8)
    ]
    assert all(np.isfinite(losses)) and min(losses[3:]) < 0.8 * losses[0], losses
