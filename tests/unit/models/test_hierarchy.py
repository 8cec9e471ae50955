"""The hierarchy over any patch encoder (#29 item 2): composition, region geometry, model ids and
the config errors, on the tiny twins (uni_tiny: CLS, patch 16; virchow2_tiny: CLS ⊕ mean, patch
14, 4 registers) and on HIPT's own ViT-256."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hipt_ray.config import ConfigError, HeadsConfig, load_config
from hipt_ray.heads.cohort import Cohort
from hipt_ray.heads.fit import build_head
from hipt_ray.models import create_model
from hipt_ray.models.encoders import PatchEncoder, create_encoder, list_encoders
from hipt_ray.models.geometry import apply_geometry, resolve_geometry
from hipt_ray.models.loading import architecture, build_model
from hipt_ray.models.registry import create_hipt4k

from ...conftest import TINY


def _cfg(*overrides: str):
    return load_config(files=[TINY], overrides=list(overrides))


def _region(px: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, px, px, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _normalised(enc: PatchEncoder, patch: torch.Tensor) -> torch.Tensor:
    """uint8 ``[h, w, 3]`` → ``[1, 3, h, w]`` normalised with the encoder's own mean/std."""
    mean, std = torch.tensor(enc.mean).view(1, 3, 1, 1), torch.tensor(enc.std).view(1, 3, 1, 1)
    return (patch.permute(2, 0, 1)[None].float() / 255 - mean) / std


def test_tiny_twins_are_registered_beside_the_real_encoders_not_among_them():
    assert {"uni_tiny", "virchow2_tiny"} <= set(list_encoders(tiny=True))
    assert not {"uni_tiny", "virchow2_tiny"} & set(list_encoders())
    assert create_encoder("virchow2_tiny").num_prefix_tokens == 5  # CLS + 4 registers


@pytest.mark.parametrize("name", ["uni_tiny", "virchow2_tiny"])
def test_vit4k_takes_the_encoders_width_and_each_token_is_the_encoders_embedding(name):
    cfg = apply_geometry(_cfg(f"model.patch_encoder={name}", "tiling.region_px=512"))
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    enc = model.vit256
    assert isinstance(enc, PatchEncoder) and model.vit4k.in_dim == enc.embed_dim == create_encoder(name).embed_dim
    p = cfg.tiling.patch_px
    assert p == 224 and cfg.tiling.region_px == 2 * 224  # native: 2 × 2 patches of the encoder's input
    img = _region(2 * p)
    with torch.no_grad():
        out = model.forward_uint8(img)
        k = 3  # row 1, col 1: patches are row-major
        ref = enc(_normalised(enc, img[0, p:, p:]))
    assert out["tokens256"].shape == (1, 4, enc.embed_dim) and out["emb4k"].shape == (1, model.vit4k.embed_dim)
    torch.testing.assert_close(out["tokens256"][0, k], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["mean256"], out["tokens256"].mean(1))


def test_resize_geometry_feeds_each_cut_patch_resized_to_the_encoders_input():
    cfg = apply_geometry(_cfg("model.patch_encoder=uni_tiny", "model.patch_geometry=resize", "tiling.region_px=512"))
    assert (cfg.tiling.patch_px, cfg.tiling.region_px) == (256, 512)  # HIPT's cut, unchanged
    torch.manual_seed(0)
    model, mid = build_model(cfg)
    assert (model.patch_px, model.input_px) == (256, 224) and mid.startswith("random-uni_tiny-resize256to224-")
    img = _region(512, seed=1)
    with torch.no_grad():
        tokens = model.forward_uint8(img)["tokens256"]
        x = F.interpolate(
            _normalised(model.vit256, img[0, :256, 256:]), size=(224, 224), mode="bilinear", antialias=True
        )
        ref = model.vit256(x)
    torch.testing.assert_close(tokens[0, 1], ref[0], atol=1e-5, rtol=1e-5)


def test_hipts_own_vit256_named_as_patch_encoder_is_todays_model_with_todays_id():
    base = load_config(overrides=["model.allow_random_weights=true"])
    named = load_config(overrides=["model.allow_random_weights=true", "model.patch_encoder=vit256_s16"])
    assert apply_geometry(named).tiling == base.tiling  # 16 × 256 px: the same regions
    (m0, id0), (m1, id1) = build_model(base), build_model(named)
    assert id0 == id1 and list(m0.state_dict()) == list(m1.state_dict())  # published key names
    img = _region(256, seed=2)
    with torch.no_grad():
        assert torch.equal(m0.forward_uint8(img)["emb4k"], m1.forward_uint8(img)["emb4k"])
    assert architecture(base) == {"name": "hipt4k"}
    tiny = create_hipt4k({"name": "hipt4k_tiny"})
    assert {k: v.shape for k, v in tiny.state_dict().items()} == {
        k: v.shape for k, v in create_model("hipt4k_tiny").state_dict().items()
    }


def test_native_geometry_cuts_the_encoders_input_and_keeps_the_grid():
    cfg = _cfg("model.patch_encoder=uni")
    g = apply_geometry(cfg)
    assert (g.tiling.patch_px, g.tiling.region_px) == (224, 3584)  # 16 × 224 px at 0.5 µm/px
    assert g.tiling_spec_hash() != cfg.tiling_spec_hash()  # other regions: another tiling spec
    assert apply_geometry(g) == g  # applying it again changes nothing
    conch = apply_geometry(_cfg("model.patch_encoder=conch_v1_5")).tiling
    assert (conch.patch_px, conch.region_px) == (448, 7168)
    resize = _cfg("model.patch_encoder=uni", "model.patch_geometry=resize")
    assert apply_geometry(resize) is resize  # HIPT's cut: the same regions, the same spec


def test_tiling_geometry_needs_a_patch_size_that_divides_the_tile():
    tiling = _cfg().tiling
    assert resolve_geometry("uni", "tiling", tiling).input_px == 256  # patch 16 divides 256
    assert resolve_geometry("lunit_vits8", "tiling", tiling).input_px == 256
    with pytest.raises(ConfigError, match=r"patch size 14 does not divide tiling.patch_px=256.*: native, resize$"):
        resolve_geometry("virchow2", "tiling", tiling)
    with pytest.raises(ConfigError, match="patch size 14"):  # the same through the config
        apply_geometry(_cfg("model.patch_encoder=virchow2_tiny", "model.patch_geometry=tiling"))


def test_unknown_encoder_and_geometry_are_config_errors():
    with pytest.raises(ConfigError, match="unknown patch encoder 'unii'.*uni_tiny"):
        apply_geometry(_cfg("model.patch_encoder=unii"))
    with pytest.raises(ConfigError, match="model.patch_geometry"):
        _cfg("model.patch_encoder=uni", "model.patch_geometry=crop")


def test_model_ids_keep_encoders_and_geometries_apart():
    ids = set()
    for geometry in ("native", "resize", "tiling"):
        cfg = apply_geometry(_cfg("model.patch_encoder=uni_tiny", f"model.patch_geometry={geometry}"))
        ids.add(build_model(cfg)[1])  # the same seed: the same weights, fed differently
    ids.add(build_model(apply_geometry(_cfg("model.patch_encoder=virchow2_tiny")))[1])
    ids.add(build_model(_cfg())[1])
    assert len(ids) == 5
    assert build_model(_cfg("model.patch_encoder=uni_tiny"))[1] == build_model(_cfg("model.patch_encoder=uni_tiny"))[1]


def test_encoder_attention_leaves_out_the_registers():
    cfg = apply_geometry(_cfg("model.patch_encoder=virchow2_tiny", "tiling.region_px=512"))
    model, _ = build_model(cfg)
    img = _region(448, seed=3)
    with torch.no_grad():
        a256, a4k = model.get_attention(model.normalize_uint8(img))
    assert model.prefix_tokens == 5 and model.tokens_per_side == 16
    assert a256.shape == (4, 2, 5 + 256, 5 + 256) and a4k.shape == (1, 2, 5, 5)
    torch.testing.assert_close(a256.sum(-1), torch.ones(4, 2, 261))


def test_a_heads_local_vit4k_takes_the_width_of_the_stored_tokens():
    grids = [torch.randn(96, 16, 16), torch.randn(96, 8, 16)]  # virchow2_tiny's width, a full and an edge region
    cohort = Cohort(["c0"], [torch.zeros(2, 32)], classes=["a", "b"], token_bags=[grids])
    head = build_head(HeadsConfig(head="hipt_lgp", local_vit="vit4k_tiny"), cohort).eval()
    assert head.local_vit.in_dim == 96
    with torch.no_grad():
        logits, attn = head(grids)
    assert logits.shape == (1, 2) and attn.shape[-1] == 2
