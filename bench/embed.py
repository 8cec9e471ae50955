"""Embedding-job pipeline efficiency and driver memory, measured side by side in one run.

    .venv/bin/python bench/embed.py [--slides 8] [--model tiny|real] [--storage local|s3] [--compile false]
    .venv/bin/python bench/embed.py --rss        # driver peak RSS, 4 vs 16 slides
    .venv/bin/python bench/embed.py --routes [--repeats 3]   # pixels vs compressed tiles to the model

For N synthetic slides (each a few 4096² regions at 0.5 µm/px) it measures, on the same local Ray:
  read-only   regions/s of the Ray Data read stage alone (OpenSlide read + resample);
  model-only  regions/s of one model actor on regions read beforehand;
  end-to-end  regions/s of `hipt-ray embed` (tiling done beforehand, so only embedding counts);
and prints efficiency = end-to-end / min(read-only, model-only). The tiny model makes the job
read-bound, the real model model-bound. With --rss it runs the job in subprocesses on 4 and 16
slides and compares the driver's peak RSS. With --routes it runs `hipt-ray embed` on the same
tiled slides with embed.decode=reader (read tasks decode, pixels cross the object store) and
embed.decode=auto (compressed tiles cross, the model actor decodes), alternating, and prints
each route's regions/s and object-store bytes per region (medians of --repeats runs) and the ratios.
"""

from __future__ import annotations

import argparse
import os
import resource  # noqa: F401  (used in the driver snippet)
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

BENCH_DIR = Path(tempfile.gettempdir()) / "hipt-ray-bench"


def make_slides(n: int) -> Path:
    from hipt_ray.slides import synthetic

    d = BENCH_DIR / f"slides-{n}"
    if d.is_dir() and len(list(d.iterdir())) == n:
        return d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for i in range(n):  # exactly 3 full 4096² regions each (6144 × 2048 µm at 0.5 µm/px)
        synthetic.make_slide(
            d / f"b{i:03d}.tiff", width_um=6144, height_um=2048, seed=100 + i, n_blobs=3, subtype=i % 2
        )
    return d


def start_moto() -> tuple[subprocess.Popen, str]:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            break
        except Exception:
            time.sleep(0.05)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ALLOW_HTTP="true",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    return proc, endpoint


def efficiency(args: argparse.Namespace) -> None:
    import ray
    import torch

    from hipt_ray.config import load_config
    from hipt_ray.data.regions import read_region, reader_kwargs
    from hipt_ray.embed.embedder import RegionEmbedder
    from hipt_ray.embed.job import build_model
    from hipt_ray.embed.job import run as embed_run
    from hipt_ray.slides.packed import COLUMNS as PACKED
    from hipt_ray.store import Store
    from hipt_ray.tile.job import run as tile_run

    slides = make_slides(args.slides)
    moto = None
    src = str(slides)
    if args.storage == "s3":
        moto, endpoint = start_moto()
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("bench")
        fs.put(str(slides) + "/", "bench/slides/", recursive=True)
        src = "s3://bench/slides/"
    work = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    overrides = [f"storage.cache_dir={work / 'cache'}", "embed.store_tokens=true", f"reader.backend={args.backend}"]
    if args.model == "tiny":
        files = [ROOT / "hipt_ray" / "configs" / "tiny.yaml"]
    else:
        files = []
        overrides += ["model.name=hipt4k", "model.allow_random_weights=true", f"embed.compile={args.compile}"]
    cfg = load_config("embed", files=files, overrides=overrides, values={"slides": src, "out": str(work / "out")})
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    print(
        f"{args.slides} slides on {args.storage}, reader.backend={args.backend}, model {cfg.model.name} "
        f"(precision {cfg.embed.precision}, compile {cfg.embed.compile}), {ray.cluster_resources().get('CPU')} CPUs"
    )
    tile_run(cfg)
    store = Store(cfg.out)
    regions = store.regions(cfg.tiling_spec_hash()).to_pylist()
    for r in regions:
        r["uri"] = (
            f"{src.rstrip('/')}/{r['slide_id']}.tiff" if args.storage == "s3" else str(slides / f"{r['slide_id']}.tiff")
        )
        r["mpp_override"] = None
    n = len(regions)
    read_kwargs = reader_kwargs(cfg)

    # (b) read-only: the Ray Data read stage alone
    t0 = time.perf_counter()
    ds = ray.data.from_items(regions, override_num_blocks=n).map(
        read_region, fn_kwargs=read_kwargs, num_cpus=cfg.embed.read_cpus
    )
    assert ds.materialize().count() == n  # pixels stay in the object store, as for the model
    read_rate = n / (time.perf_counter() - t0)

    # (a) model-only: one actor's worth of model on regions read beforehand
    model, _ = build_model(cfg)
    import pyarrow as pa

    from hipt_ray.store.tables import REGIONS_SCHEMA, embedding_fields

    schema = pa.schema(
        [REGIONS_SCHEMA.field(c) for c in ("slide_id", "region_index")]
        + [pa.field("uri", pa.string())]
        + embedding_fields(model.vit4k.embed_dim, model.vit256.embed_dim)
        + [pa.field("error", pa.string())]
    )
    t_warm = time.perf_counter()
    embedder = RegionEmbedder(
        model_name=cfg.model.name,
        state_dict=model.state_dict(),
        micro_batch=cfg.model.micro_batch,
        precision=cfg.embed.precision,
        compile=cfg.embed.compile,
        use_gpu=torch.cuda.is_available(),
        store_tokens=True,
        schema=schema,
    )
    sample = [read_region(dict(r), **read_kwargs) for r in regions[: min(n, args.model_regions)]]
    batch = lambda r: {k: [r[k]] for k in ("slide_id", "region_index", "uri", "error", "image", *PACKED)}  # noqa: E731
    embedder(batch(sample[0]))  # warm-up (and compilation)
    t_warm = time.perf_counter() - t_warm
    t0 = time.perf_counter()
    for r in sample:
        embedder(batch(r))
    model_rate = len(sample) / (time.perf_counter() - t0)

    # end-to-end: the job itself (tiling already done, so it measures reading + embedding)
    t0 = time.perf_counter()
    summary = embed_run(cfg)
    e2e_seconds = time.perf_counter() - t0
    e2e_rate = summary.regions / e2e_seconds
    assert summary.regions == n, (summary.regions, n)
    bound = min(read_rate, model_rate)
    print(f"  regions: {n}")
    print(f"  read-only : {read_rate:8.4g} regions/s")
    print(f"  model-only: {model_rate:8.4g} regions/s")
    print(
        f"  end-to-end: {e2e_rate:8.4g} regions/s (includes model actor start-up"
        f"{' and compilation' if cfg.embed.compile else ''})"
    )
    # The actor builds and warms its model once per run (compilation: minutes on a CPU); taken
    # apart as the warm-up measured in-process above, that leaves the steady pipeline.
    steady = summary.regions / max(e2e_seconds - t_warm, 1e-9)
    print(
        f"  actor start-up (model build + first region{', compiled' if cfg.embed.compile else ''}, measured "
        f"in-process): {t_warm:.1f} s; end-to-end without it: {steady:8.4g} regions/s"
    )
    print(f"  in the pipeline, {summary.stages_line()}")
    print(
        f"  efficiency = end-to-end / min(read, model) = {e2e_rate / bound:.2f} (target ≥ 0.9); "
        f"{'read' if read_rate < model_rate else 'model'}-bound"
    )
    # On one small node reads and model share the same cores, so the attainable rate is the
    # harmonic combination of the two, not their minimum; printed for context.
    shared = 1 / (1 / read_rate + 1 / model_rate)
    print(
        f"  shared-CPU bound 1/(1/read + 1/model) = {shared:.4g} regions/s; end-to-end / that = "
        f"{e2e_rate / shared:.2f}, without start-up {steady / shared:.2f}"
    )
    staged = sum(p.stat().st_size for p in (work / "cache").glob("*") if p.is_file())
    print(f"  staged on local disk: {staged / 1e6:.1f} MB")
    ray.shutdown()
    if moto:
        moto.kill()
    shutil.rmtree(work, ignore_errors=True)


def routes(args: argparse.Namespace) -> None:
    """embed.decode=reader vs auto on the same tiled slides, side by side (see the docstring)."""
    import statistics

    import ray

    from hipt_ray.config import load_config
    from hipt_ray.embed.job import run as embed_run
    from hipt_ray.tile.job import run as tile_run

    slides = make_slides(args.slides)
    work = Path(tempfile.mkdtemp(prefix="embed-routes-"))
    files = [ROOT / "hipt_ray" / "configs" / "tiny.yaml"] if args.model == "tiny" else []
    base = [f"storage.cache_dir={work / 'cache'}", "embed.store_tokens=true"]
    if args.model == "real":
        base += ["model.name=hipt4k", "model.allow_random_weights=true", f"embed.compile={args.compile}"]

    def cfg_for(out: Path, route: str):
        overrides = [*base, f"embed.decode={route}"]
        return load_config("embed", files=files, overrides=overrides, values={"slides": str(slides), "out": str(out)})

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    tile_run(cfg_for(work / "tiled", "auto"))  # every run starts from this tiling: only embedding counts
    actor_overlap(cfg_for(work / "tiled", "auto"), slides, args.repeats)
    figures: dict[str, dict[str, list[float]]] = {r: {"rate": [], "pipeline": [], "bytes": []} for r in ROUTES}
    for rep in range(args.repeats):
        for route in ROUTES if rep % 2 == 0 else ROUTES[::-1]:  # alternate who goes first
            out = work / f"{route}-{rep}"
            shutil.copytree(work / "tiled", out)
            summary = embed_run(cfg_for(out, route))
            n = summary.regions
            figures[route]["rate"].append(n / summary.seconds)
            figures[route]["pipeline"].append(n / summary.pipeline_seconds)
            figures[route]["bytes"].append(summary.moved["transfer_bytes"] / n)
            print(f"  run {rep} {route:6}: {n} regions, {n / summary.seconds:.3f} regions/s; {summary.transfer_line()}")
            shutil.rmtree(out, ignore_errors=True)
    med = {r: {k: statistics.median(v) for k, v in f.items()} for r, f in figures.items()}
    print(f"{args.slides} slides, {n} regions of 4096² at 20×, model {args.model}, medians of {args.repeats} runs:")
    for r, label in zip(ROUTES, ("pixels (decode=reader)", "tiles (decode=auto)")):
        m = med[r]
        print(
            f"  {label:24} end-to-end {m['rate']:.3f} regions/s (pipeline alone {m['pipeline']:.3f}), "
            f"{m['bytes'] / 1e6:.2f} MB a region through the object store"
        )
    a, b = med[ROUTES[0]], med[ROUTES[1]]
    print(
        f"  tiles / pixels: end-to-end {b['rate'] / a['rate']:.2f}× (target ≥ 1), "
        f"pipeline {b['pipeline'] / a['pipeline']:.2f}×, "
        f"object-store bytes {b['bytes'] / a['bytes']:.3f}× ({a['bytes'] / b['bytes']:.1f}× fewer)"
    )
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)


ROUTES = ("reader", "auto")


def actor_overlap(cfg, slides: Path, repeats: int) -> None:
    """In one process, one model actor's batch of packed regions: decoded then embedded one
    after the other, against RegionEmbedder's decode on a thread overlapped with the model."""
    import statistics

    import numpy as np

    from hipt_ray.data.regions import RegionReader
    from hipt_ray.embed.embedder import RegionEmbedder, output_schema
    from hipt_ray.models.loading import build_model
    from hipt_ray.slides.packed import COLUMNS, PackedRegion, decode_region
    from hipt_ray.store import Store

    rows = Store(cfg.out).regions(cfg.tiling_spec_hash()).to_pylist()[: cfg.embed.actor_batch_regions]
    for r in rows:
        r.update(uri=str(slides / f"{r['slide_id']}.tiff"), mpp_override=None)
    read = [RegionReader(cfg_dict=cfg.to_dict())(dict(r)) for r in rows]
    batch = {k: np.empty(len(read), object) for k in read[0]}
    for i, r in enumerate(read):
        for k, v in r.items():
            batch[k][i] = v
    model, _ = build_model(cfg)
    embedder = RegionEmbedder(
        model_name=cfg.model.name, state_dict=model.state_dict(), micro_batch=cfg.model.micro_batch,
        precision=cfg.embed.precision, compile=cfg.embed.compile, use_gpu=False, store_tokens=True,
        schema=output_schema(model.vit4k.embed_dim, model.vit256.embed_dim), decode="cpu", decode_threads=1,
    )  # fmt: skip
    regions = [PackedRegion.from_columns(*(r[c] for c in COLUMNS)) for r in read]
    pixels = {**batch, "image": np.empty(len(read), object), "packing": np.array([""] * len(read), object)}
    embedder(batch)  # warm-up
    serial, overlapped = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i, region in enumerate(regions):
            pixels["image"][i] = decode_region(region)
        t1 = time.perf_counter()
        embedder(pixels)
        serial.append((t1 - t0, time.perf_counter() - t1))
        t0 = time.perf_counter()
        embedder(batch)
        overlapped.append(time.perf_counter() - t0)
    dec, mod = (statistics.median(x[k] for x in serial) for k in (0, 1))
    ovl = statistics.median(overlapped)
    print(
        f"  one actor batch of {len(read)} packed regions (median of {repeats}): decode {dec:.2f} s then model "
        f"{mod:.2f} s = {dec + mod:.2f} s; decode on a thread overlapped with the model {ovl:.2f} s "
        f"({(dec + mod) / ovl:.2f}× faster)"
    )


def rss(args: argparse.Namespace) -> None:
    peaks = {}
    for n in (4, 16):
        slides = make_slides(n)
        work = Path(tempfile.mkdtemp(prefix="embed-rss-"))
        driver = (
            "import resource, sys; from hipt_ray.cli import main; code = main(sys.argv[1:]); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)"
        )
        cmd = [
            sys.executable,
            "-c",
            driver,
            "embed",
            "--slides",
            str(slides),
            "--out",
            str(work / "out"),
            "--config",
            str(ROOT / "hipt_ray" / "configs" / "tiny.yaml"),
            f"storage.cache_dir={work / 'cache'}",
        ]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[n] = int(out.stdout.split("PEAK_RSS_KB")[1].split()[0]) / 1024
        print(f"  {n:>2} slides: driver peak RSS {peaks[n]:.0f} MiB, {time.perf_counter() - t0:.0f} s")
        shutil.rmtree(work, ignore_errors=True)
    print(f"  peak RSS ratio 16 / 4 slides: {peaks[16] / peaks[4]:.2f} (target ≤ 1.2)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--model", choices=("tiny", "real"), default="tiny")
    ap.add_argument("--storage", choices=("local", "s3"), default="local")
    ap.add_argument("--model-regions", type=int, default=6, help="regions timed for model-only")
    ap.add_argument(
        "--backend",
        choices=("auto", "tiles", "openslide", "both"),
        default="auto",
        help="reader.backend; both: OpenSlide then the tile backend, one after the other",
    )
    ap.add_argument(
        "--compile",
        choices=("true", "false"),
        default="true",
        help="embed.compile for --model real (on an AVX2-only CPU it gains nothing: false)",
    )
    ap.add_argument("--rss", action="store_true")
    ap.add_argument("--routes", action="store_true", help="pixels vs compressed tiles to the model actors")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each route for --routes")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # figures appear as they are measured, even in a log
    if args.rss:
        rss(args)
        return
    if args.routes:
        routes(args)
        return
    for backend in ("openslide", "tiles") if args.backend == "both" else (args.backend,):
        efficiency(argparse.Namespace(**{**vars(args), "backend": backend}))


if __name__ == "__main__":
    main()
