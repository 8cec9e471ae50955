"""HIPT-4K: a region → 256 px patches (row-major) → ViT-256 in micro-batches → token grid →
ViT-4K → region embedding."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hipt_ray.models.encoders import PatchEncoder
from hipt_ray.models.vit import ViT4K, ViT256

# Inference normalisation of the published HIPT code: mean = std = 0.5 per channel.
PIXEL_MEAN = PIXEL_STD = 0.5


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` (as read from a slide) → float ``[B, 3, H, W]`` in [-1, 1].

    Run it on the model's device: it is the only per-pixel work between the reader and the model.
    """
    return _scale_(images.permute(0, 3, 1, 2).float())


def _scale_(x: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Pixel values 0–255 held in float → normalised, in place: HIPT's [-1, 1] by default, else
    ``(x / 255 − mean) / std`` with ``norm`` = (255·std, mean/std) per channel, ``[1, 3, 1, 1]``."""
    if norm is None:
        return x.div_(255.0 * PIXEL_STD).sub_(PIXEL_MEAN / PIXEL_STD)
    scale, shift = norm
    return x.div_(scale.to(x.device)).sub_(shift.to(x.device))


def _norm(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`_scale_`'s per-channel factors, None for HIPT's own (kept on the exact old path)."""
    if all(m == PIXEL_MEAN for m in mean) and all(s == PIXEL_STD for s in std):
        return None
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    return (255.0 * s).float(), (m / s).float()


def patchify(x: torch.Tensor, patch_px: int) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B·R·Cn, C, p, p]``: patch k of region b is row k // Cn, col k % Cn."""
    b, c, h, w = x.shape
    if h % patch_px or w % patch_px:
        raise ValueError(f"region {w}×{h} is not a multiple of the {patch_px} px patch size")
    rows, cols = h // patch_px, w // patch_px
    x = x.reshape(b, c, rows, patch_px, cols, patch_px)  # (B, C, R, p, Cn, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b * rows * cols, c, patch_px, patch_px)


def patchify_uint8(images: torch.Tensor, patch_px: int) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` → uint8 ``[B·R·Cn, 3, p, p]`` in :func:`patchify`'s patch order.

    Cutting the pixels before normalising moves a quarter of the bytes: a 4096² region is
    50 MB as uint8 and 200 MB as float.
    """
    return patchify(images.permute(0, 3, 1, 2), patch_px)


def default_micro_batch(device: str | torch.device = "cpu", configured: int | None = None) -> int:
    """Patches per ViT-256 forward, decided here only: ``model.micro_batch`` when set, else 256
    on a GPU (the bench/gpu.py optimum) and 32 on a CPU (larger batches gain nothing there)."""
    if configured:
        return configured
    return 256 if torch.device(device).type == "cuda" else 32


class HIPT4K(nn.Module):
    """A patch encoder over every patch (HIPT's ViT-256, or a registered foundation model such
    as UNI), ViT-4K over the resulting token grid.

    ``patch_px`` is what is cut from the region per patch, ``input_px`` what the encoder is fed
    (each patch resized when they differ; see :mod:`hipt_ray.models.geometry`); ``mean``/``std``
    the encoder's normalisation (HIPT's 0.5/0.5 by default). ``architecture`` records how it was
    built, for actors that rebuild it (:func:`hipt_ray.models.registry.create_hipt4k`).
    """

    def __init__(
        self,
        *,
        vit256: nn.Module,
        vit4k: ViT4K,
        patch_px: int = 256,
        micro_batch: int | None = None,
        input_px: int | None = None,
        mean: tuple[float, float, float] = (PIXEL_MEAN,) * 3,
        std: tuple[float, float, float] = (PIXEL_STD,) * 3,
    ) -> None:
        super().__init__()
        if vit4k.in_dim != vit256.embed_dim:
            raise ValueError(f"ViT-4K takes {vit4k.in_dim}-d tokens, ViT-256 gives {vit256.embed_dim}")
        # typed as any module: prepare_for_inference swaps in compiled or cast wrappers that
        # only run forward (get_attention needs the ViTs as built)
        self.vit256: nn.Module = vit256
        self.vit4k: nn.Module = vit4k
        self.patch_px, self.micro_batch = patch_px, default_micro_batch("cpu", micro_batch)
        self.input_px = input_px or patch_px
        self.mean, self.std = tuple(mean), tuple(std)
        self._norm = _norm(self.mean, self.std)
        self.embed_dim = vit4k.embed_dim
        self.architecture: dict = {}
        # > 0: a region's last ViT-256 batch is padded to a multiple of this many patches (the
        # padding's outputs dropped), so that a compiled ViT-256 sees a few batch shapes instead
        # of one per region size; per-sample layers make the kept outputs the same either way.
        self.pad_patches = 0

    def tokens256(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` → per-patch CLS tokens ``[B, N, D256]`` in row-major patch order."""
        return self._tokens(patchify(x, self.patch_px), x.shape[0])

    def _tokens(self, patches: torch.Tensor, b: int) -> torch.Tensor:
        tokens = torch.cat([self._vit256_padded(chunk) for chunk in patches.split(self.micro_batch)])
        return tokens.reshape(b, -1, tokens.shape[-1])

    def _vit256_padded(self, chunk: torch.Tensor) -> torch.Tensor:
        """ViT-256 over one micro-batch of patches, float or uint8 (normalised here)."""
        n, short = chunk.shape[0], -chunk.shape[0] % self.pad_patches if self.pad_patches else 0
        if short:
            chunk = torch.cat([chunk, chunk.new_zeros((short, *chunk.shape[1:]))])
        if chunk.dtype == torch.uint8:
            chunk = _scale_(chunk.float(), self._norm)
        if chunk.shape[-1] != self.input_px:  # geometry "resize": the cut patch → the encoder's input
            chunk = F.interpolate(
                chunk, size=(self.input_px, self.input_px), mode="bilinear", antialias=True, align_corners=False
            )
        return self.vit256(chunk)[:n]

    def normalize_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` → float ``[B, 3, H, W]`` normalised for this model's encoder
        (:func:`normalize_uint8` for HIPT's)."""
        return _scale_(images.permute(0, 3, 1, 2).float(), self._norm)

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patch tokens in the encoder's sequence (CLS, then registers)."""
        return int(getattr(self.vit256, "num_prefix_tokens", 1))

    @property
    def tokens_per_side(self) -> int:
        """Patch tokens per side of one encoder input (16 for HIPT's 256 px at patch 16)."""
        vit256 = self.vit256
        # a PatchEncoder knows its patch size; HIPT's ViT-256 has timm's PatchEmbed: (h, w)
        if isinstance(vit256, PatchEncoder):
            return self.input_px // vit256.patch_size
        size = getattr(vit256.patch_embed, "patch_size", (16, 16))
        return self.input_px // int(size[0])

    def grid(self, tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """``[B, N, D]`` → ``[B, D, rows, cols]`` (the ViT-4K input)."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, rows, cols)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Region embedding ``emb4k [B, 192]``, the patch tokens ``tokens256 [B, N, 384]`` and
        their mean ``mean256 [B, 384]``."""
        rows, cols = x.shape[-2] // self.patch_px, x.shape[-1] // self.patch_px
        return self._features(self.tokens256(x), rows, cols)

    def forward_uint8(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`forward_features` of uint8 ``[B, H, W, 3]`` pixels as read from a slide,
        normalised one micro-batch of patches at a time: the region is never held in float.
        Same outputs as ``forward_features(normalize_uint8(images))``, and faster (1.2–1.5× for
        the tiny model on a CPU, where the float copies of a whole region cost memory bandwidth).
        """
        rows, cols = images.shape[1] // self.patch_px, images.shape[2] // self.patch_px
        return self._features(self._tokens(patchify_uint8(images, self.patch_px), images.shape[0]), rows, cols)

    def _features(self, tokens: torch.Tensor, rows: int, cols: int) -> dict[str, torch.Tensor]:
        emb4k = self.vit4k(self.grid(tokens, rows, cols))
        return {"emb4k": emb4k, "tokens256": tokens, "mean256": tokens.mean(dim=1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["emb4k"]

    def get_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-block self-attention of both levels: ``[B·N, h, P + (input/patch size)², …]`` for
        the patches (row-major; P = :attr:`prefix_tokens`) and ``[B, h, 1 + N, 1 + N]`` for the
        regions. ``x`` is normalised as :meth:`normalize_uint8` does."""
        vit256, vit4k = self.vit256, self.vit4k
        if not (isinstance(vit256, ViT256 | PatchEncoder) and isinstance(vit4k, ViT4K)):
            raise TypeError(
                f"attention maps need the model as built, not one prepared for inference "
                f"(ViT-256 is a {type(vit256).__name__}, ViT-4K a {type(vit4k).__name__})"
            )
        rows, cols = x.shape[-2] // self.patch_px, x.shape[-1] // self.patch_px
        patches = patchify(x, self.patch_px)
        if self.input_px != self.patch_px:
            patches = F.interpolate(
                patches, size=(self.input_px, self.input_px), mode="bilinear", antialias=True, align_corners=False
            )
        attn256 = torch.cat([vit256.get_last_selfattention(c) for c in patches.split(self.micro_batch)])
        tokens = self.tokens256(x)
        attn4k = vit4k.get_last_selfattention(self.grid(tokens, rows, cols))
        return attn256, attn4k
