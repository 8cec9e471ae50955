"""ViT-256 (ViT-S/16 on 256 px patches) and ViT-4K (over the 16×16 grid of ViT-256 tokens),
numerically the published HIPT architecture with its parameter names.

Position embeddings are stored for a 14×14 grid (+ CLS), as in the DINO/HIPT checkpoints, and
resized per input exactly as the published code does: bicubic ``F.interpolate`` with
``scale_factor=((H + 0.1) / 14, (W + 0.1) / 14)`` (H, W = grid rows, columns). A 14×14 grid uses
the stored embedding as is.
"""

from __future__ import annotations

import math
from functools import partial
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

LN_EPS = 1e-6


def resize_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[1, 1 + n², D]`` → ``[1, 1 + rows·cols, D]`` by the published HIPT/DINO rule."""
    n = int(math.sqrt(pos_embed.shape[1] - 1))
    if rows == cols == n:
        return pos_embed
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    grid_pos = grid_pos.reshape(1, n, n, dim).permute(0, 3, 1, 2)  # (1, D, n, n)
    # The +0.1 avoids floating-point floor errors (facebookresearch/dino#8); the scale factor,
    # not the target size, sets the sampling grid, which is what the checkpoints were used with.
    grid_pos = F.interpolate(
        grid_pos.float(),
        scale_factor=((rows + 0.1) / n, (cols + 0.1) / n),
        mode="bicubic",
        align_corners=False,
    ).to(pos_embed.dtype)
    assert grid_pos.shape[-2:] == (rows, cols), grid_pos.shape
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)  # (1, rows·cols, D)
    return torch.cat([cls_pos, grid_pos], dim=1)


def last_block_attention(blocks: nn.ModuleList | nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run all but the last block on tokens ``x``; return the last block's softmax attention
    ``[B, heads, T, T]`` (computed explicitly, since fused attention never forms it)."""
    for blk in blocks[:-1]:
        x = blk(x)
    last = blocks[-1]
    # both ViTs build timm Blocks with timm's default Attention: its q, k are what is formed here
    assert isinstance(last, Block) and isinstance(last.attn, Attention), type(last)
    attn = last.attn
    y = last.norm1(x)
    b, t, _ = y.shape
    qkv = attn.qkv(y).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)  # (B, heads, T, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)


def set_fused_attention(model: nn.Module, fused: bool) -> None:
    """Switch every attention layer between ``F.scaled_dot_product_attention`` (fused) and the
    published code's explicit ``softmax(q @ kᵀ · scale) @ v``."""
    for m in model.modules():
        if isinstance(m, Attention):
            # timm declares fused_attn Final for TorchScript (a constant once scripted); in eager
            # mode it is a per-layer switch, and these models are never scripted
            m.fused_attn = fused  # type: ignore[misc]


class ViT256(VisionTransformer):
    """ViT on 256 px patches (ViT-S/16 for HIPT). ``forward`` → CLS after the final norm."""

    def __init__(
        self,
        *,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        patch_size: int = 16,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__(
            img_size=224,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            num_classes=0,
            global_pool="token",
            class_token=True,
            dynamic_img_size=True,
            norm_layer=partial(nn.LayerNorm, eps=LN_EPS),
            act_layer=nn.GELU,
            drop_path_rate=drop_path_rate,
        )

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        b, rows, cols, c = x.shape  # NHWC from the patch embedding (dynamic_img_size)
        # both exist: built with class_token=True and timm's learned position embedding
        assert self.cls_token is not None and self.pos_embed is not None
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, rows * cols, c)], dim=1)
        return self.pos_drop(x + resize_pos_embed(self.pos_embed, rows, cols))

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` → ``[B, 1 + (H/16)(W/16), D]`` with CLS and position embeddings."""
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, heads, T, T]`` attention of the last block (T = 1 + patches)."""
        return last_block_attention(self.blocks, self.prepare_tokens(x))


class ViT4K(nn.Module):
    """ViT over a grid of ViT-256 CLS tokens: ``[B, in_dim, H, W]`` → ``[B, embed_dim]``."""

    def __init__(
        self,
        *,
        in_dim: int = 384,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 6,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pos_grid: int = 14,
    ) -> None:
        super().__init__()
        self.in_dim, self.embed_dim, self.num_features = in_dim, embed_dim, embed_dim
        self.phi = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.GELU(), nn.Dropout(drop_rate))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid * pos_grid + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=4.0,
                qkv_bias=True,
                proj_drop=drop_rate,
                drop_path=dpr[i],
                # timm types norm_layer as a class, but only calls it (its own models pass partials)
                norm_layer=cast(type[nn.Module], partial(nn.LayerNorm, eps=LN_EPS)),
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def prepare_tokens(self, grid: torch.Tensor) -> torch.Tensor:
        b, _, rows, cols = grid.shape
        x = self.phi(grid.flatten(2).transpose(1, 2))  # (B, rows·cols, D), row-major
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        return self.pos_drop(x + resize_pos_embed(self.pos_embed, rows, cols))

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = self.prepare_tokens(grid)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]

    def get_last_selfattention(self, grid: torch.Tensor) -> torch.Tensor:
        """``[B, heads, T, T]`` attention of the last block (T = 1 + rows·cols)."""
        return last_block_attention(self.blocks, self.prepare_tokens(grid))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
