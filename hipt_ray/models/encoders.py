"""Pathology foundation-model patch encoders, built offline from explicit architecture settings.

Every encoder is a timm 1.0.31 ``VisionTransformer`` (``pretrained=False``: no hub look-up, no
download) configured as its model card and the peers' loaders define it, wrapped in
:class:`PatchEncoder`, whose ``forward`` takes a float batch ``[B, 3, H, W]`` already normalised
with the encoder's ``mean``/``std`` and returns the embedding ``[B, embed_dim]`` the model card
defines (the CLS token, or CLS ⊕ the mean of the patch tokens with register tokens excluded).
The wrapped network is ``.trunk``; its state-dict keys are the published ones, so a user's weight
file loads into it strictly (:func:`hipt_ray.models.encoder_checkpoints.load_encoder_checkpoint`).

Sources of the facts, by peer file (read at their newest stored commits):
  TRIDENT  = mahmoodlab/TRIDENT trident/patch_encoder_models/load.py (+ utils/constants.py)
  slide2vec = clemsgrs/slide2vec slide2vec/encoders/models/<file>.py
  eva      = kaiko-ai/eva src/eva/vision/models/networks/backbones/pathology/<file>.py
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import timm
import timm.layers
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from hipt_ray.config import ConfigError
from hipt_ray.models.conch import ConchV15Tower, adapt_conch_state
from hipt_ray.models.vit import last_block_attention

log = logging.getLogger(__name__)

Pooling = Literal["cls", "cls_mean", "module"]  # "module": the network's own head (CONCH's pooler)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # TRIDENT utils/constants.py
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)  # TRIDENT HOptimus0/1; slide2vec hoptimus.py
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
KAIKO_MEAN = (0.5, 0.5, 0.5)  # TRIDENT utils/constants.py KAIKO_MEAN/STD
KAIKO_STD = (0.5, 0.5, 0.5)
# Lunit's own statistics (eva lunit.py, from lunit-io/benchmark-ssl-pathology); its weights
# were trained with these, not with ImageNet's.
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
HIPT_MEAN = (0.5, 0.5, 0.5)  # HIPT's ViT-256 transform (hipt_ray.models.inference.normalize_uint8)
HIPT_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EncoderSpec:
    """What a model card fixes about an encoder. ``embed_dim`` is the output's width (twice the
    token width for CLS ⊕ mean); ``mpp`` is the µm/px its input was trained at."""

    name: str
    embed_dim: int
    input_px: int
    mpp: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: Pooling
    build: Callable[..., nn.Module] = field(repr=False)
    source: str = ""
    # A published-layout fix-up applied before the strict check (CONCH v1.5's pos_embed resample).
    adapt_state: Callable[..., dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    tiny: bool = False  # a test twin: registered beside the real ones, left out of list_encoders()


class PatchEncoder(nn.Module):
    """A patch encoder with its model-card facts as attributes; ``forward`` returns the embedding."""

    def __init__(self, *, spec: EncoderSpec, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.name = spec.name
        self.embed_dim = spec.embed_dim
        self.input_px = spec.input_px
        self.mpp = spec.mpp
        self.mean = spec.mean
        self.std = spec.std
        self.pooling: Pooling = spec.pooling
        self.adapt_state = spec.adapt_state
        self.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 1))
        self.patch_size = _patch_size(trunk)

    @property
    def vit(self) -> VisionTransformer:
        """The timm ViT inside (CONCH v1.5's tower keeps it as ``.trunk``)."""
        vit = self.trunk if isinstance(self.trunk, VisionTransformer) else getattr(self.trunk, "trunk", None)
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"encoder {self.name} holds no timm ViT ({type(self.trunk).__name__})")
        return vit

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, heads, T, T]`` softmax attention of the last block (T = prefix + patch tokens:
        CLS first, then the registers, then the patches row-major), as the forward computes it."""
        vit = self.vit
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        return last_block_attention(vit.blocks, tokens)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens ``[B, prefix + patches, D]`` (after the final norm)."""
        forward_features = cast(Callable[[torch.Tensor], torch.Tensor], self.trunk.forward_features)
        return forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling == "module":
            return self.trunk(x)
        tokens = self.forward_tokens(x)
        cls = tokens[:, 0]
        if self.pooling == "cls":
            return cls
        # Virchow/Virchow2: CLS ⊕ mean of the patch tokens; registers (prefix tokens after the
        # CLS) are not patches and stay out of the mean (TRIDENT Virchow2 forward: output[:, 5:]).
        return torch.cat([cls, tokens[:, self.num_prefix_tokens :].mean(dim=1)], dim=-1)


def _patch_size(trunk: nn.Module) -> int:
    ps = getattr(getattr(trunk, "patch_embed", None), "patch_size", 16)
    return int(ps[0] if isinstance(ps, tuple) else ps)


def _timm(arch: str, **kwargs: Any) -> Callable[..., nn.Module]:
    """A builder for ``timm.create_model(arch, pretrained=False, ...)`` with no classifier head
    and position embeddings resampled for other input sizes (``dynamic_img_size``, as the peers
    build them; at the native size nothing is resampled). ``overrides`` (e.g. ``depth=1``) make
    tiny twins of the same structure for tests."""

    def build(**overrides: Any) -> nn.Module:
        return timm.create_model(
            arch, pretrained=False, num_classes=0, dynamic_img_size=True, **{**kwargs, **overrides}
        )

    return build


def _vit256(**overrides: Any) -> nn.Module:
    from hipt_ray.models.vit import ViT256

    return ViT256(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **overrides})


_SPECS: dict[str, EncoderSpec] = {}


def _add(spec: EncoderSpec) -> None:
    if spec.name in _SPECS:
        raise ValueError(f"encoder {spec.name!r} registered twice")
    _SPECS[spec.name] = spec


_SWIGLU = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU}

# HIPT's ViT-256 (ViT-S/16, 384-d CLS), the default: 256 px at 0.5 µm/px, mean = std = 0.5.
_add(EncoderSpec("vit256_s16", 384, 256, 0.5, HIPT_MEAN, HIPT_STD, "cls", _vit256, "HIPT vit256_small_dino.pth"))
# UNI: ViT-L/16 at 224, LayerScale 1e-5, CLS 1024-d, ImageNet norm (TRIDENT UNIInferenceEncoder;
# slide2vec uni.py: 0.5 µm/px).
_add(
    EncoderSpec(
        "uni",
        1024,
        224,
        0.5,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "cls",
        _timm("vit_large_patch16_224", img_size=224, patch_size=16, init_values=1e-5),
        "MahmoodLab/UNI pytorch_model.bin",
    )
)
# UNI2-h: ViT-H/14-ish (1536-d, depth 24, 24 heads), SwiGLU (mlp_ratio 2.66667·2), 8 registers,
# no_embed_class (registers and CLS carry no position embedding), CLS 1536-d, ImageNet norm
# (TRIDENT UNIv2InferenceEncoder; slide2vec uni.py).
_add(
    EncoderSpec(
        "uni2_h",
        1536,
        224,
        0.5,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "cls",
        _timm(
            "vit_giant_patch14_224",
            img_size=224,
            patch_size=14,
            depth=24,
            num_heads=24,
            init_values=1e-5,
            embed_dim=1536,
            mlp_ratio=2.66667 * 2,
            no_embed_class=True,
            reg_tokens=8,
            **_SWIGLU,
        ),
        "MahmoodLab/UNI2-h pytorch_model.bin",
    )
)
# Virchow: ViT-H/14 at 224, SwiGLU (mlp_ratio 5.3375), LayerScale 1e-5; embedding CLS ⊕ mean of
# the 256 patch tokens = 2560-d; ImageNet norm (TRIDENT VirchowInferenceEncoder; slide2vec virchow.py).
_add(
    EncoderSpec(
        "virchow",
        2560,
        224,
        0.5,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "cls_mean",
        _timm("vit_huge_patch14_224", img_size=224, init_values=1e-5, mlp_ratio=5.3375, **_SWIGLU),
        "paige-ai/Virchow pytorch_model.bin",
    )
)
# Virchow2: Virchow plus 4 registers; class token and registers inside pos_embed (timm's default
# no_embed_class=False: pos_embed is [1, 1 + 4 + 256, 1280]); CLS ⊕ mean of tokens[:, 5:] = 2560-d
# (TRIDENT Virchow2InferenceEncoder; slide2vec virchow.py, trained at 0.25–2 µm/px, 0.5 default).
_add(
    EncoderSpec(
        "virchow2",
        2560,
        224,
        0.5,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "cls_mean",
        _timm("vit_huge_patch14_224", img_size=224, init_values=1e-5, mlp_ratio=5.3375, reg_tokens=4, **_SWIGLU),
        "paige-ai/Virchow2 pytorch_model.bin",
    )
)
# H-optimus-0 / H-optimus-1: timm vit_giant_patch14_reg4_dinov2 (1536-d, depth 40, SwiGLU, 4
# registers, no_embed_class) at 224, LayerScale 1e-5, CLS ("global_pool": "token") 1536-d; their
# own normalisation (TRIDENT HOptimus0/1InferenceEncoder; slide2vec hoptimus.py: 0.5 µm/px).
for _name in ("h_optimus_0", "h_optimus_1"):
    _add(
        EncoderSpec(
            _name,
            1536,
            224,
            0.5,
            HOPTIMUS_MEAN,
            HOPTIMUS_STD,
            "cls",
            _timm("vit_giant_patch14_reg4_dinov2", img_size=224, init_values=1e-5),
            f"bioptimus/{_name.replace('h_optimus', 'H-optimus').replace('_', '-')} pytorch_model.bin",
        )
    )
# Prov-GigaPath tile encoder: timm's vit_giant_patch14_dinov2 architecture but patch size 16 at
# 224 (1536-d, depth 40, 24 heads, mlp_ratio 5.33334 of the architecture's packed SwiGLU, LayerScale), CLS 1536-d,
# ImageNet norm (TRIDENT GigaPathInferenceEncoder; eva gigapath.py).
_add(
    EncoderSpec(
        "gigapath",
        1536,
        224,
        0.5,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "cls",
        _timm(
            "vit_giant_patch14_dinov2",
            img_size=224,
            in_chans=3,
            patch_size=16,
            embed_dim=1536,
            depth=40,
            num_heads=24,
            mlp_ratio=5.33334,
        ),
        "prov-gigapath/prov-gigapath pytorch_model.bin",
    )
)
KAIKO_VITL14_GRID = 37  # 518 px / patch 14


def adapt_kaiko_vitl14_state(state: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """Bring a kaiko ViT-L/14 file to the layout it is built in, as timm's ``checkpoint_filter_fn``
    does when ``torch.hub.load("kaiko-ai/towards_large_pathology_fms", "vitl14")`` loads kaiko's
    release file into the 518 px build: a DINOv2-layout file (``register_tokens``, the CLS's position
    at ``pos_embed[:, 0]``) is converted first, then a ``pos_embed`` of another square grid (e.g.
    16×16, from a 224 px build) is resampled to 37×37 (bicubic, antialiased, patch positions only:
    ``no_embed_class``). Anything else is left for the strict check, which names it."""
    if "register_tokens" in state and "pos_embed" in state and "cls_token" in state:
        state = _from_dinov2_registers(state, source=source)
    pos = state.get("pos_embed")
    if pos is None or pos.ndim != 3 or pos.shape[1] == KAIKO_VITL14_GRID**2:
        return state
    side = math.isqrt(pos.shape[1])
    if side * side != pos.shape[1]:
        return state  # not a square grid of patch positions: the strict check names the shape
    log.info("%s: resampling pos_embed from %d×%d to %d×%d", source, side, side, KAIKO_VITL14_GRID, KAIKO_VITL14_GRID)
    resized = timm.layers.resample_abs_pos_embed(
        pos, new_size=[KAIKO_VITL14_GRID] * 2, num_prefix_tokens=0, interpolation="bicubic", antialias=True
    )
    return {**state, "pos_embed": resized}


def _from_dinov2_registers(state: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """DINOv2's own layout with registers → timm's ``no_embed_class`` one (timm's
    ``_convert_dinov2``): ``register_tokens`` is ``reg_token``; the CLS's position embedding is
    added into ``cls_token`` and dropped from ``pos_embed``."""
    log.info("%s: converting DINOv2's register layout (register_tokens, CLS position) to timm's", source)
    out = {k: v for k, v in state.items() if k not in ("register_tokens", "cls_token", "pos_embed")}
    out["reg_token"] = state["register_tokens"]
    out["cls_token"] = state["cls_token"] + state["pos_embed"][:, 0]
    out["pos_embed"] = state["pos_embed"][:, 1:]
    return out


# kaiko.ai ViT-S/16, ViT-B/16 (timm vit_small/base_patch16_224) at 224 and ViT-L/14 (timm
# vit_large_patch14_reg4_dinov2), CLS; mean = std = 0.5, fed 224 px (TRIDENT KaikoInferenceEncoder
# and KAIKO_MEAN/STD; eva kaiko.py; the timm ports' cards: Resize/CenterCrop 224). The ViT-L/14 is
# built at 518 (a 37×37 grid) as both of its distributions build it: kaiko's hubconf.py vitl14
# (timm's architecture default) and the port 1aurent/vit_large_patch14_reg4_224.kaiko_ai_… despite
# its name (config.json: that architecture, no model_args, pretrained_cfg input_size [3, 518, 518]
# with fixed_input_size, so timm builds img_size 518; its 1.22 GB model.safetensors is the 304.37 M
# float32 parameters of that grid, not the 303.23 M of a 16×16 one). no_embed_class: pos_embed is
# [1, 1369, 1024], patch positions only (the CLS and 4 registers carry none); 224 px inputs are
# resampled at run time (dynamic_img_size).
_add(
    EncoderSpec(
        "kaiko_vits16",
        384,
        224,
        0.5,
        KAIKO_MEAN,
        KAIKO_STD,
        "cls",
        _timm("vit_small_patch16_224", img_size=224),
        "kaiko-ai/towards_large_pathology_fms vits16",
    )
)
_add(
    EncoderSpec(
        "kaiko_vitb16",
        768,
        224,
        0.5,
        KAIKO_MEAN,
        KAIKO_STD,
        "cls",
        _timm("vit_base_patch16_224", img_size=224),
        "kaiko-ai/towards_large_pathology_fms vitb16",
    )
)
_add(
    EncoderSpec(
        "kaiko_vitl14",
        1024,
        224,
        0.5,
        KAIKO_MEAN,
        KAIKO_STD,
        "cls",
        _timm("vit_large_patch14_reg4_dinov2", img_size=518),
        "kaiko-ai/towards_large_pathology_fms vitl14",
        adapt_kaiko_vitl14_state,
    )
)
# Lunit DINO ViT-S/8 (timm vit_small_patch8_224) at 224, CLS 384-d, Lunit's statistics
# (eva lunit.py; TRIDENT LunitS8InferenceEncoder; slide2vec lunit.py: 0.5 µm/px).
_add(
    EncoderSpec(
        "lunit_vits8",
        384,
        224,
        0.5,
        LUNIT_MEAN,
        LUNIT_STD,
        "cls",
        _timm("vit_small_patch8_224", img_size=224),
        "lunit-io/benchmark-ssl-pathology dino_vit_small_patch8_ep200.torch",
    )
)
# GPFM: DINOv2 ViT-L/14 (timm vit_large_patch14_dinov2) at 224, LayerScale 1e-5, CLS 1024-d,
# ImageNet norm (eva hkust.py; slide2vec gpfm.py: 0.5 µm/px). The GitHub GPFM.pth is a DINOv2
# training checkpoint ({"teacher": {"backbone.blocks.<chunk>.<i>.…"}}; see encoder_checkpoints).
_add(
    EncoderSpec(
        "gpfm",
        1024,
        224,
        0.5,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "cls",
        _timm("vit_large_patch14_dinov2", img_size=224, patch_size=14, init_values=1e-5),
        "birkhoffkiki/GPFM GPFM.pth",
    )
)


def _adapt_hf_dinov2(state: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    # Imported here: encoder_checkpoints imports this module (PatchEncoder).
    from hipt_ray.models.encoder_checkpoints import adapt_hf_dinov2_state

    return adapt_hf_dinov2_state(state, source=source)


class _HFDinov2ViT(VisionTransformer):
    """timm's ViT that resamples its position embedding for other input sizes as transformers'
    ``Dinov2Embeddings`` does (bicubic to the new grid, no antialiasing). timm antialiases, which
    changes upsampled embeddings (224 → 256 px: up to 2e-2 on the output), so a model published
    for transformers would embed differently here than with its own code."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_img_size or self.cls_token is None or self.reg_token is not None:
            return super()._pos_embed(x)
        b, h, w, c = x.shape
        pos = timm.layers.resample_abs_pos_embed(
            self.pos_embed, new_size=[h, w], old_size=list(self.patch_embed.grid_size), antialias=False
        )
        return self.pos_drop(torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, -1, c)], dim=1) + pos)


def _hf_dinov2_vit_l16(**overrides: Any) -> nn.Module:
    """timm's ``vit_large_patch16_224`` recipe (1024-d, depth 24, 16 heads, GELU MLP ×4, qkv bias,
    LayerNorm eps 1e-6) with LayerScale, built as :class:`_HFDinov2ViT`."""
    args = {"img_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}
    return _HFDinov2ViT(**{**args, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True, **overrides})


# Phikon-v2: DINOv2 ViT-L/16 at 224 in transformers' Dinov2Model layout (model.safetensors; q/k/v
# fused on load), no registers, LayerScale, final LayerNorm, CLS of last_hidden_state 1024-d,
# ImageNet norm (TRIDENT Phikonv2InferenceEncoder; slide2vec phikon.py: patch 16, 0.5 µm/px).
_add(
    EncoderSpec(
        "phikon_v2",
        1024,
        224,
        0.5,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "cls",
        _hf_dinov2_vit_l16,
        "owkin/phikon-v2 model.safetensors",
        _adapt_hf_dinov2,
    )
)

# CONCH v1.5: ViT-L/16 trunk fed 448 px, attentional pooler + LayerNorm → 768-d, ImageNet norm
# (TRIDENT model_zoo/conchv1_5/conchv1_5.py; slide2vec conch.py: 448 px, patch 16, 0.5 µm/px).
_add(
    EncoderSpec(
        "conch_v1_5",
        768,
        448,
        0.5,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "module",
        lambda **kw: ConchV15Tower(**kw),
        "MahmoodLab/conchv1_5 pytorch_model_vision.bin",
        adapt_conch_state,
    )
)


# Tiny twins for tests: the token layout and pooling of a CLS-only encoder with patch 16 (UNI)
# and of a CLS ⊕ mean encoder with patch 14 and 4 registers (Virchow2), 48-d and 2 blocks deep.
_add(
    EncoderSpec(
        "uni_tiny",
        48,
        224,
        0.5,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "cls",
        _timm("vit_small_patch16_224", img_size=224, embed_dim=48, depth=2, num_heads=2, init_values=1e-5),
        "test twin of uni",
        tiny=True,
    )
)
_add(
    EncoderSpec(
        "virchow2_tiny",
        96,
        224,
        0.5,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "cls_mean",
        _timm(
            "vit_huge_patch14_224",
            img_size=224,
            embed_dim=48,
            depth=2,
            num_heads=2,
            init_values=1e-5,
            mlp_ratio=5.3375,
            reg_tokens=4,
            **_SWIGLU,
        ),
        "test twin of virchow2",
        tiny=True,
    )
)


def list_encoders(*, tiny: bool = False) -> list[str]:
    """The registered encoders; with ``tiny``, their test twins too."""
    return sorted(n for n, s in _SPECS.items() if tiny or not s.tiny)


def encoder_spec(name: str) -> EncoderSpec:
    if name not in _SPECS:
        raise ConfigError(f"unknown patch encoder {name!r}; known encoders: {', '.join(list_encoders(tiny=True))}")
    return _SPECS[name]


def create_encoder(name: str, **overrides: Any) -> PatchEncoder:
    """Build the named encoder with random weights (load the user's file with
    :func:`~hipt_ray.models.encoder_checkpoints.load_encoder_checkpoint`). Build it under
    ``with torch.device("meta"):`` to inspect its structure without allocating it;
    ``overrides`` go to the architecture (``depth=1``: a tiny twin whose embedding width and
    token layout are the real ones)."""
    spec = encoder_spec(name)
    return PatchEncoder(spec=spec, trunk=spec.build(**overrides))
