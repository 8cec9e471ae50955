"""Feature preprocessing for slide-level heads, fitted on the training cases of one fold only.

The transform is a module with buffers (``mean``, ``scale``, optional ``proj``) that the head runs
first, so it is saved in the head's ``state_dict`` (``prep.*``) and every later use of the head —
out-of-fold predictions, slide heatmaps — applies exactly what training saw.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hipt_ray.config import ConfigError


class FeatureTransform(nn.Module):
    """``((x − mean) / scale) @ proj``: standardisation, then PCA (whitened when ``whiten``)."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, proj: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("scale", scale.float())
        self.register_buffer("proj", proj.float() if proj is not None else torch.empty(0))

    @property
    def out_dim(self) -> int:
        return int(self.proj.shape[1]) if self.proj.numel() else int(self.mean.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.scale
        return x @ self.proj if self.proj.numel() else x

    @classmethod
    def fit(
        cls, rows: torch.Tensor, *, standardize: bool = True, pca: int | None = None, whiten: bool = False
    ) -> FeatureTransform | None:
        """Fitted on ``rows`` ``[N, D]`` (every region of the training cases); None when there is
        nothing to do (no standardisation, no PCA)."""
        if not standardize and not pca:
            return None
        rows = rows.double()
        d = rows.shape[1]
        mean = rows.mean(0) if standardize or pca else torch.zeros(d, dtype=rows.dtype)
        scale = rows.std(0).clamp_min(1e-6) if standardize else torch.ones(d, dtype=rows.dtype)
        proj = None
        if pca:
            k = min(int(pca), d, rows.shape[0] - 1)
            if k < 1:
                raise ConfigError(f"heads.pca={pca}: the training part has {rows.shape[0]} regions, too few for PCA")
            z = (rows - mean) / scale
            _, s, vt = torch.linalg.svd(z, full_matrices=False)
            proj = vt[:k].T  # [D, k]
            if whiten:
                var = (s[:k] ** 2) / max(1, rows.shape[0] - 1)
                proj = proj / var.sqrt().clamp_min(1e-6)
        return cls(mean, scale, proj)

    @classmethod
    def from_state_dict(cls, state: dict, prefix: str = "prep.") -> FeatureTransform | None:
        """The (unfitted) transform a saved head's ``state_dict`` holds, to load the rest into;
        None for a head saved without preprocessing."""
        if f"{prefix}mean" not in state:
            return None
        proj = state[f"{prefix}proj"]
        return cls(state[f"{prefix}mean"], state[f"{prefix}scale"], proj if proj.numel() else None)
