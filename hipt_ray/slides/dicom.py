"""DICOM whole-slide images (VL Whole Slide Microscopy) read by byte range, locally or from S3.

A slide is a series: the ``.dcm`` instances of one SeriesInstanceUID in one folder (an IDC
series folder ``s3://idc-open-data/<crdc_series_uuid>/``, or a local folder), one instance per
pyramid level (ImageType ``…\\VOLUME``) plus thumbnail/label/overview images, which are kept out
of the pyramid. Only each instance's header is read (pydicom, stopping before the pixel data),
then its frame index (:mod:`hipt_ray.slides.dicom_frames`); pixels come from the frames a
region needs, fetched and decoded by :class:`hipt_ray.slides.tiles.TileSource` like the tiles
of a TIFF. The instances share one offset space: instance ``k``'s byte ``b`` is
``(k + 1) << 40 | b``, so a level's frame offsets say which object to read.

Geometry, downsamples and the MPP/objective properties are those OpenSlide 4 reports for the
same folder, and so are the pixels (tests compare them).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.filereader import dcmread
from pydicom.uid import UID

from hipt_ray.slides import dicom_frames as frames
from hipt_ray.slides.tiles import Level, TileError, TileSource
from hipt_ray.storage import ObjectInfo, filesystem, is_remote, local_path, stat

log = logging.getLogger(__name__)

VL_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"
ASSOCIATED = ("LABEL", "OVERVIEW", "THUMBNAIL")
_SHIFT = 40  # instance k's bytes live at (k + 1) << _SHIFT in the slide's offset space
_HEADER_BLOCK = 64 * 1024


class DicomError(TileError):
    """A series that cannot be read as a slide; the message names the object and the reason."""


@dataclass(frozen=True)
class Instance:
    uri: str
    size: int


@dataclass
class _Header:
    instance: Instance
    ds: Dataset
    preamble: bytes
    first_item: int  # where the first frame's item starts (after the Basic Offset Table)
    bot: bytes


def series_folder(uri: str) -> str | None:
    """The series folder (with a trailing slash) of a DICOM slide URI: a folder, or one of its
    ``.dcm`` instances (as OpenSlide opens one); ``None`` for any other file."""
    if uri.endswith("/"):
        return uri
    if uri.lower().endswith(".dcm"):
        return uri.rsplit("/", 1)[0] + "/"
    if not is_remote(uri) and os.path.isdir(local_path(uri)):
        return uri + "/"
    return None


def list_instances(fs, folder: str) -> list[Instance]:
    """The ``.dcm`` objects directly in ``folder`` (a URI ending in ``/``), by name."""
    path = fs._strip_protocol(folder)
    prefix = folder[: len(folder) - len(folder.split("://", 1)[-1])] if is_remote(folder) else ""
    entries = fs.ls(path, detail=True, refresh=True) if is_remote(folder) else fs.ls(path, detail=True)
    out = [
        Instance(prefix + e["name"], int(e.get("size") or 0))
        for e in entries
        if e.get("type") == "file" and e["name"].lower().endswith(".dcm")
    ]
    if not out:
        raise DicomError(f"{folder}: no .dcm instances in the series folder")
    return sorted(out, key=lambda i: i.uri)


def series_version(instances: list[Instance], versions: list[str]) -> str:
    """One version for a series: a digest of its instances' names, sizes and ETags (mtime and
    content fingerprint locally), so adding, removing or replacing any instance changes it."""
    h = hashlib.blake2b(digest_size=12)
    for inst, version in zip(instances, versions):
        h.update(f"{inst.uri.rsplit('/', 1)[-1]}\0{inst.size}\0{version}\n".encode())
    return "series-" + h.hexdigest()


def series_info(uri: str) -> tuple[ObjectInfo, str]:
    """A local series' identity (as :class:`DicomSlide` records it) and its first instance's path
    (what OpenSlide opens), without reading any instance."""
    folder = series_folder(uri) or uri
    fs, _ = filesystem(folder)
    instances = list_instances(fs, folder)
    version = series_version(instances, [stat(i.uri).version for i in instances])
    return ObjectInfo(folder, sum(i.size for i in instances), version), local_path(instances[0].uri)


def _flavor(ds: Dataset) -> str:
    kinds = list(ds.get("ImageType", []))
    return str(kinds[2]).upper() if len(kinds) > 2 else ""


def _syntax_name(uid: str) -> str:
    return frames.SYNTAX_NAMES.get(uid) or UID(uid).name


def _check_volume(h: _Header) -> None:
    """The instance is a pyramid level this backend reads: a clear reason otherwise."""
    ds, name = h.ds, h.instance.uri
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if syntax != frames.JPEG_BASELINE and syntax not in frames.JPEG2000:
        raise DicomError(
            f"{name}: transfer syntax {_syntax_name(syntax)} ({syntax}) is not read (JPEG baseline and "
            "JPEG 2000 are); convert the series or read it with a tool that decodes it"
        )
    organisation = str(ds.get("DimensionOrganizationType", "TILED_FULL"))
    if organisation != "TILED_FULL":
        raise DicomError(f"{name}: DimensionOrganizationType {organisation} is not read (TILED_FULL is)")
    shape = (ds.get("SamplesPerPixel"), ds.get("BitsAllocated"), ds.get("PlanarConfiguration", 0))
    if shape != (3, 8, 0):
        raise DicomError(f"{name}: {shape[0]} samples of {shape[1]} bits (planar {shape[2]}); RGB 8-bit is read")
    for key in ("TotalPixelMatrixFocalPlanes", "NumberOfOpticalPaths"):
        if int(ds.get(key, 1) or 1) != 1:
            raise DicomError(f"{name}: {key} is {ds.get(key)}; one focal plane and optical path are read")
    if "ConcatenationUID" in ds:
        raise DicomError(f"{name}: a level split over concatenated instances is not read")


def _properties(ds: Dataset, methods: list[str]) -> dict[str, str]:
    """OpenSlide's DICOM properties ``resolve_mpp`` reads (PixelSpacing is mm, row then column),
    plus what this backend records about the series."""
    props = {
        "openslide.vendor": "dicom",
        "dicom.SeriesInstanceUID": str(ds.SeriesInstanceUID),
        "dicom.TransferSyntaxUID": str(ds.file_meta.TransferSyntaxUID),
        "hipt-ray.frame-index": ",".join(methods),
    }
    try:
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        props["openslide.mpp-y"], props["openslide.mpp-x"] = (
            repr(float(spacing[0]) * 1000),
            repr(float(spacing[1]) * 1000),
        )
    except (AttributeError, IndexError, KeyError, TypeError):
        pass
    paths = ds.get("OpticalPathSequence") or []
    if paths and paths[0].get("ObjectiveLensPower") not in (None, ""):
        props["openslide.objective-power"] = repr(float(paths[0].ObjectiveLensPower))
    if paths and "ICCProfile" in paths[0]:
        # frames are read as stored (as OpenSlide's read_region does); the profile is recorded
        props["hipt-ray.icc-profile-bytes"] = str(len(paths[0].ICCProfile))
    return props


class DicomSlide(TileSource):
    """A DICOM series (module docs) with OpenSlide's ``read_region`` contract."""

    def __init__(
        self, uri: str, *, endpoint_url: str | None = None, range_gap: int = 64 * 1024, retries: int = 3
    ) -> None:
        folder = series_folder(uri)
        if folder is None:
            raise DicomError(f"{uri}: not a DICOM series folder or .dcm instance")
        super().__init__(folder, endpoint_url=endpoint_url, range_gap=range_gap, retries=retries)
        self.folder = folder
        kw = dict(endpoint_url=endpoint_url, range_gap=range_gap, retries=retries)
        self.instances = list_instances(self.fs, folder)
        with ThreadPoolExecutor(max_workers=min(8, len(self.instances)) if self.remote else 1) as pool:
            opened = list(pool.map(lambda inst: self._open_instance(inst, kw), self.instances))
        self._parts = [part for part, _, _ in opened]
        self.requests += sum(reads[0] for _, _, reads in opened)  # the header reads
        self.bytes_read += sum(reads[1] for _, _, reads in opened)
        versions = (
            [part.etag or "" for part in self._parts] if self.remote else [stat(i.uri).version for i in self.instances]
        )
        self.info = ObjectInfo(folder, sum(i.size for i in self.instances), series_version(self.instances, versions))
        volume, self.associated = self._pyramid([h for _, h, _ in opened])
        built = [self._level(h) for h in volume]
        self._set_levels([lv for lv, _ in built], _properties(volume[0].ds, [m for _, m in built]))

    # ------------------------------------------------------------------ opening
    def _open_instance(self, inst: Instance, kw: dict) -> tuple[TileSource, _Header, tuple[int, int]]:
        try:
            part = TileSource(inst.uri, **kw)
            return part, *self._header(inst, part)
        except FileNotFoundError:
            raise DicomError(f"{inst.uri}: the instance was listed but cannot be read (removed?)") from None

    def _header(self, inst: Instance, part: TileSource) -> tuple[_Header, tuple[int, int]]:
        """The instance's header up to PixelData, and the Basic Offset Table, in one pass; and
        the (requests, bytes) it took."""
        reads = (0, 0)
        fh = (
            part.fs.open(part.path, "rb", block_size=_HEADER_BLOCK, cache_type="readahead", size=inst.size)
            if self.remote
            else open(local_path(inst.uri), "rb")
        )
        try:
            try:
                ds = dcmread(fh, stop_before_pixels=True)
            except OSError:
                raise
            except Exception as exc:
                raise DicomError(f"{inst.uri}: not a DICOM file ({type(exc).__name__}: {exc})") from None
            at = fh.tell()  # the PixelData element
            head = fh.read(20)  # tag, VR, reserved, length; the BOT's item header
            bot = b""
            if len(head) == 20 and head[:4] == b"\xe0\x7f\x10\x00" and head[8:12] == b"\xff\xff\xff\xff":
                bot = fh.read(int.from_bytes(head[16:20], "little"))
        finally:
            if self.remote:
                cache = getattr(fh, "cache", None)
                reads = (getattr(cache, "miss_count", 0), getattr(cache, "total_requested_bytes", 0))
            fh.close()
        return _Header(inst, ds, bytes(getattr(ds, "preamble", None) or b""), at + 20 + len(bot), bot), reads

    def _pyramid(self, headers: list[_Header]) -> tuple[list[_Header], list[str]]:
        """The volume instances of the one series, largest first, and the associated images."""
        wsi = [h for h in headers if str(h.ds.file_meta.get("MediaStorageSOPClassUID", "")) == VL_WSI]
        for h in headers:
            if h not in wsi:
                log.warning("%s: not a VL Whole Slide Microscopy image; left out of the slide", h.instance.uri)
        series = {str(h.ds.get("SeriesInstanceUID", "")): h.instance.uri for h in wsi}
        if len(series) > 1:
            listed = "; ".join(f"{uid} ({uri})" for uid, uri in series.items())
            raise DicomError(
                f"{self.folder}: instances of {len(series)} series in one folder ({listed}); a slide is one series"
            )
        seen: dict[str, _Header] = {}
        for h in wsi:
            seen.setdefault(str(h.ds.SOPInstanceUID), h)  # a copied file is the same instance
        volume = sorted(
            (h for h in seen.values() if _flavor(h.ds) == "VOLUME"), key=lambda h: -int(h.ds.TotalPixelMatrixColumns)
        )
        if not volume:
            raise DicomError(f"{self.folder}: no pyramid level (an instance with ImageType …\\VOLUME) in the series")
        for a, b in zip(volume, volume[1:]):
            if int(a.ds.TotalPixelMatrixColumns) == int(b.ds.TotalPixelMatrixColumns):
                raise DicomError(f"{a.instance.uri} and {b.instance.uri}: two instances of one level size")
        kinds = list(volume[0].ds.get("ImageType", []))
        if len(kinds) > 3 and str(kinds[3]).upper() == "RESAMPLED":
            raise DicomError(
                f"{self.folder}: the largest level present ({volume[0].instance.uri}) is a RESAMPLED one: the "
                "series' full-resolution level file is missing; copy the whole series folder"
            )
        return volume, sorted(_flavor(h.ds).lower() for h in seen.values() if _flavor(h.ds) in ASSOCIATED)

    def _level(self, h: _Header) -> tuple[Level, str]:
        _check_volume(h)
        ds, k = h.ds, self.instances.index(h.instance)
        width, height = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
        tile_w, tile_h = int(ds.Columns), int(ds.Rows)
        n_tiles = math.ceil(width / tile_w) * math.ceil(height / tile_h)
        if int(ds.get("NumberOfFrames", 1)) != n_tiles:
            raise DicomError(
                f"{h.instance.uri}: {ds.get('NumberOfFrames')} frames for the {n_tiles} tiles of TILED_FULL"
            )
        eot = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            eot = (bytes(ds.ExtendedOffsetTable), bytes(ds.ExtendedOffsetTableLengths))
        base = (k + 1) << _SHIFT
        try:
            index = frames.locate(
                preamble=h.preamble,
                eot=eot,
                bot=h.bot,
                first_item=h.first_item,
                read=lambda at, n: self._fetch([(base + at, n)])[0],
                size=h.instance.size,
                geometry=frames.Geometry(width, height, tile_w, tile_h, n_tiles),
                name=h.instance.uri,
            )
        except frames.FrameIndexError as exc:
            raise DicomError(str(exc)) from None
        syntax = str(ds.file_meta.TransferSyntaxUID)
        decoder = frames.FrameDecoder(syntax, str(ds.PhotometricInterpretation))
        level = Level(
            width,
            height,
            tile_w,
            tile_h,
            index.offsets + base,
            index.counts,
            decoder,
            None,
            decoder.jpeg,
            codec=decoder,
            items=index.items,
        )  # the frame decoder pickles: regions travel to the model as their compressed frames
        return level, index.method

    # ------------------------------------------------------------------ bytes
    def _fetch(self, spans: list[tuple[int, int]]) -> list[bytes]:
        """Each span from the instance its offset names (neighbours coalesced per instance)."""
        out: list[bytes] = [b""] * len(spans)
        groups: dict[int, list[int]] = {}
        for i, (offset, _) in enumerate(spans):
            groups.setdefault(offset >> _SHIFT, []).append(i)
        for k, members in groups.items():
            part = self._parts[k - 1]
            before = part.requests, part.bytes_read
            blobs = part._fetch([(spans[i][0] - (k << _SHIFT), spans[i][1]) for i in members])
            self.requests += part.requests - before[0]
            self.bytes_read += part.bytes_read - before[1]
            for i, blob in zip(members, blobs):
                out[i] = blob
        return out

    def close(self) -> None:
        super().close()
        self._parts = []
