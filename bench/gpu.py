"""GPU checks and throughput of the real-size HIPT-4K, side by side in one run (for a lent GPU
machine; it also runs on CPU with ``--device cpu --model hipt4k_tiny`` as a smoke test).

    python bench/gpu.py [--device cuda] [--model hipt4k] [--reps 5] [--out results.json]

Numerics: each GPU variant's region embedding (``emb4k``) against an fp32 CPU reference of the
same weights on the same tissue region (cosine, max |Δ|), fused vs explicit attention, and the
region attention maps (sums, time). Throughput: regions/s (and patches/s) for fp32 / TF32 / bf16,
eager vs ``torch.compile``, two ViT-256 micro-batch sizes. Needs only torch, timm, numpy and
scikit-image (no Ray, no OpenSlide), so it runs on a bare GPU image.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hipt_ray.models import create_model, normalize_uint8, set_fused_attention  # noqa: E402
from hipt_ray.models.inference import prepare_for_inference  # noqa: E402
from hipt_ray.viz.attention import region_attention  # noqa: E402

GFLOP_REGION = 256 * 12.28 + 1.71  # ViT-256 on 256 patches + ViT-4K (see bench/models.py)


def tissue_region(side: int) -> np.ndarray:
    from skimage import data as skdata

    tile = skdata.immunohistochemistry()  # 512×512 RGB
    block = np.concatenate(
        [np.concatenate([tile, tile[:, ::-1]], 1), np.concatenate([tile[::-1], tile[::-1, ::-1]], 1)], 0
    )
    reps = -(-side // block.shape[0])
    return np.ascontiguousarray(np.tile(block, (reps, reps, 1))[:side, :side])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int) -> tuple[float, object]:
    out = fn()  # warm-up (and compilation)
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def dino_steps(args, stage: str, batch: int = 64, steps: int = 5) -> dict:
    """One DINO training step as the pretraining loop runs it (bf16 autocast on CUDA, AdamW, grad
    clipping, EMA teacher), on random crops: 2 global + 8 local. Augmentation cost not included."""
    import copy

    from hipt_ray.ssl import DINOHead, DINOLoss, MultiCrop, ema_update

    dev = args.device
    tiny = args.model.endswith("_tiny")
    if stage == "vit256":
        backbone = create_model("vit256_tiny" if tiny else "vit256_s16", drop_path_rate=0.1)
        shapes = [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8
        dim = backbone.embed_dim
    else:
        backbone = create_model("vit4k_tiny" if tiny else "vit4k_xs", drop_path_rate=0.1)
        shapes = [(backbone.in_dim, 14, 14)] * 2 + [(backbone.in_dim, 6, 6)] * 8
        dim = backbone.embed_dim
    out_dim = 4096 if tiny else 65536
    student = MultiCrop(backbone, DINOHead(in_dim=dim, out_dim=out_dim)).to(dev)
    teacher = copy.deepcopy(student).requires_grad_(False)
    loss_fn = DINOLoss(out_dim=out_dim).to(dev)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    crops = [torch.randn(batch, *s, device=dev) for s in shapes]
    amp = dev.startswith("cuda")

    def step() -> float:
        with torch.autocast("cuda" if amp else "cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(student(crops), teacher(crops[:2]), 0.04)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
        opt.step()
        ema_update(student, teacher, 0.996)
        return loss.item()

    sec, loss = timed(step, dev, steps)
    row = {
        "stage": stage,
        "batch": batch,
        "s_per_step": round(sec, 4),
        "samples_per_s": round(batch / sec, 1),
        "loss_finite": bool(np.isfinite(loss)),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="hipt4k")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = args.device
    results: dict = {"torch": torch.__version__, "device": dev}
    if dev.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(results), flush=True)
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    region = tissue_region(4096)
    x_cpu = normalize_uint8(torch.from_numpy(region).unsqueeze(0))
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = model(x_cpu)  # fp32 CPU reference
    results["cpu_fp32_region_s"] = round(time.perf_counter() - t0, 2)
    print(f"CPU fp32 reference: {results['cpu_fp32_region_s']} s per region", flush=True)

    x = x_cpu.to(dev)
    rows = []
    variants = [
        ("fp32", torch.float32, False, False, 64),
        ("fp32", torch.float32, False, False, 256),
        ("tf32", torch.float32, False, True, 256),
        ("bf16", torch.bfloat16, False, False, 64),
        ("bf16", torch.bfloat16, False, False, 256),
    ]
    if not args.no_compile:
        variants.append(("bf16+compile", torch.bfloat16, True, False, 256))
    for name, dtype, compile_, tf32, mb in variants:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        m = create_model(args.model, micro_batch=mb)
        m.load_state_dict(model.state_dict())
        fast = prepare_for_inference(m, device=dev, dtype=dtype, compile=compile_)
        with torch.no_grad():
            sec, emb = timed(lambda: fast(x), dev, args.reps)
        emb = emb.float().cpu()
        cos = F.cosine_similarity(emb, ref).item()
        row = {
            "variant": name,
            "micro_batch": mb,
            "s_per_region": round(sec, 4),
            "regions_per_s": round(1 / sec, 2),
            "patches_per_s": round(256 / sec, 1),
            "tflops": round(GFLOP_REGION / sec / 1e3, 1) if args.model == "hipt4k" else None,
            "cos_vs_cpu_fp32": round(cos, 6),
            "max_abs_diff": float((emb - ref).abs().max()),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    results["throughput"] = rows

    # Fused (SDPA) vs explicit attention, fp32 on the device: the same numbers.
    m = model.to(dev)
    with torch.no_grad():
        set_fused_attention(m, True)
        fused = m(x).cpu()
        set_fused_attention(m, False)
        naive = m(x).cpu()
        set_fused_attention(m, True)
    results["fused_vs_naive_max_abs"] = float((fused - naive).abs().max())
    print(f"fused vs explicit attention on {dev}: max |Δ| {results['fused_vs_naive_max_abs']:.2e}", flush=True)

    # Region attention maps on the device (the heatmap command's core), fp32.
    sec, att = timed(lambda: region_attention(m, region), dev, max(1, args.reps // 2))
    per_patch = att.vit256.reshape(att.vit256.shape[0], 16, 16, 16, 16).sum(axis=(2, 4))
    results["attention"] = {
        "s_per_window": round(sec, 3),
        "vit256_shape": list(att.vit256.shape),
        "vit4k_shape": list(att.vit4k.shape),
        "vit256_patch_sums_max_err": float(np.abs(per_patch - 1).max()),
        "vit4k_sums_max_err": float(np.abs(att.vit4k.sum(axis=(1, 2)) - 1).max()),
    }
    print(json.dumps(results["attention"]), flush=True)
    results["dino"] = [dino_steps(args, stage) for stage in ("vit256", "vit4k")]
    if dev.startswith("cuda"):
        results["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
