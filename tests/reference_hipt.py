"""An independent, functional re-statement of the published HIPT forward pass, for tests.

It works on plain state dicts with explicit (naive) attention, the published position-embedding
rule and the published way of cutting a region into patches and folding ViT-256 outputs back
into a grid (unfold → ``(b p1 p2) c w h`` → ``reshape(w, h, D).transpose(0, 1).transpose(0, 2)``),
so that it shares no code with ``hipt_ray.models``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-6


def _ln(x, sd, p):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps=EPS)


def _lin(x, sd, p):
    return x @ sd[p + ".weight"].T + sd[p + ".bias"]


def _block(x, sd, p, heads, return_attention=False):
    b, n, c = x.shape
    y = _ln(x, sd, p + ".norm1")
    qkv = _lin(y, sd, p + ".attn.qkv").reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    if return_attention:
        return attn
    o = _lin((attn @ v).transpose(1, 2).reshape(b, n, c), sd, p + ".attn.proj")
    x = x + o
    h = F.gelu(_lin(_ln(x, sd, p + ".norm2"), sd, p + ".mlp.fc1"))
    return x + _lin(h, sd, p + ".mlp.fc2")


def _pos(pos_embed, w0, h0, npatch):
    n_stored = pos_embed.shape[1] - 1
    if npatch == n_stored and w0 == h0:
        return pos_embed
    side = int(math.sqrt(n_stored))
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((w0 + 0.1) / side, (h0 + 0.1) / side), mode="bicubic")
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def _depth(sd):
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))


def _encoder(t, sd, heads, return_attention):
    depth = _depth(sd)
    for i in range(depth):
        if return_attention and i == depth - 1:
            return _block(t, sd, f"blocks.{i}", heads, return_attention=True)
        t = _block(t, sd, f"blocks.{i}", heads)
    return _ln(t, sd, "norm")[:, 0]


def vit256(sd, x, heads, *, return_attention=False):
    b, _, w, h = x.shape
    patch = sd["patch_embed.proj.weight"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], dim=1)
    t = t + _pos(sd["pos_embed"], w // patch, h // patch, t.shape[1] - 1)
    return _encoder(t, sd, heads, return_attention)


def vit4k(sd, grid, heads, *, return_attention=False):
    b, _, w, h = grid.shape
    t = F.gelu(_lin(grid.flatten(2, 3).transpose(1, 2), sd, "phi.0"))
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], dim=1)
    t = t + _pos(sd["pos_embed"], w, h, t.shape[1] - 1)
    return _encoder(t, sd, heads, return_attention)


def hipt4k(sd256, sd4k, x, heads256, heads4k):
    """One region ``[1, 3, W, H]`` (the published code's naming) → ``[1, D4k]``."""
    _, c, w, h = x.shape
    w256, h256 = w // 256, h // 256
    b = x.unfold(2, 256, 256).unfold(3, 256, 256)  # [1, c, p1, p2, 256, 256]
    b = b.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, 256, 256)  # (b p1 p2) c w h
    cls256 = vit256(sd256, b, heads256)
    dim = cls256.shape[-1]
    grid = cls256.reshape(w256, h256, dim).transpose(0, 1).transpose(0, 2).unsqueeze(0)
    return vit4k(sd4k, grid, heads4k)
