"""Ray Data stages of the embedding job: region reads as CPU tasks, HIPT-4K in model actors.

Reads return the region's RGB uint8 pixels (no copies, no normalisation: that happens on the
model's device). A read that fails (undecodable tiles, a vanished object) returns the row with
an ``error`` instead of raising, so one bad slide never stops the dataset.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa

from hipt_ray.config import validate_config
from hipt_ray.slides.reader import Slide, SlideError, open_slide
from hipt_ray.slides.tiler import make_cache
from hipt_ray.storage import describe_error
from hipt_ray.store.tables import slide_version

log = logging.getLogger(__name__)
_OPEN: OrderedDict[str, Slide] = OrderedDict()  # a few open slides per read worker
_MAX_OPEN = 4


def _key(row: dict) -> str:
    # the file version is part of the key: a handle opened on an earlier content of the same
    # path (overwritten in place) would decode the new bytes with the old tile directory
    return f"{row['uri']}\0{row['mpp_override']}\0{row.get('slide_version')}"


def _open_slide(row: dict, cfg) -> Slide:
    key = _key(row)
    if key in _OPEN:
        _OPEN.move_to_end(key)
        return _OPEN[key]
    slide, info = open_slide(row["uri"], cfg, cache=make_cache(cfg), mpp_override=row["mpp_override"])
    tiled = row.get("slide_version")
    if tiled is not None and slide_version(info.size, info.version) != tiled:
        slide.close()
        raise SlideError(f"{row['uri']}: the file changed after it was tiled (size or ETag/mtime differ); "
                         "rerun the command to tile and embed it again")
    _OPEN[key] = slide
    while len(_OPEN) > _MAX_OPEN:
        _OPEN.popitem(last=False)[1].close()
    return slide


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def read_region(row: dict[str, Any], *, cfg_dict: dict) -> dict[str, Any]:
    """One region spec → the same row plus ``image`` (uint8 [h, w, 3]), ``error``,
    ``read_node`` (the Ray node that read it) and ``read_seconds``."""
    t0 = time.perf_counter()
    cfg = validate_config(cfg_dict)  # 35 µs: not worth caching per worker
    row["read_node"] = _node()
    try:
        slide = _open_slide(row, cfg)
        image, _ = slide.read_region((row["x"], row["y"]), (row["read_w"], row["read_h"]), row["mpp"])
        row["image"], row["error"] = image, ""
    except Exception as exc:
        _OPEN.pop(_key(row), None)
        row["image"] = np.zeros((0, 0, 3), np.uint8)
        row["error"] = str(exc) if isinstance(exc, SlideError) else describe_error(row["uri"], exc)
    row["read_seconds"] = time.perf_counter() - t0
    return row


class RegionEmbedder:
    """A model actor: weights loaded once, regions embedded one at a time (their 256 px patches
    cut from the uint8 pixels and normalised in micro-batches). Returns Arrow rows without the
    pixels, with each region's ``model_seconds``. On CPU, torch uses ``threads`` threads (the
    actor's CPUs; Ray's default for a worker is one)."""

    def __init__(self, *, model_name: str, state_dict: dict, micro_batch: int | None, precision: str,
                 compile: bool, use_gpu: bool, store_tokens: bool, schema: pa.Schema, threads: int = 1) -> None:
        import torch

        from hipt_ray.models import create_model
        from hipt_ray.models.hipt4k import default_micro_batch
        from hipt_ray.models.inference import fast_dtype, prepare_for_inference

        self.torch = torch
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        self.node = _node()
        model = create_model(model_name, micro_batch=default_micro_batch(self.device, micro_batch))
        model.load_state_dict(state_dict)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision) or fast_dtype(self.device)
        self.model = prepare_for_inference(model, device=self.device, dtype=dtype, compile=compile)
        self.store_tokens, self.schema = store_tokens, schema

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["slide_id"])
        emb4k, mean256, tokens, seconds = [], [], [], [0.0] * n
        errors = [str(e) for e in batch["error"]]
        for i in range(n):
            if errors[i]:
                emb4k.append(None), mean256.append(None), tokens.append(None)
                continue
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():  # Ray's buffers are read-only; the model only reads
                    warnings.simplefilter("ignore", UserWarning)
                    img = self.torch.from_numpy(np.ascontiguousarray(batch["image"][i])).to(self.device)
                with self.torch.inference_mode():
                    out = self.model.forward_uint8(img[None])
                emb4k.append(out["emb4k"][0].cpu().numpy())
                mean256.append(out["mean256"][0].cpu().numpy())
                tokens.append(out["tokens256"][0].half().cpu().numpy().ravel() if self.store_tokens else None)
            except Exception as exc:  # e.g. out of memory on an odd region: fail the slide, go on
                log.warning("embedding failed for %s region %s", batch["slide_id"][i], batch["region_index"][i], exc_info=True)
                errors[i] = f"{batch['uri'][i]}: embedding failed: {type(exc).__name__}: {exc}"
                emb4k.append(None), mean256.append(None), tokens.append(None)
            seconds[i] = time.perf_counter() - t0
        columns = {name: list(batch[name]) for name in self.schema.names if name in batch}
        columns.update(emb4k=emb4k, mean256=mean256, tokens256=tokens, error=errors, model_node=[self.node] * n,
                       model_seconds=seconds)
        return pa.Table.from_pydict({f.name: columns[f.name] for f in self.schema}, schema=self.schema)
