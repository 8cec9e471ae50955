"""Patch-encoder weight files in, strictly, whatever layout they were published in.

Published layouts: a bare state dict (``pytorch_model.bin``), ``model.safetensors``, and training
checkpoints that wrap it in ``teacher``/``student``/``model``/``state_dict`` with ``module.`` /
``backbone.`` key prefixes. DINOv2 training checkpoints (GPFM's GitHub ``GPFM.pth``) also chunk the
blocks (``blocks.<chunk>.<i>.…`` for timm's ``blocks.<i>.…``) and carry training-only entries
(``mask_token``, ``dino_head.*``, ``ibot_head.*``) that the encoder does not have. After those
renames every missing, unexpected or mis-shaped key is an error that names it (never random
weights), and nothing is unpickled beyond tensors and plain containers unless the caller opts in.
"""

from __future__ import annotations

import functools
import io
import logging
import re
from collections.abc import Mapping

import torch
import torch.nn as nn

from hipt_ray.models.checkpoints import CheckpointError, _open, load_trusted
from hipt_ray.models.encoders import PatchEncoder, create_encoder, list_encoders

log = logging.getLogger(__name__)

_WRAPPERS = ("teacher", "model", "state_dict", "student")  # teacher first: DINO evaluates it
_PREFIXES = ("module.", "backbone.", "_orig_mod.")
_TRAINING_ONLY = re.compile(r"^(mask_token$|dino_head\.|ibot_head\.|head\.)")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
_LISTED = 10  # keys shown per kind of problem; the rest are counted


def read_weights(uri: str, *, allow_unsafe_pickle: bool = False) -> object:
    """The object in a weight file (path or ``s3://``): safetensors files (by suffix or by their
    header) as a dict of tensors, anything else through :func:`~hipt_ray.models.checkpoints.load_trusted`."""
    try:
        with _open(uri, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise CheckpointError(f"weight file not found: {uri}") from None
    if uri.endswith(".safetensors") or _looks_like_safetensors(data):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as exc:
            first = (str(exc).splitlines() or [""])[0]
            raise CheckpointError(f"{uri}: not a readable safetensors file ({type(exc).__name__}: {first})") from None
    if not data.startswith((b"PK\x03\x04", b"\x80")):
        # torch.save writes a zip archive (or, before torch 1.6, a pickle: protocol byte 0x80)
        raise CheckpointError(
            f"{uri}: not a readable PyTorch checkpoint (neither a torch.save zip/pickle nor a safetensors "
            f"file: {len(data)} bytes starting {data[:8]!r}); give the encoder's weight file"
        )
    return load_trusted(io.BytesIO(data), name=uri, allow_unsafe_pickle=allow_unsafe_pickle)


def _looks_like_safetensors(data: bytes) -> bool:
    # An 8-byte little-endian header length, then the JSON header; torch files are zip or pickle.
    return len(data) > 9 and data[8:10] in (b'{"', b"{ ")


def encoder_state_dict(obj: object, own_keys: set[str], *, source: str) -> dict[str, torch.Tensor]:
    """The encoder's state dict inside ``obj``, renamed to the keys in ``own_keys``: unwrap the
    training-checkpoint dicts, strip the prefixes, un-chunk DINOv2 blocks, drop training-only
    entries the encoder does not have. Nothing else is renamed or dropped."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    chunked = not any(_CHUNKED_BLOCK.match(k) for k in own_keys)
    out: dict[str, torch.Tensor] = {}
    dropped = []
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        k = str(key)
        while k.startswith(_PREFIXES):
            k = k.split(".", 1)[1]
        if chunked:
            k = _CHUNKED_BLOCK.sub(r"blocks.\1.", k)
        if k not in own_keys and _TRAINING_ONLY.match(k):
            dropped.append(k)
            continue
        if k in out:
            raise CheckpointError(f"{source}: two entries map to the key {k!r} after stripping prefixes")
        out[k] = value
    if dropped:
        log.info("%s: ignored %d training-only entries (%s)", source, len(dropped), ", ".join(sorted(dropped)[:5]))
    return out


def load_encoder_checkpoint(model: nn.Module, uri: str, *, allow_unsafe_pickle: bool = False) -> nn.Module:
    """Load a published patch-encoder weight file into ``model`` (a :class:`PatchEncoder`, whose
    ``trunk`` holds the published keys, or a bare network) strictly; returns ``model``."""
    target = model.trunk if isinstance(model, PatchEncoder) else model
    own = set(target.state_dict())
    state = encoder_state_dict(read_weights(uri, allow_unsafe_pickle=allow_unsafe_pickle), own, source=uri)
    if isinstance(model, PatchEncoder) and model.adapt_state is not None:
        state = model.adapt_state(state, source=uri)
    check_fits(target, state, source=uri, name=getattr(model, "name", None))
    target.load_state_dict(state, strict=True)
    return model


# Hugging Face transformers' Dinov2Model layout (Phikon-v2's model.safetensors) → timm's ViT. Files
# saved by transformers < 5 name the attention ``attention.attention.{query,key,value}`` and
# ``attention.output.dense``; transformers 5 names them ``attention.{q,k,v,o}_proj``; both load.
_HF_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$")
_HF_GLOBAL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_IN_BLOCK = {
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layer_scale1": "ls1",
    "layer_scale2": "ls2",
    "norm1": "norm1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_PARAM = {"weight": "weight", "bias": "bias", "lambda1": "gamma"}
_HF_TRAINING_ONLY = ("embeddings.mask_token",)  # iBOT's masked-patch token; inference never uses it
_QKV_PART = {"query": "q", "key": "k", "value": "v"}


def _is_hf_dinov2(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("embeddings.", "encoder.layer.")) for k in state)


def _hf_block_key(rest: str) -> str | None:
    module, _, param = rest.rpartition(".")
    if module in _HF_IN_BLOCK and param in _HF_PARAM:
        return f"{_HF_IN_BLOCK[module]}.{_HF_PARAM[param]}"
    return None


def adapt_hf_dinov2_state(state: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """Rename a transformers ``Dinov2Model`` state dict to timm's ViT keys, fusing each block's
    separate q/k/v projections into timm's ``attn.qkv`` (rows q, then k, then v). A state that is
    not in that layout is returned as it is (the strict check judges it). Any key this mapping does
    not know, and any block missing one of q/k/v, is an error naming the keys."""
    if not _is_hf_dinov2(state):
        return state
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        if key in _HF_TRAINING_ONLY:
            log.info("%s: ignored the training-only entry %s", source, key)
            continue
        if key in _HF_GLOBAL:
            out[_HF_GLOBAL[key]] = value
            continue
        block = _HF_BLOCK.match(key)
        qkv_part = _HF_QKV.match(block.group(2)) if block else None
        if block and qkv_part:
            part = _QKV_PART.get(qkv_part.group(1) or "", qkv_part.group(2))
            qkv.setdefault((int(block.group(1)), qkv_part.group(3)), {})[part] = value
            continue
        timm_key = _hf_block_key(block.group(2)) if block else None
        if block is None or timm_key is None:
            unmapped.append(key)
            continue
        out[f"blocks.{block.group(1)}.{timm_key}"] = value
    if unmapped:
        raise CheckpointError(
            f"{source}: keys not in the transformers Dinov2Model layout (no timm name for them): "
            + ", ".join(sorted(unmapped))
        )
    out.update(_fuse_qkv(qkv, source=source))
    return out


def _fuse_qkv(parts: dict[tuple[int, str], dict[str, torch.Tensor]], *, source: str) -> dict[str, torch.Tensor]:
    fused: dict[str, torch.Tensor] = {}
    incomplete = []
    for (block, kind), by_part in sorted(parts.items()):
        missing = [p for p in "qkv" if p not in by_part]
        if missing:
            incomplete.append(f"encoder.layer.{block}.attention {kind} of {'/'.join(missing)}")
            continue
        fused[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([by_part["q"], by_part["k"], by_part["v"]], dim=0)
    if incomplete:
        raise CheckpointError(f"{source}: attention projections missing: {'; '.join(incomplete)}")
    return fused


def check_fits(target: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, name: str | None = None) -> None:
    """Raise unless ``state`` has exactly ``target``'s keys and shapes. The message leads with the
    first mis-shaped key in the model's order and both shapes (what tells a wrong encoder's file
    apart), lists at most ten keys of each kind and counts the rest, and names the registered
    encoder whose layout the file has, if one does."""
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    problems = [f"first mis-shaped key {shapes[0]}"] if shapes else []
    for what, keys, sep in (("missing", missing, ", "), ("unexpected", unexpected, ", "), ("mis-shaped", shapes, "; ")):
        if keys:
            more = f" … ({len(keys) - _LISTED} more)" if len(keys) > _LISTED else ""
            problems.append(f"{what} keys: {sep.join(keys[:_LISTED])}{more}")
    what = f"encoder {name!r}" if name else type(target).__name__
    others = _layouts_of(state, exclude=name)
    # several encoders share one layout (H-optimus-0 and -1; UNI and Phikon-v2 once renamed)
    choice = f"={others[0]}" if len(others) == 1 else " to the one it is"
    hint = f"; the file has the keys and shapes of {' and '.join(map(repr, others))}: set model.patch_encoder{choice}"
    hint = hint if others else ""
    raise CheckpointError(f"{source} does not fit {what}: " + " | ".join(problems) + hint)


def _layouts_of(state: Mapping[str, torch.Tensor], *, exclude: str | None) -> list[str]:
    """The registered encoders (built at real size on the meta device) whose keys and shapes are
    exactly those of ``state`` (H-optimus-0 and -1 share theirs)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    return [n for n, own in _registered_layouts().items() if n != exclude and own == shapes]


@functools.cache
def _registered_layouts() -> dict[str, dict[str, tuple[int, ...]]]:
    """Every registered encoder's keys and shapes at real size (built once, on the meta device:
    about 3 s on 2 cores, paid only when a file does not fit)."""
    out = {}
    for name in list_encoders():
        with torch.device("meta"):
            trunk = create_encoder(name).trunk
        out[name] = {k: tuple(v.shape) for k, v in trunk.state_dict().items()}
    return out
