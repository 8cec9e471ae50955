"""Slide-level heads. Each takes one bag (all regions of a case) and returns logits ``[1, C]``
and the attention over the bag's regions ``[M]`` (uniform for the mean-pool head).

``forward_padded(x [B, M, D], mask [B, M])`` runs a batch of bags zero-padded to one length, the
padding masked out of attention, pooling and the transformer's keys: the same outputs as ``B``
calls of ``forward`` (to float rounding), in one call — a batch of bags a step costs about what
one bag does (a step on these small bags is mostly per-call overhead). :func:`forward_bags` picks
the path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hipt_ray.models import create_model


class GatedAttention(nn.Module):
    """Gated attention scores (Ilse et al.): ``c(tanh(a(x)) ⊙ sigmoid(b(x)))``; parameter names
    of the published ``Attn_Net_Gated`` (``attention_a.0``, ``attention_b.0``, ``attention_c``)."""

    def __init__(self, *, dim: int, hidden: int, dropout: float = 0.25) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, dim]`` → unnormalised scores ``[M]``."""
        return self.attention_c(self.attention_a(x) * self.attention_b(x)).squeeze(-1)


class HIPTLGP(nn.Module):
    """HIPT's global aggregator (the published ``HIPT_LGP_FC``, same parameter names).

    Input: ``emb4k [M, 192]``, or with ``local_vit`` the patch tokens ``tokens256 [M, 256, 384]``
    which the (frozen or fine-tuned) ViT-4K turns into region embeddings first.
    """

    def __init__(
        self,
        *,
        n_classes: int,
        dim: int = 192,
        local_vit: str | None = None,
        local_in_dim: int | None = None,
        freeze_local: bool = True,
        dropout: float = 0.25,
        n_heads: int = 3,
        n_layers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.local_vit = None
        if local_vit:  # random weights: the builder (heads.fit.build_head) loads a checkpoint into it
            with torch.random.fork_rng():  # the same random ViT-4K in every fold when no weights are given
                torch.manual_seed(seed)
                # its input: the width of the patch encoder that wrote the tokens (HIPT's 384 by default)
                self.local_vit = create_model(local_vit, **({"in_dim": local_in_dim} if local_in_dim else {}))
        self.freeze_local = freeze_local
        if self.local_vit is not None and freeze_local:
            self.local_vit.requires_grad_(False)
        # heads.features.FeatureTransform on the region embeddings (emb4k, or the frozen ViT-4K's)
        self.prep: nn.Module = nn.Identity()
        self.global_phi = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.global_transformer = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(
                d_model=dim, nhead=n_heads, dim_feedforward=dim, dropout=dropout, activation="relu"
            ),
            num_layers=n_layers,
            enable_nested_tensor=False,
        )
        self.global_attn_pool = GatedAttention(dim=dim, hidden=dim, dropout=dropout)
        self.global_rho = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(dim, n_classes)

    def train(self, mode: bool = True) -> HIPTLGP:
        super().train(mode)
        if self.local_vit is not None and self.freeze_local:
            self.local_vit.eval()  # a frozen ViT-4K keeps inference behaviour (no dropout)
        return self

    def embed_regions(self, bag: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Patch tokens → region embeddings with the local ViT-4K: ``[M, 256, 384]`` (square,
        row-major) or a list of ``[384, rows, cols]`` grids (regions of different sizes)."""
        if isinstance(bag, torch.Tensor):
            m, n, d = bag.shape
            side = int(n**0.5)
            bag = list(bag.transpose(1, 2).reshape(m, d, side, side))
        by_shape: dict[tuple, list[int]] = {}
        for i, grid in enumerate(bag):
            by_shape.setdefault(tuple(grid.shape), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(bag)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_local):
            for idx in by_shape.values():
                for j, emb in zip(idx, self.local_vit(torch.stack([bag[i] for i in idx]))):
                    out[j] = emb
        return torch.stack(out)  # (M, 192)

    def forward(self, bag: torch.Tensor | list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        bag = self.prep(self.embed_regions(bag) if self.local_vit is not None else bag)
        h = self.global_phi(bag)
        h = self.global_transformer(h.unsqueeze(1)).squeeze(1)  # sequence of M regions, batch 1
        attn = F.softmax(self.global_attn_pool(h), dim=0)  # (M,)
        slide = self.global_rho(attn.unsqueeze(0) @ h)  # (1, dim)
        return self.classifier(slide), attn

    def forward_padded(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Region embeddings ``[B, M, D]`` (not tokens: a local ViT-4K takes bags one by one)."""
        if self.local_vit is not None:
            raise ValueError("forward_padded takes region embeddings; a head with a local ViT-4K runs bag by bag")
        h = self.global_phi(self.prep(x))
        h = self.global_transformer(h.transpose(0, 1), src_key_padding_mask=~mask).transpose(0, 1)
        attn = _masked_softmax(self.global_attn_pool(h), mask)  # (B, M)
        slide = self.global_rho(torch.bmm(attn.unsqueeze(1), h).squeeze(1))  # (B, dim)
        return self.classifier(slide), attn


class ABMIL(nn.Module):
    """Gated-attention MIL: embed → gated attention pooling → classifier."""

    def __init__(self, *, n_classes: int, dim: int = 192, hidden: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        self.prep: nn.Module = nn.Identity()
        self.phi = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn = GatedAttention(dim=hidden, hidden=hidden, dropout=dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.phi(self.prep(bag))
        attn = F.softmax(self.attn(h), dim=0)
        return self.classifier(attn.unsqueeze(0) @ h), attn

    def forward_padded(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.phi(self.prep(x))
        attn = _masked_softmax(self.attn(h), mask)
        return self.classifier(torch.bmm(attn.unsqueeze(1), h).squeeze(1)), attn


class MeanMLP(nn.Module):
    """Mean of the bag → MLP."""

    def __init__(self, *, n_classes: int, dim: int = 192, hidden: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        self.prep: nn.Module = nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes))

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = torch.full((bag.shape[0],), 1.0 / bag.shape[0], device=bag.device)
        return self.mlp(self.prep(bag).mean(dim=0, keepdim=True)), attn

    def forward_padded(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = mask.float() / mask.sum(1, keepdim=True)
        return self.mlp(torch.bmm(attn.unsqueeze(1), self.prep(x)).squeeze(1)), attn


HEADS = {"hipt_lgp": HIPTLGP, "abmil": ABMIL, "mean_mlp": MeanMLP}


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)


def pad_bags(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags ``[M_i, D]`` → zeros-padded ``[B, max M, D]`` and ``mask [B, max M]`` (True: a region)."""
    lengths = torch.tensor([len(b) for b in bags])
    x = torch.nn.utils.rnn.pad_sequence(bags, batch_first=True)
    return x, torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)


def forward_bags(head: nn.Module, bags: list) -> torch.Tensor:
    """Logits ``[B, C]`` of ``B`` bags: one padded call, or bag by bag where a bag is not a matrix
    of region embeddings (a head that runs its own ViT-4K over tokens)."""
    if len(bags) > 1 and all(isinstance(b, torch.Tensor) and b.dim() == 2 for b in bags):
        return head.forward_padded(*pad_bags(bags))[0]
    return torch.cat([head(b)[0] for b in bags])


def create_head(name: str, **kwargs) -> nn.Module:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; known heads: {', '.join(sorted(HEADS))}")
    return HEADS[name](**kwargs)
