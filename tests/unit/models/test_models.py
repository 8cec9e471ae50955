import argparse

import pytest
import torch
import torch.nn.functional as F

from hipt_ray.models import (
    CheckpointError,
    create_model,
    export_checkpoint,
    list_models,
    load_checkpoint,
    model_id,
    normalize_uint8,
    patchify,
    patchify_uint8,
    resize_pos_embed,
    set_fused_attention,
)
from hipt_ray.models.checkpoints import extract_state_dict

from ... import reference_hipt as ref

torch.manual_seed(0)


def _published_layout(embed, depth, *, patch_in=None, mlp=4):
    """Names and shapes of the published ViT state dicts, from the architecture's facts."""
    shapes = {"cls_token": (1, 1, embed), "pos_embed": (1, 197, embed)}
    if patch_in is None:
        shapes.update({"patch_embed.proj.weight": (embed, 3, 16, 16), "patch_embed.proj.bias": (embed,)})
    else:
        shapes.update({"phi.0.weight": (embed, patch_in), "phi.0.bias": (embed,)})
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (embed,),
                p + "norm1.bias": (embed,),
                p + "attn.qkv.weight": (3 * embed, embed),
                p + "attn.qkv.bias": (3 * embed,),
                p + "attn.proj.weight": (embed, embed),
                p + "attn.proj.bias": (embed,),
                p + "norm2.weight": (embed,),
                p + "norm2.bias": (embed,),
                p + "mlp.fc1.weight": (mlp * embed, embed),
                p + "mlp.fc1.bias": (mlp * embed,),
                p + "mlp.fc2.weight": (embed, mlp * embed),
                p + "mlp.fc2.bias": (embed,),
            }
        )
    shapes.update({"norm.weight": (embed,), "norm.bias": (embed,)})
    return shapes


def _randomize(model, seed=0):
    """Random non-trivial weights everywhere (LayerNorms and pos embeddings included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            ln_gain = name.endswith("weight") and p.ndim == 1  # LayerNorm gains around 1
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if ln_gain else 0.0))
    return model.eval()


def _sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_parameter_counts_and_published_layout():
    vit256, vit4k = create_model("vit256_s16"), create_model("vit4k_xs")
    assert sum(p.numel() for p in vit256.parameters()) == 21_665_664
    assert sum(p.numel() for p in vit4k.parameters()) == 2_781_504
    assert {k: tuple(v.shape) for k, v in vit256.state_dict().items()} == _published_layout(384, 12)
    assert {k: tuple(v.shape) for k, v in vit4k.state_dict().items()} == _published_layout(192, 6, patch_in=384)


@pytest.mark.parametrize("name", sorted(set(list_models())))
def test_every_registered_model_runs_forward_and_backward(name):
    m = create_model(name)
    if name.startswith("vit256"):
        x = torch.randn(2, 3, 256, 256)
    elif name.startswith("vit4k"):
        x = torch.randn(2, m.in_dim, 16, 16)
    else:
        if name == "hipt4k":
            pytest.skip("real-size HIPT-4K is covered by the rectangular-region reference test")
        x = torch.randn(1, 3, 512, 768)
    out = m(x)
    assert out.shape == (x.shape[0], m.embed_dim) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'vit_huge'.*hipt4k_tiny.*vit256_s16"):
        create_model("vit_huge")


def test_pos_embed_resize_follows_the_scale_factor_rule():
    pos = torch.randn(1, 197, 8)
    out = resize_pos_embed(pos, 16, 16)
    grid = pos[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    expect = F.interpolate(grid, scale_factor=(16.1 / 14, 16.1 / 14), mode="bicubic", align_corners=False)
    assert torch.equal(out[:, 1:], expect.permute(0, 2, 3, 1).reshape(1, 256, 8))
    assert torch.equal(out[:, :1], pos[:, :1])
    by_size = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    assert (by_size - expect).abs().max() > 1e-3  # the two rules differ measurably
    assert resize_pos_embed(pos, 14, 14) is pos  # a 224 px input uses the stored embedding
    assert resize_pos_embed(pos, 6, 9).shape == (1, 55, 8)


@pytest.mark.parametrize("hw", [(256, 256), (224, 224), (96, 96), (256, 384)])
def test_vit256_matches_reference(hw):
    m = _randomize(create_model("vit256_tiny"), seed=1)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ours, theirs = m(x), ref.vit256(_sd(m), x, heads=2)
        attn, attn_ref = m.get_last_selfattention(x), ref.vit256(_sd(m), x, heads=2, return_attention=True)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    assert torch.allclose(attn, attn_ref, atol=1e-6)
    assert attn.shape == (2, 2, 1 + hw[0] * hw[1] // 256, 1 + hw[0] * hw[1] // 256)
    assert torch.allclose(attn.sum(-1), torch.ones(attn.shape[:-1]), atol=1e-5)


@pytest.mark.parametrize("grid", [(16, 16), (14, 14), (6, 6), (5, 9)])
def test_vit4k_matches_reference_on_all_grids(grid):
    m = _randomize(create_model("vit4k_xs"), seed=2)
    x = torch.randn(2, 384, *grid)
    with torch.no_grad():
        ours, theirs = m(x), ref.vit4k(_sd(m), x, heads=6)
        attn = m.get_last_selfattention(x)
    assert ours.shape == (2, 192) and torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    assert torch.allclose(attn, ref.vit4k(_sd(m), x, heads=6, return_attention=True), atol=1e-6)


def test_real_size_hipt4k_matches_reference_on_a_rectangular_region():
    m = create_model("hipt4k", micro_batch=4)
    _randomize(m, seed=3)
    x = torch.randn(1, 3, 512, 768)  # 2 × 3 patches: rows and columns must not be swapped
    with torch.no_grad():
        ours = m(x)
        theirs = ref.hipt4k(_sd(m.vit256), _sd(m.vit4k), x, heads256=6, heads4k=6)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), (ours - theirs).abs().max()


def test_hipt4k_equals_vit4k_on_patchwise_vit256_grid_in_row_major_order():
    m = _randomize(create_model("hipt4k_tiny", micro_batch=5), seed=4)
    x = torch.randn(2, 3, 768, 1024)  # 3 rows × 4 columns of distinct patches
    with torch.no_grad():
        feats = m.forward_features(x)
        for b in range(2):
            for k in range(12):
                r, c = divmod(k, 4)
                patch = x[b : b + 1, :, r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]
                assert torch.allclose(feats["tokens256"][b, k], m.vit256(patch)[0], atol=1e-5)
            grid = torch.stack(
                [
                    m.vit256(x[b : b + 1, :, r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256])[0]
                    for r in range(3)
                    for c in range(4)
                ]
            ).T.reshape(1, -1, 3, 4)
            assert torch.allclose(feats["emb4k"][b], m.vit4k(grid)[0], atol=1e-5)
    assert torch.allclose(feats["mean256"], feats["tokens256"].mean(1))
    assert feats["tokens256"].shape == (2, 12, 48) and feats["emb4k"].shape == (2, 32)
    attn256, attn4k = m.get_attention(x)
    assert attn256.shape == (24, 2, 257, 257) and attn4k.shape == (2, 2, 13, 13)
    assert torch.allclose(attn4k.sum(-1), torch.ones(2, 2, 13), atol=1e-5)


def test_patchify_and_normalize():
    img = torch.arange(4 * 6, dtype=torch.uint8).reshape(4, 6).repeat_interleave(64, 0).repeat_interleave(64, 1)
    x = normalize_uint8(img[None, :, :, None].expand(1, 256, 384, 3))
    assert x.shape == (1, 3, 256, 384) and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[0, :, 0, 0], torch.full((3,), -1.0))
    p = patchify(
        torch.arange(2 * 3, dtype=torch.float32).reshape(1, 1, 2, 3).repeat_interleave(4, 2).repeat_interleave(4, 3), 4
    )
    assert p.shape == (6, 1, 4, 4) and p[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_uint8_path_equals_normalise_then_patchify():
    # The model actors cut uint8 patches and normalise a micro-batch at a time; the outputs
    # must be those of the float route (normalise the whole region, then patchify).
    m = _randomize(create_model("hipt4k_tiny", micro_batch=5), seed=6)
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (2, 768, 1024, 3), dtype=torch.uint8, generator=g)
    p8 = patchify_uint8(img, 256)
    assert p8.dtype == torch.uint8 and p8.shape == (24, 3, 256, 256)
    assert torch.equal(normalize_uint8(p8.permute(0, 2, 3, 1)), patchify(normalize_uint8(img), 256))  # same order
    with torch.no_grad():
        ours, ref = m.forward_uint8(img), m.forward_features(normalize_uint8(img))
        m.pad_patches = 4  # the compiled path pads each micro-batch; the padding's outputs are dropped
        padded = m.forward_uint8(img)
    for k in ("emb4k", "tokens256", "mean256"):
        assert torch.allclose(ours[k], ref[k], atol=1e-5), (k, (ours[k] - ref[k]).abs().max())
        assert torch.allclose(padded[k], ref[k], atol=1e-5), k
    with pytest.raises(ValueError, match="multiple of the 256 px"):
        patchify_uint8(img[:, :700], 256)


def test_fused_and_naive_attention_agree_and_bf16_is_close():
    m = _randomize(create_model("hipt4k_tiny"), seed=5)
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        fused = m(x)
        set_fused_attention(m, False)
        naive = m(x)
        set_fused_attention(m, True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x).float()
    assert torch.allclose(fused, naive, atol=1e-5)
    assert F.cosine_similarity(low, fused).min() > 0.99


def test_bf16_real_vit256_close_to_fp32():
    m = create_model("vit256_s16").eval()
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        hi = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lo = m(x).float()
    assert F.cosine_similarity(lo, hi).min() > 0.99


# ------------------------------------------------------------------ checkpoints


def _official(model, *, prefix="module.backbone.", extra=None):
    """A file laid out like the published DINO checkpoints, with random tensors."""
    teacher = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    teacher.update(
        {
            prefix.replace("backbone.", "") + "head.mlp.0.weight": torch.randn(8, 4),
            prefix.replace("backbone.", "") + "head.last_layer.weight_g": torch.ones(8, 1),
        }
    )
    student = {k: v + 1 for k, v in teacher.items()}
    return {
        "teacher": teacher,
        "student": student,
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small"),
        **(extra or {}),
    }


def test_official_layout_loads_strictly(tmp_path):
    src = _randomize(create_model("vit4k_xs"), seed=6)
    torch.save(_official(src), tmp_path / "vit4k_xs_dino.pth")
    dst = load_checkpoint(create_model("vit4k_xs"), str(tmp_path / "vit4k_xs_dino.pth"))
    assert model_id(dst) == model_id(src)
    torch.save(_official(src, prefix="backbone."), tmp_path / "b.pth")
    assert model_id(load_checkpoint(create_model("vit4k_xs"), str(tmp_path / "b.pth"))) == model_id(src)
    student = load_checkpoint(create_model("vit4k_xs"), str(tmp_path / "b.pth"), key="student")
    assert model_id(student) != model_id(src)
    torch.save(src.state_dict(), tmp_path / "plain.pth")  # a plain state dict
    assert model_id(load_checkpoint(create_model("vit4k_xs"), str(tmp_path / "plain.pth"))) == model_id(src)


def test_missing_and_misshaped_keys_are_named(tmp_path):
    src = create_model("vit256_tiny")
    ckpt = _official(src)
    del ckpt["teacher"]["module.backbone.blocks.1.mlp.fc2.bias"]
    torch.save(ckpt, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.mlp\.fc2\.bias"):
        load_checkpoint(create_model("vit256_tiny"), str(tmp_path / "missing.pth"))
    ckpt = _official(src)
    ckpt["teacher"]["module.backbone.pos_embed"] = torch.zeros(1, 257, 48)
    torch.save(ckpt, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"pos_embed: checkpoint \(1, 257, 48\) vs model \(1, 197, 48\)"):
        load_checkpoint(create_model("vit256_tiny"), str(tmp_path / "shape.pth"))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(create_model("vit256_tiny"), str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match="unexpected keys: phi"):  # a ViT-4K file into ViT-256
        torch.save(_official(create_model("vit4k_tiny")), tmp_path / "wrong.pth")
        load_checkpoint(create_model("vit256_tiny"), str(tmp_path / "wrong.pth"))


class NotAllowed:
    pass


class RunsCode:
    """Unpickling this calls os.makedirs(path): what a crafted checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return os.makedirs, (self.path,)


def test_no_arbitrary_pickle_without_opt_in(tmp_path):
    src = create_model("vit4k_tiny")
    torch.save(_official(src, extra={"evil": NotAllowed()}), tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"model\.allow_unsafe_pickle=true$") as err:
        load_checkpoint(create_model("vit4k_tiny"), str(tmp_path / "x.pth"))
    assert "\n" not in str(err.value) and str(tmp_path / "x.pth") in str(err.value)
    load_checkpoint(create_model("vit4k_tiny"), str(tmp_path / "x.pth"), allow_unsafe_pickle=True)


@pytest.mark.parametrize("what", ["heads.pt", "dino.pt"])
def test_heads_and_resume_files_never_run_code(tmp_path, what, capsys):
    """`heatmap --head-run` and pretraining resume load with weights_only: a crafted file is refused
    before any of its code runs; the files this project writes load that way."""
    from hipt_ray.models.checkpoints import load_trusted
    from hipt_ray.train.dino import _rng_state, _set_rng_state

    marker = tmp_path / "pwned"
    torch.save({"config": {}, "folds": [], "x": RunsCode(str(marker))}, tmp_path / what)
    with pytest.raises(CheckpointError, match="allow_unsafe_pickle"):
        load_trusted(str(tmp_path / what), name=what)
    assert not marker.exists()
    if what == "heads.pt":
        from hipt_ray.cli import main

        run = tmp_path / "run"
        run.mkdir()
        (tmp_path / what).rename(run / what)
        assert main(["heatmap", "--out", str(tmp_path / "png"), "--head-run", str(run)]) == 2
        assert "model.allow_unsafe_pickle=true" in capsys.readouterr().err and not marker.exists()
    else:  # the DINO checkpoint's RNG state is plain data now, so resume loads it safely
        state = _rng_state()
        torch.save({"rng": {0: state}, "step": 3}, tmp_path / "ok.pt")
        back = load_trusted(str(tmp_path / "ok.pt"), name="ok.pt")
        import numpy as np

        before = np.random.rand()
        _set_rng_state(back["rng"][0])
        assert np.random.rand() == before


def test_export_round_trip_and_published_loader_compatibility(tmp_path):
    src = _randomize(create_model("hipt4k_tiny"), seed=7)
    export_checkpoint(src.vit256, str(tmp_path / "v256.pth"))
    export_checkpoint(src.vit4k, str(tmp_path / "v4k.pth"))
    dst = create_model("hipt4k_tiny")
    load_checkpoint(dst.vit256, str(tmp_path / "v256.pth"))
    load_checkpoint(dst.vit4k, str(tmp_path / "v4k.pth"))
    x = torch.randn(1, 3, 512, 256)
    with torch.no_grad():
        assert torch.equal(src.eval()(x), dst.eval()(x))
    # the published loader: take "teacher", str.replace the prefixes, load into its own layout
    raw = torch.load(tmp_path / "v4k.pth", map_location="cpu", weights_only=True)["teacher"]
    state = {k.replace("module.", "").replace("backbone.", ""): v for k, v in raw.items()}
    assert set(state) == set(_published_layout(32, 2, patch_in=48))


def test_the_micro_batch_default_is_decided_in_one_place():
    from hipt_ray.models.hipt4k import default_micro_batch

    assert default_micro_batch("cpu") == 32 and default_micro_batch("cuda") == 256
    assert default_micro_batch("cuda", 64) == 64
    assert create_model("hipt4k_tiny").micro_batch == 32


def test_a_checkpoint_entry_that_is_not_a_state_dict_is_named():
    with pytest.raises(CheckpointError, match=r"expected a state dict under 'teacher', got list"):
        extract_state_dict({"teacher": [1, 2], "student": {}})
    state = {"backbone.cls_token": torch.zeros(1), "head.w": torch.zeros(1)}
    assert list(extract_state_dict({"args": None, "student": state})) == ["cls_token"]
