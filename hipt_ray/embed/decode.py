"""Regions decoded next to the model: a batch's rows → uint8 ``[h, w, 3]`` tensors on its device.

Read tasks send a tile-backend region as its compressed tiles (:mod:`hipt_ray.slides.packed`);
the model actor decodes them here, so compressed bytes, not pixels, cross the network:

- **CPU** (``embed.decode`` ``cpu``, or ``auto`` on a CPU actor): each region decoded by
  :func:`~hipt_ray.slides.packed.decode_region` — the read path's own function, so the pixels
  are the read path's — in a thread pool started when the batch arrives, so regions decode while
  the model embeds the ones before them (libjpeg-turbo and PIL release the GIL).
- **GPU** (``gpu``, or ``auto`` on a GPU actor): every tile of the batch in one batched
  ``torchvision.io.decode_jpeg(…, device="cuda")`` call (nvJPEG), the shared JPEG tables put in
  front of each abbreviated tile, the canvas assembled and reduced on the GPU. nvJPEG decodes
  YCbCr JPEG to RGB as libjpeg-turbo does, up to rounding in its IDCT and chroma upsampling; a
  read box that is not the region's size is resampled there too, as the CPU does (integer reduce,
  or Pillow's Lanczos in :mod:`hipt_ray.embed.lanczos`: most TCGA slides need it). A
  region the GPU cannot decode as the CPU does goes to the CPU threads instead and is counted
  (``gpu→cpu``): a decode call that raises, or a slide level whose first tile's GPU colours
  differ from the CPU's (checked once per slide and level: Aperio stores RGB components without
  the YCbCr transform and without a marker that says so, which only a decoder told by the TIFF
  tags, as tifffile tells libjpeg-turbo, reads right; so is a DICOM level declared RGB whose
  frames carry no Adobe segment). DICOM frames arrive without the byte that pads an item to
  even length (:func:`~hipt_ray.slides.packed.unpadded`). DCT-scaled
  regions (``reader.scaled_decode``) decode on the CPU: nvJPEG has no DCT scaling.

Rows that arrive with pixels (``embed.decode=reader``, OpenSlide slides) pass through. A tile
that fails to decode fails its region with the read path's reason, word for word.

nvImageCodec (a wheel on PyPI) was not used: it cannot be installed on this offline machine
and torchvision 0.29's batched nvJPEG decoder is already a dependency, and ships a CPU
(libjpeg-turbo) twin of the same call that lets the GPU route's logic be tested without a GPU.
"""

from __future__ import annotations

import logging
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from hipt_ray.embed import lanczos
from hipt_ray.slides.packed import COLUMNS, PackedRegion, TileError, decode_region, jpeg_stream, region_error

log = logging.getLogger(__name__)
# A slide level decodes on the GPU when its first tile's GPU pixels are within this mean |Δ| of
# the CPU's: nvJPEG's IDCT and chroma upsampling round differently from libjpeg-turbo's (a level
# or two, rarely more, at colour edges), while a colour transform read the wrong way (RGB-stored
# components read as YCbCr) is off by tens of levels everywhere.
SAME_COLOURS_MEAN = 2.0


def row_bytes(batch: dict, i: int) -> int:
    """The bytes row ``i`` of a batch holds: what it moved through the object store."""
    total = 0
    for col in batch.values():
        v = col[i]
        if isinstance(v, np.ndarray):
            total += v.nbytes
        elif isinstance(v, (bytes, str)):
            total += len(v)
        else:
            total += np.asarray(v).nbytes
    return total


@dataclass
class DecodedBatch:
    """One batch's regions on the model's device: :meth:`pixels` per row, and per row where it
    was decoded (``reader``, ``cpu``, ``gpu``, ``gpu→cpu``), the seconds it took, the bytes the
    row moved and its compressed tile bytes."""

    where: list[str]
    seconds: list[float]
    transfer_bytes: list[int]
    tile_bytes: list[int]
    _ready: dict[int, torch.Tensor | str] = field(default_factory=dict)
    _pending: dict[int, Future] = field(default_factory=dict)
    _device: torch.device = torch.device("cpu")

    def pixels(self, i: int) -> torch.Tensor | str:
        """Row ``i``'s pixels, uint8 ``[h, w, 3]`` on the model's device, or the reason they
        could not be decoded (the per-slide failure reason)."""
        if i in self._pending:
            rgb, self.seconds[i] = self._pending.pop(i).result()
            with warnings.catch_warnings():  # PIL's arrays are read-only; the model only reads
                warnings.simplefilter("ignore", UserWarning)
                self._ready[i] = rgb if isinstance(rgb, str) else torch.from_numpy(rgb).to(self._device)
        return self._ready.pop(i)


def _timed_cpu_decode(region: PackedRegion) -> tuple[np.ndarray | str, float]:
    t0 = time.perf_counter()
    try:
        rgb: np.ndarray | str = decode_region(region)
    except TileError as exc:
        rgb = region_error(exc)
    return rgb, time.perf_counter() - t0


class RegionDecoder:
    """Decodes the packed regions of a model actor's batches (see the module docstring).

    Args:
        device: where the model runs (pixels are put there).
        gpu: decode JPEG tiles with torchvision's batched decoder on ``jpeg_device``.
        threads: CPU decode threads.
        jpeg_device: the batched decoder's device (default ``device``; ``cpu`` runs the GPU
            route's logic on torchvision's CPU decoder, for tests without a GPU).
    """

    def __init__(self, *, device: torch.device, gpu: bool, threads: int, jpeg_device: str | None = None) -> None:
        self.device, self.gpu = device, gpu
        self.jpeg_device = torch.device(jpeg_device or device)
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode")
        self.same_colours: dict[tuple[str, int], bool] = {}  # (uri, level) → GPU colours checked

    def __call__(self, batch: dict) -> DecodedBatch:
        n = len(batch["slide_id"])
        out = DecodedBatch(
            where=[""] * n,
            seconds=[0.0] * n,
            transfer_bytes=[row_bytes(batch, i) for i in range(n)],
            tile_bytes=[len(t) for t in batch["tiles"]] if "tiles" in batch else [0] * n,
            _device=self.device,
        )
        packed: dict[int, PackedRegion] = {}
        for i in range(n):
            if batch["error"][i]:
                out._ready[i] = str(batch["error"][i])
            elif "packing" in batch and batch["packing"][i]:
                packed[i] = PackedRegion.from_columns(*(batch[c][i] for c in COLUMNS))
            else:
                out.where[i] = "reader"
                out._ready[i] = torch.from_numpy(np.ascontiguousarray(batch["image"][i])).to(self.device)
        on_gpu = {i: r for i, r in packed.items() if self.gpu and r.tiles.scale == 1 and r.tiles.codec is not None}
        for i, region in packed.items():  # the CPU's share first: it decodes while the GPU does
            if i not in on_gpu:
                out.where[i] = "cpu"
                out._pending[i] = self.pool.submit(_timed_cpu_decode, region)
        if on_gpu:
            for i in self._decode_batched(on_gpu, out):
                out.where[i] = "gpu→cpu"
                out._pending[i] = self.pool.submit(_timed_cpu_decode, on_gpu[i])
        return out

    def _decode_batched(self, regions: dict[int, PackedRegion], out: DecodedBatch) -> list[int]:
        """Decode ``regions`` with the batched decoder into ``out``; returns the rows left to
        the CPU after a GPU failure or colour mismatch (logged)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        usable = {i: r for i, r in regions.items() if getattr(r.tiles.codec, "jpeg", False)}  # JPEG 2000: CPU
        t0 = time.perf_counter()
        streams = [
            torch.frombuffer(bytearray(jpeg_stream(r.tiles.tile_bytes(k), r.tiles.tables or None)), dtype=torch.uint8)
            for r in usable.values()
            for k in range(len(r.tiles))
        ]
        try:
            decoded = decode_jpeg(streams, mode=ImageReadMode.RGB, device=self.jpeg_device) if streams else []
        except Exception as exc:  # noqa: BLE001 - one bad tile fails the whole call: each region alone
            log.info("batched JPEG decode failed (%s: %s); decoding region by region", type(exc).__name__, exc)
            decoded = None
        failed = [i for i in regions if i not in usable]
        start = 0
        for i, region in usable.items():
            m = len(region.tiles)
            tiles = decoded[start : start + m] if decoded is not None else _each(region, self.jpeg_device)
            start += m
            if tiles is None or not self._colours_match(region, tiles):
                failed.append(i)
                continue
            out._ready[i] = _assemble(region, tiles, self.device)
            out.where[i] = "gpu"
        if self.jpeg_device.type == "cuda":
            torch.cuda.synchronize(self.jpeg_device)
        share = (time.perf_counter() - t0) / max(1, len(usable))
        for i in usable:
            out.seconds[i] = share
        if failed:
            log.info("%d region(s) decoded on the CPU instead of the GPU", len(failed))
        return failed

    def _colours_match(self, region: PackedRegion, tiles: list[torch.Tensor]) -> bool:
        """Whether this slide level's GPU colours are the CPU's (its first tile, once)."""
        key = (region.tiles.uri, region.tiles.level)
        if key not in self.same_colours and len(region.tiles):
            try:
                cpu = region.tiles.decode_tile(0)
            except TileError:
                return False  # the CPU decode reports it, in the read path's words
            gpu = tiles[0].permute(1, 2, 0).cpu().numpy()
            diff = np.abs(gpu.astype(np.int16) - cpu) if gpu.shape == cpu.shape else None
            self.same_colours[key] = diff is not None and float(diff.mean()) <= SAME_COLOURS_MEAN
            if not self.same_colours[key]:
                log.warning("%s level %d: GPU JPEG colours differ from the CPU's; decoding it on the CPU", *key)
        return self.same_colours.get(key, True)


def _each(region: PackedRegion, device: torch.device) -> list[torch.Tensor] | None:
    """``region``'s tiles decoded in a call of their own (``None``: that failed too)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    t = region.tiles
    streams = [
        torch.frombuffer(bytearray(jpeg_stream(t.tile_bytes(k), t.tables or None)), dtype=torch.uint8)
        for k in range(len(t))
    ]
    try:
        return decode_jpeg(streams, mode=ImageReadMode.RGB, device=device) if streams else []
    except Exception as exc:  # noqa: BLE001 - the CPU decoder decides whether the tile is bad
        log.info("%s: GPU decode failed (%s: %s)", t.uri, type(exc).__name__, exc)
        return None


def _assemble(region: PackedRegion, tiles: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The region from its decoded ``[3, h, w]`` tiles: placed on a white canvas, then resampled
    as the CPU does, on the device: the integer reduce with PIL's rounding, Lanczos with PIL's
    coefficients and fixed-point sums (:mod:`hipt_ray.embed.lanczos`)."""
    t = region.tiles
    w, h = t.canvas
    canvas = torch.full((h, w, 3), 255, dtype=torch.uint8, device=tiles[0].device if tiles else device)
    for k, tile in enumerate(tiles):
        (oy, ox), (iy, ix) = t.boxes(k)
        canvas[oy, ox] = tile.permute(1, 2, 0)[iy, ix]
    if region.resample == "reduce":
        f = region.factor
        s = canvas[: h - h % f, : w - w % f].reshape(h // f, f, w // f, f, 3).sum((1, 3), dtype=torch.int32)
        canvas = ((s + f * f // 2) // (f * f)).to(torch.uint8)
    elif region.resample == "lanczos":  # Pillow's arithmetic, on the canvas's device
        canvas = lanczos.resize(canvas, region.size)
    return canvas.to(device)


def decoder_for(route: str, device: torch.device, threads: int) -> RegionDecoder:
    """The decoder ``embed.decode`` = ``route`` asks for on a model actor on ``device``."""
    gpu = route == "gpu" or (route == "auto" and device.type == "cuda")
    return RegionDecoder(device=device, gpu=gpu, threads=threads)
