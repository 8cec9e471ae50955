"""Region reads for Ray Data: one region row → its compressed tiles or its RGB uint8 pixels, as
CPU tasks.

A region of a slide the tile backend reads leaves as its compressed tiles
(:mod:`hipt_ray.slides.packed`: ≈ 3 MB for a 4096² region at 20×, against 50 MB of pixels),
decoded next to the model (:mod:`hipt_ray.embed.decode`); with ``embed.decode=reader``, and for
slides read through OpenSlide, the read decodes and the row carries the pixels (no copies, no
normalisation: that happens on the model's device). Every row has both kinds of columns, one
kind empty, so that Ray Data's blocks keep one schema. A read that fails (undecodable tiles, a
vanished object, a file that changed after it was tiled) returns the row with an ``error``
instead of raising, so one bad slide never stops the dataset.

Reads stay Ray *tasks* (a function, not an actor pool): a task lost with its node is retried
elsewhere and reads scale with the cluster's CPUs as it autoscales, while the per-worker state
a reader needs (the validated config, the staging cache, a few open slides) lives in one
:class:`RegionReader` per worker process and configuration, built on the first region a
worker reads (Ray reuses worker processes across tasks).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import ray

from hipt_ray.config import Config, validate_config
from hipt_ray.slide_ref import SlideRef
from hipt_ray.slides.packed import COLUMNS as PACKED_COLUMNS
from hipt_ray.slides.reader import Slide, SlideError, make_cache, open_slide
from hipt_ray.storage import describe_error


def worker_node() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


class RegionReader:
    """Reads regions for one configuration: the config validated and the staging cache made
    once, and an LRU of ``max_open`` open slides (opening a slide reads its tile directory).

    Called with a region row (the tiling's columns and :attr:`SlideRef.COLUMNS`), it returns the
    same row plus ``image`` (uint8 [h, w, 3], or [0, 0, 3] when packed), the packed region's
    columns (:data:`hipt_ray.slides.packed.COLUMNS`, empty when it carries pixels), ``error``,
    ``read_node`` and ``read_seconds``.
    """

    def __init__(self, *, cfg_dict: dict, max_open: int = 4) -> None:
        self.cfg = validate_config(cfg_dict)
        self.cache = make_cache(self.cfg)
        self.max_open = max_open
        self.pack = self.cfg.embed.decode != "reader"
        self.node = worker_node()
        self._open: OrderedDict[SlideRef, Slide] = OrderedDict()

    def slide(self, ref: SlideRef) -> Slide:
        """``ref`` open (the reference includes the file version: a handle opened on an earlier
        content of the same path would decode the new bytes with the old tile directory)."""
        if ref in self._open:
            self._open.move_to_end(ref)
            return self._open[ref]
        slide, _ = open_slide(ref, self.cfg, cache=self.cache)
        self._open[ref] = slide
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return slide

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        ref = SlideRef.of_region(row)
        row["read_node"] = self.node
        row["image"], row["error"] = _NO_PIXELS, ""
        row.update(_NOT_PACKED)
        try:
            slide = self.slide(ref)
            xy, size = (row["x"], row["y"]), (row["read_w"], row["read_h"])
            packed = slide.pack_region(xy, size, row["mpp"]) if self.pack else None
            if packed is not None:
                row.update(packed.to_columns())
            else:
                row["image"], _ = slide.read_region(xy, size, row["mpp"])
        except Exception as exc:
            if (slide := self._open.pop(ref, None)) is not None:
                slide.close()
            row.update(_NOT_PACKED)
            endpoint = self.cfg.storage.s3_endpoint_url
            row["error"] = str(exc) if isinstance(exc, SlideError) else describe_error(ref.uri, exc, endpoint)
        row["read_seconds"] = time.perf_counter() - t0
        return row


_NO_PIXELS = np.zeros((0, 0, 3), np.uint8)
_NOT_PACKED = {c: "" if c == "packing" else b"" for c in PACKED_COLUMNS}  # binary, and the JSON a string
_READERS: dict[str, RegionReader] = {}  # this worker's reader per configuration


def reader_kwargs(cfg: Config, *, pixels: bool = False) -> dict:
    """``fn_kwargs`` for :func:`read_region`: the config, and a key that names it cheaply.
    ``pixels``: every read returns decoded pixels whatever ``embed.decode`` says (stage-1
    pretraining cuts patches from them right after the read, so there is no model to decode next to)."""
    cfg_dict = cfg.to_dict()
    if pixels:
        cfg_dict["embed"]["decode"] = "reader"
    key = hashlib.sha256(json.dumps(cfg_dict, sort_keys=True, default=str).encode()).hexdigest()
    return {"cfg_dict": cfg_dict, "key": key}


def read_region(row: dict[str, Any], *, cfg_dict: dict, key: str) -> dict[str, Any]:
    """A Ray Data ``map`` function: ``row`` read by this worker's :class:`RegionReader` for the
    configuration ``key`` names (see :func:`reader_kwargs`)."""
    reader = _READERS.get(key)
    if reader is None:
        reader = _READERS[key] = RegionReader(cfg_dict=cfg_dict)
    return reader(row)
