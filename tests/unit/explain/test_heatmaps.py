"""Region attention maps (shapes, normalisation, shifted windows) and the heatmap command's files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hipt_ray.cli import main
from hipt_ray.models import create_model
from hipt_ray.slides.synthetic import make_slide, tissue_tile
from hipt_ray.viz.attention import percentile_map, region_attention, smoothed_attention, window_offsets

from ...conftest import TINY


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("hipt4k_tiny").eval()


def _region(side: int = 1024) -> np.ndarray:
    tile = tissue_tile(subtype=1, risk=0.7, seed=1)
    return np.tile(tile, (side // 512, side // 512, 1))[:side, :side].copy()


def test_attention_maps_sum_to_one_per_head_and_have_the_grid_shapes(model):
    att = region_attention(model, _region(1024))  # 4×4 patches of 256 px, 16×16 tokens each
    assert att.vit256.shape == (2, 64, 64) and att.vit4k.shape == (2, 4, 4)
    per_patch = att.vit256.reshape(2, 4, 16, 4, 16).sum(axis=(2, 4))
    np.testing.assert_allclose(per_patch, 1.0, rtol=1e-5)
    np.testing.assert_allclose(att.vit4k.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(att.hierarchical().sum(), 1.0, rtol=1e-5)
    assert att.vit256.std() > 0 and att.vit4k.std() > 0


def test_attention_matches_the_explicit_last_block(model):
    """The per-patch map is the last block's CLS row of an explicit softmax(q kᵀ) (renormalised
    over the tokens), laid out row-major."""
    region = _region(512)
    att = region_attention(model, region)
    from hipt_ray.models.hipt4k import normalize_uint8, patchify

    x = patchify(normalize_uint8(torch.from_numpy(region).unsqueeze(0)), 256)
    with torch.no_grad():
        a = model.vit256.get_last_selfattention(x)[:, :, 0, 1:]
    a = a / a.sum(-1, keepdim=True)
    # patch 1 is row 0, column 1: cells [0:16, 16:32]
    np.testing.assert_allclose(att.vit256[:, 0:16, 16:32], a[1].reshape(2, 16, 16).numpy(), rtol=1e-5, atol=1e-7)


def test_shifted_windows_see_different_crops(model):
    """Each window encodes its own crop: averaging differs from the unshifted map, and a
    single window reproduces it exactly."""
    offsets = window_offsets(256, 2)
    assert offsets == [0, 128]
    margin = offsets[-1]
    canvas = _region(1024 + 512)[: 1024 + margin, : 1024 + margin]
    single, n1 = smoothed_attention(model, canvas, (1024, 1024), margin, [margin])
    plain = region_attention(model, canvas[margin:, margin:])
    assert n1 == 1
    np.testing.assert_allclose(single.vit256, plain.vit256, rtol=1e-5)
    smooth, n4 = smoothed_attention(model, canvas, (1024, 1024), margin, offsets)
    assert n4 == 4 and smooth.vit256.shape == plain.vit256.shape
    # Cell (r, c) of the region is the mean of what each window's own crop gives at that place.
    r, c = 10, 37
    expected = np.mean(
        [
            region_attention(model, canvas[dy : dy + 1024, dx : dx + 1024]).vit256[
                :, r + (margin - dy) // 16, c + (margin - dx) // 16
            ]
            for dy in offsets
            for dx in offsets
        ],
        axis=0,
    )
    np.testing.assert_allclose(smooth.vit256[:, r, c], expected, rtol=1e-5)
    assert np.abs(smooth.vit256 - plain.vit256).max() > 0.05 * plain.vit256.std()
    # The 4K map of the smoothed result is no longer constant on 256 px blocks.
    block = smooth.vit4k[0, 8:24, 8:24]
    assert block.std() > 0


def test_percentile_map_is_a_rank_scale():
    v = np.array([[3.0, 1.0], [2.0, 10.0]])
    np.testing.assert_allclose(percentile_map(v), [[2 / 3, 0], [1 / 3, 1]])
    np.testing.assert_allclose(percentile_map(np.full((3, 3), 0.2)), 0.5)  # ties: no false ranking


def test_percentile_map_ranks_within_the_mask():
    v = np.array([[3.0, 1.0], [2.0, 10.0]])
    got = percentile_map(v, np.array([[True, True], [True, False]]))
    np.testing.assert_allclose(got[0], [1.0, 0.0])
    np.testing.assert_allclose(got[1, 0], 0.5)
    assert np.isnan(got[1, 1])


def test_padding_beyond_the_slide_edge_is_grey_not_attention(tmp_path, capsys):
    slide = make_slide(tmp_path / "e.tiff", width_um=700, height_um=700, mpp=0.5, seed=3, n_blobs=1)
    out = tmp_path / "hm"
    # a 512 px region at 1100,1000 of a 1400 px slide: 300 × 400 px of slide, the rest padding
    assert (
        main(
            [
                "heatmap",
                "--slide",
                slide.path,
                "--region",
                "1100,1000",
                "--out",
                str(out),
                "--shifts",
                "1",
                "--config",
                TINY,
                "tiling.region_px=512",
            ]
        )
        == 0
    )
    capsys.readouterr()
    maps = np.load(out / "e_1100_1000_attention.npz")
    assert (int(maps["valid_w"]), int(maps["valid_h"])) == (300, 400)
    tissue = maps["vit4k_tissue"]
    np.testing.assert_allclose(tissue.sum(axis=(1, 2)), 1.0, atol=1e-6)
    cell = 512 // tissue.shape[2]  # the tiny model's patch
    cols, rows = -(-300 // cell), -(-400 // cell)
    assert (tissue[:, :, cols:] == 0).all() and (tissue[:, rows:, :] == 0).all()
    assert (tissue[:, :rows, :cols] > 0).all()
    overlay = np.asarray(Image.open(out / "e_1100_1000_hierarchical_overlay.png")).astype(int)
    pad = overlay[:, 700:]  # display columns beyond 300/512 of 1024
    assert (pad == 150).all()  # flat grey
    inside = overlay[:700, :550]
    assert np.abs(inside[..., 0] - inside[..., 2]).max() > 20  # coloured by attention


def test_heatmap_command_writes_the_figures(tmp_path, capsys):
    slide = make_slide(
        tmp_path / "s.tiff", width_um=700, height_um=700, mpp=0.5, seed=2, subtype=1, risk=0.5, n_blobs=1
    )
    out = tmp_path / "hm"
    code = main(
        [
            "heatmap",
            "--slide",
            slide.path,
            "--region",
            "64,64",
            "--out",
            str(out),
            "--shifts",
            "2",
            "--config",
            TINY,
            "tiling.region_px=512",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    overlay = np.asarray(Image.open(out / "s_64_64_hierarchical_overlay.png"))
    assert overlay.shape == (1024, 1024, 3) and overlay.std() > 10
    for name in ("vit256", "vit4k", "hierarchical"):
        img = Image.open(out / f"s_64_64_{name}.png")
        assert img.width > 800 and img.height > 300
    maps = np.load(out / "s_64_64_attention.npz")
    assert maps["vit256"].shape == (2, 32, 32) and int(maps["windows"]) == 4
    assert main(["heatmap", "--slide", slide.path, "--region", "99999,5", "--out", str(out), "--config", TINY]) == 2
    assert "outside the slide" in capsys.readouterr().err
