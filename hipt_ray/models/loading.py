"""The configured HIPT-4K with its weights (shared by embedding, heatmaps and search)."""

from __future__ import annotations

import hashlib

import torch

from hipt_ray.config import Config, ConfigError
from hipt_ray.models.checkpoints import load_checkpoint, model_id
from hipt_ray.models.encoder_checkpoints import load_encoder_checkpoint
from hipt_ray.models.encoders import PatchEncoder
from hipt_ray.models.geometry import PatchGeometry, config_geometry
from hipt_ray.models.hipt4k import HIPT4K, default_micro_batch
from hipt_ray.models.registry import create_hipt4k


def architecture(cfg: Config) -> dict:
    """What to build for ``cfg.model`` (:func:`~hipt_ray.models.registry.create_hipt4k`):
    the registered model, or its ViT-4K over ``model.patch_encoder`` in its geometry."""
    geometry = config_geometry(cfg)
    if geometry is None:
        return {"name": cfg.model.name}
    return {
        "name": cfg.model.name,
        "encoder": geometry.encoder,
        "geometry": geometry.name,
        "patch_px": geometry.patch_px,
        "input_px": geometry.input_px,
    }


def composed_id(model: HIPT4K, geometry: PatchGeometry | None) -> str:
    """The model id: :func:`model_id` of the weights for HIPT's own ViT-256 fed what is cut (the
    ids embeddings had before patch encoders existed); otherwise the encoder and geometry, readable,
    then a hash of the weights and the geometry (``uni-native224-…``), so that one encoder's
    weights fed differently never share an id."""
    weights = model_id(model)
    if geometry is None or (geometry.encoder == "vit256_s16" and geometry.patch_px == geometry.input_px):
        return weights
    h = hashlib.sha256(f"{weights}|{geometry.encoder}|{geometry.tag}".encode()).hexdigest()[:16]
    return f"{geometry.encoder}-{geometry.tag}-{h}"


def build_model(cfg: Config) -> tuple[HIPT4K, str]:
    """The configured model with its weights, and its id (``random-…`` for random weights).

    ``model.checkpoint_256`` is the patch level's file: HIPT's official layout, or with
    ``model.patch_encoder`` the encoder's published weights (read strictly, see
    :func:`~hipt_ray.models.encoder_checkpoints.load_encoder_checkpoint`); ``checkpoint_4k`` the
    ViT-4K's (official layout, or a stage-2 export of this project)."""
    torch.manual_seed(cfg.model.seed)
    model = create_hipt4k(architecture(cfg), micro_batch=default_micro_batch("cpu", cfg.model.micro_batch))
    c256, c4k = cfg.model.checkpoint_256, cfg.model.checkpoint_4k
    if not (c256 and c4k) and not cfg.model.allow_random_weights:
        raise ConfigError(
            "embedding needs both --checkpoint-256 and --checkpoint-4k (official HIPT layout, or the patch "
            "encoder's weights and a stage-2 ViT-4K); for tests and demos only, model.allow_random_weights=true "
            "embeds with random weights"
        )
    unsafe = cfg.model.allow_unsafe_pickle
    if c256 and isinstance(model.vit256, PatchEncoder):
        load_encoder_checkpoint(model.vit256, c256, allow_unsafe_pickle=unsafe)
    elif c256:
        load_checkpoint(model.vit256, c256, allow_unsafe_pickle=unsafe)
    if c4k:
        load_checkpoint(model.vit4k, c4k, allow_unsafe_pickle=unsafe)
    mid = composed_id(model, config_geometry(cfg))
    return model.eval(), mid if (c256 and c4k) else f"random-{mid}"
