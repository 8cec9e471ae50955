"""A region as its compressed tiles: what crosses the network instead of its pixels.

A read task that packs a region (:meth:`hipt_ray.slides.reader.Slide.pack_region`) sends the
JPEG bytes of the tiles the region needs (≈ 3 MB for a 4096² region at 20×, against 50 MB of
pixels), the level's shared JPEG tables, where each tile part goes, and how the assembled box
becomes the region (DCT scale, then none / integer reduce / Lanczos). :func:`decode_region`
turns that back into the region's pixels; the tile backend itself reads every region as "pack,
then decode" (:meth:`Slide.read_region <hipt_ray.slides.reader.Slide.read_region>`), so pixels
decoded next to the model are the read tasks' pixels by construction.

The packed form is plain data (bytes, an int32 array, a JSON string) so that a region row stays
a few Arrow columns, not a Python object per tile. No Ray, no torch here.
"""

from __future__ import annotations

import base64
import json
import pickle
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# The columns a packed region adds to a region row (empty on rows that carry pixels instead).
COLUMNS = ("tiles", "layout", "tables", "packing")
# layout: one int32 row per tile part — byte start and length in ``tiles``, the tile's column
# and row in its level, the part's box in the assembled canvas (y0, y1, x0, x1) and its top-left
# corner inside the decoded tile (y, x)
_LAYOUT = ("start", "length", "col", "row", "y0", "y1", "x0", "x1", "ty", "tx")


class TileError(RuntimeError):
    """A tile could not be fetched or decoded; the message names the file, level and tile."""


def region_error(exc: TileError) -> str:
    """The per-slide failure reason for a tile that failed, wherever it was decoded."""
    return f"{exc}; re-export or re-upload it"


@dataclass(frozen=True)
class TileCodec:
    """A tiled TIFF level's JPEG decode as plain data, with ``TiffPage.decode``'s signature
    (it travels, pickled, with packed regions; ``TiffPage.decode`` cannot).

    ``imagecodecs.jpeg_decode`` with the colour spaces tifffile derives from the TIFF tags
    (``colorspace`` 2: RGB components stored without the YCbCr transform, as Aperio writes
    them; ``None``: the JPEG's own) and the tile ``shape``, so it decodes as tifffile does.

    Another container's codec is any picklable callable with this signature and a ``jpeg``
    attribute (whether its tiles are JPEG streams a GPU JPEG decoder may read)."""

    colorspace: int | None = None
    outcolorspace: int | str | None = 2
    shape: tuple[int, int] | None = None  # (h, w) of a tile
    jpeg = True

    def __call__(self, data: bytes, index: int, jpegtables: bytes | None = None) -> tuple[np.ndarray, None, None]:
        import imagecodecs

        pixels = imagecodecs.jpeg_decode(
            data,
            bitspersample=8,
            tables=jpegtables,
            colorspace=self.colorspace,
            outcolorspace=self.outcolorspace,
            shape=self.shape,
        )
        return pixels, None, None


def unpadded(tile: bytes) -> bytes:
    """A tile without the byte that pads a DICOM item to even length after its codestream's end
    marker (JPEG's EOI and JPEG 2000's EOC are both ``FF D9``; neither codestream can hold
    ``FF D9`` before its end): nvJPEG may reject bytes after EOI, libjpeg-turbo ignores them."""
    return tile[:-1] if tile.endswith(b"\xff\xd9\x00") else tile


_ITEM = b"\xfe\xff\x00\xe0"  # DICOM's item tag (FFFE,E000), little endian


def join_items(run: bytes) -> bytes | None:
    """The fragments of a run of DICOM items (each an 8-byte header: the item tag, a <u4 length,
    then that many bytes) joined: one frame's data when it spans several fragments. ``None``
    when the run is not whole items (a broken file)."""
    parts, pos = [], 0
    while pos < len(run):
        if run[pos : pos + 4] != _ITEM or pos + 8 > len(run):
            return None
        (n,) = struct.unpack_from("<I", run, pos + 4)
        if pos + 8 + n > len(run):
            return None
        parts.append(run[pos + 8 : pos + 8 + n])
        pos += 8 + n
    return b"".join(parts)


def jpeg_stream(tile: bytes, tables: bytes | None) -> bytes:
    """A tile's JPEG as a whole stream: TIFF's shared JPEGTables (SOI, DQT/DHT…, EOI) put in
    front of an abbreviated tile (SOI, frame, scan, EOI)."""
    return tables[:-2] + tile[2:] if tables else tile


@dataclass
class PackedTiles:
    """The tile parts covering a ``canvas`` (w, h) box of pixels of ``level`` shrunk ``scale``
    times (DCT scaling), white where no tile covers it."""

    uri: str
    level: int
    canvas: tuple[int, int]
    tile: tuple[int, int]  # a stored tile's (w, h)
    scale: int
    codec: Callable[..., Any] | None  # a TileCodec or another picklable decoder; None: not packable
    tables: bytes
    data: bytes
    layout: np.ndarray  # int32 [n, 10], see _LAYOUT

    def __len__(self) -> int:
        return len(self.layout)

    def tile_bytes(self, k: int) -> bytes:
        start, length = int(self.layout[k, 0]), int(self.layout[k, 1])
        return self.data[start : start + length]

    def name(self, k: int) -> str:
        return f"{self.uri}: tile ({int(self.layout[k, 2])}, {int(self.layout[k, 3])}) of level {self.level}"

    def decode_tile(self, k: int, decode: Callable[[bytes, int], Any] | None = None) -> np.ndarray:
        """Tile part ``k``'s decoded tile, RGB ``[h, w, 3]`` at the packed scale; ``decode``
        (tile bytes, ``k`` → pixels) replaces the codec for containers without one.

        Raises:
            TileError: the tile does not decode (the message names it)."""
        data = self.tile_bytes(k)
        tw, th = self.tile[0] // self.scale, self.tile[1] // self.scale
        try:
            if self.scale > 1:  # libjpeg-turbo's DCT scaling (JPEG levels only)
                import simplejpeg

                tile = simplejpeg.decode_jpeg(
                    jpeg_stream(data, self.tables), colorspace="RGB", min_width=tw, min_height=th
                )
            elif decode is not None:
                tile = decode(data, k)
            elif self.codec is not None:
                tile = self.codec(data, k, jpegtables=self.tables or None)[0]
            else:
                raise ValueError("no decoder for this level")
        except Exception as exc:
            raise TileError(
                f"{self.name(k)} failed to decode ({type(exc).__name__}: {exc}): the file is corrupt"
            ) from None
        if tile is None:
            raise TileError(f"{self.name(k)} failed to decode: the file is corrupt")
        return np.asarray(tile).reshape(th, tw, -1)[..., :3]

    def boxes(self, k: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """Tile part ``k``: (its box in the canvas, the same box in its decoded tile)."""
        _, _, _, _, y0, y1, x0, x1, ty, tx = (int(v) for v in self.layout[k])
        return (slice(y0, y1), slice(x0, x1)), (slice(ty, ty + y1 - y0), slice(tx, tx + x1 - x0))

    def parts(
        self, decode: Callable[[bytes, int], Any] | None = None
    ) -> Iterator[tuple[tuple[slice, slice], np.ndarray]]:
        """``(box in the canvas, pixels)`` for each tile part, decoded on this CPU."""
        for k in range(len(self)):
            out, inside = self.boxes(k)
            yield out, self.decode_tile(k, decode)[inside]

    def decode_rgb(self) -> np.ndarray:
        """The canvas, RGB uint8 ``[h, w, 3]`` on white."""
        w, h = self.canvas
        out = np.full((h, w, 3), 255, np.uint8)
        for box, pixels in self.parts():
            out[box] = pixels
        return out


@dataclass
class PackedRegion:
    """A region of ``size`` (w, h) pixels: its tiles, and the resampling that turns their
    canvas into the region (``none``, ``reduce`` by ``factor``, or ``lanczos`` to ``size``)."""

    tiles: PackedTiles
    resample: str
    factor: int
    size: tuple[int, int]

    @property
    def compressed_bytes(self) -> int:
        return len(self.tiles.data)

    def to_columns(self) -> dict[str, Any]:
        """The region as row columns (:data:`COLUMNS`): tile bytes, layout, tables, the rest as JSON."""
        t = self.tiles
        codec = None if t.codec is None else base64.b64encode(pickle.dumps(t.codec)).decode()
        packing = dict(
            uri=t.uri, level=t.level, canvas=t.canvas, tile=t.tile, scale=t.scale, codec=codec,
            resample=self.resample, factor=self.factor, size=self.size,
        )  # fmt: skip
        return {
            "tiles": t.data,
            "layout": np.ascontiguousarray(t.layout, np.int32).tobytes(),
            "tables": t.tables,
            "packing": json.dumps(packing),
        }

    @classmethod
    def from_columns(cls, tiles: bytes, layout: bytes, tables: bytes, packing: str) -> PackedRegion:
        p = json.loads(packing)
        codec = None if p["codec"] is None else pickle.loads(base64.b64decode(p["codec"]))
        packed = PackedTiles(
            uri=p["uri"], level=p["level"], canvas=tuple(p["canvas"]), tile=tuple(p["tile"]), scale=p["scale"],
            codec=codec, tables=bytes(tables), data=bytes(tiles),
            layout=np.frombuffer(layout, np.int32).reshape(-1, len(_LAYOUT)),
        )  # fmt: skip
        return cls(packed, p["resample"], p["factor"], tuple(p["size"]))


def resample(rgb: np.ndarray, how: str, factor: int, size: tuple[int, int]) -> np.ndarray:
    """The read box ``rgb`` as the region: unchanged, reduced by an exact integer ``factor``
    (a box average: a 40× slide read at 20×), or Lanczos-resampled to ``size`` (w, h)."""
    if how == "none":
        return rgb
    img = Image.fromarray(rgb)
    img = img.reduce(factor) if how == "reduce" else img.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(img)


def decode_region(region: PackedRegion) -> np.ndarray:
    """The region's RGB uint8 ``[h, w, 3]`` pixels, decoded on this CPU.

    Raises:
        TileError: a tile does not decode."""
    return resample(region.tiles.decode_rgb(), region.resample, region.factor, region.size)
