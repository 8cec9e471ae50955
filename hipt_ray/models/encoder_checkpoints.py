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

import io
import logging
import re
from collections.abc import Mapping

import torch
import torch.nn as nn

from hipt_ray.models.checkpoints import CheckpointError, _open, load_state_dict_strict, load_trusted
from hipt_ray.models.encoders import PatchEncoder

log = logging.getLogger(__name__)

_WRAPPERS = ("teacher", "model", "state_dict", "student")  # teacher first: DINO evaluates it
_PREFIXES = ("module.", "backbone.", "_orig_mod.")
_TRAINING_ONLY = re.compile(r"^(mask_token$|dino_head\.|ibot_head\.|head\.)")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


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
    load_state_dict_strict(target, state, source=uri)
    return model
