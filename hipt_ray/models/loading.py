"""The configured HIPT-4K with its weights (shared by embedding, heatmaps and search)."""

from __future__ import annotations

import torch

from hipt_ray.config import Config, ConfigError
from hipt_ray.models.checkpoints import load_checkpoint, model_id
from hipt_ray.models.hipt4k import HIPT4K, default_micro_batch
from hipt_ray.models.registry import create_model


def build_model(cfg: Config) -> tuple[HIPT4K, str]:
    """The configured model with its weights, and its id (``random-…`` for random weights)."""
    torch.manual_seed(cfg.model.seed)
    model = create_model(cfg.model.name, micro_batch=default_micro_batch("cpu", cfg.model.micro_batch))
    # only the HIPT-4K builders take micro_batch: any other model.name failed in create_model
    assert isinstance(model, HIPT4K), type(model)
    c256, c4k = cfg.model.checkpoint_256, cfg.model.checkpoint_4k
    if not (c256 and c4k) and not cfg.model.allow_random_weights:
        raise ConfigError(
            "embedding needs both --checkpoint-256 and --checkpoint-4k (official HIPT layout); "
            "for tests and demos only, model.allow_random_weights=true embeds with random weights"
        )
    if c256:
        load_checkpoint(model.vit256, c256, allow_unsafe_pickle=cfg.model.allow_unsafe_pickle)
    if c4k:
        load_checkpoint(model.vit4k, c4k, allow_unsafe_pickle=cfg.model.allow_unsafe_pickle)
    mid = model_id(model)
    return model.eval(), mid if (c256 and c4k) else f"random-{mid}"
