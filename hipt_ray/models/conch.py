"""CONCH v1.5's vision tower: a ViT-L/16 trunk fed 448 px plus its attentional pooler (768-d).

Facts from TRIDENT trident/patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py
(``CONCHVisionTower``, ``vit_large``, ``AttentionalPooler``, ``create_model_from_pretrained``):
the trunk is ViT-L/16 (1024-d, depth 24, 16 heads, MLP ratio 4, qkv bias, LayerScale with
init 1.0, LayerNorm eps 1e-6) built for 224 px (a 14×14 position grid); at 448 px the grid is
resized per input the DINO way (bicubic, ``scale_factor=(n + 0.1) / 14``), which is
:func:`hipt_ray.models.vit.resize_pos_embed`. A published ``trunk.pos_embed`` of another grid is
first resampled to 14×14 bilinearly (timm's ``resample_abs_pos_embed``, no antialias) when
loading, as the published loader does. The embedding is ``ln_contrast(attn_pool_contrast(tokens))``:
one learned query (768-d, 8 heads) attending over all 1 + 784 normed trunk tokens. Keys are the
published ``pytorch_model_vision.bin``'s: ``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from hipt_ray.models.vit import LN_EPS, resize_pos_embed

log = logging.getLogger(__name__)

TRUNK_GRID = 14  # the trunk is built for 224 px at patch 16


class ConchTrunk(VisionTransformer):
    """timm's ViT with CONCH v1.5's (DINO-style) position-embedding resize per input."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        b, rows, cols, c = x.shape  # NHWC from the patch embedding (dynamic_img_size)
        assert self.cls_token is not None and self.pos_embed is not None  # built with both
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, rows * cols, c)], dim=1)
        return self.pos_drop(x + resize_pos_embed(self.pos_embed, rows, cols))


class AttentionalPooler(nn.Module):
    """``n_queries`` learned queries cross-attending over the (layer-normed) tokens."""

    def __init__(self, *, d_model: int, context_dim: int, n_head: int, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.scale = (d_model // n_head) ** -0.5
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, d_model * 2, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, context_dim]`` → ``[B, n_queries, d_model]``."""
        b, n, _ = x.shape
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)  # (B, Q, D)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)  # (B, N, D) each

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)  # (B, h, T, d)

        q, k, v = heads(q) * self.scale, heads(k), heads(v)
        sim = q @ k.transpose(-2, -1)
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1])
        return self.to_out(out)


class ConchV15Tower(nn.Module):
    def __init__(self, *, depth: int = 24) -> None:
        super().__init__()
        self.trunk = ConchTrunk(
            img_size=224,
            patch_size=16,
            embed_dim=1024,
            depth=depth,
            num_heads=16,
            mlp_ratio=4.0,
            qkv_bias=True,
            init_values=1.0,
            num_classes=0,
            global_pool="token",
            class_token=True,
            dynamic_img_size=True,
            norm_layer=partial(nn.LayerNorm, eps=LN_EPS),
            act_layer=nn.GELU,
        )
        self.attn_pool_contrast = AttentionalPooler(d_model=768, context_dim=1024, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(768)

    @property
    def patch_embed(self) -> nn.Module:
        return self.trunk.patch_embed

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.trunk.num_prefix_tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.forward_features(x))[:, 0])


def adapt_conch_state(state: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """Resample a published ``trunk.pos_embed`` of another square grid to the trunk's 14×14 (the
    published loader's step); anything else is left for the strict check."""
    pos = state.get("trunk.pos_embed")
    if pos is None or pos.shape[1] == 1 + TRUNK_GRID**2:
        return state
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        return state  # not a square grid: the strict check names the shape
    log.info("%s: resampling trunk.pos_embed from %d×%d to %d×%d", source, side, side, TRUNK_GRID, TRUNK_GRID)
    resized = resample_abs_pos_embed(
        pos, new_size=[TRUNK_GRID, TRUNK_GRID], num_prefix_tokens=1, interpolation="bilinear", antialias=False
    )
    return {**state, "trunk.pos_embed": resized}
