"""Inference wrappers: reduced precision and ``torch.compile`` with inductor freezing.

Kept apart from the modules themselves, which stay plain ``nn.Module``s that load and export
official checkpoints. :func:`prepare_for_inference` is the default fast path: bf16 where the
device runs it natively (CUDA with bf16, CPUs with AVX-512 bf16/AMX), compiled and frozen, with
a fall-back to eager execution if compilation fails on the node.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import cast

import torch
import torch.nn as nn

from hipt_ray.config import ConfigError
from hipt_ray.models.hipt4k import HIPT4K

log = logging.getLogger(__name__)
PAD_PATCHES = 32  # the compiled ViT-256's batch sizes are multiples of this


def wants_gpu(setting: bool | str, *, available: bool) -> bool:
    """The one GPU decision: ``setting`` is ``embed.use_gpu`` (``True``, ``False`` or ``"auto"``);
    ``available`` whether GPUs are there to use (the cluster's, for a job that asks Ray for
    them; this process's, for a model run here). ``"auto"`` uses them when they are there."""
    return available if setting == "auto" else bool(setting)


def cluster_wants_gpu(setting: bool | str, *, gpus: int | None, key: str, source: str) -> bool:
    """The GPU decision for a job's model actors or training workers on a cluster that may
    grow: ``gpus`` is how many GPUs the cluster has or its autoscaler can add (``None``: no
    limit), read from ``source``. ``"auto"`` uses them when there can be any, so a GPU cluster
    whose GPU nodes start at zero still gets them (the actors' requests make the autoscaler
    launch them).

    Raises:
        ConfigError: ``key`` is ``true`` and no node can ever provide a GPU (the job would wait
            for one forever).
    """
    possible = gpus is None or gpus > 0
    if setting is True and not possible:
        raise ConfigError(
            f"{key}=true but this cluster has no GPU and cannot add one (read from {source}); "
            f"add a GPU node type to the cluster or set {key}=auto"
        )
    return wants_gpu(setting, available=possible)


def inference_device(setting: bool | str, *, where: str = "this process") -> torch.device:
    """Where a model runs in this process: CUDA if :func:`wants_gpu` says so and this process
    sees a GPU, else the CPU. ``"auto"`` falls back to the CPU; ``True`` does not.

    Raises:
        RuntimeError: ``setting`` is ``True`` (a GPU was asked for, e.g. Ray placed this actor
            on a GPU) and torch cannot use one here; the message names ``where`` and the cause.
    """
    cuda = torch.cuda.is_available()
    if setting is True and not cuda:
        raise RuntimeError(f"a GPU was assigned on {where} but torch cannot use it: {_cuda_cause()}")
    return torch.device("cuda" if cuda and wants_gpu(setting, available=cuda) else "cpu")


def _cuda_cause() -> str:
    """Why ``torch.cuda.is_available()`` is False: a CPU-only torch build, no device visible to
    this process, or the driver's own error."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    try:
        n = torch.cuda.device_count()
        torch.cuda.init()
    except Exception as exc:  # the driver's reason, e.g. "Found no NVIDIA driver on your system"
        return f"CUDA {torch.version.cuda} build, {type(exc).__name__}: {exc}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"CUDA {torch.version.cuda} build sees {n} devices (CUDA_VISIBLE_DEVICES={visible!r})"


def fast_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 where the device computes it natively, else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


class CastInputs(nn.Module):
    """Runs ``model`` (already in ``dtype``) on inputs cast to ``dtype``; float32 outputs.

    With ``eager`` given, a failure of the (compiled) ``model`` switches to ``eager`` for good,
    so that a node without a working compiler still embeds, only slower.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, *, eager: nn.Module | None = None) -> None:
        super().__init__()
        self.model, self.dtype, self.eager = model, dtype, eager

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.eager is None:
            return self.model(x).float()
        try:
            return self.model(x).float()
        except Exception as exc:  # compiler missing or failing on this node
            log.warning("torch.compile failed (%s); running eager instead", exc)
            self.model, self.eager = self.eager, None
            return self.model(x).float()


def compile_for_inference(
    model: nn.Module, *, dtype: torch.dtype = torch.bfloat16, dynamic: bool | None = None
) -> nn.Module:
    """A frozen, compiled copy of ``model`` for inference in ``dtype`` (the original is untouched).

    Freezing lets inductor fold the weights into prepacked kernels, which is what makes bf16
    fast on CPUs with AVX-512 bf16/AMX. Each new input shape compiles once (tens of seconds).
    """
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    frozen = copy.deepcopy(model).eval().requires_grad_(False).to(dtype)
    # torch.compile(module) returns an OptimizedModule (an nn.Module); its annotation only says
    # "a callable like the argument"
    compiled = cast(nn.Module, torch.compile(frozen, dynamic=dynamic))
    return CastInputs(compiled, dtype, eager=frozen)


def prepare_for_inference(
    model: HIPT4K, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, compile: bool = True
) -> HIPT4K:
    """A copy of ``model`` on ``device`` in its fastest safe form (see the module docstring).

    ``dtype`` defaults to :func:`fast_dtype`; outputs are float32 either way and agree with
    fp32 to cosine > 0.999 on HIPT-4K.
    """
    dtype = dtype or fast_dtype(device)
    fast = copy.deepcopy(model).eval().requires_grad_(False).to(device)
    if compile:
        # Only ViT-256 (≈ 99.9 % of the FLOPs) is compiled, on batches padded to multiples of 32
        # patches: compiled, every new region size (edge regions come in hundreds) recompiled
        # both models, minutes each on a CPU, until Dynamo's cache limit sent the rest to eager.
        fast.vit256 = compile_for_inference(fast.vit256, dtype=dtype)
        fast.pad_patches = min(fast.micro_batch, PAD_PATCHES)
    elif dtype != torch.float32:
        fast.vit256 = CastInputs(fast.vit256.to(dtype), dtype)
    if dtype != torch.float32:
        fast.vit4k = CastInputs(fast.vit4k.to(dtype), dtype)
    return fast
