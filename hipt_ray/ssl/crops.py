"""Multi-crop views for the two pretraining stages.

Stage 1 (ViT-256, pixels): DINO's augmentation — 2 global crops (224 px, scale 0.4–1) and
``n_local`` local crops (96 px, scale 0.05–0.4) with flips, colour jitter, grayscale, Gaussian
blur (p = 1.0 / 0.1 / 0.5 for global 1 / global 2 / locals) and solarisation (p = 0.2, second
global crop only), normalised with mean = std = 0.5 as at inference.

Stage 2 (ViT-4K, token grids ``[D, 16, 16]``): 2 global crops of 14×14 tokens and ``n_local``
local crops of 6×6 at random positions, with random flips (and optional 90° rotations); no
colour augmentation (these are features, not pixels).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

MEAN = STD = (0.5, 0.5, 0.5)


class PixelCrops:
    """uint8 ``[3, H, W]`` patch → list of float crops (2 global, then ``n_local`` local)."""

    def __init__(
        self,
        *,
        global_px: int = 224,
        local_px: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
    ) -> None:
        flip_jitter = [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]

        def blur(p: float) -> v2.Transform:
            return v2.RandomApply([v2.GaussianBlur(kernel_size=23, sigma=(0.1, 2.0))], p=p)

        bicubic = v2.InterpolationMode.BICUBIC
        self.global1 = v2.Compose(
            [
                v2.RandomResizedCrop(global_px, scale=global_scale, interpolation=bicubic, antialias=True),
                *flip_jitter,
                blur(1.0),
                *normalize,
            ]
        )
        self.global2 = v2.Compose(
            [
                v2.RandomResizedCrop(global_px, scale=global_scale, interpolation=bicubic, antialias=True),
                *flip_jitter,
                blur(0.1),
                v2.RandomSolarize(threshold=128, p=0.2),
                *normalize,
            ]
        )
        self.local = v2.Compose(
            [
                v2.RandomResizedCrop(local_px, scale=local_scale, interpolation=bicubic, antialias=True),
                *flip_jitter,
                blur(0.5),
                *normalize,
            ]
        )
        self.n_local = n_local

    def __call__(self, patch: torch.Tensor) -> list[torch.Tensor]:
        return [self.global1(patch), self.global2(patch)] + [self.local(patch) for _ in range(self.n_local)]


class GridCrops:
    """Token grid ``[D, H, W]`` → list of crops: 2 of ``global_size``², then ``n_local`` of
    ``local_size``², each at a random position with random flips (and 90° turns if asked)."""

    def __init__(
        self,
        *,
        global_size: int = 14,
        local_size: int = 6,
        n_local: int = 8,
        rotate: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.rotate, self.g = rotate, generator

    def _rand(self, high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=self.g))

    def crop(self, grid: torch.Tensor, size: int) -> torch.Tensor:
        _, h, w = grid.shape
        if size > min(h, w):
            raise ValueError(f"a {size}×{size} crop does not fit a {h}×{w} token grid")
        top, left = self._rand(h - size + 1), self._rand(w - size + 1)
        out = grid[:, top : top + size, left : left + size]
        if self._rand(2):
            out = out.flip(-1)
        if self._rand(2):
            out = out.flip(-2)
        if self.rotate:
            out = torch.rot90(out, self._rand(4), dims=(-2, -1))
        return out.contiguous()

    def __call__(self, grid: torch.Tensor) -> list[torch.Tensor]:
        return [self.crop(grid, self.global_size) for _ in range(2)] + [
            self.crop(grid, self.local_size) for _ in range(self.n_local)
        ]
