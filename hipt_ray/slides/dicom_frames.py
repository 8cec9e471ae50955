"""Where the frames of one DICOM instance are, and how they decode.

A multi-frame DICOM file keeps its compressed frames as items of the encapsulated PixelData
element, each behind an 8-byte item header. To read one tile by byte range a reader needs every
frame's offset and length before it reads any pixels, and finds them, cheapest first:

1. the TIFF personality (IDC's TCGA files are dual-personality DICOM-TIFF): a TIFF header in
   the 128-byte preamble points to an IFD (PixelMed puts it in DataSetTrailingPadding at the end
   of the file) whose TileOffsets/TileByteCounts locate each frame: one ranged read of the
   file's tail;
2. the Extended Offset Table (7FE0,0001/0002), in the header already read;
3. the Basic Offset Table (the first item of PixelData, read with the header), plus the last
   frame's item headers up to the sequence delimiter (two 8-byte reads for a frame in one
   fragment); a frame may span several fragments here, which packing joins;
4. else a walk over every item header: the slow path, one sequential read of the whole
   PixelData (requests ≈ object size / 8 MiB, bytes ≈ object size).

The index is checked against the DICOM header (frame count, sizes) and the object's size, so a
broken file fails its slide with a reason instead of decoding the wrong bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import imagecodecs
import numpy as np

from hipt_ray.slides.packed import unpadded

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG2000 = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")  # lossless only; lossless or lossy
# Names pydicom 3.0 does not know, for the unsupported-syntax message.
SYNTAX_NAMES = {
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
}
ITEM, SEQUENCE_END = 0xE000FFFE, 0xE0DDFFFE  # (FFFE,E000) and (FFFE,E0DD) read as one <u4
WALK_BLOCK = 8 * 2**20  # bytes per sequential read when walking the item headers


class FrameIndexError(RuntimeError):
    """The frames of an instance cannot be located; the message names the file and the reason."""


@dataclass(frozen=True)
class FrameIndex:
    offsets: np.ndarray  # int64, where each frame's data starts in the file
    # int64, its length in bytes: an item's (walk; extended as pydicom writes it) includes the
    # even-length pad byte, which packing drops (hipt_ray.slides.packed.unpadded)
    counts: np.ndarray
    method: str  # "tiff" | "extended" | "basic" | "walk"
    # "basic": each span is the frame's run of items, headers included (a frame may be split over
    # several fragments; packing joins them: hipt_ray.slides.packed.join_items)
    items: bool = False


@dataclass(frozen=True)
class Geometry:
    """What the DICOM header says the frames are (the TIFF personality must agree)."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    n_frames: int


Reader = Callable[[int, int], bytes]  # (offset, length) → bytes of the instance


class FrameDecoder:
    """Decodes one frame as ``TiffPage.decode`` does, ``(pixels, None, None)``; a plain class so
    that a level (and so a region's decode) can be pickled to another process."""

    def __init__(self, syntax: str, photometric: str) -> None:
        self.jpeg = syntax == JPEG_BASELINE
        # YBR_FULL_422 (and YBR_FULL): YCbCr in the JPEG stream; RGB: no colour transform
        self.colorspace = "RGB" if photometric == "RGB" else "YCBCR"

    def __call__(self, data: bytes, index: int, jpegtables: bytes | None = None) -> tuple:
        data = unpadded(data)  # packed tiles come without it; a tile read for a check may not
        if self.jpeg:
            return (
                imagecodecs.jpeg8_decode(data, tables=jpegtables, colorspace=self.colorspace, outcolorspace="RGB"),
                None,
                None,
            )
        return imagecodecs.jpeg2k_decode(data), None, None


def _check(index: FrameIndex, geometry: Geometry, size: int, first_data: int, name: str) -> FrameIndex:
    """Every frame inside the PixelData's items: after the first item's header, before the
    object's end, not empty."""
    n = len(index.offsets)
    if n != geometry.n_frames or len(index.counts) != n:
        raise FrameIndexError(
            f"{name}: its {index.method} frame index lists {n} frames, the header {geometry.n_frames}"
        )
    ends = index.offsets + index.counts
    bad = np.flatnonzero((index.offsets < first_data) | (index.counts <= 0) | (ends > size))
    if len(bad):
        i = int(bad[0])
        raise FrameIndexError(
            f"{name}: frame {i} of its {index.method} frame index lies at bytes {int(index.offsets[i])}–"
            f"{int(ends[i])}, outside the PixelData (bytes {first_data}–{size}, the end of the object) "
            "or empty: the file is truncated or corrupt"
        )
    return index


def _tiff_ifd(preamble: bytes, read: Reader, size: int) -> dict[int, np.ndarray] | None:
    """The first IFD of a TIFF header in the preamble, as {tag: values} (the tags needed)."""
    order = {b"II": "<", b"MM": ">"}.get(preamble[:2])
    if order is None:
        return None
    (version,) = struct.unpack(order + "H", preamble[2:4])
    if version not in (42, 43):
        return None
    big = version == 43
    ifd_at = struct.unpack(order + ("Q" if big else "I"), preamble[8:16] if big else preamble[4:8])[0]
    if not 132 <= ifd_at < size:
        raise FrameIndexError(f"its TIFF header points to an IFD at {ifd_at}, outside the file ({size} bytes)")
    n_fmt, entry, value_size = ("Q", 20, 8) if big else ("H", 12, 4)
    tail = read(ifd_at, min(size - ifd_at, 4 * 2**20))  # PixelMed: the IFD and its arrays end the file
    (n,) = struct.unpack_from(order + n_fmt, tail)
    base = 8 if big else 2
    types = {3: "H", 4: "I", 16: "Q"}
    tags: dict[int, np.ndarray] = {}
    for k in range(n):
        tag, typ = struct.unpack_from(order + "HH", tail, base + k * entry)
        if tag not in (256, 257, 322, 323, 324, 325) or typ not in types:
            continue
        count = struct.unpack_from(order + ("Q" if big else "I"), tail, base + k * entry + 4)[0]
        dtype = np.dtype(order + types[typ])
        value_at = base + k * entry + (12 if big else 8)
        nbytes = count * dtype.itemsize
        if nbytes <= value_size:
            raw = tail[value_at : value_at + nbytes]
        else:
            at = struct.unpack_from(order + ("Q" if big else "I"), tail, value_at)[0]
            inside = ifd_at <= at and at + nbytes <= ifd_at + len(tail)
            raw = tail[at - ifd_at : at - ifd_at + nbytes] if inside else read(at, nbytes)
        tags[tag] = np.frombuffer(raw, dtype).astype(np.int64)
    return tags


def from_tiff(preamble: bytes, read: Reader, size: int, geometry: Geometry, name: str) -> FrameIndex | None:
    """The frame index of the TIFF personality, ``None`` when the file has none."""
    try:
        tags = _tiff_ifd(preamble, read, size)
    except (FrameIndexError, struct.error) as exc:
        raise FrameIndexError(f"{name}: {exc}: the TIFF personality is broken") from None
    if tags is None:
        return None
    if 324 not in tags or 325 not in tags:
        raise FrameIndexError(f"{name}: its TIFF personality has no TileOffsets/TileByteCounts")
    seen = tuple(int(tags[t][0]) if t in tags and len(tags[t]) else -1 for t in (256, 257, 322, 323))
    wanted = (geometry.width, geometry.height, geometry.tile_w, geometry.tile_h)
    if seen != wanted or len(tags[324]) != geometry.n_frames:
        raise FrameIndexError(
            f"{name}: its TIFF personality disagrees with its DICOM header (TIFF {seen[0]}×{seen[1]} px in "
            f"{seen[2]}×{seen[3]} tiles, {len(tags[324])} tiles; DICOM {wanted[0]}×{wanted[1]} in "
            f"{wanted[2]}×{wanted[3]}, {geometry.n_frames} frames): the file is corrupt"
        )
    return FrameIndex(tags[324], tags[325], "tiff")


def from_extended(eot: bytes, lengths: bytes, first_item: int) -> FrameIndex:
    """Extended Offset Table: offsets from the first item after the (empty) BOT, frame lengths."""
    offsets = np.frombuffer(eot, "<u8").astype(np.int64) + first_item + 8
    return FrameIndex(offsets, np.frombuffer(lengths, "<u8").astype(np.int64), "extended")


def from_basic(bot: bytes, first_item: int, read: Reader, size: int, name: str) -> FrameIndex:
    """Basic Offset Table: where each frame's first item starts. A frame is the run of items up
    to the next frame's (one fragment or several: the spans keep the item headers, and packing
    joins the fragments); the last frame's run ends at the sequence delimiter, found by reading
    its item headers (two 8-byte reads for a frame in one fragment)."""
    starts = np.frombuffer(bot, "<u4").astype(np.int64) + first_item
    pos = int(starts[-1])
    while True:
        header = read(pos, 8)
        tag, length = struct.unpack("<II", header) if len(header) == 8 else (0, 0)
        if tag == SEQUENCE_END and pos > starts[-1]:
            break
        if tag != ITEM:
            what = "no item for the last frame" if pos == starts[-1] else "no item or delimiter after the last frame's"
            raise FrameIndexError(f"{name}: its Basic Offset Table points to {what} (at byte {pos})")
        pos += 8 + length
    return FrameIndex(starts, np.append(np.diff(starts), pos - starts[-1]), "basic", items=True)


def walk(first_item: int, read: Reader, size: int, name: str) -> FrameIndex:
    """Every item header from ``first_item`` to the sequence delimiter, read sequentially in
    blocks of :data:`WALK_BLOCK` (the slow path: the whole PixelData is read once)."""
    offsets, counts = [], []
    pos, block_at, block = first_item, first_item, b""
    while True:
        if pos + 8 > size:
            raise FrameIndexError(f"{name}: the encapsulated PixelData ends without its delimiter (truncated)")
        if pos + 8 > block_at + len(block):
            block_at, block = pos, read(pos, min(WALK_BLOCK, size - pos))
        tag, length = struct.unpack_from("<II", block, pos - block_at)
        if tag == SEQUENCE_END:
            break
        if tag != ITEM:
            raise FrameIndexError(f"{name}: no item header at byte {pos} of the PixelData: the file is corrupt")
        offsets.append(pos + 8)
        counts.append(length)
        pos += 8 + length
    return FrameIndex(np.asarray(offsets, np.int64), np.asarray(counts, np.int64), "walk")


def locate(
    *,
    preamble: bytes,
    eot: tuple[bytes, bytes] | None,
    bot: bytes,
    first_item: int,
    read: Reader,
    size: int,
    geometry: Geometry,
    name: str,
) -> FrameIndex:
    """The frame index of one instance, by the cheapest method its file allows (module docs)."""
    index = from_tiff(preamble, read, size, geometry, name)
    if index is None and eot is not None:
        index = from_extended(*eot, first_item)
    if index is None and len(bot) == 4 * geometry.n_frames and geometry.n_frames:
        index = from_basic(bot, first_item, read, size, name)
    if index is None:
        index = walk(first_item, read, size, name)
        if len(index.offsets) != geometry.n_frames:
            raise FrameIndexError(
                f"{name}: {len(index.offsets)} fragments for {geometry.n_frames} frames and no offset "
                "table to tell the frames apart (frames split over several fragments are not read)"
            )
    return _check(index, geometry, size, first_item + (0 if index.items else 8), name)
