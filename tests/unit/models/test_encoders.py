"""Patch encoders: built offline at real size (on the meta device for the big ones), the
embedding contract, and strict loading of every published file layout."""

import io

import pytest
import torch
from safetensors.torch import save_file

from hipt_ray.config import ConfigError
from hipt_ray.models.checkpoints import CheckpointError
from hipt_ray.models.conch import TRUNK_GRID
from hipt_ray.models.encoder_checkpoints import encoder_state_dict, load_encoder_checkpoint
from hipt_ray.models.encoders import create_encoder, encoder_spec, list_encoders

# Published sizes (model cards / papers), in millions of parameters, and token layouts.
PUBLISHED = {
    # name: (params M, tokens width, prefix tokens, patch size)
    "vit256_s16": (21.7, 384, 1, 16),
    "uni": (303, 1024, 1, 16),
    "uni2_h": (681, 1536, 9, 14),
    "virchow": (632, 1280, 1, 14),
    "virchow2": (632, 1280, 5, 14),
    "h_optimus_0": (1134, 1536, 5, 14),
    "h_optimus_1": (1134, 1536, 5, 14),
    "gigapath": (1134, 1536, 1, 16),
    "kaiko_vits16": (21.7, 384, 1, 16),
    "kaiko_vitb16": (86, 768, 1, 16),
    "kaiko_vitl14": (304, 1024, 5, 14),
    "lunit_vits8": (21.7, 384, 1, 8),
    "gpfm": (303, 1024, 1, 14),
    "conch_v1_5": (306, 1024, 1, 16),  # ViT-L/16 trunk + attentional pooler (768-d)
    "phikon_v2": (303, 1024, 1, 16),  # DINOv2 ViT-L/16 (tests/unit/models/test_phikon.py)
}
SMALL = ["vit256_s16", "kaiko_vits16", "kaiko_vitb16", "lunit_vits8"]  # real size on 2 cores


def test_every_encoder_has_its_published_facts():
    assert set(list_encoders()) == set(PUBLISHED)


def _meta(name, **overrides):
    with torch.device("meta"):
        return create_encoder(name, **overrides)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_size_structure(name):
    params_m, width, prefix, patch = PUBLISHED[name]
    enc = _meta(name)
    n = sum(p.numel() for p in enc.parameters()) / 1e6
    assert n == pytest.approx(params_m, rel=0.01)
    assert (enc.num_prefix_tokens, enc.patch_size) == (prefix, patch)
    assert enc.embed_dim == {"cls": width, "cls_mean": 2 * width, "module": 768}[enc.pooling]
    assert enc.input_px % enc.patch_size == 0 and enc.mpp > 0
    assert len(enc.mean) == len(enc.std) == 3
    tokens = enc.forward_tokens(torch.empty(2, 3, enc.input_px, enc.input_px, device="meta"))
    assert tokens.shape == (2, prefix + (enc.input_px // patch) ** 2, width)
    assert enc(torch.empty(2, 3, enc.input_px, enc.input_px, device="meta")).shape == (2, enc.embed_dim)


def test_model_card_traps():
    v2 = _meta("virchow2")  # 4 registers inside pos_embed (class token + registers + 256 patches)
    assert v2.trunk.pos_embed.shape == (1, 1 + 4 + 256, 1280) and v2.pooling == "cls_mean"
    u2 = _meta("uni2_h")  # 8 registers, no_embed_class: pos_embed covers the patches only
    assert u2.trunk.pos_embed.shape == (1, 256, 1536) and u2.trunk.reg_token.shape == (1, 8, 1536)
    assert _meta("gigapath").trunk.patch_embed.proj.weight.shape[-2:] == (16, 16)
    assert encoder_spec("h_optimus_0").mean == (0.707223, 0.578729, 0.703617)
    assert encoder_spec("lunit_vits8").mean == (0.70322989, 0.53606487, 0.66096631)
    assert encoder_spec("uni").mean == (0.485, 0.456, 0.406)
    assert encoder_spec("vit256_s16").mean == encoder_spec("vit256_s16").std == (0.5, 0.5, 0.5)


def test_unknown_encoder_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown patch encoder 'unii'.*gigapath.*vit256_s16"):
        create_encoder("unii")


@pytest.mark.parametrize("name", SMALL)
def test_real_forward_is_timms_cls(name):
    torch.manual_seed(0)
    enc = create_encoder(name).eval()
    x = torch.randn(2, 3, enc.input_px, enc.input_px)
    with torch.no_grad():
        y = enc(x)
        assert y.shape == (2, enc.embed_dim) and torch.isfinite(y).all()
        # The embedding is the network's own pooled output (timm's CLS ``global_pool="token"``).
        torch.testing.assert_close(y, enc.trunk(x), rtol=0, atol=1e-6)


def test_virchow2_embedding_is_cls_and_mean_of_patches_without_registers():
    torch.manual_seed(0)
    enc = create_encoder("virchow2", depth=1).eval()  # real widths and token layout, one block
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        y = enc(x)
        tokens = enc.trunk.forward_features(x)
    assert tokens.shape[1] == 1 + 4 + 256 and y.shape == (2, 2560)
    torch.testing.assert_close(y, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1))
    with_registers = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)
    assert not torch.allclose(y, with_registers)


def _layouts(state):
    """The published file layouts of a state dict: (file name, writer)."""

    def torch_save(obj):
        return lambda path: torch.save(obj, path)

    return {
        "pytorch_model.bin": torch_save(state),
        "model.safetensors": lambda path: save_file(state, path),
        "teacher_backbone.pth": torch_save({"teacher": {f"backbone.{k}": v for k, v in state.items()}, "epoch": 3}),
        "module.pth": torch_save({"model": {f"module.{k}": v for k, v in state.items()}}),
        "state_dict.pth": torch_save({"state_dict": state, "student": {"x": torch.zeros(1)}}),
    }


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "kaiko_vitb16" else n for n in SMALL])
def test_every_layout_round_trips(name, tmp_path):
    torch.manual_seed(0)
    src = create_encoder(name)
    state = {k: v.contiguous() for k, v in src.trunk.state_dict().items()}
    torch.manual_seed(1)
    dst = create_encoder(name)
    for fname, write in _layouts(state).items():
        for p in dst.parameters():
            torch.nn.init.zeros_(p)
        write(tmp_path / fname)
        assert load_encoder_checkpoint(dst, str(tmp_path / fname)) is dst
        for k, v in dst.trunk.state_dict().items():
            assert torch.equal(v, state[k]), (fname, k)


@pytest.mark.parametrize("name", sorted(set(PUBLISHED) - set(SMALL)))
def test_every_layout_names_the_real_keys(name):
    """The big ones at real size on the meta device: each layout's keys map onto the trunk's."""
    trunk = _meta(name).trunk
    own = trunk.state_dict()
    for obj in (
        own,
        {"teacher": {f"backbone.{k}": v for k, v in own.items()}},
        {"model": {f"module.{k}": v for k, v in own.items()}},
    ):
        got = encoder_state_dict(obj, set(own), source=name)
        assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in own.items()}


def test_gpfm_github_checkpoint_layout():
    """GPFM.pth: DINOv2 teacher, ``backbone.`` prefix, chunked blocks, training-only entries."""
    own = _meta("gpfm").trunk.state_dict()
    teacher = {}
    for k, v in own.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 6}.{k.split('.', 1)[1]}"  # 4 chunks of 6: blocks.<chunk>.<i>.…
        teacher[f"backbone.{k}"] = v
    teacher["backbone.mask_token"] = torch.empty(1, 1024, device="meta")
    teacher["dino_head.mlp.0.weight"] = torch.empty(2048, 1024, device="meta")
    got = encoder_state_dict({"teacher": teacher, "student": {}}, set(own), source="GPFM.pth")
    assert set(got) == set(own)
    assert "blocks.23.ls2.gamma" in got


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    enc = create_encoder("kaiko_vits16")
    return enc, {k: v.contiguous() for k, v in enc.trunk.state_dict().items()}


def test_missing_key_is_named(small, tmp_path):
    enc, state = small
    save_file({k: v for k, v in state.items() if k != "blocks.3.attn.qkv.weight"}, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.3\.attn\.qkv\.weight"):
        load_encoder_checkpoint(enc, str(tmp_path / "m.safetensors"))


def test_unexpected_key_is_named(small, tmp_path):
    enc, state = small
    state = {("blocks.3.attn.qkv.weights" if k == "blocks.3.attn.qkv.weight" else k): v for k, v in state.items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.3\.attn\.qkv\.weights"):
        load_encoder_checkpoint(enc, str(tmp_path / "pytorch_model.bin"))


def test_wrong_encoders_file_names_the_shapes(small, tmp_path):
    enc, _ = small
    other = create_encoder("kaiko_vitb16", depth=1)
    save_file({k: v.contiguous() for k, v in other.trunk.state_dict().items()}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"cls_token: checkpoint \(1, 1, 768\) vs model \(1, 1, 384\)"):
        load_encoder_checkpoint(enc, str(tmp_path / "b.safetensors"))


def test_truncated_and_code_bearing_files_are_refused(small, tmp_path):
    enc, state = small
    save_file(state, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="t.safetensors: not a readable safetensors file"):
        load_encoder_checkpoint(enc, str(tmp_path / "t.safetensors"))
    buf = io.BytesIO()
    torch.save({"model": state, "cfg": io.StringIO("not a tensor")}, buf)
    (tmp_path / "code.bin").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_encoder_checkpoint(enc, str(tmp_path / "code.bin"))
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder_checkpoint(enc, str(tmp_path / "absent.bin"))


def test_conch_v1_5_embedding_is_its_attentional_pooler(tmp_path):
    """The pooler recomputed head by head from its weights (one query over all 1 + 28² tokens)."""
    torch.manual_seed(0)
    enc = create_encoder("conch_v1_5", depth=1).eval()
    x = torch.randn(2, 3, 448, 448)
    with torch.no_grad():
        y = enc(x)
        tokens = enc.forward_tokens(x)
        pool = enc.trunk.attn_pool_contrast
        q = pool.to_q(pool.ln_q(pool.query))[0]  # (768,)
        k, v = pool.to_kv(pool.ln_k(tokens)).chunk(2, dim=-1)  # (B, 785, 768)
        outs = []
        for h in range(8):
            sl = slice(96 * h, 96 * (h + 1))
            attn = ((k[..., sl] @ q[sl]) * 96**-0.5).softmax(dim=-1)  # (B, 785)
            outs.append(torch.einsum("bn,bnd->bd", attn, v[..., sl]))
        want = enc.trunk.ln_contrast(pool.to_out(torch.cat(outs, dim=-1)))
    assert tokens.shape == (2, 1 + 28 * 28, 1024) and y.shape == (2, 768)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_conch_v1_5_resamples_a_published_pos_embed_of_another_grid(tmp_path):
    torch.manual_seed(0)
    enc = create_encoder("conch_v1_5", depth=1)
    state = {k: v.contiguous() for k, v in enc.trunk.state_dict().items()}
    assert state["trunk.pos_embed"].shape == (1, 1 + TRUNK_GRID**2, 1024)
    save_file({**state, "trunk.pos_embed": torch.randn(1, 1 + 28 * 28, 1024)}, tmp_path / "v.safetensors")
    load_encoder_checkpoint(enc, str(tmp_path / "v.safetensors"))
    assert enc.trunk.trunk.pos_embed.shape == (1, 1 + TRUNK_GRID**2, 1024)
    save_file({**state, "trunk.pos_embed": torch.randn(1, 1 + 28 * 27, 1024)}, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"trunk\.pos_embed: checkpoint \(1, 757, 1024\)"):
        load_encoder_checkpoint(enc, str(tmp_path / "bad.safetensors"))
