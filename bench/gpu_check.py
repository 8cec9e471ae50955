"""One GPU check, prepared (issue #28 item 5): the embedding job as a user runs it on one GPU
machine, and the figures that say whether the GPU is fed.

    bash bench/gpu_check.sh [--out DIR]     # the GPU check: real-size HIPT-4K, bf16 + compile
    bash bench/gpu_check.sh --cpu [--out DIR]   # the same steps small on a CPU: a test of the script

Steps, each timed: ``hipt-ray make-demo-data`` (a handful of synthetic slides, 20× and 40×,
tiled TIFF and Aperio SVS); tiling; the embed job (``hipt_ray.embed.job.run``, what ``hipt-ray
embed`` runs, called in-process to read its summary's figures) on a local Ray holding every core
of the machine; then, with Ray shut down, in this process:

- **decode**: packed regions read as the job's read tasks read them, decoded by the model
  actor's decoder (:class:`hipt_ray.embed.decode.RegionDecoder`: batched nvJPEG on the GPU, in
  batches of ``embed.actor_batch_regions``) and by the CPU decoder (``decode_region``, one core)
  — ms a region each, where each region went (``gpu``, or ``gpu→cpu`` when the GPU could not),
  and the pixels' max |Δ| between the two;
- **cosine**: region embeddings of the GPU-decoded against the CPU-decoded pixels of the same
  regions, fp32 eager (the check: ≥ 0.9999) and as the job runs the model (bf16 + compile);
- **model-only**: regions/s of the model as the actor calls it (one 4096² uint8 region on the
  device, outputs copied back), after its warm-up (compilation, timed);
- **MFU**: model-only and end-to-end regions/s × bench/gpu.py's GFLOP a region over the GPU's
  peak dense bf16 FLOP/s (:data:`PEAK_BF16_DENSE`; an unknown GPU gets none).

``--cpu`` runs the tiny model in fp32 eager on two small slides, and the "GPU" decode with
torchvision's CPU decoder (the same batched call on ``device="cpu"``). Results are printed and
written to ``gpu_check.json`` under ``--out`` (default ``$OUT``, else the working folder). Exit
status 1 when the cosine is below 0.9999, no region decoded on the GPU route, or the job did
not embed every region.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
from gpu import GFLOP_REGION  # noqa: E402  (bench/gpu.py: ViT-256 on 256 patches + ViT-4K)

from hipt_ray.config import Config, load_config  # noqa: E402
from hipt_ray.console import Progress  # noqa: E402
from hipt_ray.embed.decode import RegionDecoder  # noqa: E402
from hipt_ray.models import create_model  # noqa: E402
from hipt_ray.models.hipt4k import default_micro_batch  # noqa: E402
from hipt_ray.models.inference import prepare_for_inference  # noqa: E402
from hipt_ray.models.loading import build_model  # noqa: E402
from hipt_ray.slides.packed import COLUMNS, PackedRegion, decode_region  # noqa: E402

COSINE_MIN = 0.9999  # issue #28 item 2: GPU-decoded regions embed as CPU-decoded ones
# torch.cuda.get_device_name() → peak dense bf16 tensor FLOP/s (without 2:4 sparsity) and where
# the figure comes from. Exact names: an H100 PCIe (756 TFLOP/s) or H200 NVL (835) must not
# borrow the SXM figure.
PEAK_BF16_DENSE = {
    "NVIDIA H100 80GB HBM3": (
        989e12,
        "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: BF16 1,979 TFLOPS with sparsity",
    ),
    "NVIDIA H200": (989e12, "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: BF16 1,979 TFLOPS with sparsity"),
}


@dataclass(frozen=True)
class Mode:
    """How big the check runs: slides, model and where it runs."""

    name: str
    device: str  # the model's device
    jpeg_device: str  # the batched ("GPU") JPEG decoder's device
    n_slides: int
    size_um: tuple[float, float]
    overrides: tuple[str, ...]  # over the embed command's config
    decode_regions: int  # packed regions in the decode and cosine comparison
    model_reps: int  # timed model-only calls


GPU = Mode(
    name="gpu",
    device="cuda",
    jpeg_device="cuda",
    # ≈ 200 regions from ≈ 5,600 megapixels to render (≈ 1 min on make-demo-data's 4 threads): a
    # few seconds of steady embedding at 50+ regions/s after the actor's compile, which takes longer
    n_slides=16,
    size_um=(8000.0, 10000.0),
    # actor_cpus 4: the actor's decode threads for the regions the GPU cannot decode (the Aperio
    # slides, a third of the demo), leaving 12 of the 16 cores to the read tasks
    overrides=(
        "model.name=hipt4k",
        "model.allow_random_weights=true",
        "embed.precision=bf16",
        "embed.compile=true",
        "embed.use_gpu=true",
        "embed.actor_cpus=4",
    ),
    decode_regions=24,
    model_reps=30,
)
CPU = Mode(
    name="cpu",
    device="cpu",
    jpeg_device="cpu",
    n_slides=2,  # demo-000.tiff (20×) and demo-001.svs (Aperio, RGB-stored JPEG: the CPU fallback)
    size_um=(2000.0, 2400.0),
    overrides=("embed.use_gpu=false",),  # tiny.yaml: hipt4k_tiny, fp32, no compile
    decode_regions=4,
    model_reps=2,
)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(name: str):
    """Prints a step's start; the returned function prints its seconds and returns them."""
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()

    def done() -> float:
        sec = time.perf_counter() - t0
        print(f"   {name}: {sec:.1f} s", flush=True)
        return round(sec, 2)

    return done


def make_data(mode: Mode, work: Path) -> Path:
    """``hipt-ray make-demo-data`` into ``work/data``; returns the slides folder."""
    from hipt_ray.cli import main as hipt_ray

    lo, hi = mode.size_um
    args = ["make-demo-data", str(work / "data"), "--n-slides", str(mode.n_slides), "--size-um", str(lo), str(hi)]
    code = hipt_ray(args)
    if code != 0:
        raise SystemExit(f"hipt-ray {' '.join(args)} exited {code}")
    return work / "data" / "slides"


def embed_config(mode: Mode, slides: Path, work: Path) -> Config:
    files = [ROOT / "hipt_ray" / "configs" / "tiny.yaml"] if mode.name == "cpu" else []
    return load_config(
        "embed",
        files=files,
        overrides=[*mode.overrides, "embed.decode=auto", f"storage.cache_dir={work / 'cache'}"],
        values={"slides": str(slides), "out": str(work / "out")},
    )


class _Clock(Progress):
    """The embed job's progress line, remembering when rows came back: the steady rate (from
    the first rows back to the last) leaves out the actors' start-up and compilation."""

    last: _Clock | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.marks: list[tuple[float, int]] = []
        _Clock.last = self

    def update(self, done: int | None = None, *, advance: int = 0, **fields: object) -> None:
        super().update(done, advance=advance, **fields)
        if advance:
            self.marks.append((time.perf_counter(), self.done))

    def steady(self) -> tuple[float | None, float | None]:
        """(seconds from the start to the first rows back, regions/s from them to the last)."""
        if not self.marks:
            return None, None
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return round(t0 - self.t0, 2), (round((n1 - n0) / (t1 - t0), 3) if t1 > t0 else None)


def end_to_end(cfg: Config) -> dict:
    """Tiling, then the embed job on a local Ray (all cores); its summary's figures."""
    import ray

    from hipt_ray.embed import job
    from hipt_ray.runtime import start_ray
    from hipt_ray.tile.job import run as tile_run

    start_ray(address="local", num_cpus=cfg.ray.num_cpus)
    done = step("tile")
    tiling = tile_run(cfg)
    tile_s = done()
    done = step("embed (bf16 + compile)" if cfg.embed.compile else "embed")
    with mock.patch.object(job, "Progress", _Clock):  # only to read when rows came back
        s = job.run(cfg)
    embed_s = done()
    first_s, steady = _Clock.last.steady() if _Clock.last else (None, None)
    ray.shutdown()
    for line in s.lines():
        print("   " + line)
    n = max(s.regions, 1)
    model_s = s.stage_seconds.get("model", 0.0) / max(s.returned, 1)
    return {
        "slides": s.total,
        "slides_ok": s.ok,
        "slides_failed": s.failed,
        "regions_tiled": tiling.regions,
        "regions": s.regions,
        "tile_s": tile_s,
        "embed_s": embed_s,
        "end_to_end_regions_per_s": round(s.regions / s.seconds, 3),
        "pipeline_regions_per_s": round(s.regions / s.pipeline_seconds, 3) if s.pipeline_seconds else None,
        "first_rows_back_s": first_s,
        "steady_regions_per_s": steady,
        "in_pipeline_model_s_per_region": round(model_s, 4),
        "model_actors": s.model_actors,
        "decoded": dict(s.decoded),
        "transfer_bytes_per_region": round(s.moved.get("transfer_bytes", 0.0) / n),
        "tile_bytes_per_region": round(s.moved.get("tile_bytes", 0.0) / n),
        "transfer_line": s.transfer_line() if s.decoded else "",
        "stages_line": s.stages_line() if s.stage_seconds else "",
    }


def packed_batch(cfg: Config, slides: Path, n: int) -> dict[str, np.ndarray]:
    """Up to ``n`` regions of the tiled slides, read as the job's read tasks read them (packed
    compressed tiles), as one actor batch (numpy object columns); every slide contributes. Whole
    regions where there are any: one input shape, so the compiled model compiles once here."""
    from hipt_ray.data.regions import RegionReader  # imports Ray: not on the --no-ray path
    from hipt_ray.store import Store

    uris = {p.stem: str(p) for p in slides.iterdir()}
    rows = Store(cfg.out).regions(cfg.tiling_spec_hash()).to_pylist()
    px = cfg.tiling.region_px
    rows = [r for r in rows if (r["read_w"], r["read_h"]) == (px, px)] or rows
    by_slide: dict[str, list[dict]] = {}
    for r in rows:
        by_slide.setdefault(r["slide_id"], []).append(r)
    picked = [r for i in range(n) for group in by_slide.values() if i < len(group) for r in [group[i]]][:n]
    reader = RegionReader(cfg_dict=cfg.to_dict())
    read = [reader({**r, "uri": uris[r["slide_id"]], "mpp_override": None}) for r in picked]
    batch = {k: np.empty(len(read), object) for k in read[0]}
    for i, r in enumerate(read):
        for k, v in r.items():
            batch[k][i] = v
    return batch


def take(batch: dict[str, np.ndarray], rows: list[int]) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in batch.items()}


def decode_compare(batch: dict[str, np.ndarray], mode: Mode, per_call: int, reps: int = 3) -> tuple[dict, list, list]:
    """The GPU route against the CPU decoder on the same packed regions (see the module
    docstring); returns the figures and both pixel lists of the regions the GPU decoded."""
    dev = torch.device(mode.device)
    decoder = RegionDecoder(device=dev, gpu=True, threads=1, jpeg_device=mode.jpeg_device)
    first = decoder(batch)  # warm-up (nvJPEG's start) and where each region goes
    for i in range(len(first.where)):
        first.pixels(i)
    where = {w: first.where.count(w) for w in sorted(set(first.where))}
    on_gpu = [i for i, w in enumerate(first.where) if w == "gpu"]
    figures: dict = {"regions": len(first.where), "where": where, "gpu_regions": len(on_gpu)}
    if not on_gpu:
        return figures, [], []
    gpu_px, times = [], []
    for _ in range(reps):
        sync(mode.jpeg_device)
        t0 = time.perf_counter()
        out = []
        for k in range(0, len(on_gpu), per_call):
            decoded = decoder(take(batch, on_gpu[k : k + per_call]))
            out += [decoded.pixels(i) for i in range(len(decoded.where))]
        sync(mode.jpeg_device)
        times.append(time.perf_counter() - t0)
        gpu_px = out
    regions = [PackedRegion.from_columns(*(batch[c][i] for c in COLUMNS)) for i in on_gpu]
    t0 = time.perf_counter()
    cpu_px = [decode_region(r) for r in regions]
    cpu_s = time.perf_counter() - t0
    diffs = [np.abs(g.cpu().numpy().astype(np.int16) - c) for g, c in zip(gpu_px, cpu_px, strict=True)]
    figures.update(
        gpu_ms_per_region=round(1e3 * statistics.median(times) / len(on_gpu), 2),
        gpu_batch_regions=per_call,
        cpu_ms_per_region=round(1e3 * cpu_s / len(on_gpu), 2),
        pixels_max_abs_diff=int(max(int(d.max()) for d in diffs)),
        pixels_mean_abs_diff=round(float(np.mean([d.mean() for d in diffs])), 4),
    )
    return figures, [g.to(dev) for g in gpu_px], [torch.from_numpy(np.ascontiguousarray(c)).to(dev) for c in cpu_px]


def embed_all(model, images: list[torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model.forward_uint8(img[None])["emb4k"].float().cpu() for img in images])


def min_cosine(model, a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return round(float(F.cosine_similarity(embed_all(model, a), embed_all(model, b)).min()), 6)


def model_figures(cfg: Config, mode: Mode, gpu_px: list, cpu_px: list, region: torch.Tensor) -> dict:
    """Embedding cosines of the two decodes and the model-only rate (see the module docstring)."""
    dev = mode.device
    base, _ = build_model(cfg)
    model = create_model(cfg.model.name, micro_batch=default_micro_batch(dev, cfg.model.micro_batch))
    model.load_state_dict(base.state_dict())
    model = model.eval().to(dev)
    figures: dict = {}
    if gpu_px:
        figures["cosine_fp32_min"] = min_cosine(model, gpu_px, cpu_px)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(cfg.embed.precision, torch.float32)
    fast = prepare_for_inference(model, device=dev, dtype=dtype, compile=cfg.embed.compile)

    def call() -> None:
        with torch.inference_mode():
            out = fast.forward_uint8(region[None])  # as the actor calls it, outputs copied back
        out["emb4k"].cpu(), out["mean256"].cpu(), out["tokens256"].half().cpu()

    sync(dev)
    t0 = time.perf_counter()
    call()  # warm-up: compilation when embed.compile
    sync(dev)
    figures["warmup_s"] = round(time.perf_counter() - t0, 2)
    times = []
    for _ in range(mode.model_reps):
        t0 = time.perf_counter()
        call()
        sync(dev)
        times.append(time.perf_counter() - t0)
    figures["model_only_regions_per_s"] = round(1 / statistics.median(times), 3)
    if gpu_px:  # the job's model is the fp32 eager one when it runs fp32 uncompiled (--cpu)
        same = dtype == torch.float32 and not cfg.embed.compile
        figures["cosine_job_min"] = figures["cosine_fp32_min"] if same else min_cosine(fast, gpu_px, cpu_px)
    return figures


def mfu(mode: Mode, rates: dict[str, float | None]) -> dict:
    """MFU of each rate on this GPU (real-size model only; ``None`` where the GPU is unknown)."""
    name = torch.cuda.get_device_name(0) if mode.device == "cuda" else None
    peak = PEAK_BF16_DENSE.get(name or "")
    out: dict = {"gpu": name, "gflop_per_region": GFLOP_REGION}
    if peak is None or mode.name != "gpu":
        out["peak_source"] = f"no peak for {name!r}: MFU not computed" if name else "not a GPU run"
        return out
    out["peak_bf16_dense_tflops"], out["peak_source"] = peak[0] / 1e12, peak[1]
    for key, rate in rates.items():
        out[key] = round(rate * GFLOP_REGION * 1e9 / peak[0], 4) if rate else None
    return out


def full_region(pixels: list[torch.Tensor], batch: dict[str, np.ndarray], device: str) -> torch.Tensor:
    """The first whole 4096² region (else the largest) among ``pixels`` (or decoded from the
    batch when the GPU route decoded none): the model-only input."""
    if not pixels:
        packed = [i for i, p in enumerate(batch["packing"]) if p]
        pixels = [torch.from_numpy(decode_region(PackedRegion.from_columns(*(batch[c][i] for c in COLUMNS))))
                  for i in packed[:4]]  # fmt: skip
    best = max(pixels, key=lambda p: p.shape[0] * p.shape[1])
    return best.to(device)


# The read boxes of a 4096² region at 0.5 µm/px from TCGA's two common scans: 40× at 0.2527 µm/px
# (an 8105² box, shrunk) and 20× at 0.504 (4063², enlarged); the CPU mode at a quarter of the size.
LANCZOS_BOXES = {"gpu": ((8105, 4096), (4063, 4096)), "cpu": ((2026, 1024), (1016, 1024))}


def lanczos_figures(mode: Mode, reps: int = 3) -> dict:
    """The GPU route's Lanczos resize (:mod:`hipt_ray.embed.lanczos`) on ``mode.jpeg_device``
    against Pillow's on one CPU core, on smooth random boxes of the sizes TCGA slides need: ms a
    region each (medians; Pillow timed once at the GPU size, ≈ 0.3–0.7 s) and the pixels' max |Δ|
    (0: square resizes are Pillow's bit for bit)."""
    from PIL import Image, ImageFilter

    from hipt_ray.embed.lanczos import resize

    rng = np.random.default_rng(0)
    out = []
    for box, px in LANCZOS_BOXES[mode.name]:
        noise = Image.fromarray(rng.integers(0, 256, (box // 8, box // 8, 3), dtype=np.uint8))
        img = noise.resize((box, box), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(2))
        t0 = time.perf_counter()
        want = np.asarray(img.resize((px, px), Image.Resampling.LANCZOS))
        pil_ms = 1000 * (time.perf_counter() - t0)
        canvas = torch.from_numpy(np.array(img)).to(mode.jpeg_device)
        got = resize(canvas, (px, px))  # warm-up: coefficients, allocator
        times = []
        for _ in range(reps):
            sync(mode.jpeg_device)
            t0 = time.perf_counter()
            got = resize(canvas, (px, px))
            sync(mode.jpeg_device)
            times.append(1000 * (time.perf_counter() - t0))
        diff = int(np.abs(got.cpu().numpy().astype(np.int16) - want).max())
        out.append({"box": box, "region_px": px, "device_ms": round(float(np.median(times)), 2),
                    "pil_cpu_ms": round(pil_ms, 1), "max_abs_diff": diff})  # fmt: skip
    return {"device": mode.jpeg_device, "resizes": out}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def decode_lines(r: dict) -> list[str]:
    """The report's GPU-vs-CPU decode lines (the embed job's and the no-Ray mode's alike)."""
    d, m = r["decode"], r["model"]
    out: list[str] = []
    where = ", ".join(f"{k} {v}" for k, v in d["where"].items())
    if d["gpu_regions"]:
        out.append(
            f"decode on the same {d['gpu_regions']} packed regions: GPU route ({r['jpeg_device']}, batches of "
            f"{d['gpu_batch_regions']}) {d['gpu_ms_per_region']:.1f} ms a region, CPU {d['cpu_ms_per_region']:.1f} "
            f"ms a region on one core; pixels max |Δ| {d['pixels_max_abs_diff']} (mean {d['pixels_mean_abs_diff']}); "
            f"of {d['regions']} regions: {where}"
        )
        out.append(
            f"embedding cosine GPU vs CPU decode (min over regions): fp32 {m['cosine_fp32_min']:.6f} "
            f"(needs ≥ {COSINE_MIN}), as the job runs the model {m['cosine_job_min']:.6f}"
        )
    else:
        out.append(f"decode: no region of {d['regions']} decoded on the GPU route ({where})")
    if "lanczos" in r:
        lz = r["lanczos"]
        each = "; ".join(
            f"{z['box']}² → {z['region_px']}²: {z['device_ms']:.1f} ms vs Pillow {z['pil_cpu_ms']:.0f} ms, "
            f"max |Δ| {z['max_abs_diff']}"
            for z in lz["resizes"]
        )
        out.append(f"Lanczos on the GPU route ({lz['device']}) vs Pillow on one CPU core: {each}")
    return out


def report(r: dict) -> list[str]:
    """The figures as lines (what the JSON holds, readable)."""
    e, m, u = r["end_to_end"], r["model"], r["mfu"]
    lines = [
        f"device: {r['device']} ({u['gpu'] or 'no GPU'}), torch {r['torch']}, {r['cpus']} CPUs; "
        f"{e['slides']} slides, {e['regions']} regions embedded ({e['slides_failed']} slides failed)",
        f"model-only: {m['model_only_regions_per_s']:.2f} regions/s (after a {m['warmup_s']:.1f} s warm-up); "
        f"end-to-end (the embed job): {e['steady_regions_per_s']} regions/s from the first regions back "
        f"(after {e['first_rows_back_s']} s: actor start-up and compile) to the last; "
        f"{e['end_to_end_regions_per_s']:.2f} regions/s over the whole job; "
        f"the model {e['in_pipeline_model_s_per_region']} s a region inside it",
        f"decoded in the job: {', '.join(f'{k} {v}' for k, v in sorted(e['decoded'].items())) or 'none'}",
        f"object store: {e['transfer_bytes_per_region'] / 1e6:.2f} MB a region ({e['transfer_line']})",
    ]
    lines += decode_lines(r)
    if "model_only" in u:
        lines.append(
            f"MFU: model-only {_pct(u['model_only'])}, end-to-end {_pct(u['end_to_end_steady'])} steady, "
            f"{_pct(u['end_to_end'])} over the whole job ({u['gflop_per_region']:.0f} GFLOP "
            f"a region, peak {u['peak_bf16_dense_tflops']:.0f} TFLOP/s bf16 dense: {u['peak_source']})"
        )
    else:
        lines.append(f"MFU: not printed ({u['peak_source']})")
    lines.append(f"steps (s): {json.dumps(r['seconds'])}; status: {r['status']}")
    return lines


def verdict(r: dict) -> str:
    """``ok``, or what failed (the exit status is 1 then)."""
    e, d, m = r["end_to_end"], r["decode"], r["model"]
    if e["slides_failed"] or e["regions"] != e["regions_tiled"]:
        return f"the job embedded {e['regions']} of {e['regions_tiled']} regions ({e['slides_failed']} slides failed)"
    if not d["gpu_regions"]:
        return "no region decoded on the GPU route"
    if m["cosine_fp32_min"] < COSINE_MIN:
        return f"embedding cosine {m['cosine_fp32_min']} < {COSINE_MIN}"
    return lanczos_verdict(r)


def lanczos_verdict(r: dict) -> str:
    """``ok``, or the Lanczos resize whose pixels are not Pillow's."""
    bad = [z for z in r.get("lanczos", {}).get("resizes", []) if z["max_abs_diff"]]
    return f"Lanczos pixels differ from Pillow's: {bad}" if bad else "ok"


def run(mode: Mode, work: Path) -> dict:
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    done = step("make-demo-data")
    slides = make_data(mode, work)
    seconds["make_demo_data"] = done()
    cfg = embed_config(mode, slides, work)
    e2e = end_to_end(cfg)
    seconds["tile"], seconds["embed"] = e2e["tile_s"], e2e["embed_s"]
    done = step("decode: GPU route vs CPU on the same packed regions")
    batch = packed_batch(cfg, slides, mode.decode_regions)
    dec, gpu_px, cpu_px = decode_compare(batch, mode, cfg.embed.actor_batch_regions)
    seconds["decode"] = done()
    done = step("model: cosine of the two decodes, model-only rate")
    m = model_figures(cfg, mode, gpu_px, cpu_px, full_region(cpu_px, batch, mode.device))
    seconds["model"] = done()
    done = step("Lanczos: GPU route vs Pillow")
    lz = lanczos_figures(mode)
    seconds["lanczos"] = done()
    seconds["total"] = round(time.perf_counter() - t_all, 1)
    rates = {
        "model_only": m["model_only_regions_per_s"],
        "end_to_end_steady": e2e["steady_regions_per_s"],
        "end_to_end": e2e["end_to_end_regions_per_s"],
    }
    r = {
        "mode": asdict(mode),
        "device": mode.device,
        "jpeg_device": mode.jpeg_device,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "config": {k: getattr(cfg.embed, k) for k in ("precision", "compile", "decode", "actor_cpus")}
        | {"model": cfg.model.name},
        "end_to_end": e2e,
        "decode": dec,
        "model": m,
        "mfu": mfu(mode, rates),
        "lanczos": lz,
        "seconds": seconds,
    }
    r["status"] = verdict(r)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="small, on the CPU: the tiny model, two slides (a test)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json (default: $OUT)")
    ap.add_argument(
        "--no-ray",
        action="store_true",
        help="without Ray or Lance (a machine that has neither): no embed job, the rest on regions packed here",
    )
    ap.add_argument("--work", help="working folder for slides and tables (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    mode = CPU if args.cpu else GPU
    if mode.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device here; --cpu runs the small CPU check", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.no_ray:
        import gpu_check_noray as checks  # bench/: the same figures without Ray
    else:
        checks = sys.modules[__name__]
    try:
        results = checks.run(mode, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print("== results")
    for line in checks.report(results):
        print("   " + line)
    out = Path(args.out or work)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"   written: {out / 'gpu_check.json'}")
    return 0 if results["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
