import numpy as np
import pytest

from hipt_ray.config import TilingConfig
from hipt_ray.slides.grid import patch_tissue_fractions, region_grid, region_to_patches


def test_grid_at_20x_with_edge_padding():
    regions = region_grid((10000, 5000), 0.5, TilingConfig())
    assert [(r.x, r.y) for r in regions] == [(0, 0), (4096, 0), (8192, 0), (0, 4096), (4096, 4096), (8192, 4096)]
    last = regions[-1]
    assert (last.valid_w, last.valid_h) == (10000 - 8192, 5000 - 4096)
    assert (last.read_w, last.read_h) == (2048, 1024)  # padded to the next multiple of 256
    assert regions[0].read_w == regions[0].valid_w == 4096


def test_grid_at_40x_covers_8192_level0_px():
    regions = region_grid((20000, 9000), 0.25, TilingConfig())
    assert regions[1].x == 8192 and regions[0].level0_w == 8192 and regions[0].read_w == 4096
    assert len(regions) == 3 * 2


def test_slide_smaller_than_a_region_gives_one_padded_region():
    (r,) = region_grid((3000, 2000), 0.5, TilingConfig())
    assert (r.valid_w, r.valid_h, r.read_w, r.read_h) == (3000, 2000, 3072, 2048)


def test_overlap_and_tissue_threshold():
    tiling = TilingConfig(overlap=0.5)
    assert [r.x for r in region_grid((8192, 4096), 0.5, tiling)] == [0, 2048, 4096]
    mask = np.zeros((64, 128), bool)  # 8192×4096 px at 0.5 µm/px → 128×64 at 32 µm/px
    mask[:, 64:] = True  # tissue only in the right half
    kept = region_grid((8192, 4096), 0.5, TilingConfig(min_tissue_fraction=0.5), mask, 32.0)
    assert [(r.x, r.tissue_fraction) for r in kept] == [(4096, 1.0)]


def test_patches_are_row_major():
    region = np.zeros((512, 768, 3), np.uint8)
    for k in range(6):
        r, c = divmod(k, 3)
        region[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256] = k
    patches = region_to_patches(region, 256)
    assert patches.shape == (6, 3, 256, 256)
    assert [int(p.mean()) for p in patches] == list(range(6))
    full = region_to_patches(np.zeros((4096, 4096, 3), np.uint8), 256)
    assert full.shape == (256, 3, 256, 256)
    with pytest.raises(ValueError):
        region_to_patches(np.zeros((300, 256, 3), np.uint8), 256)


def test_patch_tissue_fractions():
    tiling = TilingConfig(region_px=1024)
    mask = np.zeros((16, 16), bool)  # 1024 px at 0.5 µm/px = 512 µm = 16 px at 32 µm/px
    mask[:, :4] = True  # the first patch column
    (r,) = region_grid((1024, 1024), 0.5, tiling, mask, 32.0)
    frac = patch_tissue_fractions(r, mask, 32.0, tiling, 0.5)
    assert frac.reshape(4, 4)[:, 0].tolist() == [1.0] * 4 and frac.reshape(4, 4)[:, 1:].sum() == 0
