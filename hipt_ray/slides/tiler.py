"""One slide → what tiling found (its status, error and slide fields), region rows and QC
thumbnail. No Ray and no tables here: the tile stage runs this function as a Ray task per slide
and turns what it returns into the store's rows; tests call it directly."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import fsspec
import numpy as np

from hipt_ray.config import Config
from hipt_ray.slide_ref import SlideRef, slide_version
from hipt_ray.slides.grid import Region, planned_regions, region_grid
from hipt_ray.slides.manifest import SlideSpec
from hipt_ray.slides.qc import qc_thumbnail
from hipt_ray.slides.reader import Slide, SlideError, make_cache, open_slide, override_hint
from hipt_ray.slides.tissue import tissue_mask, tissue_method
from hipt_ray.storage import StagingCache, StorageError, describe_error, is_remote, join, storage_options

log = logging.getLogger(__name__)


__all__ = ["TileResult", "check_plausible", "make_cache", "tile_slide"]


@dataclass
class TileResult:
    """``slide``: what tiling found, with ``status``, ``error``, ``n_regions`` and ``seconds``
    (the fields of a ``slides`` row the store stamps and completes); ``regions``: region rows."""

    slide: dict
    regions: list[dict] = field(default_factory=list)


def _write_bytes(uri: str, data: bytes, endpoint_url: str | None) -> None:
    if is_remote(uri):
        with fsspec.open(uri, "wb", **storage_options(uri, endpoint_url)) as fh:
            fh.write(data)
    else:
        with fsspec.open(uri, "wb", auto_mkdir=True) as fh:
            fh.write(data)


# The largest scanned area a real slide can have, in mm (long side, short side): a 75 × 25 mm
# glass slide, or a 75 × 50 mm double-width one, with room for the scanner's margins.
MAX_GLASS_MM = (80.0, 55.0)


def check_plausible(ref: SlideRef, slide: Slide, cfg: Config) -> None:
    """Refuse a slide whose resolved MPP makes it larger than any glass slide (a wrong MPP:
    a widened ``tiling.mpp_range`` once turned a 300×250 px image into 1,146 regions), or
    whose grid holds more than ``tiling.max_regions_per_slide`` regions.

    Raises:
        SlideError: with the computed size and what to check.
    """
    w_mm, h_mm = (d * slide.mpp / 1000 for d in slide.dimensions)
    if max(w_mm, h_mm) > MAX_GLASS_MM[0] or min(w_mm, h_mm) > MAX_GLASS_MM[1]:
        raise SlideError(
            f"{ref.uri}: at {slide.mpp:g} µm/px (from {slide.mpp_info.source}) its "
            f"{slide.dimensions[0]}×{slide.dimensions[1]} pixels would measure {w_mm:,.0f} × {h_mm:,.0f} mm, "
            "larger than any glass slide (75 × 25 mm, or 75 × 50 mm); its MPP is wrong: " + override_hint(ref.slide_id)
        )
    planned = planned_regions(slide.dimensions, slide.mpp, cfg.tiling)
    if planned > cfg.tiling.max_regions_per_slide:
        raise SlideError(
            f"{ref.uri}: its grid would hold {planned:,} regions at tiling.mpp={cfg.tiling.mpp:g}, "
            f"more than tiling.max_regions_per_slide={cfg.tiling.max_regions_per_slide:,}; check "
            "tiling.mpp and the slide's MPP, or raise the cap"
        )


def _probed_regions(
    slide: Slide, grid: list[Region], ref: SlideRef, cfg: Config, spec_hash: str, version: str
) -> list[dict]:
    """The region rows of ``grid``, each probed by reading one patch at its centre, so that
    undecodable tiles fail the slide here, not mid-embedding."""
    scale = cfg.tiling.mpp / slide.mpp
    level = slide.best_level(scale)
    read_mpp = slide.mpp * slide.level_downsamples[level]
    p = cfg.tiling.patch_px
    regions = []
    for r in grid:
        cx = r.x + int((min(r.valid_w, r.read_w) // 2 - p // 2) * scale)
        cy = r.y + int((min(r.valid_h, r.read_h) // 2 - p // 2) * scale)
        slide.read_region((max(cx, r.x), max(cy, r.y)), (p, p), cfg.tiling.mpp)
        regions.append(
            {
                **r.to_row(),
                "region_index": r.index,
                "slide_id": ref.slide_id,
                "level": level,
                "mpp": cfg.tiling.mpp,
                "read_mpp": read_mpp,
                "mpp_source": slide.mpp_info.source,
                "spec_hash": spec_hash,
                "model_id": "",
                "slide_version": version,
            }
        )
    return regions


def _no_tissue_reason(uri: str, cfg: Config, mask: np.ndarray, method: str, threshold: float) -> str:
    return (
        f"{uri}: no region reaches tiling.min_tissue_fraction="
        f"{cfg.tiling.min_tissue_fraction} (tissue {mask.mean():.1%} of the slide at "
        f"{method} threshold {threshold:.3f}); if the slide does hold tissue, lower "
        f"tiling.min_tissue_fraction or set tissue.{method}_threshold"
        + (" (or tissue.method=luminance for a slide without colour)" if method == "saturation" else "")
    )


def tile_slide(spec: SlideSpec | SlideRef, cfg: Config, *, cache: StagingCache, spec_hash: str) -> TileResult:
    """Open, find tissue, grid regions, probe that they decode, write a QC PNG.

    ``spec``: the slide as listed (its override from the manifest or ``tiling.mpp_overrides``),
    or its reference. Never raises for a bad slide: the result's status is ``failed`` (with a
    reason a person can act on) or ``no_tissue``.
    """
    t0 = time.perf_counter()
    ref = spec.to_ref(cfg.tiling.mpp_overrides) if isinstance(spec, SlideSpec) else spec
    row: dict[str, object] = {
        "slide_id": ref.slide_id,
        "uri": ref.uri,
        "case_id": ref.case_id,
        "spec_hash": spec_hash,
        "etag": "",
        "vendor": "",
        "mpp_source": "",
        "qc_uri": "",
    }  # what was found; the status comes last
    status, error = "failed", ""
    regions: list[dict] = []
    try:
        slide, info = open_slide(ref, cfg, cache=cache)
        row.update(size=info.size, etag=info.version)
        with slide:
            row.update(
                backend=slide.backend,
                vendor=slide.vendor,
                mpp=slide.measured_mpp,  # its own: a reopened slide snaps it again the same way
                mpp_source=slide.mpp_info.source,
                width=slide.dimensions[0],
                height=slide.dimensions[1],
            )
            check_plausible(ref, slide, cfg)  # refused before any pixel is read
            lowres, lowres_mpp = slide.read_lowres(cfg.tissue.mask_mpp)
            mask, threshold = tissue_mask(lowres, lowres_mpp, cfg.tissue)
            method = tissue_method(lowres, cfg.tissue)
            grid = region_grid(slide.dimensions, slide.mpp, cfg.tiling, mask, lowres_mpp)
            regions = _probed_regions(slide, grid, ref, cfg, spec_hash, slide_version(info.size, info.version))
            if cfg.qc.enabled and cfg.out:
                qc_uri = join(cfg.out, "qc", f"{ref.slide_id}.png")
                png = qc_thumbnail(
                    lowres,
                    lowres_mpp,
                    mask,
                    grid,
                    slide.mpp,
                    max_px=cfg.qc.thumb_px,
                    title=f"{ref.slide_id}  {len(grid)} regions  mpp {slide.measured_mpp:g}"
                    + (f" read as {slide.mpp:g}" if slide.mpp != slide.measured_mpp else ""),
                )
                _write_bytes(qc_uri, png, cfg.storage.s3_endpoint_url)
                row["qc_uri"] = qc_uri
        if regions:
            status = "ok"
        else:
            status = "no_tissue"
            error = _no_tissue_reason(ref.uri, cfg, mask, method, threshold)
    except (SlideError, StorageError) as exc:
        error = str(exc)
        regions = []
    except Exception as exc:  # one bad slide never stops the job: record why and go on
        log.warning("slide %s failed", ref.uri, exc_info=True)
        error = describe_error(ref.uri, exc, cfg.storage.s3_endpoint_url)
        regions = []
    row.update(status=status, error=error, n_regions=len(regions), seconds=round(time.perf_counter() - t0, 3))
    return TileResult(row, regions)
