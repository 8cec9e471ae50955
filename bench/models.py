"""Throughput of ViT-256 and HIPT-4K on this machine, every variant measured side by side.

    .venv/bin/python bench/models.py [--reps 3] [--quick]
    .venv/bin/python bench/models.py --pixels [--model hipt4k_tiny] [--reps 5]

Prints patches/s (ViT-256) and regions/s (HIPT-4K) for fp32 vs bf16 (bf16 only where the CPU runs it
natively: on AVX2-only CPUs torch emulates it ≈ 60× slower than fp32), fused vs naive attention,
eager vs ``torch.compile`` (inductor freezing for inference) and several batch sizes, with the
achieved GFLOP/s against large-matmul rates measured in the same run. FLOPs are counted by hand
(torch's FlopCounter misses fused attention on CPU): ViT-256 = 12.28 GFLOP per 256 px patch,
ViT-4K = 1.71 GFLOP per region, so a 4096² region ≈ 3.15 TFLOP. Medians of ``--reps`` runs.

``--pixels`` compares the two routes from a uint8 region to its embedding, on 1 and 2 threads:
normalise the whole region in float and patchify it (what the model actors did), or cut uint8
patches and normalise one micro-batch at a time (``HIPT4K.forward_uint8``, what they do now).

glibc's allocator settings move CPU throughput by 10–20 %, so this script fixes them (it
re-executes itself with the MALLOC_* values below unless they are already set).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),  # glibc's maximum: big tensors still mmap
    "MALLOC_TRIM_THRESHOLD_": str(2**30),  # never give freed memory back between batches
    "MALLOC_TOP_PAD_": str(256 * 2**20),
}
if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hipt_ray.models import create_model, normalize_uint8, set_fused_attention  # noqa: E402
from hipt_ray.models.inference import compile_for_inference, fast_dtype, prepare_for_inference  # noqa: E402

GFLOP_VIT256 = 12.28  # per 256 px patch
GFLOP_VIT4K = 1.71  # per 16×16 grid
GFLOP_REGION = 256 * GFLOP_VIT256 + GFLOP_VIT4K


def timed(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(dtype: torch.dtype, reps: int, n: int = 4096) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, reps) / 1e9


def pixels(model_name: str, reps: int) -> None:
    """Seconds a 4096² uint8 region takes by the float route and by the uint8 route."""
    model = create_model(model_name).eval()
    img = torch.randint(0, 256, (1, 4096, 4096, 3), dtype=torch.uint8)
    print(f"{model_name}, one 4096² uint8 region, micro-batch {model.micro_batch}, medians of {reps}:")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = {}

        def by_float():
            with torch.inference_mode():
                out["float"] = model.forward_features(normalize_uint8(img))["emb4k"]

        def by_uint8():
            with torch.inference_mode():
                out["uint8"] = model.forward_uint8(img)["emb4k"]

        t_float, t_uint8 = timed(by_float, reps), timed(by_uint8, reps)
        diff = (out["float"] - out["uint8"]).abs().max().item()
        print(
            f"  {threads} thread{'s' if threads > 1 else ''}: float route {t_float:.3f} s, uint8 route "
            f"{t_uint8:.3f} s ({t_float / t_uint8:.2f}×), max difference {diff:.1e}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="skip the full-region HIPT-4K runs")
    ap.add_argument("--pixels", action="store_true", help="only the float vs uint8 route of a region")
    ap.add_argument("--model", default="hipt4k_tiny", help="the model --pixels runs")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.pixels:
        pixels(args.model, args.reps)
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, allocator: " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
    )

    # bf16 rows only where the CPU computes bf16 natively (AVX-512 bf16, AMX): elsewhere (AVX2:
    # Zen 3, older Xeons) torch emulates it ≈ 60× slower than fp32 and the shipped path is fp32.
    native16 = fast_dtype("cpu") == torch.bfloat16
    peak32 = matmul_gflops(torch.float32, args.reps)
    if native16:
        peak16 = matmul_gflops(torch.bfloat16, args.reps)
        print(
            f"\nmatmul 4096³: fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s (bf16/fp32 {peak16 / peak32:.2f}×)"
        )
    else:
        emulated = matmul_gflops(torch.bfloat16, 1, n=512)
        peak16 = peak32
        print(
            f"\nmatmul 4096³: fp32 {peak32:.0f} GFLOP/s; bf16 is not native on this CPU ({emulated:.1f} GFLOP/s "
            f"emulated, 512³): bf16 rows skipped, the shipped path runs fp32"
        )
    # The matmuls ViT-256 actually runs (16 patches × 257 tokens, dim 384, MLP 1536), for context.
    tokens = 16 * 257
    shapes = [(tokens, 384, 1152), (tokens, 384, 1536), (tokens, 1536, 384)]
    for dtype in (torch.float32, torch.bfloat16)[: 2 if native16 else 1]:
        rates = []
        for m, k, n in shapes:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            rates.append(2 * m * k * n / timed(lambda: a @ b, args.reps) / 1e9)
        print(
            f"  model-shaped matmuls {str(dtype)[6:]}: "
            + ", ".join(f"{m}×{k}×{n} {r:.0f}" for (m, k, n), r in zip(shapes, rates))
            + " GFLOP/s"
        )

    vit = create_model("vit256_s16").eval()
    rows = []

    def run_vit(label: str, model, bs: int, bf16: bool, peak: float) -> float:
        x = torch.randn(bs, 3, 256, 256)
        precision = "bf16" if native16 and peak == peak16 else "fp32"

        def step():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(x)

        sec = timed(step, args.reps)
        rate = bs / sec
        gflops = rate * GFLOP_VIT256
        rows.append((label, bs, rate, gflops, gflops / peak))
        print(
            f"  {label:<34} bs {bs:>3}: {rate:6.2f} patches/s  {gflops:6.0f} GFLOP/s "
            f"({100 * gflops / peak:3.0f} % of {precision} matmul)",
            flush=True,
        )
        return rate

    print("\nViT-256 (ViT-S/16, 256 px):")
    set_fused_attention(vit, False)
    naive32 = run_vit("fp32 eager naive attention", vit, 16, False, peak32)
    set_fused_attention(vit, True)
    fused32 = {bs: run_vit("fp32 eager fused", vit, bs, False, peak32) for bs in (8, 16, 32)}
    if native16:
        set_fused_attention(vit, False)
        naive16 = run_vit("bf16 eager naive attention", vit, 16, True, peak16)
        set_fused_attention(vit, True)
        fused16 = run_vit("bf16 eager fused", vit, 16, True, peak16)
    name = "bf16" if native16 else "fp32"
    t0 = time.perf_counter()
    compiled = compile_for_inference(vit, dtype=fast_dtype("cpu"))
    run_vit(f"{name} compile+freezing fused", compiled, 16, False, peak16)
    compile_s = time.perf_counter() - t0
    comp16 = {16: rows[-1][2]}
    comp16.update({bs: run_vit(f"{name} compile+freezing fused", compiled, bs, False, peak16) for bs in (32, 64)})
    print(f"  (compile + first batches took {compile_s:.0f} s)")
    best_bs = max(comp16, key=comp16.get)
    if native16:
        print(f"\n  fused vs naive attention: fp32 {fused32[16] / naive32:.2f}×, bf16 {fused16 / naive16:.2f}×")
        print(
            f"  bf16 eager vs fp32 eager: {fused16 / fused32[16]:.2f}×; compiled bf16 (bs {best_bs}) vs fp32 eager: "
            f"{comp16[best_bs] / fused32[16]:.2f}×"
        )
    else:
        print(
            f"\n  fused vs naive attention: fp32 {fused32[16] / naive32:.2f}×; compiled fp32 (bs {best_bs}) vs "
            f"fp32 eager: {comp16[best_bs] / fused32[16]:.2f}×; one 4096² region ≈ {256 / comp16[best_bs]:.0f} s "
            f"at that rate"
        )

    if args.quick:
        return
    print("\nHIPT-4K, one 4096² region (256 patches + ViT-4K):")
    region = torch.randn(1, 3, 4096, 4096)
    published = create_model("hipt4k", micro_batch=256).eval()  # all 256 patches as one batch
    set_fused_attention(published, False)

    def region_rate(model, bf16: bool) -> tuple[float, torch.Tensor]:
        out = {}

        def step():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out["y"] = model(region).float()

        sec = timed(step, max(1, args.reps - 1), warmup=1)
        return 1 / sec, out["y"]

    r_pub, y_pub = region_rate(published, False)
    print(
        f"  published path (fp32, naive attention, one batch of 256): {r_pub:.4f} regions/s "
        f"({r_pub * GFLOP_REGION:.0f} GFLOP/s, {100 * r_pub * GFLOP_REGION / peak32:.0f} % of fp32 matmul)"
    )
    fast = create_model("hipt4k", micro_batch=best_bs).eval()
    fast.load_state_dict(published.state_dict())
    fast = prepare_for_inference(fast, device="cpu")  # the shipped default: compiled, fused, bf16 where native
    r_fast, y_fast = region_rate(fast, False)
    achieved = r_fast * GFLOP_REGION
    cos = F.cosine_similarity(y_fast, y_pub).item()
    print(
        f"  fastest path = prepare_for_inference ({name} compile+freezing, fused, micro-batch {best_bs}): "
        f"{r_fast:.4f} regions/s = {256 * r_fast:.1f} patches/s ({achieved:.0f} GFLOP/s, "
        f"{100 * achieved / peak16:.0f} % of {name} matmul)"
    )
    print(
        f"\n  speed-up over the published path: {r_fast / r_pub:.2f}× (target ≥ 2×); "
        f"share of {name} matmul: {100 * achieved / peak16:.0f} % (target ≥ 75 %); "
        f"cosine to fp32: {cos:.5f} (target > 0.99)"
    )


if __name__ == "__main__":
    main()
