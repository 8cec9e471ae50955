"""Region geometry of a patch encoder under ViT-4K: what is cut from a region, and what the
encoder sees of each cut.

HIPT cuts a 4096 px region (0.5 µm/px) into 16 × 16 patches of 256 px. Foundation models were
trained on other inputs (224 px for most, 448 px for CONCH v1.5), so the grid of 16 × 16 patches
can be laid out three ways (``model.patch_geometry``):

``native`` (``auto``)
    patches of the encoder's own input size, as its model card trains it: 16 × 224 px = a 3584 px
    region for UNI, Virchow2, H-optimus; the encoder sees what it was trained on.
``resize``
    HIPT's patches (``tiling.patch_px``, 256) each resized to the encoder's input, as TRIDENT and
    UNI's own pipelines do: the same regions as HIPT's, slightly shrunk.
``tiling``
    HIPT's patches fed as they are, with the position embedding resampled (timm's dynamic image
    size): only for encoders whose patch size divides ``tiling.patch_px`` (16 and 8 do 256; 14
    does not).

What is cut (``patch_px`` and the region) enters the tiling spec through ``cfg.tiling`` (see
:func:`apply_geometry`); what the encoder sees (``input_px``) enters the model id (see
:func:`hipt_ray.models.loading.build_model`). No Ray here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache

import torch

from hipt_ray.config import Config, ConfigError, TilingConfig, validate_config
from hipt_ray.models.encoders import create_encoder, encoder_spec

log = logging.getLogger(__name__)
GEOMETRIES = ("native", "resize", "tiling")


@dataclass(frozen=True)
class PatchGeometry:
    """``patch_px``: pixels cut per patch at ``tiling.mpp``; ``input_px``: the size the encoder
    is fed (the patch resized when the two differ)."""

    encoder: str
    name: str
    patch_px: int
    input_px: int

    @property
    def tag(self) -> str:
        """Short and readable, for model ids: ``native224``, ``resize256to224``, ``tiling256``."""
        if self.name == "resize":
            return f"resize{self.patch_px}to{self.input_px}"
        return f"{self.name}{self.patch_px}"


@cache
def encoder_shape(name: str) -> tuple[int, bool]:
    """(patch size, whether the encoder takes other input sizes) of a registered encoder, read
    from its structure built on the ``meta`` device (no memory, no weights)."""
    with torch.device("meta"):
        enc = create_encoder(name)
    return enc.patch_size, bool(getattr(enc.vit, "dynamic_img_size", False))


def _fits(name: str, geometry: str, tiling_patch_px: int) -> str | None:
    """Why ``geometry`` does not work for encoder ``name``, or None when it does."""
    if geometry != "tiling":
        return None
    patch, dynamic = encoder_shape(name)
    if not dynamic:
        return f"{name} takes only its own input size"
    if tiling_patch_px % patch:
        return f"{name}'s patch size {patch} does not divide tiling.patch_px={tiling_patch_px}"
    return None


def resolve_geometry(encoder: str, geometry: str, tiling: TilingConfig) -> PatchGeometry:
    """The geometry ``model.patch_geometry`` (``auto`` = ``native``) gives encoder ``encoder``.

    Raises:
        ConfigError: an unknown encoder, or a geometry the encoder cannot run; the message names
            the geometries that work for it.
    """
    spec = encoder_spec(encoder)
    name = "native" if geometry == "auto" else geometry
    if name not in GEOMETRIES:
        raise ConfigError(f"model.patch_geometry={geometry!r}: expected auto or one of {', '.join(GEOMETRIES)}")
    if (why := _fits(encoder, name, tiling.patch_px)) is not None:
        working = [g for g in GEOMETRIES if _fits(encoder, g, tiling.patch_px) is None]
        raise ConfigError(f"model.patch_geometry={name}: {why}; geometries that work for it: {', '.join(working)}")
    if name == "native":
        if abs(tiling.mpp - spec.mpp) > 1e-9:
            log.warning("%s was trained at %.3g µm/px; tiling.mpp is %.3g", encoder, spec.mpp, tiling.mpp)
        return PatchGeometry(encoder, name, spec.input_px, spec.input_px)
    input_px = spec.input_px if name == "resize" else tiling.patch_px
    return PatchGeometry(encoder, name, tiling.patch_px, input_px)


def config_geometry(cfg: Config) -> PatchGeometry | None:
    """The geometry of ``cfg.model`` (None: no ``model.patch_encoder``, HIPT's own ViT-256)."""
    if cfg.model.patch_encoder is None:
        return None
    return resolve_geometry(cfg.model.patch_encoder, cfg.model.patch_geometry, cfg.tiling)


def apply_geometry(cfg: Config) -> Config:
    """``cfg`` with the tiling its patch encoder's geometry cuts: ``tiling.patch_px`` the cut
    patch, ``tiling.region_px`` the same number of patches per side as configured (16). Without
    ``model.patch_encoder`` (or with a geometry that cuts the configured patches) ``cfg`` itself;
    applying it twice changes nothing more. Call it first in every stage that cuts or reads
    regions of an encoder (tile, embed, stage-2 pretrain, heatmaps), so that its tiling spec hash
    names what was cut."""
    geometry = config_geometry(cfg)
    if geometry is None or geometry.patch_px == cfg.tiling.patch_px:
        return cfg
    per_side = cfg.tiling.region_px // cfg.tiling.patch_px
    data = cfg.to_dict()
    data["tiling"].update(patch_px=geometry.patch_px, region_px=per_side * geometry.patch_px)
    log.info("%s (%s): regions of %d × %d px patches", geometry.encoder, geometry.name, per_side, geometry.patch_px)
    return validate_config(data)
