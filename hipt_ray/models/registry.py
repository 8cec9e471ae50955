"""``create_model(name, **overrides)``: the real HIPT models and tiny twins of the same
structure (for tests and the demo)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.nn as nn

from hipt_ray.config import ConfigError
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
