"""``create_model(name, **overrides)``: the real HIPT models and tiny twins of the same
structure (for tests and the demo)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.nn as nn

from hipt_ray.config import ConfigError
from hipt_ray.models.encoders import create_encoder
from hipt_ray.models.hipt4k import HIPT4K
from hipt_ray.models.vit import ViT4K, ViT256

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_Builder = TypeVar("_Builder", bound=Callable[..., nn.Module])


def register(name: str) -> Callable[[_Builder], _Builder]:
    """Register a model builder under ``name``; the builder is returned as it is (its own
    return type kept, so ``hipt4k()`` is a ``HIPT4K`` to the type checker)."""

    def deco(fn: _Builder) -> _Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; ``overrides`` go to its constructor (e.g. ``drop_path_rate``)."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name](**overrides)


@register("vit256_s16")
def vit256_s16(**kw) -> ViT256:
    return ViT256(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kw})


@register("vit4k_xs")
def vit4k_xs(**kw) -> ViT4K:
    return ViT4K(**{"in_dim": 384, "embed_dim": 192, "depth": 6, "num_heads": 6, **kw})


@register("hipt4k")
def hipt4k(*, micro_batch: int | None = None, **kw) -> HIPT4K:
    return HIPT4K(vit256=vit256_s16(**kw), vit4k=vit4k_xs(**kw), micro_batch=micro_batch)


@register("vit256_tiny")
def vit256_tiny(**kw) -> ViT256:
    return ViT256(**{"embed_dim": 48, "depth": 2, "num_heads": 2, **kw})


@register("vit4k_tiny")
def vit4k_tiny(**kw) -> ViT4K:
    return ViT4K(**{"in_dim": 48, "embed_dim": 32, "depth": 2, "num_heads": 2, **kw})


@register("hipt4k_tiny")
def hipt4k_tiny(*, micro_batch: int | None = None, **kw) -> HIPT4K:
    return HIPT4K(vit256=vit256_tiny(**kw), vit4k=vit4k_tiny(**kw), micro_batch=micro_batch)


# The ViT-4K of each HIPT-4K name, for a patch encoder of another width (model.patch_encoder).
_VIT4K_OF = {"hipt4k": vit4k_xs, "hipt4k_tiny": vit4k_tiny}


def create_hipt4k(architecture: dict, *, micro_batch: int | None = None) -> HIPT4K:
    """The HIPT-4K an ``architecture`` describes (random weights), as
    :func:`hipt_ray.models.loading.architecture` writes it: ``{"name": "hipt4k"}`` is the
    registered model itself; with ``encoder``, ``patch_px`` and ``input_px`` it is that patch
    encoder (:func:`~hipt_ray.models.encoders.create_encoder`) under the named model's ViT-4K
    with the encoder's width as input. HIPT's ``vit256_s16`` goes in unwrapped, so its weights
    keep the published key names (and the model its id)."""
    name, encoder = architecture["name"], architecture.get("encoder")
    if encoder is None:
        model = create_model(name, micro_batch=micro_batch)
        assert isinstance(model, HIPT4K), type(model)  # only the HIPT-4K builders take micro_batch
    else:
        if name not in _VIT4K_OF:
            raise ConfigError(f"model.name={name!r} with a patch encoder: expected one of {', '.join(_VIT4K_OF)}")
        enc = create_encoder(encoder)
        vit256 = enc.trunk if isinstance(enc.trunk, ViT256) else enc
        model = HIPT4K(
            vit256=vit256,
            vit4k=_VIT4K_OF[name](in_dim=enc.embed_dim),
            patch_px=architecture["patch_px"],
            input_px=architecture["input_px"],
            mean=enc.mean,
            std=enc.std,
            micro_batch=micro_batch,
        )
    model.architecture = dict(architecture)
    return model
