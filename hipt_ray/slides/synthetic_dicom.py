"""Synthetic DICOM whole-slide images (VL Whole Slide Microscopy, one instance per level), for
tests and benchmarks of the DICOM backend.

A series is made from a synthetic tiled TIFF (:func:`hipt_ray.slides.synthetic.write_slide`)
the way IDC converted TCGA's SVS files: the TIFF's JPEG tiles become the DICOM frames byte for
byte (JPEG baseline, so both formats decode to the same pixels), or its decoded tiles are
re-encoded losslessly as JPEG 2000 (the same pixels again). Frames can be indexed by an Extended
Offset Table, a Basic Offset Table or neither, and a file can be written dual-personality
DICOM-TIFF as PixelMed writes IDC's files: a TIFF header in the 128-byte preamble pointing to an
IFD stored as the value of DataSetTrailingPadding (FFFC,FFFC) at the end of the file, whose
TileOffsets point at the first byte of each frame's data (after the item header) and whose
TileByteCounts are the frame lengths without the even-length padding byte.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import imagecodecs
import numpy as np
import tifffile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.filereader import dcmread
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless, JPEGBaseline8Bit, generate_uid

VL_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
OffsetTable = Literal["extended", "basic", "none"]


@dataclass(frozen=True)
class FrameLevel:
    """One pyramid level ready to write: its size, tile size and encoded frames (row-major)."""

    width: int
    height: int
    tile: int
    frames: list[bytes]
    syntax: str  # transfer syntax UID
    photometric: str  # PhotometricInterpretation


def _jpeg_frame(tile: bytes, tables: bytes | None) -> bytes:
    """A TIFF JPEG tile as a whole JPEG stream (shared tables put in front), as DICOM wants."""
    return tables[:-2] + tile[2:] if tables else tile


Codec = Literal["jpeg", "jpeg2k", "jpeg2k-lossy"]
# JPEG 2000 as written: (transfer syntax, PhotometricInterpretation, encoder level, reversible)
_J2K = {
    "jpeg2k": (JPEG2000Lossless, "YBR_RCT", 0, True),
    "jpeg2k-lossy": (JPEG2000, "YBR_ICT", 40, False),  # ≈ 40 dB PSNR, about JPEG q85's size
}


def tiff_levels(path: str | Path, *, codec: Codec = "jpeg") -> list[FrameLevel]:
    """The levels of a tiled JPEG TIFF as DICOM frames: its JPEG tiles as they are (``jpeg``), or
    its decoded tiles re-encoded as JPEG 2000: lossless (``jpeg2k``, reversible colour
    transform: the same pixels) or lossy (``jpeg2k-lossy``, as TCGA's JPEG 2000 slides are)."""
    with tifffile.TiffFile(str(path)) as tif:
        return [_page_level(p, tif.filehandle, codec) for p in tif.pages if p.is_tiled and p.tilewidth == p.tilelength]  # type: ignore[union-attr]


def _page_level(page: Any, fh: Any, codec: Codec) -> FrameLevel:
    """One TIFF page's tiles as DICOM frames (see :func:`tiff_levels`)."""
    frames: list[bytes] = []
    for i, (off, n) in enumerate(zip(page.dataoffsets, page.databytecounts)):
        fh.seek(off)
        data = bytes(fh.read(n))
        if codec == "jpeg":
            frames.append(_jpeg_frame(data, page.jpegtables))
        else:
            pixels = page.decode(data, i, jpegtables=page.jpegtables)[0]
            tile = np.ascontiguousarray(np.asarray(pixels).reshape(page.tilelength, page.tilewidth, -1)[..., :3])
            _, _, level, reversible = _J2K[codec]
            frames.append(bytes(imagecodecs.jpeg2k_encode(tile, level=level, reversible=reversible, codecformat="J2K")))
    if codec == "jpeg":
        syntax, photometric = JPEGBaseline8Bit, "YBR_FULL_422" if int(page.photometric) == 6 else "RGB"
    else:
        syntax, photometric = _J2K[codec][:2]
    return FrameLevel(page.imagewidth, page.imagelength, page.tilewidth, frames, syntax, photometric)


def _dataset(
    level: FrameLevel, *, mpp: float | None, objective: float | None, uids: dict, flavor: str, resampled: bool
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(VL_WSI)
    meta.MediaStorageSOPInstanceUID = sop = generate_uid()
    meta.TransferSyntaxUID = UID(level.syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = VL_WSI, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.Modality, ds.PatientID, ds.SeriesDescription = "SM", uids.get("patient", "SYNTH-0001"), "FFPE synthetic"
    ds.ImageType = ["DERIVED", "PRIMARY", flavor, "RESAMPLED" if resampled else "NONE"]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.NumberOfFrames = len(level.frames)
    ds.Rows = ds.Columns = level.tile
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = level.width, level.height
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, level.photometric, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "00" if level.syntax == JPEG2000Lossless else "01"
    if mpp is not None:
        measures = Dataset()
        measures.PixelSpacing = [f"{mpp / 1000:.10g}", f"{mpp / 1000:.10g}"]  # mm, row then column
        measures.SliceThickness = "0.001"
        shared = Dataset()
        shared.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [shared]
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    if objective is not None:
        path.ObjectiveLensPower = f"{objective:g}"
    ds.OpticalPathSequence = [path]
    return ds


def _tiff_ifd(
    level: FrameLevel, offsets: Sequence[int], counts: Sequence[int], ifd_at: int, mpp: float | None
) -> bytes:
    """A classic little-endian TIFF IFD at file offset ``ifd_at`` for one level, its arrays
    (BitsPerSample, resolutions, TileOffsets, TileByteCounts) right after it (PixelMed's order)."""
    n_tiles = len(offsets)
    compression = 7 if level.syntax == JPEGBaseline8Bit else 33005
    photometric = 2 if level.photometric == "RGB" else 6
    per_cm = round(1e4 / mpp) if mpp else 1
    entries = 15  # the tags below
    values_at = ifd_at + 2 + 12 * entries + 4
    bps_at, xres_at = values_at, values_at + 6
    yres_at, offs_at = xres_at + 8, xres_at + 16
    counts_at = offs_at + 4 * n_tiles
    tags = [
        (254, 4, 1, 0),  # NewSubfileType
        (256, 4, 1, level.width),
        (257, 4, 1, level.height),
        (258, 3, 3, bps_at),
        (259, 3, 1, compression),
        (262, 3, 1, photometric),
        (277, 3, 1, 3),
        (282, 5, 1, xres_at),
        (283, 5, 1, yres_at),
        (284, 3, 1, 1),
        (296, 3, 1, 3 if mpp else 1),  # centimetre
        (322, 3, 1, level.tile),
        (323, 3, 1, level.tile),
        (324, 4, n_tiles, offs_at if n_tiles > 1 else offsets[0]),
        (325, 4, n_tiles, counts_at if n_tiles > 1 else counts[0]),
    ]
    buf = io.BytesIO()
    buf.write(struct.pack("<H", len(tags)))
    for tag, typ, count, value in tags:
        inline = struct.pack("<H", value) + b"\0\0" if typ == 3 and count == 1 else struct.pack("<I", value)
        buf.write(struct.pack("<HHI", tag, typ, count) + inline)
    buf.write(struct.pack("<I", 0))
    buf.write(struct.pack("<HHH", 8, 8, 8) + struct.pack("<II", per_cm, 1) * 2)
    if n_tiles > 1:
        buf.write(np.asarray(offsets, "<u4").tobytes() + np.asarray(counts, "<u4").tobytes())
    return buf.getvalue()


def _frame_positions(path: Path, frames: list[bytes]) -> list[int]:
    """Where each frame's data starts in a file just written with an empty Basic Offset Table
    or one entry per frame: after the PixelData element header, the BOT item and each item header."""
    with open(path, "rb") as fh:
        ds = dcmread(fh, stop_before_pixels=True)
        at = fh.tell()  # PixelData element: tag, VR, reserved, undefined length
        fh.seek(at + 12 + 4)
        (bot_len,) = struct.unpack("<I", fh.read(4))
    assert "ExtendedOffsetTable" not in ds or bot_len == 0
    pos = at + 12 + 8 + bot_len
    out = []
    for f in frames:
        out.append(pos + 8)
        pos += 8 + len(f) + len(f) % 2
    return out


def _add_tiff(path: Path, level: FrameLevel, mpp: float | None) -> None:
    """Make ``path`` dual-personality: an IFD as the DataSetTrailingPadding value at the end,
    a TIFF header in the preamble pointing to it."""
    data = bytearray(path.read_bytes())
    offsets = _frame_positions(path, level.frames)
    ifd_at = len(data) + 12  # (FFFC,FFFC) OB: tag 4 + VR 2 + reserved 2 + length 4
    ifd = _tiff_ifd(level, offsets, [len(f) for f in level.frames], ifd_at, mpp)
    ifd += b"\0" * (len(ifd) % 2)
    data += struct.pack("<HH", 0xFFFC, 0xFFFC) + b"OB\0\0" + struct.pack("<I", len(ifd)) + ifd
    data[:8] = b"II*\0" + struct.pack("<I", ifd_at)
    path.write_bytes(bytes(data))


def write_instance(
    path: str | Path,
    level: FrameLevel,
    *,
    mpp: float | None,
    objective: float | None = None,
    uids: dict,
    flavor: str = "VOLUME",
    resampled: bool = False,
    offset_table: OffsetTable = "none",
    tiff: bool = False,
    fragments: int = 1,
) -> Path:
    """Write one level as a VL Whole Slide Microscopy instance (TILED_FULL); ``resampled``: a
    level made from the full-resolution one (ImageType …\\RESAMPLED, as IDC's levels > 0);
    ``fragments``: items each frame is split over (allowed with a Basic Offset Table or none)."""
    path = Path(path)
    ds = _dataset(level, mpp=mpp, objective=objective, uids=uids, flavor=flavor, resampled=resampled)
    if offset_table == "extended":
        pixels, eot, lengths = encapsulate_extended(level.frames)
        ds.PixelData = pixels
        ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = eot, lengths
    else:
        ds.PixelData = encapsulate(level.frames, fragments_per_frame=fragments, has_bot=offset_table == "basic")
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    if tiff:
        _add_tiff(path, level, mpp)
    return path


def write_series(
    folder: str | Path,
    levels: list[FrameLevel],
    *,
    mpp: float | None,
    objective: float | None = None,
    offset_table: OffsetTable = "none",
    tiff: bool = False,
    thumbnail: bool = True,
    series_uid: str | None = None,
    fragments: int = 1,
) -> list[Path]:
    """Write ``levels`` as one series in ``folder`` (``level-<i>.dcm``), plus a THUMBNAIL
    instance (the smallest level again, which a reader must keep out of the pyramid)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": generate_uid(), "series": series_uid or generate_uid()}
    ds0 = levels[0].width
    paths = []
    for i, level in enumerate(levels):
        level_mpp = None if mpp is None else mpp * ds0 / level.width
        paths.append(
            write_instance(
                folder / f"level-{i}.dcm",
                level,
                mpp=level_mpp,
                objective=objective,
                uids=uids,
                resampled=i > 0,
                offset_table=offset_table,
                tiff=tiff,
                fragments=fragments,
            )
        )
    if thumbnail:
        small = levels[-1]
        paths.append(
            write_instance(
                folder / "thumbnail.dcm",
                small,
                mpp=None if mpp is None else mpp * ds0 / small.width,
                uids=uids,
                flavor="THUMBNAIL",
                resampled=True,
            )
        )
    return paths


def write_dicom_twin(
    tiff_path: str | Path,
    folder: str | Path,
    *,
    mpp: float | None,
    codec: Codec = "jpeg",
    offset_table: OffsetTable = "none",
    tiff: bool = False,
    objective: float | None = None,
    fragments: int = 1,
) -> list[Path]:
    """The synthetic TIFF at ``tiff_path`` written again as a DICOM series in ``folder``."""
    return write_series(
        folder,
        tiff_levels(tiff_path, codec=codec),
        mpp=mpp,
        objective=objective,
        offset_table=offset_table,
        tiff=tiff,
        fragments=fragments,
    )
