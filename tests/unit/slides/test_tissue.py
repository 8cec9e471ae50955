import numpy as np
import pytest
from PIL import Image

from hipt_ray.config import TissueConfig
from hipt_ray.slides import synthetic
from hipt_ray.slides.reader import Slide
from hipt_ray.slides.tissue import is_grayscale, tissue_mask, tissue_method


def _iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


@pytest.mark.parametrize("seed, subtype, n_blobs", [(20, 0, 1), (21, 1, 2), (22, 2, 3), (23, 0, 3)])
def test_tissue_mask_matches_ground_truth(tmp_path, seed, subtype, n_blobs):
    s = synthetic.make_slide(
        tmp_path / "s.tiff", width_um=4000, height_um=3000, seed=seed, subtype=subtype, risk=0.5, n_blobs=n_blobs
    )
    with Slide(s.path) as slide:
        rgb, mpp = slide.read_lowres(8.0)
    mask, _ = tissue_mask(rgb, mpp, TissueConfig())
    found = np.asarray(Image.fromarray(mask).resize(s.mask.shape[::-1], Image.Resampling.NEAREST))
    assert s.mask.mean() > 0.05
    assert _iou(found, s.mask) >= 0.9


def test_blank_glass_has_no_tissue(slide_set):
    with Slide(str(slide_set["blank"])) as slide:
        rgb, mpp = slide.read_lowres(8.0)
    mask, threshold = tissue_mask(rgb, mpp, TissueConfig())
    assert mask.sum() == 0 and threshold >= TissueConfig().min_saturation


def test_small_specks_are_removed_and_holes_filled():
    rgb = np.full((200, 200, 3), 240, np.uint8)
    rgb[50:150, 50:150] = (150, 60, 120)  # a 800 µm square of tissue at 8 µm/px
    rgb[95:105, 95:105] = 240  # a hole
    rgb[10:12, 10:12] = (150, 60, 120)  # dust: 16×16 µm
    mask, _ = tissue_mask(rgb, 8.0, TissueConfig())
    assert mask[100, 100] and not mask[11, 11] and mask.sum() == pytest.approx(100 * 100, rel=0.02)


def test_a_grayscale_slide_is_found_by_luminance(tmp_path):
    rgb, gt = synthetic.render(8000, 6000, mpp=0.5, seed=24, n_blobs=2)
    gray = np.repeat(np.round(rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None], 3, axis=-1)
    synthetic.write_slide(tmp_path / "gray.tiff", gray, mpp=0.5)
    with Slide(str(tmp_path / "gray.tiff")) as slide:
        low, mpp = slide.read_lowres(8.0)
    assert is_grayscale(low) and tissue_method(low, TissueConfig()) == "luminance"
    sat_mask, _ = tissue_mask(low, mpp, TissueConfig(method="saturation"))
    assert sat_mask.mean() < 0.01  # saturation sees nothing on a slide without colour
    mask, threshold = tissue_mask(low, mpp, TissueConfig())
    found = np.asarray(Image.fromarray(mask).resize(gt.shape[::-1], Image.Resampling.NEAREST))
    assert _iou(found, gt) >= 0.85 and 0.12 <= threshold <= 0.5
    # blank gray glass stays empty, and colour slides keep the saturation rule
    glass = np.full_like(low, 236) + np.random.default_rng(0).integers(0, 3, low.shape[:2], dtype=np.uint8)[..., None]
    assert tissue_mask(glass, mpp, TissueConfig())[0].sum() == 0
    colour, _ = synthetic.render(800, 600, mpp=8.0, seed=25)
    assert tissue_method(colour, TissueConfig()) == "saturation"


def test_stage1_patches_of_a_grayscale_region_are_kept_where_there_is_tissue():
    from hipt_ray.data.pretrain import _patch_rows

    img = np.full((512, 512, 3), 238, np.uint8)
    img[:, :256] = 120  # the left column of patches is tissue, gray
    rows = _patch_rows(
        {"error": "", "image": img, "region_index": 0, "slide_id": "g"},
        patch_px=256,
        per_region=4,
        min_tissue=0.5,
        threshold=0.1,
        seed=0,
    )
    assert len(rows) == 2 and all(r["patch"].mean() < 130 for r in rows)
