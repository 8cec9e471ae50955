"""HIPT models: ViT-256, ViT-4K, HIPT-4K, their registry and official checkpoints. No Ray here."""

from hipt_ray.models.checkpoints import (
    CheckpointError,
    export_checkpoint,
    load_checkpoint,
    model_id,
)
from hipt_ray.models.hipt4k import HIPT4K, normalize_uint8, patchify, patchify_uint8
from hipt_ray.models.registry import create_model, list_models
from hipt_ray.models.vit import ViT4K, ViT256, resize_pos_embed, set_fused_attention

__all__ = [
    "HIPT4K",
    "CheckpointError",
    "ViT256",
    "ViT4K",
    "create_model",
    "export_checkpoint",
    "list_models",
    "load_checkpoint",
    "model_id",
    "normalize_uint8",
    "patchify",
    "patchify_uint8",
    "resize_pos_embed",
    "set_fused_attention",
]
