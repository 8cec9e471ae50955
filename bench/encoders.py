"""Patches/s of every registered patch encoder, and what embedding TCGA with each would take.

    python bench/encoders.py [--encoders uni,gpfm] [--reps 2] [--out results.json]
    python bench/encoders.py --tiny          # one-block twins: a smoke test of this script

For each encoder at real size and its native input (fp32, random weights: no download):
  - GFLOP per patch, counted by hand from a forward on the meta device (every Linear and
    Conv2d, plus attention's QKᵀ and AV at 4·T²·D per block; torch's FlopCounter misses fused
    attention on CPU). HIPT's ViT-S/16 at 256 px counts 12.28, as bench/models.py does.
  - patches/s on this CPU, a few patches (fewer for the big ones: a ViT-g/14 patch is ≈ 0.6
    TFLOP, seconds on 2 cores), median of ``--reps`` timed runs after one warm-up.
  - patches/s on the GPU in bf16 with ``torch.compile``, when ``torch.cuda.is_available()``.
Then the projection of embedding TCGA at HIPT's scale (408,218 regions of 256 patches each: 16×16
patches of 256 px, or of the encoder's own 224 px tiles) on 16 GPUs: from this run's GPU figures
when there are some, else from the H100 bf16 + compile figure in bench/results/ (ViT-S/16 at
256 px, patches/s) scaled by each encoder's GFLOP per patch relative to it — printed as a
FLOP-scaled estimate, not a measurement (big models usually run at a higher fraction of peak
than ViT-S, so for them the estimate errs long).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from hipt_ray.models.encoders import PatchEncoder, create_encoder, encoder_spec, list_encoders  # noqa: E402

TCGA_REGIONS, PATCHES_PER_REGION, GPUS = 408_218, 256, 16  # HIPT's TCGA; a 16×16 grid a region
REFERENCE = "vit256_s16"  # what bench/results/gpu_h100_*.json measured (inside HIPT-4K)
SAME_AS = {"h_optimus_1": "h_optimus_0"}  # identical architecture: measured once


def gflop_per_patch(enc: PatchEncoder) -> float:
    """GFLOP of one patch at the encoder's input size, from a forward on the meta device."""
    total = 0.0

    def linear(mod: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += 2.0 * inputs[0].numel() * mod.out_features

    def conv(mod: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        total += 2.0 * out.numel() * k

    def attention(mod: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        b, t, d = inputs[0].shape  # (B, T, D): QKᵀ and AV, 2·T²·D multiply-adds each
        total += 4.0 * b * t * t * d

    hooks = []
    for mod in enc.modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(linear))
        elif isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv))
        elif hasattr(mod, "qkv") and hasattr(mod, "num_heads"):  # timm's Attention
            hooks.append(mod.register_forward_hook(attention))
    try:
        with torch.no_grad():
            enc(torch.empty(1, 3, enc.input_px, enc.input_px, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return total / 1e9


def build(name: str, *, tiny: bool, device: str = "cpu") -> PatchEncoder:
    """The encoder with random weights, allocated from a meta build and drawn in place (timm's
    own initialisation of a 1.1 B-parameter model takes longer than timing it)."""
    with torch.device("meta"):
        enc = create_encoder(name, **({"depth": 1} if tiny else {}))
    enc = enc.to_empty(device=device).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0.0, 0.02)
    return enc


def n_patches(gflop: float, asked: int) -> int:
    """Patches per timed CPU run: ``asked`` for ViT-S/B/L sizes, 1 above ≈ 200 GFLOP a patch."""
    return 1 if gflop > 200 else asked


def cpu_rate(enc: PatchEncoder, batch: int, reps: int) -> float:
    x = torch.randn(batch, 3, enc.input_px, enc.input_px)
    with torch.no_grad():
        enc(x)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            enc(x)
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def gpu_rate(name: str, *, tiny: bool, batch: int, reps: int) -> float:
    """bf16 autocast + torch.compile on the GPU, patches/s (compile and first batches untimed)."""
    enc = build(name, tiny=tiny, device="cuda")
    model = torch.compile(enc)
    x = torch.randn(batch, 3, enc.input_px, enc.input_px, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    del model, enc
    torch.cuda.empty_cache()
    return batch / statistics.median(times)


def h100_reference(results_dir: Path = ROOT / "bench" / "results") -> tuple[float, str]:
    """ViT-S/16 patches/s in bf16 + compile (largest micro-batch) from the H100 run on file."""
    path = sorted(results_dir.glob("gpu_h100_*.json"))[-1]
    rows = [r for r in json.loads(path.read_text())["throughput"] if r["variant"] == "bf16+compile"]
    return max(rows, key=lambda r: r["micro_batch"])["patches_per_s"], path.name


def projection_hours(patches_per_s: float) -> float:
    """Hours to embed TCGA's regions on ``GPUS`` GPUs at ``patches_per_s`` each (compute only)."""
    return TCGA_REGIONS * PATCHES_PER_REGION / (GPUS * patches_per_s) / 3600


def measure(names: list[str], *, tiny: bool, patches: int, reps: int, gpu_batch: int) -> list[dict]:
    cuda = torch.cuda.is_available()
    rows: list[dict] = []
    for name in names:
        spec = encoder_spec(name)
        with torch.device("meta"):
            real = create_encoder(name)
        row = {
            "encoder": name,
            "input_px": spec.input_px,
            "embed_dim": spec.embed_dim,
            "params_m": round(sum(p.numel() for p in real.parameters()) / 1e6, 1),
            "gflop_per_patch": round(gflop_per_patch(real), 2),
        }
        twin = SAME_AS.get(name)
        done = next((r for r in rows if r["encoder"] == twin), None)
        if done is not None:
            row.update({k: done[k] for k in ("cpu_patches", "cpu_patches_per_s", "gpu_patches_per_s")})
            row["measured_as"] = twin
        else:
            enc = build(name, tiny=tiny)
            row["cpu_patches"] = n_patches(row["gflop_per_patch"], patches) if not tiny else 1
            row["cpu_patches_per_s"] = round(cpu_rate(enc, row["cpu_patches"], reps), 3)
            del enc
            row["gpu_patches_per_s"] = round(gpu_rate(name, tiny=tiny, batch=gpu_batch, reps=reps), 1) if cuda else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def project(rows: list[dict]) -> list[dict]:
    """Hours for TCGA on 16 GPUs per encoder: measured GPU rates, else FLOP-scaled H100 figures."""
    ref_rate, ref_file = h100_reference()
    ref_gflop = next((r["gflop_per_patch"] for r in rows if r["encoder"] == REFERENCE), None)
    if ref_gflop is None:
        with torch.device("meta"):
            ref_gflop = gflop_per_patch(create_encoder(REFERENCE))
    out = []
    for r in rows:
        if r.get("gpu_patches_per_s"):
            rate, how = r["gpu_patches_per_s"], "measured on this run's GPU (bf16, compiled)"
        else:
            rate = ref_rate * ref_gflop / r["gflop_per_patch"]
            how = f"FLOP-scaled estimate from {ref_file} (ViT-S/16 {ref_rate:,.0f} patches/s), not a measurement"
        out.append(
            {"encoder": r["encoder"], "gpu_patches_per_s": round(rate, 1), "hours": projection_hours(rate), "how": how}
        )
    return out


def cpu_name() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"Model name:\s*(.+)", text)
        return f"{m.group(1).strip() if m else 'CPU'}, {os.cpu_count()} cores"
    except OSError:
        return f"{os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoders", default=",".join(list_encoders()), help="comma-separated names")
    ap.add_argument("--patches", type=int, default=4, help="patches per CPU run (1 for models > 200 GFLOP/patch)")
    ap.add_argument("--reps", type=int, default=2, help="timed runs after one warm-up (median)")
    ap.add_argument("--gpu-batch", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="one-block twins on the CPU: a smoke test, not figures")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    names = [n for n in args.encoders.split(",") if n]
    load = os.getloadavg()[0]
    print(
        f"CPU: {cpu_name()}; load average {load:.2f}; torch {torch.__version__}; GPU: "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}"
        + ("; TINY one-block twins: CPU rates are not the encoders'" if args.tiny else ""),
        flush=True,
    )
    rows = measure(names, tiny=args.tiny, patches=args.patches, reps=args.reps, gpu_batch=args.gpu_batch)
    proj = project(rows)
    print(f"\nTCGA at HIPT's scale: {TCGA_REGIONS:,} regions × {PATCHES_PER_REGION} patches on {GPUS} GPUs")
    print(
        f"{'encoder':14} {'params M':>9} {'GFLOP/patch':>12} {'CPU patch/s':>12} {'CPU GFLOP/s':>12} "
        f"{'GPU patch/s':>12} {'GPU hours':>10}"
    )
    for r, p in zip(rows, proj, strict=True):
        print(
            f"{r['encoder']:14} {r['params_m']:9.1f} {r['gflop_per_patch']:12.2f} {r['cpu_patches_per_s']:12.3f} "
            f"{r['cpu_patches_per_s'] * r['gflop_per_patch']:12.1f} {p['gpu_patches_per_s']:12.1f} {p['hours']:10.2f}"
        )
    print("GPU patch/s and hours: " + "; ".join(sorted({p["how"] for p in proj})))
    print(
        f"load average at the end {os.getloadavg()[0]:.2f} (CPU GFLOP/s apart for one architecture: a shared machine)"
    )
    result = {"cpu": cpu_name(), "load_avg_1m": load, "tiny": args.tiny, "encoders": rows, "projection": proj}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
