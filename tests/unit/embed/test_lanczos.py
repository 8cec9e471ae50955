"""The GPU route's Lanczos (torch, run here on the CPU) gives Pillow's pixels bit for bit for the
square resizes the reader makes (TCGA's 40× and 20× ratios among them), on noise and on smooth
images; a non-square resize stays within 2 levels on smooth images (see the module docstring)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from hipt_ray.embed.lanczos import coefficients, resize


def _pil(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize(size, Image.Resampling.LANCZOS))


def _smooth(rng, h: int, w: int) -> np.ndarray:
    noise = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return np.array(noise.filter(ImageFilter.GaussianBlur(2)))


# (box, region): a 40× slide at 0.2527 µm/px read at 0.5 (×1.979, as for 8105² → 4096²), a 20×
# slide at 0.504 (×0.992, upsampling), 0.7 → 0.5, a tiny box, an exact 2×, one pixel
SQUARE = [(2026, 1024), (1016, 1024), (717, 512), (37, 16), (512, 256), (5, 1), (1, 3)]


@pytest.mark.parametrize(("box", "out"), SQUARE)
def test_square_resizes_are_pillows_bit_for_bit(box, out):
    rng = np.random.default_rng(box * 7 + out)
    for a in (rng.integers(0, 256, (box, box, 3), dtype=np.uint8), _smooth(rng, box, box)):
        got = resize(torch.from_numpy(a), (out, out))
        assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), _pil(a, (out, out)))


def test_many_random_square_sizes():
    rng = np.random.default_rng(0)
    for _ in range(60):
        n, o = (int(v) for v in rng.integers(1, 160, 2))
        a = rng.integers(0, 256, (n, n, 3), dtype=np.uint8)
        assert np.array_equal(resize(torch.from_numpy(a), (o, o)).numpy(), _pil(a, (o, o))), (n, o)


def test_non_square_resizes_stay_within_two_levels_on_smooth_images():
    rng = np.random.default_rng(1)
    for _ in range(20):
        h, w, oh, ow = (int(v) for v in rng.integers(20, 200, 4))
        a = _smooth(rng, h, w)
        got = resize(torch.from_numpy(a), (ow, oh)).numpy().astype(int)
        assert got.shape == (oh, ow, 3) and np.abs(got - _pil(a, (ow, oh)).astype(int)).max() <= 2


def test_coefficients_are_pillows_fixed_point_and_sum_to_one():
    index, weight = coefficients(8105, 4096)  # the 40× → 20× read
    assert index.shape == weight.shape == (4096, 13)  # ceil(3 · 1.979) · 2 + 1 taps
    sums = weight.sum(axis=1)
    assert (np.abs(sums - (1 << 22)) <= 13).all()  # 1.0 in 22-bit fixed point, up to rounding
    assert index.min() >= 0 and index.max() < 8105 and weight.min() < 0  # Lanczos has negative lobes


def test_equal_size_is_unchanged_and_a_bad_input_is_refused():
    a = torch.randint(0, 256, (9, 7, 3), dtype=torch.uint8)
    assert torch.equal(resize(a, (7, 9)), a)
    with pytest.raises(ValueError, match="uint8"):
        resize(a.float(), (3, 3))
