"""Phikon-v2: a DINOv2 ViT-L/16 published in Hugging Face transformers' ``Dinov2Model`` layout
(``model.safetensors``), built here as a timm ViT and loaded strictly through a key mapping that
fuses the separate q/k/v projections. The HF key list below is written out from
transformers' ``modeling_dinov2.py`` (as saved by transformers 4.x, the layout of the published
file), not derived from the mapping under test."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hipt_ray.models.checkpoints import CheckpointError
from hipt_ray.models.encoder_checkpoints import adapt_hf_dinov2_state, load_encoder_checkpoint
from hipt_ray.models.encoders import create_encoder, encoder_spec

DIM, HEADS, PATCH, PX = 1024, 16, 16, 224
# timm vit_large_patch16_224 with LayerScale: 24 × 12,596,224 per block + 202,752 pos/cls + 787,456
# patch embedding + 2,048 final norm; Dinov2Model has one more 1,024 (the training-only mask_token).
PHIKON_V2_PARAMS = 303_350_784


def hf_dinov2_shapes(depth: int, *, legacy: bool = True) -> dict[str, tuple[int, ...]]:
    """Dinov2Model's state-dict keys and shapes for a ViT-L/16 at 224 (no registers, GELU MLP)."""
    tokens = 1 + (PX // PATCH) ** 2
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.cls_token": (1, 1, DIM),
        "embeddings.mask_token": (1, DIM),
        "embeddings.position_embeddings": (1, tokens, DIM),
        "embeddings.patch_embeddings.projection.weight": (DIM, 3, PATCH, PATCH),
        "embeddings.patch_embeddings.projection.bias": (DIM,),
        "layernorm.weight": (DIM,),
        "layernorm.bias": (DIM,),
    }
    legacy_names = ["attention.attention.query", "attention.attention.key", "attention.attention.value"]
    att = [*legacy_names, "attention.output.dense"] if legacy else [f"attention.{p}_proj" for p in "qkvo"]
    for i in range(depth):
        b = f"encoder.layer.{i}."
        for name in att:
            shapes[b + name + ".weight"] = (DIM, DIM)
            shapes[b + name + ".bias"] = (DIM,)
        for norm in ("norm1", "norm2"):
            shapes[b + norm + ".weight"] = shapes[b + norm + ".bias"] = (DIM,)
        shapes[b + "layer_scale1.lambda1"] = shapes[b + "layer_scale2.lambda1"] = (DIM,)
        shapes[b + "mlp.fc1.weight"], shapes[b + "mlp.fc1.bias"] = (4 * DIM, DIM), (4 * DIM,)
        shapes[b + "mlp.fc2.weight"], shapes[b + "mlp.fc2.bias"] = (DIM, 4 * DIM), (DIM,)
    return shapes


def random_hf_state(depth: int, *, legacy: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights at a scale where every block and LayerScale changes the output."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in hf_dinov2_shapes(depth, legacy=legacy).items():
        t = torch.randn(shape, generator=g)
        state[k] = (1 + 0.1 * t) if k.endswith(("norm1.weight", "norm2.weight", "layernorm.weight")) else 0.05 * t
    return state


def test_phikon_v2_model_card_facts():
    spec = encoder_spec("phikon_v2")
    assert (spec.embed_dim, spec.input_px, spec.mpp, spec.pooling) == (1024, 224, 0.5, "cls")
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    with torch.device("meta"):
        enc = create_encoder("phikon_v2")
        recipe = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, init_values=1.0)
    n = sum(p.numel() for p in enc.parameters())
    assert n == PHIKON_V2_PARAMS == sum(p.numel() for p in recipe.parameters())
    hf_n = sum(torch.Size(s).numel() for s in hf_dinov2_shapes(24).values())
    assert hf_n - DIM == n  # the published file holds the same weights plus the mask token
    vit = enc.vit
    assert (enc.num_prefix_tokens, enc.patch_size, len(vit.blocks)) == (1, 16, 24)
    assert vit.blocks[0].attn.num_heads == HEADS and vit.pos_embed.shape == (1, 197, DIM)
    assert vit.blocks[0].ls1.gamma.shape == (DIM,) and vit.blocks[0].mlp.fc1.out_features == 4 * DIM
    assert vit.reg_token is None and isinstance(vit.norm, torch.nn.LayerNorm) and vit.norm.eps == 1e-6


@pytest.mark.parametrize("legacy", [True, False], ids=["transformers4_names", "transformers5_names"])
def test_every_published_key_maps_onto_the_trunk_at_real_size(legacy):
    with torch.device("meta"):
        own = create_encoder("phikon_v2").trunk.state_dict()
        hf = {k: torch.empty(s) for k, s in hf_dinov2_shapes(24, legacy=legacy).items()}
    got = adapt_hf_dinov2_state(hf, source="model.safetensors")
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in own.items()}


def test_random_model_safetensors_loads_strictly_and_fuses_qkv(tmp_path):
    state = random_hf_state(2)
    save_file(state, tmp_path / "model.safetensors")
    enc = create_encoder("phikon_v2", depth=2)
    assert load_encoder_checkpoint(enc, str(tmp_path / "model.safetensors")) is enc
    blk = enc.vit.blocks[1]
    attn = "encoder.layer.1.attention.attention."
    want_qkv = torch.cat([state[attn + p + ".weight"] for p in ("query", "key", "value")])
    assert torch.equal(blk.attn.qkv.weight, want_qkv)
    assert torch.equal(blk.attn.qkv.bias[2 * DIM :], state[attn + "value.bias"])
    assert torch.equal(blk.attn.proj.weight, state["encoder.layer.1.attention.output.dense.weight"])
    assert torch.equal(blk.ls2.gamma, state["encoder.layer.1.layer_scale2.lambda1"])
    assert torch.equal(enc.vit.pos_embed, state["embeddings.position_embeddings"])
    assert torch.equal(enc.vit.norm.bias, state["layernorm.bias"])


def test_a_renamed_key_fails_naming_it(tmp_path):
    state = random_hf_state(1)
    state["encoder.layer.0.mlp.fc1.weights"] = state.pop("encoder.layer.0.mlp.fc1.weight")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"not in the transformers Dinov2Model layout.*encoder\.layer\.0\.mlp\.fc1\.weights"
    ):
        load_encoder_checkpoint(create_encoder("phikon_v2", depth=1), str(tmp_path / "model.safetensors"))


def test_a_missing_projection_or_key_is_named(tmp_path):
    state = random_hf_state(1)
    del state["encoder.layer.0.attention.attention.value.weight"]
    save_file(state, tmp_path / "v.safetensors")
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.0\.attention weight of v"):
        load_encoder_checkpoint(create_encoder("phikon_v2", depth=1), str(tmp_path / "v.safetensors"))
    state = random_hf_state(1)
    del state["encoder.layer.0.layer_scale1.lambda1"]
    save_file(state, tmp_path / "ls.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.0\.ls1\.gamma"):
        load_encoder_checkpoint(create_encoder("phikon_v2", depth=1), str(tmp_path / "ls.safetensors"))
    save_file(random_hf_state(2), tmp_path / "deep.safetensors")  # a deeper model's file
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.1\."):
        load_encoder_checkpoint(create_encoder("phikon_v2", depth=1), str(tmp_path / "deep.safetensors"))


@pytest.mark.parametrize("px", [224, 256])
def test_embedding_equals_transformers_dinov2_cls(px, tmp_path):
    """The reference: transformers' own Dinov2Model reads the same file from a local folder
    (config written here, nothing downloaded); its ``last_hidden_state[:, 0]`` is Phikon-v2's
    embedding. 256 px exercises both sides' position-embedding interpolation (14² → 16²)."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (not a project dependency); this check needs it"
    )
    depth = 4  # the real width, heads, patch and token layout; fewer blocks to stay fast on 2 cores
    save_file(random_hf_state(depth, seed=px), tmp_path / "model.safetensors")
    config = {
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": DIM,
        "num_hidden_layers": depth,
        "num_attention_heads": HEADS,
        "patch_size": PATCH,
        "image_size": PX,
        "mlp_ratio": 4,
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "use_swiglu_ffn": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    ref, info = transformers.Dinov2Model.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info.values()), info  # every published key used, none missing
    enc = load_encoder_checkpoint(create_encoder("phikon_v2", depth=depth), str(tmp_path / "model.safetensors"))
    x = torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.eval()(pixel_values=x).last_hidden_state[:, 0]
        got = enc.eval()(x)
    assert got.shape == (1, DIM)
    assert (got - want).abs().max().item() <= 1e-5


def test_other_input_sizes_resample_position_embeddings_as_transformers_does():
    """Without transformers installed: at 256 px the 14×14 grid of position embeddings becomes
    16×16 by plain bicubic resampling (transformers' Dinov2Embeddings), not timm's antialiased one."""
    torch.manual_seed(0)
    vit = create_encoder("phikon_v2", depth=1).vit
    patches = torch.randn(1, 16, 16, DIM)
    grid = vit.pos_embed[:, 1:].reshape(1, 14, 14, DIM).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    with torch.no_grad():
        got = vit._pos_embed(patches)
    assert got.shape == (1, 1 + 256, DIM)
    torch.testing.assert_close(got[:, 0], vit.cls_token[:, 0] + vit.pos_embed[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(got[:, 1:], patches.reshape(1, 256, DIM) + want.reshape(1, 256, DIM))
    antialiased = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    assert not torch.allclose(want, antialiased.permute(0, 2, 3, 1), atol=1e-3)
    with torch.no_grad():  # at the native 224 px nothing is resampled
        native = vit._pos_embed(patches[:, :14, :14])
    torch.testing.assert_close(native[:, 1:], patches[:, :14, :14].reshape(1, 196, DIM) + vit.pos_embed[:, 1:])
