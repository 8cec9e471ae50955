"""Region reads side by side in one run: OpenSlide path vs tile backend vs a bare decode loop.

    .venv/bin/python bench/read.py [--repeats 7]

Per 4096² region at 0.5 µm/px from a synthetic 20× slide (level 0 read as is) and a 40× slide
(level 0 read and halved), on one thread, medians of ``--repeats``:
  openslide   `Slide.read_region` through OpenSlide (RGBA → composite on white → RGB)
  tiles       the same call through the tile backend (byte ranges + tifffile/imagecodecs decode)
  bare        imagecodecs' JPEG decode of exactly the needed tiles, bytes already in memory
              (no assembly, no resampling: the physical limit here)
Then ``reader.scaled_decode`` at 40× (the opt-in DCT-domain 1/2 decode) against the exact path:
speed, PSNR of the pixels, and the cosine between HIPT-4K region embeddings of the two (tiny
and real-size model, random weights: no official weights can be fetched here; ``--no-real``
skips the real-size model, ≈ 10 s a region on 2 cores).
Then from moto's S3 server on 127.0.0.1: bytes transferred per region ÷ compressed bytes of the
needed tiles, range requests per region, bytes staged on local disk, and time to the first
region of a slide (tile backend vs staging the whole file for OpenSlide).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np  # noqa: E402

BENCH_DIR = Path(tempfile.gettempdir()) / "hipt-ray-bench-read"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except Exception:
        return "unknown CPU"


def make_slides() -> dict[str, Path]:
    from hipt_ray.slides import synthetic

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    paths = {"20x": BENCH_DIR / "s20.tiff", "40x": BENCH_DIR / "s40.svs"}
    if not paths["20x"].is_file():
        synthetic.make_slide(paths["20x"], width_um=4400, height_um=4400, mpp=0.5, seed=1, n_blobs=2)
    if not paths["40x"].is_file():
        synthetic.make_slide(paths["40x"], width_um=2400, height_um=2400, mpp=0.25, seed=2, aperio=True, objective=40)
    return paths


def needed_tiles(path: Path, box: tuple[int, int, int, int]) -> list[bytes]:
    """The level-0 tiles' compressed bytes for level-0 box (x, y, w, h)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        cols = -(-page.imagewidth // page.tilewidth)
        x, y, w, h = box
        idx = [
            r * cols + c
            for r in range(y // 256, (y + h - 1) // 256 + 1)
            for c in range(x // 256, (x + w - 1) // 256 + 1)
        ]
        data = path.read_bytes()
        return [data[page.dataoffsets[i] : page.dataoffsets[i] + page.databytecounts[i]] for i in idx], page.jpegtables


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (page cache, first-call costs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def local_reads(paths: dict[str, Path], repeats: int) -> None:
    import imagecodecs

    from hipt_ray.slides.reader import Slide
    from hipt_ray.slides.tiles import TiledTiff

    print(
        f"{'slide':6} {'openslide s':>12} {'tiles s':>9} {'bare s':>8} {'tiles/openslide':>16} "
        f"{'bare/tiles':>11}  equal"
    )
    for name, path in paths.items():
        ref, ours = Slide(str(path)), Slide(str(path), source=TiledTiff(str(path)))
        scale = round(0.5 / ref.mpp)
        xy = (0, 0)
        t_os = median_time(lambda: ref.read_region(xy, (4096, 4096), 0.5), repeats)
        t_tiles = median_time(lambda: ours.read_region(xy, (4096, 4096), 0.5), repeats)
        blobs, tables = needed_tiles(path, (0, 0, 4096 * scale, 4096 * scale))
        t_bare = median_time(lambda: [imagecodecs.jpeg8_decode(b, tables=tables) for b in blobs], repeats)
        equal = np.array_equal(ref.read_region(xy, (4096, 4096), 0.5)[0], ours.read_region(xy, (4096, 4096), 0.5)[0])
        print(
            f"{name:6} {t_os:12.3f} {t_tiles:9.3f} {t_bare:8.3f} {t_os / t_tiles:15.1f}x {t_bare / t_tiles:10.2f}x  "
            f"{equal} ({len(blobs)} tiles)"
        )


def scaled_decode(path: Path, repeats: int, real: bool) -> None:
    import torch

    from hipt_ray.models import create_model, normalize_uint8
    from hipt_ray.slides.reader import Slide
    from hipt_ray.slides.tiles import TiledTiff

    exact = Slide(str(path), source=TiledTiff(str(path)))
    scaled = Slide(str(path), source=TiledTiff(str(path)), scaled_decode=True)
    w, h = exact.dimensions
    corners = [(0, 0), (w // 2 - 4096, h // 2 - 4096)]  # level-0 corners on the 20× grid (even)
    print(
        f"\nreader.scaled_decode=true, 40× → 0.5 µm/px, 4096² regions: {'exact s':>8} {'scaled s':>9} {'speed-up':>9} "
        f"{'PSNR dB':>8} {'max |Δ|':>8}  embedding cosine (tiny / real-size)"
    )
    models = {"tiny": create_model("hipt4k_tiny")} | ({"real": create_model("hipt4k")} if real else {})
    torch.manual_seed(0)
    for xy in corners:
        t_exact = median_time(lambda: exact.read_region(xy, (4096, 4096), 0.5), repeats)
        t_scaled = median_time(lambda: scaled.read_region(xy, (4096, 4096), 0.5), repeats)
        a, b = exact.read_region(xy, (4096, 4096), 0.5)[0], scaled.read_region(xy, (4096, 4096), 0.5)[0]
        d = a.astype(np.float64) - b
        psnr = 10 * np.log10(255**2 / max(np.mean(d**2), 1e-12))
        cosines = []
        for model in models.values():
            with torch.inference_mode():
                ea, eb = (model.eval()(normalize_uint8(torch.from_numpy(img.copy())[None]))[0] for img in (a, b))
            cosines.append(f"{torch.nn.functional.cosine_similarity(ea, eb, dim=0).item():.6f}")
        print(
            f"{'':40}{str(xy):14} {t_exact:8.3f} {t_scaled:9.3f} {t_exact / t_scaled:8.1f}x {psnr:8.2f} "
            f"{int(np.abs(d).max()):8d}  {' / '.join(cosines)}"
        )


def s3_reads(paths: dict[str, Path]) -> None:
    from bench.embed import start_moto

    moto, _ = start_moto()
    try:
        from hipt_ray.slides.reader import Slide
        from hipt_ray.slides.tiles import TiledTiff
        from hipt_ray.storage import StagingCache, filesystem

        fs, _ = filesystem("s3://bench/x")
        fs.mkdir("bench")
        print(
            f"\nfrom moto S3 (127.0.0.1): {'slide':6} {'MB':>6} {'bytes/needed':>13} {'requests':>9} "
            f"{'staged MB':>10} {'first region: tiles s':>22} {'staging+openslide s':>20}"
        )
        for name, path in paths.items():
            uri = f"s3://bench/{path.name}"
            fs.put(str(path), f"bench/{path.name}")
            scale = round(0.5 / Slide(str(path)).mpp)
            blobs, _ = needed_tiles(path, (0, 0, 4096 * scale, 4096 * scale))
            cache_dir = BENCH_DIR / "cache"
            shutil.rmtree(cache_dir, ignore_errors=True)
            t0 = time.perf_counter()
            src = TiledTiff(uri)
            header_bytes, header_requests = src.bytes_read, src.requests
            with Slide(uri, source=src) as s:
                s.read_region((0, 0), (4096, 4096), 0.5)
            t_tiles = time.perf_counter() - t0
            region_bytes = src.bytes_read - header_bytes
            cache = StagingCache(str(cache_dir), 2**34)
            t0 = time.perf_counter()
            local, _ = cache.fetch(uri)
            with Slide(local) as s:
                s.read_region((0, 0), (4096, 4096), 0.5)
            t_stage = time.perf_counter() - t0
            staged = sum(p.stat().st_size for p in cache_dir.iterdir())
            print(
                f"{'':26}{name:6} {path.stat().st_size / 1e6:6.1f} {region_bytes / sum(map(len, blobs)):13.3f} "
                f"{src.requests - header_requests:9d} {0:10.1f} {t_tiles:22.3f} {t_stage:20.3f}"
                f"   (header {header_bytes / 1e3:.0f} kB in {header_requests} requests; "
                f"staging path stages {staged / 1e6:.1f} MB)"
            )
    finally:
        moto.kill()
        moto.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-real", action="store_true", help="skip the real-size model's embedding cosine")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; load: {os.getloadavg()[0]:.2f}; one thread")
    paths = make_slides()
    local_reads(paths, args.repeats)
    scaled_decode(paths["40x"], args.repeats, real=not args.no_real)
    s3_reads(paths)


if __name__ == "__main__":
    main()
