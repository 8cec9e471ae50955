"""A tiled-TIFF pixel source that reads only the tiles a region needs, by byte range.

OpenSlide only reads local files, so a slide in object storage has to be copied whole before a
single region can be read (1–3 GB per 40× slide). For the formats that are plain tiled TIFF
pyramids (generic tiled TIFF and Aperio SVS), this module reads the file structure with tifffile
(IFDs, tile offsets and byte counts, JPEG tables: kilobytes to a few MB), then fetches just the
byte ranges of the tiles that intersect a region, neighbouring ranges coalesced into one request,
and decodes them with tifffile's codecs (imagecodecs' libjpeg-turbo), locally or straight from
``s3://``. Level geometry, downsamples and the MPP properties are the ones OpenSlide reports for
the same file, and so are the pixels (tests compare them).

No Ray here, like the rest of ``slides/``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hipt_ray.slides.packed import PackedTiles, TileCodec, TileError, join_items, jpeg_stream, unpadded
from hipt_ray.storage import filesystem, is_remote, local_path, with_retries

log = logging.getLogger(__name__)


class Unsupported(Exception):
    """The file is not a tiled TIFF pyramid this backend reads (OpenSlide reads it instead)."""


@dataclass
class Level:
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray
    counts: np.ndarray
    decode: Callable[..., Any]  # (tile bytes, tile index, jpegtables=…) → (pixels, …), as TiffPage.decode
    jpegtables: bytes | None
    jpeg: bool  # JPEG-compressed tiles (what scaled decoding needs)
    # how tiles decode as plain data (packed regions carry it to the model); None: only
    # ``decode`` can, so regions of this level are decoded by the read tasks
    codec: Callable[..., Any] | None = None  # picklable, with decode's signature (e.g. TileCodec)
    # each tile's span is a run of DICOM items, headers included (a frame a Basic Offset Table
    # locates may be split over several fragments), joined by :meth:`codestream`
    items: bool = False

    @property
    def cols(self) -> int:
        return -(-self.width // self.tile_w)

    def codestream(self, data: bytes) -> bytes | None:
        """A tile's bytes as fetched → its codestream alone: DICOM items joined where the level's
        spans are runs of items, the byte that pads an item to even length dropped; ``None`` when
        the items are broken."""
        joined = join_items(data) if self.items else data
        return None if joined is None else unpadded(joined)


def _properties(tif, page) -> dict[str, str]:
    """The OpenSlide properties ``resolve_mpp`` reads, derived the way OpenSlide derives them."""
    desc = page.description or ""
    props: dict[str, str] = {}
    if desc.startswith("Aperio"):
        props["openslide.vendor"] = "aperio"
        fields = dict((k.strip(), v.strip()) for k, v in (f.split("=", 1) for f in desc.split("|")[1:] if "=" in f))
        if "MPP" in fields:
            props["openslide.mpp-x"] = props["openslide.mpp-y"] = fields["MPP"]
        if "AppMag" in fields:
            props["openslide.objective-power"] = fields["AppMag"]
        return props
    props["openslide.vendor"] = "generic-tiff"
    unit = page.tags.get(296)
    unit = int(unit.value) if unit is not None else 2
    factor = {2: 25400.0, 3: 10000.0}.get(unit)  # µm per inch / per cm
    for tag, key in ((282, "openslide.mpp-x"), (283, "openslide.mpp-y")):
        value = page.tags.get(tag)
        if factor and value is not None:
            num, den = value.value
            if num:
                props[key] = repr(factor * den / num)
    return props


class TileSource:
    """A tiled pyramid read by byte range, with OpenSlide's ``read_region`` contract: level-0
    coordinates, a level, a size in that level's pixels, RGBA out (alpha 0 outside the image).

    The bytes (coalesced ranged reads, conditional on the ETag seen at open) and the pixels
    (tiles fetched, decoded, placed) are the same for every container; a subclass finds the
    levels and tiles in its format (tiled TIFF here) and calls :meth:`_set_levels`.
    """

    def __init__(
        self, uri: str, *, endpoint_url: str | None = None, range_gap: int = 64 * 1024, retries: int = 3
    ) -> None:
        self.uri, self.range_gap, self.retries = uri, range_gap, retries
        self.remote = is_remote(uri)
        self.fs, self.path = filesystem(uri, endpoint_url)
        self.requests = 0  # range requests made (for benchmarks and tests)
        self.bytes_read = 0
        self.properties: dict[str, str] = {}
        self._levels: list[Level] = []
        self._scalable: dict[int, bool] = {}  # level → scaled decoding checked and usable
        # Tile reads are conditional on this ETag: an object replaced while it is open fails its
        # reads instead of decoding new bytes with the old tile directory.
        self.etag = self.fs.info(self.path, refresh=True).get("ETag") if self.remote else None

    def _set_levels(self, levels: list[Level], properties: dict[str, str]) -> None:
        """The pyramid, largest level first, and the OpenSlide-style properties."""
        self._levels, self.properties = levels, properties
        w0, h0 = levels[0].width, levels[0].height
        self.dimensions = (w0, h0)
        self.level_dimensions = tuple((lv.width, lv.height) for lv in levels)
        # OpenSlide's downsample: the mean of the width and height ratios
        self.level_downsamples = tuple((w0 / lv.width + h0 / lv.height) / 2 for lv in levels)

    def close(self) -> None:
        self._levels = []

    # ------------------------------------------------------------------ bytes
    def _fetch(self, spans: list[tuple[int, int]]) -> list[bytes]:
        """Bytes of each ``(offset, length)`` span, neighbouring spans read as one range."""
        order = sorted(range(len(spans)), key=lambda i: spans[i][0])
        merged: list[list[int]] = []  # [start, end, members…]
        for i in order:
            start, n = spans[i]
            if merged and start - merged[-1][1] <= self.range_gap:
                merged[-1][1] = max(merged[-1][1], start + n)
                merged[-1].append(i)
            else:
                merged.append([start, start + n, i])
        if self.remote:
            try:
                blobs = with_retries(
                    lambda: self._get_ranges([(m[0], m[1]) for m in merged]), what=self.uri, retries=self.retries
                )
            except OSError as exc:
                if "precondition" in str(exc).lower().replace("-", ""):
                    raise TileError(
                        f"{self.uri}: the object changed while it was being read (its ETag is no "
                        "longer the one it was opened with); rerun to tile and embed it again"
                    ) from None
                raise
        else:
            with open(local_path(self.uri), "rb") as fh:
                blobs = []
                for m in merged:
                    fh.seek(m[0])
                    blobs.append(fh.read(m[1] - m[0]))
        self.requests += len(merged)
        out: list[bytes] = [b""] * len(spans)
        for m, blob in zip(merged, blobs):
            self.bytes_read += len(blob)
            for i in m[2:]:
                start, n = spans[i]
                out[i] = blob[start - m[0] : start - m[0] + n]
        return out

    def _get_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Concurrent ranged GETs, each conditional on the ETag seen at open (S3); other
        filesystems: fsspec's ``cat_ranges``."""
        if not hasattr(self.fs, "_call_s3") or not self.etag:
            return self.fs.cat_ranges([self.path] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges])
        import asyncio

        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self.path)

        async def get(start: int, end: int) -> bytes:
            resp = await self.fs._call_s3(
                "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=self.etag
            )
            try:
                return await resp["Body"].read()
            finally:
                resp["Body"].close()

        async def every() -> list[bytes]:
            return await asyncio.gather(*(get(a, b) for a, b in ranges))

        return sync(self.fs.loop, every)

    # ------------------------------------------------------------------ pixels
    def read_region(self, level0_xy: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGBA uint8 ``[h, w, 4]`` of ``size`` level pixels whose top-left corner is the level-0
        point ``level0_xy``; pixels outside the image are transparent (as OpenSlide returns)."""
        w, h = size
        out = np.zeros((h, w, 4), np.uint8)
        for box, pixels in self._tiles(level0_xy, level, size):
            out[box + (slice(0, 3),)] = pixels
            out[box + (3,)] = 255
        return out

    def read_rgb(self, level0_xy: tuple[int, int], level: int, size: tuple[int, int], *, scale: int = 1) -> np.ndarray:
        """The same region as RGB uint8 ``[h, w, 3]`` on white (what :class:`Slide` wants: one
        pass over the pixels, no alpha channel).

        ``scale`` > 1 (see :meth:`can_scale`): ``size`` is in pixels of the level shrunk
        ``scale`` times, each tile decoded at that size by libjpeg-turbo's DCT scaling instead
        of decoded whole and averaged: several times faster, and close to (not equal to) the
        exact box average."""
        w, h = size
        out = np.full((h, w, 3), 255, np.uint8)
        for box, pixels in self._tiles(level0_xy, level, size, scale):
            out[box] = pixels
        return out

    def codec(self, level: int) -> Callable[..., Any] | None:
        """How ``level``'s tiles decode as plain data (``None``: only here, by the container)."""
        return self._levels[level].codec

    def can_scale(self, level: int, scale: int) -> bool:
        """Whether ``level`` can be decoded at 1/``scale`` (2, 4 or 8) in the DCT domain: JPEG
        tiles whose size ``scale`` divides, and libjpeg-turbo reading this slide's JPEG colours
        as the exact decoder does (checked once on one tile, at full size)."""
        lv = self._levels[level]
        if scale not in (2, 4, 8) or not lv.jpeg or lv.tile_w % scale or lv.tile_h % scale:
            return False
        if level not in self._scalable:
            self._scalable[level] = self._same_colours(level)
        return self._scalable[level]

    def _same_colours(self, level: int) -> bool:
        import simplejpeg

        lv = self._levels[level]
        i = next((i for i, n in enumerate(lv.counts) if n > 0 and lv.offsets[i] > 0), None)
        if i is None:
            return False
        (raw,) = self._fetch([(int(lv.offsets[i]), int(lv.counts[i]))])
        data = lv.codestream(raw)
        if data is None:
            return False  # the exact path reports the broken tile in its own words
        try:
            exact = np.asarray(lv.decode(data, i, jpegtables=lv.jpegtables)[0]).reshape(lv.tile_h, lv.tile_w, -1)
            ours = simplejpeg.decode_jpeg(jpeg_stream(data, lv.jpegtables), colorspace="RGB")
        except Exception as exc:  # noqa: BLE001 - the exact path reports a bad tile in its own words
            log.debug("%s: scaled decoding not used (%s)", self.uri, exc)
            return False
        same = ours.shape == exact[..., :3].shape and int(np.abs(ours.astype(np.int16) - exact[..., :3]).max()) <= 1
        if not same:
            log.info(
                "%s: level %d decodes to other colours through libjpeg-turbo directly; reading it "
                "exactly instead of with reader.scaled_decode",
                self.uri,
                level,
            )
        return same

    def pack(self, level0_xy: tuple[int, int], level: int, size: tuple[int, int], scale: int = 1) -> PackedTiles:
        """The tiles a box needs, fetched, with where each part goes: ``size`` pixels of
        ``level`` shrunk ``scale`` times at level-0 ``level0_xy`` (see :meth:`read_rgb`),
        not decoded. A box wholly outside the image has no tiles (it is all white).

        Raises:
            TileError: the level lacks a tile the box needs, or a tile is empty or cut short."""
        lv = self._levels[level]
        ds = self.level_downsamples[level] * scale
        tile_w, tile_h = lv.tile_w // scale, lv.tile_h // scale
        width, height = lv.width // scale, lv.height // scale  # a part-covered last pixel is left out
        x, y = round(level0_xy[0] / ds), round(level0_xy[1] / ds)
        w, h = size
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        tiles = (
            [
                (r, c)
                for r in range(y0 // tile_h, (y1 - 1) // tile_h + 1)
                for c in range(x0 // tile_w, (x1 - 1) // tile_w + 1)
            ]
            if x1 > x0 and y1 > y0
            else []
        )
        index = [r * lv.cols + c for r, c in tiles]
        if index and max(index) >= len(lv.offsets):
            raise TileError(
                f"{self.uri}: level {level} lists {len(lv.offsets)} tiles, the region needs tile {max(index)}"
            )
        spans = [(int(lv.offsets[i]), int(lv.counts[i])) for i in index]
        for (r, c), (off, n) in zip(tiles, spans):
            if n <= 0 or off <= 0:
                raise TileError(f"{self.uri}: tile ({c}, {r}) of level {level} is empty (offset {off}, {n} bytes)")
        layout = np.zeros((len(tiles), 10), np.int32)
        blobs, start = [], 0
        for k, ((r, c), i, data) in enumerate(zip(tiles, index, self._fetch(spans) if spans else [])):
            if len(data) != lv.counts[i]:
                raise TileError(
                    f"{self.uri}: tile ({c}, {r}) of level {level} is cut short ({len(data)} of "
                    f"{lv.counts[i]} bytes): the file is corrupt or truncated"
                )
            stream = lv.codestream(data)  # what travels and decodes is the codestream alone
            if stream is None:
                raise TileError(
                    f"{self.uri}: tile ({c}, {r}) of level {level} is not a run of whole DICOM items "
                    "where its offset table points: the file is corrupt"
                )
            tx, ty = c * tile_w, r * tile_h
            # the part of this tile inside both the image and the requested box
            ax0, ay0, ax1, ay1 = max(tx, x0), max(ty, y0), min(tx + tile_w, x1), min(ty + tile_h, y1)
            layout[k] = (start, len(stream), c, r, ay0 - y, ay1 - y, ax0 - x, ax1 - x, ay0 - ty, ax0 - tx)
            blobs.append(stream)
            start += len(stream)
        return PackedTiles(
            uri=self.uri, level=level, canvas=(w, h), tile=(lv.tile_w, lv.tile_h), scale=scale,
            codec=lv.codec, tables=lv.jpegtables or b"", data=b"".join(blobs), layout=layout,
        )  # fmt: skip

    def _tiles(self, level0_xy: tuple[int, int], level: int, size: tuple[int, int], scale: int = 1):
        """``((rows, cols) slices into the output, pixels)`` for each tile part the box needs, in
        pixels of ``level`` shrunk ``scale`` times, decoded here."""
        packed = self.pack(level0_xy, level, size, scale)
        lv = self._levels[level]
        own = None
        if lv.codec is None:  # the container's own decoder (not packable for the network)

            def own(data: bytes, k: int):
                c, r = int(packed.layout[k, 2]), int(packed.layout[k, 3])
                return lv.decode(data, r * lv.cols + c, jpegtables=lv.jpegtables)[0]

        yield from packed.parts(own)


class TiledTiff(TileSource):
    """A generic tiled TIFF or Aperio SVS pyramid (the structure read by tifffile)."""

    def __init__(
        self, uri: str, *, endpoint_url: str | None = None, range_gap: int = 64 * 1024, retries: int = 3
    ) -> None:
        import tifffile

        super().__init__(uri, endpoint_url=endpoint_url, range_gap=range_gap, retries=retries)
        fh = (
            self.fs.open(self.path, "rb", block_size=64 * 1024, cache_type="readahead")
            if self.remote
            else open(local_path(uri), "rb")
        )
        try:
            try:
                tif = tifffile.TiffFile(fh)
            except OSError:
                raise  # the object could not be read (throttled, gone): not a question of format
            except Exception as exc:
                raise Unsupported(f"not a TIFF ({type(exc).__name__})") from None
            with tif:
                self._set_levels(*self._structure(tif))
        finally:
            if self.remote:
                cache = getattr(fh, "cache", None)
                self.bytes_read += getattr(cache, "total_requested_bytes", 0)
                self.requests += getattr(cache, "miss_count", 0)
            fh.close()

    def _structure(self, tif) -> tuple[list[Level], dict[str, str]]:
        special = [
            name
            for name in ("ndpi", "philips", "ome", "scn", "bif", "qpi", "lsm", "stk", "imagej")
            if getattr(tif, f"is_{name}", False)
        ]
        if special:
            raise Unsupported(f"{special[0]} TIFF (read through OpenSlide)")
        pages = list(tif.pages)
        first = pages[0]
        desc = first.description or ""
        aperio = desc.startswith("Aperio")
        levels: list[Level] = []
        for i, page in enumerate(pages):
            if not page.is_tiled:
                if aperio:
                    continue  # an SVS thumbnail is stripped
                if i == 0:
                    raise Unsupported("not tiled")
                continue
            if (
                aperio
                and i > 0
                and (page.description or "").startswith("Aperio")
                and ("label" in page.description or "macro" in page.description)
            ):
                continue
            if (
                page.samplesperpixel != 3
                or page.bitspersample != 8
                or page.planarconfig != 1
                or int(page.photometric) not in (2, 6)
                or page.imagedepth != 1
            ):
                raise Unsupported(
                    f"page {i}: {page.samplesperpixel}×{page.bitspersample}-bit, photometric {int(page.photometric)}"
                )
            if levels and (page.imagewidth >= levels[-1].width or page.imagelength >= levels[-1].height):
                continue  # not a smaller pyramid level (OpenSlide would not list it either)
            levels.append(
                Level(
                    page.imagewidth,
                    page.imagelength,
                    page.tilewidth,
                    page.tilelength,
                    np.asarray(page.dataoffsets, np.int64),
                    np.asarray(page.databytecounts, np.int64),
                    page.decode,
                    page.jpegtables,
                    int(page.compression) == 7,
                    _jpeg_codec(page),
                )
            )
        if not levels:
            raise Unsupported("no tiled level")
        _check_chain_ends(tif, pages, self.uri)
        return levels, _properties(tif, first)


def _jpeg_codec(page) -> TileCodec | None:
    """The JPEG decode ``page.decode`` runs, as plain data (the colour spaces as tifffile
    derives them: Aperio's RGB-stored components are read without the YCbCr transform)."""
    from tifffile.tifffile import jpeg_decode_colorspace

    if int(page.compression) != 7:
        return None
    colorspace, out = jpeg_decode_colorspace(int(page.photometric), page.planarconfig, page.extrasamples, page.is_jfif)
    return TileCodec(colorspace, out, (page.tilelength, page.tilewidth))


def _check_chain_ends(tif, pages: list, uri: str) -> None:
    """Walk the chain of directories (IFDs): tifffile stops quietly where one points back to an
    earlier one (a loop) or past the end of the file, dropping levels; OpenSlide refuses such a
    file, and so does this backend."""
    import struct

    fmt, fh = tif.tiff, tif.filehandle
    offset = pages[0].offset
    seen: dict[int, int] = {}  # directory offset → its number
    while offset:
        what = (
            f"loops back to directory {seen[offset]}"
            if offset in seen
            else f"points to offset {offset}, past the end of the file ({fh.size} bytes)"
            if offset + fmt.tagnosize > fh.size
            else None
        )
        if what:
            raise TileError(
                f"{uri}: TIFF directory {len(seen) - 1} (at offset {list(seen)[-1]}) {what}: "
                "the file is corrupt or truncated; re-export or re-upload it"
            )
        seen[offset] = len(seen)
        fh.seek(offset)
        (n,) = struct.unpack(fmt.tagnoformat, fh.read(fmt.tagnosize))
        fh.seek(offset + fmt.tagnosize + n * fmt.tagsize)
        raw = fh.read(fmt.offsetsize)
        offset = struct.unpack(fmt.offsetformat, raw)[0] if len(raw) == fmt.offsetsize else 0


def open_tiled(
    uri: str, *, endpoint_url: str | None = None, range_gap: int = 64 * 1024, retries: int = 3
) -> TiledTiff | None:
    """The tile backend for ``uri``, or ``None`` when its format is not one it reads."""
    try:
        return TiledTiff(uri, endpoint_url=endpoint_url, range_gap=range_gap, retries=retries)
    except Unsupported as exc:
        log.debug("%s: tile backend not used (%s)", uri, exc)
        return None


_jpeg_stream = jpeg_stream  # its name before it moved to packed.py
