"""Synthetic whole-slide images that OpenSlide opens as real slides, for tests and the demo.

Tissue is real tissue texture (scikit-image's bundled immunohistochemistry image) in irregular
blobs on white glass; the ground-truth tissue mask is returned. Each pyramid level is its own
tiled JPEG page (``subfiletype=1`` for reduced levels): a "generic tiff" with resolution tags, or
an Aperio-style SVS with ``AppMag``/``MPP`` in the description. A subtype (stain colour and cell
size) and a risk score (density of dark nuclei) can be planted in the texture so that slide-level
heads have something real to learn.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage
from skimage import data as skdata

GLASS_RGB = (243, 242, 246)
GT_MASK_MPP = 8.0  # µm/px of the returned ground-truth mask
# Per-subtype stain gains (R, G, B) and texture zoom: colour and cell size differ by class.
SUBTYPES = (((1.00, 0.88, 1.05), 1.0), ((1.05, 0.72, 0.80), 1.6), ((0.80, 0.85, 1.10), 0.7))


@dataclass(frozen=True)
class SyntheticSlide:
    path: str
    mpp: float | None
    dimensions: tuple[int, int]
    mask: np.ndarray  # ground truth at mask_mpp
    mask_mpp: float


def tissue_tile(*, subtype: int = 0, risk: float = 0.0, seed: int = 0) -> np.ndarray:
    """A 512×512 RGB texture tile of stained tissue for a subtype and risk in [0, 1]."""
    rng = np.random.default_rng(seed)
    gains, zoom = SUBTYPES[subtype % len(SUBTYPES)]
    img = Image.fromarray(skdata.immunohistochemistry())
    if zoom > 1:  # larger cells: crop and enlarge
        side = int(round(512 / zoom))
        img = img.crop((0, 0, side, side)).resize((512, 512), Image.Resampling.BICUBIC)
    elif zoom < 1:  # smaller cells: shrink, then mirror-extend back to 512
        side = int(round(512 * zoom))
        small = np.asarray(img.resize((side, side), Image.Resampling.BICUBIC))
        img = Image.fromarray(np.pad(small, ((0, 512 - side), (0, 512 - side), (0, 0)), mode="symmetric"))
    base = np.asarray(img).astype(np.float32)
    # Denser stain than the source image, so that every part of a blob reads as tissue.
    tile = np.clip(255.0 - (255.0 - base) * 1.35, 0, 255) * np.asarray(gains, dtype=np.float32)
    # Higher risk: darker staining overall (up to 35 %) and crowded dark nuclei.
    tile = np.clip(tile * (1.0 - 0.35 * float(np.clip(risk, 0, 1))), 0, 255)
    n_nuclei = int(round(np.clip(risk, 0, 1) * 480))  # up to ~25 % of the area
    if n_nuclei:
        for cy, cx, r in zip(
            rng.integers(0, 512, n_nuclei), rng.integers(0, 512, n_nuclei), rng.uniform(4, 8, n_nuclei)
        ):
            # each disk drawn in its own bounding box (r < 8), not tested over the whole tile
            y0, x0 = max(0, cy - 8), max(0, cx - 8)
            yy, xx = np.ogrid[y0 : min(512, cy + 9), x0 : min(512, cx + 9)]
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            tile[y0 : y0 + disk.shape[0], x0 : x0 + disk.shape[1]][disk] = (70, 35, 95)
    return tile.astype(np.uint8)


def blob_mask(shape: tuple[int, int], *, n_blobs: int, rng: np.random.Generator, fill: float = 0.45) -> np.ndarray:
    """Irregular tissue blobs on a low-resolution grid (ellipses with noisy borders)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = np.full(shape, np.inf, dtype=np.float32)
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry = rng.uniform(0.5, 1.0) * math.sqrt(fill / n_blobs) * h * 0.7 + 2
        rx = rng.uniform(0.5, 1.0) * math.sqrt(fill / n_blobs) * w * 0.7 + 2
        field = np.minimum(field, ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=max(h, w) / 40)
    noise /= np.abs(noise).max() + 1e-6
    mask = field + 0.5 * noise < 1.0
    return ndimage.binary_fill_holes(ndimage.binary_opening(mask, iterations=1))


def render(
    width: int,
    height: int,
    *,
    mpp: float,
    seed: int = 0,
    subtype: int = 0,
    risk: float = 0.0,
    n_blobs: int = 3,
    tissue: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 ``[height, width, 3]`` at ``mpp`` and its ground-truth mask at ``GT_MASK_MPP``."""
    rng = np.random.default_rng(seed)
    k = mpp / GT_MASK_MPP
    gt_shape = (max(1, round(height * k)), max(1, round(width * k)))
    gt = blob_mask(gt_shape, n_blobs=n_blobs, rng=rng) if tissue else np.zeros(gt_shape, bool)
    tile = tissue_tile(subtype=subtype, risk=risk, seed=seed)
    block = np.concatenate(
        [np.concatenate([tile, tile[:, ::-1]], 1), np.concatenate([tile[::-1], tile[::-1, ::-1]], 1)], 0
    )  # 1024², seamless
    texture = np.tile(block, (math.ceil(height / 1024), math.ceil(width / 1024), 1))[:height, :width]
    full = (
        np.asarray(Image.fromarray(gt.astype(np.uint8) * 255).resize((width, height), Image.Resampling.BILINEAR)) > 127
    )
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = GLASS_RGB
    np.copyto(rgb, texture, where=full[..., None])
    return rgb, gt


def _pyramid(rgb: np.ndarray, factor: int = 4, min_px: int = 512) -> list[np.ndarray]:
    levels = [rgb]
    while min(levels[-1].shape[:2]) // factor >= min_px // 4 and max(levels[-1].shape[:2]) > min_px:
        img = Image.fromarray(levels[-1])
        levels.append(np.asarray(img.reduce(factor)))
    return levels


def write_slide(
    path: str | Path,
    rgb: np.ndarray,
    *,
    mpp: float | None,
    aperio: bool = False,
    objective: float | None = None,
    quality: int = 85,
) -> None:
    """Write ``rgb`` as a tiled JPEG pyramid OpenSlide reads (generic TIFF or Aperio SVS).

    ``mpp=None`` writes no MPP (and, for Aperio, only ``AppMag`` when ``objective`` is given).
    """
    levels = _pyramid(rgb)
    h, w = rgb.shape[:2]
    with tifffile.TiffWriter(str(path), bigtiff=rgb.nbytes > 2**31) as tif:
        for i, level in enumerate(levels):
            kwargs: dict = {}
            if aperio and i == 0:
                fields = []
                if objective is not None:
                    fields.append(f"AppMag = {objective:g}")
                if mpp is not None:
                    fields.append(f"MPP = {mpp:g}")
                kwargs["description"] = (
                    f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB "
                    f"Q={quality}" + "".join("|" + f for f in fields)
                )
            if mpp is not None and not aperio:
                ds = w / level.shape[1]
                kwargs.update(resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), resolutionunit="CENTIMETER")
            tif.write(
                level,
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                subfiletype=1 if i else 0,
                metadata=None,
                **kwargs,
            )


def make_slide(
    path: str | Path,
    *,
    width_um: float,
    height_um: float,
    mpp: float = 0.5,
    seed: int = 0,
    subtype: int = 0,
    risk: float = 0.0,
    n_blobs: int = 3,
    tissue: bool = True,
    aperio: bool = False,
    write_mpp: bool = True,
    objective: float | None = None,
) -> SyntheticSlide:
    """Render and write one synthetic slide; returns its path, size and ground-truth mask."""
    width, height = round(width_um / mpp), round(height_um / mpp)
    rgb, gt = render(width, height, mpp=mpp, seed=seed, subtype=subtype, risk=risk, n_blobs=n_blobs, tissue=tissue)
    write_slide(path, rgb, mpp=mpp if write_mpp else None, aperio=aperio, objective=objective)
    return SyntheticSlide(str(path), mpp if write_mpp else None, (width, height), gt, GT_MASK_MPP)


def corrupt_tiles(path: str | Path, *, fraction: float = 1.0, seed: int = 0) -> int:
    """Overwrite the JPEG data of level-0 tiles with garbage (an undecodable slide); returns
    the number of tiles damaged."""
    rng = np.random.default_rng(seed)
    with tifffile.TiffFile(str(path)) as tif:
        page = tif.pages[0]
        tiles = list(zip(page.dataoffsets, page.databytecounts))
    chosen = [t for t in tiles if rng.random() < fraction]
    with open(path, "r+b") as fh:
        for offset, count in chosen:
            fh.seek(offset)
            fh.write(rng.integers(0, 256, count, dtype=np.uint8).tobytes())
    return len(chosen)


# Bytes a demo slide's file takes per level-0 pixel (JPEG q85 tiles of glass and tissue, the
# pyramid included): 0.08–0.13 measured over six default-size demo slides, 0.11 over all six.
DEMO_BYTES_PER_PIXEL = 0.12


@dataclass(frozen=True)
class DemoPlan:
    """What ``make-demo-data`` will write, decided before anything is: each slide's
    :func:`make_slide` arguments and each slide's row of ``labels.csv``."""

    out: Path
    slides: list[dict]
    rows: list[dict]

    def estimated_bytes(self) -> int:
        """About how much disk the slides take (:data:`DEMO_BYTES_PER_PIXEL` per level-0 pixel)."""
        pixels = sum(round(s["width_um"] / s["mpp"]) * round(s["height_um"] / s["mpp"]) for s in self.slides)
        return int(pixels * DEMO_BYTES_PER_PIXEL)


def plan_demo_data(
    out: str | Path,
    *,
    n_slides: int = 12,
    seed: int = 0,
    n_subtypes: int = 2,
    size_um: tuple[float, float] = (3000.0, 6000.0),
) -> DemoPlan:
    """The slides and labels of a demo cohort (see :func:`make_demo_data`), nothing written yet.

    The class is in ``label`` (``subtype-<k>``), the column ``train-head`` reads by default; the
    planted texture index stays in ``subtype``.
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    rows, slides = [], []
    case = 0
    for i in range(n_slides):
        # Most cases have one slide, some two (same tumour: same subtype and risk).
        if i == 0 or rng.random() > 0.25:
            case += 1
            subtype, risk = int(rng.integers(0, n_subtypes)), float(rng.uniform(0, 1))
            t_event = rng.exponential(36.0 / math.exp(3.0 * (risk - 0.5)))
            t_censor = rng.uniform(12.0, 120.0)
        slide_id = f"demo-{i:03d}"
        forty_x = i % 6 == 5
        aperio = i % 3 == 1
        mpp = 0.25 if forty_x else 0.5
        lo, hi = size_um
        if forty_x:  # about a third smaller; for narrow ranges the two bounds can cross
            lo, hi = sorted((lo * 0.73, hi * 0.6))
        width_um, height_um = rng.uniform(lo, hi, 2)
        ext = ".svs" if aperio else ".tiff"
        slides.append(
            dict(
                path=out / "slides" / f"{slide_id}{ext}",
                width_um=width_um,
                height_um=height_um,
                mpp=mpp,
                seed=seed * 1000 + i,
                subtype=subtype,
                risk=risk,
                n_blobs=int(rng.integers(1, 4)),
                aperio=aperio,
                objective=10.0 / mpp if aperio else None,
            )
        )
        rows.append(
            {
                "slide_id": slide_id,
                "case_id": f"case-{case:03d}",
                "label": f"subtype-{subtype}",
                "subtype": subtype,
                "survival_months": round(min(t_event, t_censor), 2),
                "event": int(t_event <= t_censor),
                "risk": round(risk, 4),
            }
        )
    return DemoPlan(out=out, slides=slides, rows=rows)


def write_demo_data(plan: DemoPlan, *, on_slide: Callable[[], None] | None = None) -> Path:
    """Write ``plan``'s slides (calling ``on_slide`` after each, in this thread) and then
    ``labels.csv``; returns the output folder."""
    (plan.out / "slides").mkdir(parents=True, exist_ok=True)
    # Each slide has its own seed: rendered side by side (numpy, PIL and the JPEG encoder release
    # the GIL for most of the work), the files are the same as one after the other.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not on macOS
    with ThreadPoolExecutor(max_workers=min(4, cpus)) as pool:  # ≈ 1 GB a slide in flight
        for _ in pool.map(lambda kw: make_slide(**kw), plan.slides):
            if on_slide is not None:
                on_slide()
    with open(plan.out / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(plan.rows[0]))
        writer.writeheader()
        writer.writerows(plan.rows)
    return plan.out


def make_demo_data(
    out: str | Path,
    *,
    n_slides: int = 12,
    seed: int = 0,
    n_subtypes: int = 2,
    size_um: tuple[float, float] = (3000.0, 6000.0),
) -> Path:
    """Write ``n_slides`` synthetic slides plus ``labels.csv`` (slide_id, case_id, label, subtype,
    survival_months, event, risk) with subtype and risk planted in the slide content.

    Survival follows an exponential model whose hazard grows with the planted risk (a hazard
    ratio of e³ ≈ 20 between risk 0 and 1), censored uniformly between 12 and 120 months.
    Slide sides are drawn from ``size_um`` (µm; the 40× slides are about a third smaller).
    """
    return write_demo_data(plan_demo_data(out, n_slides=n_slides, seed=seed, n_subtypes=n_subtypes, size_um=size_um))
