"""Official HIPT/DINO checkpoints in and out.

The published files (``vit256_small_dino.pth``, ``vit4k_xs_dino.pth``) are DINO training
checkpoints: a dict with ``teacher`` and/or ``student`` state dicts whose keys carry ``module.``
and/or ``backbone.`` prefixes, plus the DINO projection head (``head.*``), and training
metadata (``args`` is an ``argparse.Namespace``). Unlike the published loader, which silently
keeps random weights when a file is missing or keys do not match, every mismatch here is an
error that lists the keys. Nothing is unpickled beyond tensors and plain containers unless the
caller opts in.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import fsspec
import torch
import torch.nn as nn

from hipt_ray.storage import is_remote, storage_options

log = logging.getLogger(__name__)

# What DINO training checkpoints need beyond tensors and plain containers.
# (typed as torch.serialization.safe_globals takes it: a list of classes or (class, name) pairs)
SAFE_GLOBALS: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [argparse.Namespace]
_PREFIXES = ("module.", "backbone.")
_SKIPPED = ("head.",)  # the DINO projection head is not part of the backbone


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message lists the offending keys."""


def _open(uri: str, mode: str):
    if is_remote(uri):
        return fsspec.open(uri, mode, **storage_options(uri))
    return fsspec.open(uri, mode, auto_mkdir="w" in mode)


UNSAFE_OPT_IN = "model.allow_unsafe_pickle=true"


def load_trusted(source: str | io.BytesIO, *, name: str | None = None, allow_unsafe_pickle: bool = False) -> object:
    """``torch.load`` restricted to tensors and plain Python types (``weights_only=True``), so
    that a crafted file cannot run code; anything else is refused on one line that names the
    file (``name``, default the path) and the opt-in (``model.allow_unsafe_pickle=true``, for
    files you trust)."""
    name = name or str(source)
    if allow_unsafe_pickle:
        log.warning("%s: loading with full unpickling (%s)", name, UNSAFE_OPT_IN)
        return torch.load(source, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        what = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise CheckpointError(
            f"{name}: refused to unpickle it, it holds more than tensors and plain types"
            f"{' (' + what.rstrip('.') + ')' if what else ''}; if you trust the file, set {UNSAFE_OPT_IN}"
        ) from None
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(f"{name}: not a readable PyTorch checkpoint ({type(exc).__name__}: {first})") from None


def read_checkpoint(uri: str, *, allow_unsafe_pickle: bool = False) -> object:
    """Load a checkpoint file from a path or ``s3://`` URI onto the CPU (see :func:`load_trusted`)."""
    try:
        with _open(uri, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {uri}") from None
    return load_trusted(io.BytesIO(data), name=uri, allow_unsafe_pickle=allow_unsafe_pickle)


def extract_state_dict(obj: object, *, key: str | None = "teacher") -> dict[str, torch.Tensor]:
    """The backbone state dict inside a checkpoint: ``obj[key]`` when present (``teacher`` by
    default, else ``student``), else ``obj`` itself; prefixes stripped, DINO head dropped."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"expected a dict checkpoint, got {type(obj).__name__}")
    state, where = obj, None
    if key and key in obj:
        where = key
    elif "teacher" in obj or "student" in obj:
        where = "teacher" if "teacher" in obj else "student"
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        where = "state_dict"
    if where is not None:
        state = obj[where]
        if not isinstance(state, Mapping):
            raise CheckpointError(f"expected a state dict under {where!r}, got {type(state).__name__}")
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        if k.startswith(_SKIPPED):
            continue
        out[k] = v
    return out


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped key is an error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped keys: {'; '.join(shapes)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + " | ".join(problems))
    model.load_state_dict(state, strict=True)


def load_checkpoint(
    model: nn.Module, uri: str, *, key: str | None = "teacher", allow_unsafe_pickle: bool = False
) -> nn.Module:
    """Load an official HIPT/DINO checkpoint or a plain state dict into ``model`` (strict)."""
    state = extract_state_dict(read_checkpoint(uri, allow_unsafe_pickle=allow_unsafe_pickle), key=key)
    load_state_dict_strict(model, state, source=uri)
    return model


def export_checkpoint(model: nn.Module, uri: str, *, metadata: dict | None = None) -> None:
    """Write ``model``'s weights in the official layout: ``{"teacher": {"backbone.<key>": …}}``,
    which the published HIPT loader and :func:`load_checkpoint` both read."""
    state = {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {"teacher": state, "hipt_ray": {"model_id": model_id(model), **(metadata or {})}}
    buf = io.BytesIO()
    torch.save(payload, buf)
    with _open(uri, "wb") as fh:
        fh.write(buf.getvalue())


def model_id(model: nn.Module) -> str:
    """A short hash of the weights: two models with equal ids compute the same embeddings."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]
