"""The DICOM rows of the read benchmark (#30), measured side by side in one run.

    .venv/bin/python bench/read_dicom.py [--repeats 9]

The 20× synthetic slide of ``bench/read.py`` (8800² px, JPEG q85 tiles) written again as DICOM
series: its JPEG tiles as they are (IDC's layout: a TIFF personality, no offset table), and
its tiles re-encoded as JPEG 2000, lossy (≈ 40 dB PSNR, as TCGA's JPEG 2000 slides are lossy)
and lossless. Per 4096² region at 0.5 µm/px on one thread, medians of ``--repeats``
(measured in rotating turns):
  tiff        the TIFF through the tile backend
  dicom       the JPEG series through DicomSlide (the same tiles: target within 1.1× of tiff)
  openslide   the JPEG series through OpenSlide 4's DICOM reader, from the local folder
  jpeg2k      the JPEG 2000 series through DicomSlide (the decode cost of JPEG 2000)
Then from moto's S3 server on 127.0.0.1, per layout (TIFF personality, Extended Offset Table,
Basic Offset Table, item walk): requests and bytes to open the series (listing and one HEAD per
instance counted apart), and per region bytes read ÷ compressed frame bytes and requests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np  # noqa: E402

from bench.read import BENCH_DIR, cpu_name, make_slides  # noqa: E402

LAYOUTS = {  # name → write_dicom_twin arguments
    "jpeg-tiff": dict(tiff=True),
    "jpeg-extended": dict(offset_table="extended"),
    "jpeg-basic": dict(offset_table="basic"),
    "jpeg-walk": {},
    "j2k-lossy": dict(codec="jpeg2k-lossy", tiff=True),
    "j2k-lossless": dict(codec="jpeg2k", tiff=True),
}


def make_series(tiff: Path) -> dict[str, Path]:
    from hipt_ray.slides import synthetic_dicom

    out = {}
    for name, kw in LAYOUTS.items():
        folder = BENCH_DIR / f"dicom-{name}"
        if not (folder / "level-0.dcm").is_file():
            synthetic_dicom.write_dicom_twin(tiff, folder, mpp=0.5, **kw)
        out[name] = folder
    return out


def paired_times(fns: list, repeats: int) -> list[float]:
    """Medians of each function's time, measured in turns whose order rotates (A B C, B C A,
    C A B, …) so that a noisy shared machine slows each of them alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for k in range(len(fns)):
            i = (k + r) % len(fns)
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(ts)) for ts in times]


def local_reads(tiff: Path, series: dict[str, Path], repeats: int) -> None:
    from hipt_ray.slides.dicom import DicomSlide
    from hipt_ray.slides.reader import Slide
    from hipt_ray.slides.tiles import TiledTiff

    args = ((0, 0), (4096, 4096), 0.5)
    slides = {"tiff (tile backend)": Slide(str(tiff), source=TiledTiff(str(tiff)))}
    for name in ("jpeg-tiff", "j2k-lossy", "j2k-lossless"):
        slides[f"dicom {name}"] = Slide(f"{series[name]}/", source=DicomSlide(f"{series[name]}/"))
    slides["openslide dicom jpeg-tiff"] = Slide(str(series["jpeg-tiff"] / "level-0.dcm"))
    times = paired_times([lambda s=s: s.read_region(*args) for s in slides.values()], repeats)
    ref = slides["tiff (tile backend)"].read_region(*args)[0]
    print(f"{'4096² region, one thread':28} {'s':>7} {'÷ tiff':>7}  equal to the TIFF's pixels")
    for (name, slide), t in zip(slides.items(), times):
        d = slide.read_region(*args)[0].astype(np.float64) - ref
        same = "yes" if not d.any() else f"no (PSNR {10 * np.log10(255**2 / np.mean(d**2)):.1f} dB)"
        print(f"{name:28} {t:7.3f} {t / times[0]:7.2f}  {same}")


def s3_reads(series: dict[str, Path]) -> None:
    from bench.embed import start_moto

    moto, _ = start_moto()
    try:
        from hipt_ray.slides.dicom import DicomSlide
        from hipt_ray.storage import filesystem

        fs, _ = filesystem("s3://bench/x")
        fs.mkdir("bench")
        print(
            f"\nfrom moto S3 (127.0.0.1): {'layout':14} {'MB':>6} {'open requests':>14} {'open kB':>8} "
            f"{'+ list/HEAD':>12} {'region requests':>16} {'bytes/needed':>13}"
        )
        for name, folder in series.items():
            for path in sorted(folder.iterdir()):
                fs.put(str(path), f"bench/{name}/{path.name}")
            slide = DicomSlide(f"s3://bench/{name}/")
            opened = slide.requests, slide.bytes_read
            lv = slide._levels[0]
            rows = 4096 // lv.tile_h
            slide.read_rgb((0, 0), 0, (4096, 4096))
            cols = -(-4096 // lv.tile_w)
            needed = int(sum(lv.counts[r * lv.cols + c] for r in range(rows) for c in range(cols)))
            size = sum(p.stat().st_size for p in folder.iterdir())
            print(
                f"{'':26}{name:14} {size / 1e6:6.1f} {opened[0]:14d} {opened[1] / 1e3:8.1f} "
                f"{1 + len(slide.instances):12d} {slide.requests - opened[0]:16d} "
                f"{(slide.bytes_read - opened[1]) / needed:13.3f}"
            )
    finally:
        moto.kill()
        moto.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; load: {os.getloadavg()[0]:.2f}; one thread")
    tiff = make_slides()["20x"]
    series = make_series(tiff)
    local_reads(tiff, series, args.repeats)
    s3_reads(series)


if __name__ == "__main__":
    main()
