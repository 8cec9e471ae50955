"""Every registered patch encoder against timm's model built from the published recipe (the
model cards' own timm arguments, written out here independently of ``encoders.py``): the same
parameters at real size, the same outputs on the same weights where a forward fits on 2 cores,
and a random-weight file in the layout each encoder's weights are published in loads strictly.

Nothing is downloaded: every timm model is ``pretrained=False`` with explicit arguments.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import timm.layers
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn

from hipt_ray.models.checkpoints import CheckpointError
from hipt_ray.models.encoder_checkpoints import check_fits, load_encoder_checkpoint
from hipt_ray.models.encoders import create_encoder, list_encoders

SWIGLU = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU}

# name: (timm architecture, the model card's / hub config's arguments). CONCH v1.5 is not a
# timm model (its own tower: tests/unit/models/test_encoders.py checks its pooler by hand);
# HIPT's ViT-256 is DINO's ViT-S/16, which is timm's vit_small_patch16_224 key for key.
RECIPES: dict[str, tuple[str, dict]] = {
    # MahmoodLab/UNI card: vit_large_patch16_224, img_size=224, patch_size=16, init_values=1e-5
    "uni": ("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5}),
    # MahmoodLab/UNI2-h card's timm_kwargs
    "uni2_h": (
        "vit_giant_patch14_224",
        {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "reg_tokens": 8,
            **SWIGLU,
        },
    ),
    # paige-ai/Virchow(2) hub config + the cards' mlp_layer/act_layer; global_pool "" (all tokens)
    "virchow": ("vit_huge_patch14_224", {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, **SWIGLU}),
    "virchow2": (
        "vit_huge_patch14_224",
        {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4, **SWIGLU},
    ),
    # bioptimus/H-optimus-0/1 hub configs: the DINOv2 giant with 4 registers at 224
    "h_optimus_0": ("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5}),
    "h_optimus_1": ("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5}),
    # prov-gigapath/prov-gigapath hub config: the DINOv2 giant's blocks at patch 16
    "gigapath": (
        "vit_giant_patch14_dinov2",
        {
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
        },
    ),
    # kaiko-ai towards_large_pathology_fms (timm ports 1aurent/*.kaiko_ai_towards_large_pathology_fms)
    "kaiko_vits16": ("vit_small_patch16_224", {"img_size": 224}),
    "kaiko_vitb16": ("vit_base_patch16_224", {"img_size": 224}),
    # 1aurent/vit_large_patch14_reg4_224.kaiko_ai_towards_large_pathology_fms config.json: no
    # model_args, pretrained_cfg input_size [3, 518, 518] + fixed_input_size → timm builds 518
    # (the "224" of its name is the input the card feeds it); kaiko's hubconf.py vitl14 too
    "kaiko_vitl14": ("vit_large_patch14_reg4_dinov2", {"img_size": 518}),
    # lunit-io/benchmark-ssl-pathology DINO ViT-S/8
    "lunit_vits8": ("vit_small_patch8_224", {"img_size": 224}),
    # GPFM: DINOv2 ViT-L/14 at 224
    "gpfm": ("vit_large_patch14_dinov2", {"img_size": 224, "patch_size": 14, "init_values": 1e-5}),
    "vit256_s16": ("vit_small_patch16_224", {"img_size": 224}),
    # owkin/phikon-v2: transformers' Dinov2Model, ViT-L/16 at 224 with LayerScale, no registers
    # (its transformers layout and position-embedding resampling: tests/unit/models/test_phikon.py)
    "phikon_v2": ("vit_large_patch16_224", {"img_size": 224, "init_values": 1e-5}),
}
# Real size on 2 cores: ViT-S, ViT-B and the ViT-L ones (one image each). The ViT-L ones take
# ≈ 5 s each on an idle 2-core machine (weights drawn ≈ 2 s, two forwards ≈ 1.3 s each) and
# 3–4× that when the machine is shared: marked slow (they still run in `make test`).
VIT_L = {"kaiko_vitl14", "uni", "gpfm"}
FORWARD_REAL = ["vit256_s16", "kaiko_vits16", "kaiko_vitb16", "lunit_vits8", *sorted(VIT_L)]


def _timm_recipe(name: str, **overrides) -> nn.Module:
    arch, kwargs = RECIPES[name]
    return timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, **{**kwargs, **overrides})


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_every_timm_encoder_has_a_recipe():
    assert set(list_encoders()) - set(RECIPES) == {"conch_v1_5"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_real_size_equals_the_published_recipe(name):
    """Same keys, same shapes, hence the same parameter count as timm's model from the card."""
    with torch.device("meta"):
        ours = create_encoder(name).trunk
        theirs = _timm_recipe(name)
    assert _shapes(ours) == _shapes(theirs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def _random_real(name: str) -> nn.Module:
    """The encoder at real size with random weights, fast: allocated uninitialised from the meta
    build, then every parameter drawn so that each one moves the output (LayerScale ≈ 0.1, not
    1e-5; non-zero biases; norms around 1)."""
    with torch.device("meta"):
        enc = create_encoder(name)
    enc = enc.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in enc.modules():
            for pname, p in mod.named_parameters(recurse=False):
                p.normal_(0.0, 0.02, generator=g)
                if isinstance(mod, nn.LayerNorm) and pname == "weight":
                    p.add_(1.0)
                if isinstance(mod, timm.layers.LayerScale):
                    p.add_(0.1)
    return enc


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in VIT_L else n for n in FORWARD_REAL])
def test_real_outputs_equal_timms_model_on_the_same_weights(name):
    enc = _random_real(name)
    with torch.device("meta"):
        ref = _timm_recipe(name)
    ref.load_state_dict(enc.trunk.state_dict(), strict=True, assign=True)
    ref.eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = enc(x), ref(x)  # timm's num_classes=0 head: the CLS token after the norm
    assert got.shape == want.shape == (1, enc.embed_dim)
    assert want.abs().mean() > 0.1  # an output that says something, not one crushed to zero
    assert (got - want).abs().max().item() <= 1e-5


def test_virchow2_card_pooling_on_timms_tokens():
    """Virchow2's card: CLS ⊕ mean of tokens[:, 5:] of timm's model (4 registers skipped)."""
    torch.manual_seed(0)
    enc = create_encoder("virchow2", depth=2).eval()
    ref = _timm_recipe("virchow2", depth=2, global_pool="")
    ref.load_state_dict(enc.trunk.state_dict(), strict=True)
    ref.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = ref(x)  # global_pool "" → all 1 + 4 + 256 tokens
        want = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
        got = enc(x)
    assert tokens.shape == (1, 261, 1280)
    assert (got - want).abs().max().item() <= 1e-5


# --- the file each encoder's weights are published as, written with random weights ----------


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _gpfm_teacher(state: dict) -> dict:
    """GPFM.pth (GitHub): a DINOv2 training checkpoint, teacher/student with ``backbone.`` keys,
    blocks chunked as ``blocks.<chunk>.<i>.…`` (chunk 0 holds the twin's one block),
    plus the mask token and DINO/iBOT heads the encoder does not have."""
    teacher = {}
    for k, v in state.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 6}.{i}.{k.split('.', 2)[2]}"
        teacher["backbone." + k] = v
    teacher["backbone.mask_token"] = torch.zeros(1, 1024)
    teacher["dino_head.mlp.0.weight"] = torch.zeros(8, 1024)
    teacher["ibot_head.mlp.0.weight"] = torch.zeros(8, 1024)
    return {"teacher": teacher, "student": {"backbone.cls_token": torch.zeros(1)}, "iteration": 7}


def _hipt_dino(state: dict) -> dict:
    """vit256_small_dino.pth: DINO's checkpoint, ``teacher``/``student`` with ``backbone.`` /
    ``module.backbone.`` keys, the DINO head, and ``args`` as an argparse.Namespace."""
    head = {"head.last_layer.weight_g": torch.ones(8, 1)}
    return {
        "teacher": {**_prefixed(state, "backbone."), **head},
        "student": {**_prefixed(state, "module.backbone."), **head},
        "args": argparse.Namespace(arch="vit_small", patch_size=16),
        "epoch": 100,
    }


def _torch_save(make: Callable[[dict], object]) -> Callable[[dict, Path], None]:
    return lambda state, path: torch.save(make(state), path)


def _safetensors(state: dict, path: Path) -> None:
    save_file(state, path)


# name: (published file name, how that file is written). Sources: the Hugging Face repos'
# file lists (pytorch_model.bin / model.safetensors), GPFM's and Lunit's GitHub releases,
# CONCH v1.5's pytorch_model_vision.bin (trunk.* / attn_pool_contrast.* / ln_contrast.*).
PUBLISHED_FILES: dict[str, tuple[str, Callable[[dict, Path], None]]] = {
    "uni": ("pytorch_model.bin", _torch_save(dict)),
    "uni2_h": ("pytorch_model.bin", _torch_save(dict)),
    "virchow": ("pytorch_model.bin", _torch_save(dict)),
    "virchow2": ("model.safetensors", _safetensors),
    "h_optimus_0": ("model.safetensors", _safetensors),
    "h_optimus_1": ("pytorch_model.bin", _torch_save(dict)),
    "gigapath": ("pytorch_model.bin", _torch_save(dict)),
    "kaiko_vits16": ("model.safetensors", _safetensors),
    "kaiko_vitb16": ("model.safetensors", _safetensors),
    "kaiko_vitl14": ("model.safetensors", _safetensors),
    "lunit_vits8": ("dino_vit_small_patch8_ep200.torch", _torch_save(dict)),
    "gpfm": ("GPFM.pth", _torch_save(_gpfm_teacher)),
    "conch_v1_5": ("pytorch_model_vision.bin", _torch_save(dict)),
    "vit256_s16": ("vit256_small_dino.pth", _torch_save(_hipt_dino)),
}


def test_every_encoder_has_a_published_file_layout():
    # phikon_v2's model.safetensors is in transformers' Dinov2Model layout (other key names, q/k/v
    # apart): written and loaded in tests/unit/models/test_phikon.py
    assert set(PUBLISHED_FILES) == set(list_encoders()) - {"phikon_v2"}


def _twin(name: str) -> nn.Module:
    """Real widths and token layout, one block (the file layout does not depend on depth)."""
    return create_encoder(name, depth=1)


@pytest.mark.parametrize("name", sorted(PUBLISHED_FILES))
def test_published_file_loads_strictly_and_a_renamed_key_is_named(name, tmp_path):
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in _twin(name).trunk.state_dict().items()}
    fname, write = PUBLISHED_FILES[name]
    dst = _twin(name)
    for p in dst.parameters():
        nn.init.zeros_(p)
    write(state, tmp_path / fname)
    load_encoder_checkpoint(dst, str(tmp_path / fname))
    assert all(torch.equal(v, state[k]) for k, v in dst.trunk.state_dict().items())

    key = next(k for k in state if k.endswith("blocks.0.norm1.weight"))
    renamed = {(key.replace("norm1", "norm_1") if k == key else k): v for k, v in state.items()}
    write(renamed, tmp_path / ("renamed_" + fname))
    with pytest.raises(CheckpointError) as err:
        load_encoder_checkpoint(dst, str(tmp_path / ("renamed_" + fname)))
    msg = str(err.value)
    assert f"missing keys: {key}" in msg and f"unexpected keys: {key.replace('norm1', 'norm_1')}" in msg
    assert "renamed_" + fname in msg


def test_kaiko_vitl14_loads_both_position_grids_as_timm_would(tmp_path, caplog):
    """The port's model.safetensors has the 37×37 grid it is built at (the published-file test
    above); a file with a 16×16 grid (a model built at 224) loads too, its pos_embed resampled
    exactly as timm's checkpoint_filter_fn does when torch.hub builds kaiko's vitl14 at 518."""
    torch.manual_seed(0)
    with torch.device("meta"):
        at_224 = _timm_recipe("kaiko_vitl14", depth=1, img_size=224)
    state = {k: torch.randn(v.shape) for k, v in at_224.state_dict().items()}
    assert state["pos_embed"].shape == (1, 256, 1024)  # no_embed_class: patch positions only
    torch.save(state, tmp_path / "vitl14.pth")
    dst = create_encoder("kaiko_vitl14", depth=1)
    with caplog.at_level("INFO", logger="hipt_ray.models.encoders"):
        load_encoder_checkpoint(dst, str(tmp_path / "vitl14.pth"))
    assert "vitl14.pth: resampling pos_embed from 16×16 to 37×37" in caplog.text

    ref = _timm_recipe("kaiko_vitl14", depth=1)
    want = checkpoint_filter_fn(dict(state), ref)
    assert want["pos_embed"].shape == (1, 1369, 1024)
    got = dst.trunk.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)


def test_kaiko_vitl14_loads_dinov2s_register_layout_as_timm_would(tmp_path, caplog):
    """A file in DINOv2's own layout (register_tokens, mask_token, the CLS's position in front of a
    16×16 grid), as a DINOv2 training run saves it: converted and resampled as timm does."""
    torch.manual_seed(0)
    with torch.device("meta"):
        at_224 = _timm_recipe("kaiko_vitl14", depth=1, img_size=224)
    state = {k: torch.randn(v.shape) for k, v in at_224.state_dict().items() if k != "reg_token"}
    state["register_tokens"] = torch.randn(1, 4, 1024)
    state["pos_embed"] = torch.randn(1, 1 + 256, 1024)
    state["mask_token"] = torch.randn(1, 1024)
    torch.save({"teacher": _prefixed(state, "backbone.")}, tmp_path / "teacher_checkpoint.pth")
    dst = create_encoder("kaiko_vitl14", depth=1)
    with caplog.at_level("INFO", logger="hipt_ray.models.encoders"):
        load_encoder_checkpoint(dst, str(tmp_path / "teacher_checkpoint.pth"))
    assert "converting DINOv2's register layout" in caplog.text and "from 16×16 to 37×37" in caplog.text

    want = checkpoint_filter_fn(dict(state), _timm_recipe("kaiko_vitl14", depth=1))
    got = dst.trunk.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
    assert not torch.equal(got["cls_token"], state["cls_token"])  # the CLS's position folded in


def test_kaiko_vitl14_refuses_a_grid_that_is_not_square(tmp_path):
    state = {k: v.clone() for k, v in create_encoder("kaiko_vitl14", depth=1).trunk.state_dict().items()}
    state["pos_embed"] = torch.zeros(1, 1370, 1024)  # the CLS's position in front: not this layout
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"pos_embed: checkpoint \(1, 1370, 1024\) vs model \(1, 1369, 1024\)"):
        load_encoder_checkpoint(create_encoder("kaiko_vitl14", depth=1), str(tmp_path / "model.safetensors"))


# --- bad input -------------------------------------------------------------------------------


def test_another_encoders_file_names_the_first_mismatching_key_and_both_shapes(tmp_path):
    """UNI's file given to GPFM (both ViT-L, 1024-d): the patch embedding is the first key whose
    shape differs (16×16 vs 14×14 patches); the message says so before anything else."""
    with torch.device("meta"):
        uni = create_encoder("uni", depth=1)
    gpfm = create_encoder("gpfm", depth=1)
    state = {k: torch.zeros(v.shape) for k, v in uni.trunk.state_dict().items()}
    save_file(state, tmp_path / "uni.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_encoder_checkpoint(gpfm, str(tmp_path / "uni.safetensors"))
    msg = str(err.value)
    first = "pos_embed: checkpoint (1, 197, 1024) vs model (1, 257, 1024)"
    assert "uni.safetensors" in msg and f"first mis-shaped key {first}" in msg
    assert "patch_embed.proj.weight: checkpoint (1024, 3, 16, 16) vs model (1024, 3, 14, 14)" in msg


def test_a_file_of_many_wrong_keys_stays_readable(tmp_path):
    """Virchow2's file given to UNI: hundreds of differences, listed as counts and the first few."""
    with torch.device("meta"):
        v2 = create_encoder("virchow2", depth=4)
    uni = create_encoder("kaiko_vits16")  # small: any other encoder makes the point
    save_file({k: torch.zeros(v.shape) for k, v in v2.trunk.state_dict().items()}, tmp_path / "v2.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_encoder_checkpoint(uni, str(tmp_path / "v2.safetensors"))
    msg = str(err.value)
    assert len(msg) < 2000 and "more)" in msg and "missing keys: blocks.10" in msg


@pytest.mark.parametrize(
    "content, why",
    [
        (b"", "not a readable PyTorch checkpoint"),
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "not a readable PyTorch checkpoint"),
        (b"slide_id,case_id\na,b\n", "not a readable PyTorch checkpoint"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_named(tmp_path, content, why):
    (tmp_path / "weights.bin").write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"weights\.bin: {why}"):
        load_encoder_checkpoint(create_encoder("kaiko_vits16", depth=1), str(tmp_path / "weights.bin"))


def test_a_truncated_torch_file_is_named(tmp_path):
    enc = create_encoder("kaiko_vits16", depth=1)
    torch.save(enc.trunk.state_dict(), tmp_path / "pytorch_model.bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a readable PyTorch checkpoint"):
        load_encoder_checkpoint(enc, str(tmp_path / "pytorch_model.bin"))


class _RunsCode:
    """An object whose unpickling would create a file: what a crafted weight file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_file_with_code_is_refused_and_its_code_never_runs(tmp_path):
    enc = create_encoder("kaiko_vits16", depth=1)
    state = enc.trunk.state_dict()
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save({"model": state, "payload": _RunsCode(marker)}, buf)
    (tmp_path / "pytorch_model.bin").write_bytes(buf.getvalue())
    with pytest.raises(
        CheckpointError, match=r"pytorch_model\.bin: refused to unpickle.*model\.allow_unsafe_pickle=true"
    ):
        load_encoder_checkpoint(enc, str(tmp_path / "pytorch_model.bin"))
    assert not marker.exists()


def test_the_opt_in_loads_a_trusted_file_with_more_than_tensors(tmp_path):
    torch.manual_seed(0)
    src = create_encoder("kaiko_vits16", depth=1)
    buf = io.BytesIO()
    torch.save({"model": src.trunk.state_dict(), "cfg": io.StringIO("trusted")}, buf)
    (tmp_path / "trusted.bin").write_bytes(buf.getvalue())
    dst = create_encoder("kaiko_vits16", depth=1)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_encoder_checkpoint(dst, str(tmp_path / "trusted.bin"))
    load_encoder_checkpoint(dst, str(tmp_path / "trusted.bin"), allow_unsafe_pickle=True)
    assert torch.equal(dst.trunk.cls_token, src.trunk.cls_token)


def test_a_registered_encoders_layout_is_named():
    """At real size (meta tensors: no file of 1.2 GB written), UNI's weights offered to GPFM."""
    with torch.device("meta"):
        uni, gpfm = create_encoder("uni"), create_encoder("gpfm")
    # UNI and Phikon-v2 (once its transformers keys are renamed) are both timm's ViT-L/16 at 224
    with pytest.raises(
        CheckpointError, match=r"has the keys and shapes of 'phikon_v2' and 'uni': set model\.patch_encoder to the one"
    ):
        check_fits(gpfm.trunk, uni.trunk.state_dict(), source="w.bin", name="gpfm")
    with pytest.raises(CheckpointError, match=r"has the keys and shapes of 'uni': set model\.patch_encoder=uni"):
        check_fits(gpfm.trunk, uni.trunk.state_dict(), source="w.bin", name="phikon_v2")
    check_fits(gpfm.trunk, gpfm.trunk.state_dict(), source="w.bin", name="gpfm")  # fits: no error
    with torch.device("meta"):
        h0 = create_encoder("h_optimus_0")
    with pytest.raises(
        CheckpointError, match=r"of 'h_optimus_0' and 'h_optimus_1': set model\.patch_encoder to the one it is"
    ):
        check_fits(gpfm.trunk, h0.trunk.state_dict(), source="w.bin", name="gpfm")
