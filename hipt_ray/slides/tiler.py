"""One slide → its status row, region rows and QC thumbnail. No Ray here: the tile stage runs
this function as a Ray task per slide, and tests call it directly."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import fsspec

from hipt_ray.config import Config
from hipt_ray.slides.grid import planned_regions, region_grid
from hipt_ray.slides.manifest import SlideSpec
from hipt_ray.slides.qc import qc_thumbnail
from hipt_ray.slides.reader import SlideError, open_slide
from hipt_ray.slides.tissue import tissue_mask, tissue_method
from hipt_ray.store.commit import status_row
from hipt_ray.store.tables import slide_version
from hipt_ray.storage import StagingCache, StorageError, describe_error, is_remote, join, storage_options

log = logging.getLogger(__name__)


@dataclass
class TileResult:
    slide: dict
    regions: list[dict] = field(default_factory=list)


def make_cache(cfg: Config) -> StagingCache:
    s = cfg.storage
    return StagingCache(s.cache_dir, s.cache_max_bytes, endpoint_url=s.s3_endpoint_url, retries=s.retries)


def _write_bytes(uri: str, data: bytes, endpoint_url: str | None) -> None:
    if is_remote(uri):
        with fsspec.open(uri, "wb", **storage_options(uri, endpoint_url)) as fh:
            fh.write(data)
    else:
        with fsspec.open(uri, "wb", auto_mkdir=True) as fh:
            fh.write(data)


def tile_slide(spec: SlideSpec, cfg: Config, *, cache: StagingCache, spec_hash: str) -> TileResult:
    """Open, find tissue, grid regions, probe that they decode, write a QC PNG.

    Never raises for a bad slide: the result's status is ``failed`` (with a reason a person can
    act on) or ``no_tissue``.
    """
    t0 = time.perf_counter()
    row = {"slide_id": spec.slide_id, "uri": spec.uri, "spec_hash": spec_hash, "etag": "", "vendor": "",
           "mpp_source": "", "qc_uri": ""}  # what was found; the status comes last
    status, error = "failed", ""
    regions: list[dict] = []
    try:
        override = spec.mpp if spec.mpp is not None else cfg.tiling.mpp_overrides.get(spec.slide_id)
        slide, info = open_slide(spec.uri, cfg, cache=cache, mpp_override=override, slide_id=spec.slide_id)
        row.update(size=info.size, etag=info.version)
        with slide:
            row.update(backend=slide.backend, vendor=slide.vendor, mpp=slide.mpp, mpp_source=slide.mpp_info.source,
                       width=slide.dimensions[0], height=slide.dimensions[1])
            planned = planned_regions(slide.dimensions, slide.mpp, cfg.tiling)
            if planned > cfg.tiling.max_regions_per_slide:  # refused before any pixel is read
                raise SlideError(
                    f"{spec.uri}: its grid would hold {planned:,} regions at tiling.mpp={cfg.tiling.mpp:g}, "
                    f"more than tiling.max_regions_per_slide={cfg.tiling.max_regions_per_slide:,}; check "
                    "tiling.mpp and the slide's MPP, or raise the cap"
                )
            lowres, lowres_mpp = slide.read_lowres(cfg.tissue.mask_mpp)
            mask, threshold = tissue_mask(lowres, lowres_mpp, cfg.tissue)
            method = tissue_method(lowres, cfg.tissue)
            grid = region_grid(slide.dimensions, slide.mpp, cfg.tiling, mask, lowres_mpp)
            scale = cfg.tiling.mpp / slide.mpp
            level = slide.best_level(scale)
            read_mpp = slide.mpp * slide.level_downsamples[level]
            p = cfg.tiling.patch_px
            for r in grid:
                # Probe one patch per region so that undecodable tiles fail here, not mid-embedding.
                cx = r.x + int((min(r.valid_w, r.read_w) // 2 - p // 2) * scale)
                cy = r.y + int((min(r.valid_h, r.read_h) // 2 - p // 2) * scale)
                slide.read_region((max(cx, r.x), max(cy, r.y)), (p, p), cfg.tiling.mpp)
                regions.append({**r.to_row(), "region_index": r.index, "slide_id": spec.slide_id,
                                "level": level, "mpp": cfg.tiling.mpp, "read_mpp": read_mpp,
                                "mpp_source": slide.mpp_info.source, "spec_hash": spec_hash,
                                "model_id": "", "slide_version": slide_version(info.size, info.version)})
            if cfg.qc.enabled and cfg.out:
                qc_uri = join(cfg.out, "qc", f"{spec.slide_id}.png")
                png = qc_thumbnail(lowres, lowres_mpp, mask, grid, slide.mpp, max_px=cfg.qc.thumb_px,
                                   title=f"{spec.slide_id}  {len(grid)} regions  mpp {slide.mpp:g}")
                _write_bytes(qc_uri, png, cfg.storage.s3_endpoint_url)
                row["qc_uri"] = qc_uri
        if regions:
            status = "ok"
        else:
            status = "no_tissue"
            error = (
                f"{spec.uri}: no region reaches tiling.min_tissue_fraction="
                f"{cfg.tiling.min_tissue_fraction} (tissue {mask.mean():.1%} of the slide at "
                f"{method} threshold {threshold:.3f}); if the slide does hold tissue, lower "
                f"tiling.min_tissue_fraction or set tissue.{method}_threshold"
                + (" (or tissue.method=luminance for a slide without colour)" if method == "saturation" else "")
            )
    except (SlideError, StorageError) as exc:
        error = str(exc)
        regions = []
    except Exception as exc:  # one bad slide never stops the job: record why and go on
        log.warning("slide %s failed", spec.uri, exc_info=True)
        error = describe_error(spec.uri, exc)
        regions = []
    return TileResult(status_row(row, status=status, error=error, n_regions=len(regions),
                                 seconds=time.perf_counter() - t0), regions)
