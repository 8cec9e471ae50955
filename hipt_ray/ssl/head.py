"""DINO projection head and the multi-crop wrapper."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DINOHead(nn.Module):
    """MLP (``nlayers`` linear layers, GELU) → bottleneck → L2-normalise → weight-normalised
    linear layer to ``out_dim`` prototypes, whose gain is fixed at 1 when ``norm_last_layer``."""

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


def cancel_last_layer_gradients(head: nn.Module, epoch: int, freeze_epochs: int = 1) -> None:
    """DINO keeps the prototypes fixed during the first ``freeze_epochs`` (call after backward)."""
    if epoch >= freeze_epochs:
        return
    for name, p in head.named_parameters():
        if "last_layer" in name:
            p.grad = None


class MultiCrop(nn.Module):
    """Backbone + head over a list of crops: consecutive crops of equal size are batched
    together through the backbone, then all features go through the head at once.

    Returns ``[n_crops · B, out_dim]``, crop-major (crop 0's batch first).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(feats))
