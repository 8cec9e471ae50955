"""OpenSlide reader at an exact physical scale.

A region is ``read_w × read_h`` pixels at the target MPP. It is read from the best pyramid level
(the coarsest level that is still at least as fine as the target), resampled to exactly the
requested pixels, and transparent pixels (outside the scanned area) are composited on white.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass

import numpy as np
import openslide
from PIL import Image

from hipt_ray.slide_ref import SlideRef, same_version, slide_version
from hipt_ray.slides.dicom import DicomSlide, series_folder, series_info
from hipt_ray.slides.manifest import slide_id_from_uri
from hipt_ray.slides.packed import PackedRegion, TileError, decode_region, region_error, resample
from hipt_ray.slides.tiles import TileSource, open_tiled
from hipt_ray.storage import ObjectInfo, StagingCache, is_remote, stat, with_retries

# A level whose downsample is within this factor of the wanted one counts as exact
# (odd level sizes make stored downsamples like 4.0007).
_LEVEL_TOLERANCE = 1e-3


class SlideError(RuntimeError):
    """A per-slide problem: the slide is recorded as failed with this message; the job goes on."""


@dataclass(frozen=True)
class _ReadPlan:
    level: int
    read_size: tuple[int, int]  # pixels of the level (shrunk ``scale`` times) read
    scale: int  # DCT scaling of JPEG tiles (1: none)
    resample: str  # none | reduce | lanczos (see hipt_ray.slides.packed.resample)
    factor: int  # the reduce factor


@dataclass(frozen=True)
class MPPInfo:
    mpp: float
    source: str  # "metadata" | "objective" | "override"


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """``[H, W, 4]`` uint8 (straight alpha, as openslide-python returns) → ``[H, W, 3]`` on white.

    OpenSlide marks pixels outside the scanned area fully transparent, so the common cases are
    cheap: all opaque (one copy) or opaque/transparent only (one masked fill); the blend formula
    runs only on partially transparent pixels, if any.
    """
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    out = np.ascontiguousarray(rgb)
    opaque = alpha == 255
    n_opaque = np.count_nonzero(opaque)
    if n_opaque == alpha.size:
        return out
    clear = alpha == 0
    np.copyto(out, 255, where=clear[..., None])
    if n_opaque + np.count_nonzero(clear) < alpha.size:
        partial = ~(opaque | clear)
        a = alpha[partial].astype(np.uint16)[:, None]
        out[partial] = ((rgb[partial].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    return out


def override_hint(slide_id: str) -> str:
    """How to give ``slide_id`` an MPP, as text that works when pasted into a shell command (the
    id is a YAML key, so dots and dashes in it are fine)."""
    value = shlex.quote("{" + json.dumps(slide_id) + ": 0.5}")
    return (
        f"set it per slide with an 'mpp' column in a manifest CSV or by adding "
        f"tiling.mpp_overrides={value} to the command (0.5 µm/px is 20×, 0.25 is 40×: put the "
        "slide's own value)"
    )


def resolve_mpp(
    properties: dict[str, str],
    *,
    override: float | None,
    mpp_range: tuple[float, float],
    name: str,
    slide_id: str | None = None,
) -> MPPInfo:
    """Slide MPP from an explicit override, the MPP tags, or the objective power (10 / power).

    Raises:
        SlideError: no usable MPP (the message says how to set an override), or an MPP outside
            ``mpp_range`` (a broken tag is never guessed around).
    """
    how_to = override_hint(slide_id or slide_id_from_uri(name))
    if override is not None:
        info = MPPInfo(float(override), "override")
    else:
        info = None
        try:
            mx = float(properties.get(openslide.PROPERTY_NAME_MPP_X, "nan"))
            my = float(properties.get(openslide.PROPERTY_NAME_MPP_Y, "nan"))
        except ValueError:
            mx = my = math.nan
        if math.isfinite(mx) and math.isfinite(my) and mx > 0 and my > 0:
            if abs(mx - my) > 0.02 * max(mx, my):
                raise SlideError(f"{name}: non-square pixels (mpp-x {mx}, mpp-y {my}); {how_to}")
            info = MPPInfo((mx + my) / 2, "metadata")
        else:
            try:
                power = float(properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER, "nan"))
            except ValueError:
                power = math.nan
            if math.isfinite(power) and power > 0:
                info = MPPInfo(10.0 / power, "objective")
    if info is None:
        raise SlideError(f"{name}: the slide records no MPP and no objective power; {how_to}")
    lo, hi = mpp_range
    if not lo <= info.mpp <= hi:
        raise SlideError(
            f"{name}: MPP {info.mpp:g} µm/px (from {info.source}) is outside the sane range "
            f"{lo}–{hi}; if it is really right widen tiling.mpp_range, otherwise {how_to}"
        )
    return info


def snapped_mpp(mpp: float, target: float, tolerance: float) -> float:
    """``target / n`` when ``mpp`` is within the relative ``tolerance`` of it for a whole ``n ≥ 1``
    (level-0 pixels per target pixel), else ``mpp`` unchanged."""
    n = round(target / mpp)
    if tolerance > 0 and n >= 1 and abs(mpp * n / target - 1) <= tolerance:
        return target / n
    return mpp


class Slide:
    """An open slide with its resolved MPP. Use as a context manager."""

    def __init__(
        self,
        path: str,
        *,
        name: str | None = None,
        mpp_override: float | None = None,
        mpp_range: tuple[float, float] = (0.1, 2.0),
        slide_id: str | None = None,
        source: TileSource | None = None,
        scaled_decode: bool = False,
        snap: tuple[float, float] | None = None,
    ) -> None:
        """``source``: an open pixel source with OpenSlide's interface (the tile backend,
        :class:`hipt_ray.slides.tiles.TileSource`); ``None`` opens ``path`` with OpenSlide.
        ``scaled_decode``: a region read from a level 2, 4 or 8 times finer than wanted is
        decoded at the wanted size in the DCT domain where the source can (JPEG tiles through
        the tile backend) instead of decoded whole and box-averaged: faster, not identical.
        ``snap``: ``(target µm/px, tolerance)`` (``tiling.mpp`` and ``tiling.mpp_tolerance``): an
        MPP within ``tolerance`` of the target times 1/n for a whole n (0.504 for 0.5, n = 1;
        0.2527, n = 2) is read as exactly that (:meth:`mpp`), so regions are read whole or
        reduced by n instead of Lanczos-resampled; :attr:`measured_mpp` keeps the slide's own."""
        self.path = path
        self.name = name or os.path.basename(path)
        self.scaled_decode = scaled_decode and source is not None
        self.backend = "openslide" if source is None else "tiles+scaled" if self.scaled_decode else "tiles"
        if source is None and os.path.exists(path) and os.path.getsize(path) == 0:
            raise SlideError(f"{self.name}: the file is empty (0 bytes); re-upload the slide")
        try:
            self._osr: openslide.OpenSlide | TileSource = source if source is not None else openslide.OpenSlide(path)
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(
                f"{self.name}: not a slide OpenSlide can read (unsupported or unrecognised format); "
                "check the file is a whole-slide image and was copied completely"
            ) from None
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{self.name}: the slide file is corrupt or truncated ({exc})") from None
        self.properties = dict(self._osr.properties)
        self.mpp_info = resolve_mpp(
            self.properties,
            override=mpp_override,
            mpp_range=mpp_range,
            name=self.name,
            slide_id=slide_id,
        )
        self._mpp = snapped_mpp(self.mpp_info.mpp, *snap) if snap else self.mpp_info.mpp

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._osr.close()

    @property
    def mpp(self) -> float:
        """The MPP the slide is read at: its own, or the snapped one (see ``snap``)."""
        return self._mpp

    @property
    def measured_mpp(self) -> float:
        """The slide's own MPP (its tags, objective power or override), before any snapping."""
        return self.mpp_info.mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._osr.dimensions

    @property
    def vendor(self) -> str:
        return self.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._osr.level_downsamples

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample``."""
        best = 0
        for level, ds in enumerate(self._osr.level_downsamples):
            if ds <= downsample * (1 + _LEVEL_TOLERANCE):
                best = level
        return best

    def _read(self, level0_xy: tuple[int, int], level: int, size: tuple[int, int], scale: int = 1) -> np.ndarray:
        """``size`` pixels of ``level`` (shrunk ``scale`` times: the tile backend's scaled
        decoding) at level-0 ``level0_xy``, RGB on white."""
        try:
            if hasattr(self._osr, "read_rgb"):  # the tile backend composites on white itself
                return self._osr.read_rgb(level0_xy, level, size, scale=scale)
            img = self._osr.read_region(level0_xy, level, size)
        except TileError as exc:
            raise SlideError(region_error(exc)) from None
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"{self.name}: tiles failed to decode at level {level}, {level0_xy} ({exc}); "
                "the file is corrupt: re-export or re-upload it"
            ) from None
        return composite_on_white(np.asarray(img))

    def _plan(self, level0_xy: tuple[int, int], size_px: tuple[int, int], mpp: float) -> _ReadPlan:
        """Which level a region reads, how many of its pixels, and how they become the region."""
        w, h = size_px
        scale = mpp / self.mpp  # level-0 pixels per output pixel
        level = self.best_level(scale)
        level_scale = scale / self._osr.level_downsamples[level]  # level pixels per output pixel
        lw, lh = max(1, round(w * level_scale)), max(1, round(h * level_scale))
        factor = lw // w
        exact_factor = factor > 1 and (lw, lh) == (w * factor, h * factor)
        # scaled decoding only with the corner on the shrunk level's pixel grid (regions of a grid
        # are; an arbitrary point is read exactly, not half a pixel off)
        if (
            exact_factor
            and self.scaled_decode
            and isinstance(self._osr, TileSource)
            and self._osr.can_scale(level, factor)
            and all(round(v / self._osr.level_downsamples[level]) % factor == 0 for v in level0_xy)
        ):
            return _ReadPlan(level, (w, h), factor, "none", 1)
        how = "none" if (lw, lh) == (w, h) else "reduce" if exact_factor else "lanczos"
        return _ReadPlan(level, (lw, lh), 1, how, factor if exact_factor else 1)

    def pack_region(self, level0_xy: tuple[int, int], size_px: tuple[int, int], mpp: float) -> PackedRegion | None:
        """The region :meth:`read_region` reads, as its compressed tiles (:mod:`hipt_ray.slides.packed`),
        or ``None`` when its pixels cannot travel compressed (OpenSlide, tiles without a codec).

        Raises:
            SlideError: a tile the region needs is missing, empty or cut short."""
        return self._pack(level0_xy, self._plan(level0_xy, size_px, mpp), size_px)

    def _pack(self, level0_xy: tuple[int, int], plan: _ReadPlan, size_px: tuple[int, int]) -> PackedRegion | None:
        if not isinstance(self._osr, TileSource) or self._osr.codec(plan.level) is None:
            return None
        try:
            tiles = self._osr.pack(level0_xy, plan.level, plan.read_size, plan.scale)
        except TileError as exc:
            raise SlideError(region_error(exc)) from None
        return PackedRegion(tiles, plan.resample, plan.factor, (size_px[0], size_px[1]))

    def read_region(self, level0_xy: tuple[int, int], size_px: tuple[int, int], mpp: float) -> tuple[np.ndarray, int]:
        """``size_px`` (w, h) pixels at ``mpp`` µm/px with top-left corner ``level0_xy``; from
        the tile backend, the region packed and then decoded (the same pixels wherever the
        packed region is decoded).

        Returns:
            RGB uint8 ``[h, w, 3]`` on white, and the pyramid level read.
        """
        plan = self._plan(level0_xy, size_px, mpp)
        packed = self._pack(level0_xy, plan, size_px)
        if packed is not None:
            try:
                return decode_region(packed), plan.level
            except TileError as exc:
                raise SlideError(region_error(exc)) from None
        rgb = self._read(level0_xy, plan.level, plan.read_size, plan.scale)
        return resample(rgb, plan.resample, plan.factor, (size_px[0], size_px[1])), plan.level

    def read_lowres(self, mpp: float) -> tuple[np.ndarray, float]:
        """The whole slide at about ``mpp`` µm/px (for tissue detection and thumbnails).

        Returns:
            RGB uint8 on white and its exact MPP (width-based).
        """
        w0, h0 = self.dimensions
        scale = max(mpp / self.mpp, 1.0)
        w, h = max(1, round(w0 / scale)), max(1, round(h0 / scale))
        level = self.best_level(w0 / w)
        lw, lh = self._osr.level_dimensions[level]
        rgb = self._read((0, 0), level, (lw, lh))
        if (lw, lh) != (w, h):
            rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BOX))
        return rgb, self.mpp * w0 / w


def make_cache(cfg) -> StagingCache:
    """The local staging cache ``cfg.storage`` describes (where OpenSlide reads remote slides)."""
    s = cfg.storage
    return StagingCache(s.cache_dir, s.cache_max_bytes, endpoint_url=s.s3_endpoint_url, retries=s.retries)


def open_slide(ref: SlideRef, cfg, *, cache: StagingCache) -> tuple[Slide, ObjectInfo]:
    """The one way to open a slide: ``(Slide, ObjectInfo)`` for ``ref`` read by the backend
    ``cfg.reader.backend`` picks (see :class:`hipt_ray.config.ReaderConfig`), with the MPP
    override it names; ``cache`` stages the file for OpenSlide when it reads a remote slide.

    Raises:
        SlideError: the slide cannot be read, with the reason; or its file is not the version
            ``ref`` names (it changed after it was tiled).
        StorageError, OSError: the object cannot be reached (callers describe it).
    """
    slide, info = _open(ref, cfg, cache)
    if ref.version is not None and not same_version(ref.version, slide_version(info.size, info.version)):
        slide.close()
        raise SlideError(
            f"{ref.uri}: the file changed after it was tiled (its size, ETag/mtime or content differ); "
            "rerun the command to tile and embed it again"
        )
    return slide, info


def _open(ref: SlideRef, cfg, cache: StagingCache) -> tuple[Slide, ObjectInfo]:
    s, uri = cfg.storage, ref.uri
    kwargs = dict(
        name=uri,
        mpp_override=ref.mpp_override,
        mpp_range=cfg.tiling.mpp_range,
        slide_id=ref.slide_id,
        snap=(cfg.tiling.mpp, cfg.tiling.mpp_tolerance),
    )
    if series_folder(uri) is not None:
        return _open_dicom(uri, cfg, kwargs)
    if cfg.reader.backend != "openslide":
        info = with_retries(lambda: stat(uri, s.s3_endpoint_url), what=uri, retries=s.retries)
        if info.size == 0:
            raise SlideError(f"{uri}: the file is empty (0 bytes); re-upload the slide")
        try:
            source = open_tiled(
                uri, endpoint_url=s.s3_endpoint_url, range_gap=cfg.reader.range_gap_bytes, retries=s.retries
            )
        except TileError as exc:  # a TIFF whose structure is broken
            raise SlideError(str(exc)) from None
        if source is not None:
            return Slide(uri, source=source, scaled_decode=cfg.reader.scaled_decode, **kwargs), info
        if cfg.reader.backend == "tiles":
            raise SlideError(
                f"{uri}: reader.backend=tiles reads generic tiled TIFF and Aperio SVS only and this "
                "file is neither; set reader.backend=auto to read it through OpenSlide"
            )
    path, info = cache.fetch(uri)
    return Slide(path, **kwargs), info


def _open_dicom(uri: str, cfg, kwargs: dict) -> tuple[Slide, ObjectInfo]:
    """A DICOM series (a folder, or one of its instances): read by byte range; OpenSlide reads
    it only from a local folder (it opens one instance and finds the rest beside it)."""
    s = cfg.storage
    if cfg.reader.backend == "openslide":
        if is_remote(uri):
            raise SlideError(
                f"{uri}: OpenSlide reads DICOM series from a local folder only; set reader.backend=auto "
                "to read the series by byte range"
            )
        info, first = series_info(uri)
        return Slide(first, **kwargs), info

    def attempt() -> DicomSlide | TileError:
        try:
            return DicomSlide(
                uri, endpoint_url=s.s3_endpoint_url, range_gap=cfg.reader.range_gap_bytes, retries=s.retries
            )
        except TileError as exc:  # a series that is not one readable slide: no retry
            return exc

    source = with_retries(attempt, what=uri, retries=s.retries)  # a listing or read that may pass
    if isinstance(source, TileError):
        raise SlideError(str(source))
    return Slide(uri, source=source, scaled_decode=cfg.reader.scaled_decode, **kwargs), source.info
