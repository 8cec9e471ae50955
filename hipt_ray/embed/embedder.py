"""The embedding job's model actor: HIPT-4K on read regions, weights loaded once per actor.

Regions arrive as RGB uint8 pixels from the read tasks (:mod:`hipt_ray.data.regions`) and are
normalised on the model's device; rows leave with their embeddings and without the pixels,
in the schema :func:`output_schema` gives.
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np
import pyarrow as pa
import torch

from hipt_ray.data.regions import worker_node
from hipt_ray.embed.decode import decoder_for
from hipt_ray.models import create_model
from hipt_ray.models.hipt4k import default_micro_batch
from hipt_ray.models.inference import fast_dtype, inference_device, prepare_for_inference
from hipt_ray.store import REGIONS_SCHEMA, embedding_fields

log = logging.getLogger(__name__)
# What a read row carries in: the tiling's columns and the slide's reference.
READ_COLUMNS = [f.name for f in REGIONS_SCHEMA if f.name != "model_id"]


def output_schema(dim4k: int, dim256: int) -> pa.Schema:
    """The rows :class:`RegionEmbedder` returns: the read row's columns without the pixels,
    the embeddings, and where and how long each region's read and model call took."""
    return pa.schema(
        [REGIONS_SCHEMA.field(n) for n in READ_COLUMNS]
        + [pa.field("uri", pa.string())]
        + embedding_fields(dim4k, dim256)
        + [pa.field(n, pa.string()) for n in ("error", "read_node", "model_node", "decoded")]
        + [pa.field(n, pa.float32()) for n in ("read_seconds", "model_seconds", "decode_seconds")]
        + [pa.field(n, pa.int64()) for n in ("transfer_bytes", "tile_bytes")]
    )


def regions_schema(dim4k: int, dim256: int) -> pa.Schema:
    """The columns an embedding adds to ``regions.lance`` (see :func:`plan_run`)."""
    return pa.schema(list(REGIONS_SCHEMA) + embedding_fields(dim4k, dim256))


class RegionEmbedder:
    """A model actor: weights loaded once, regions embedded one at a time (their 256 px patches
    cut from the uint8 pixels and normalised in micro-batches). Returns Arrow rows without the
    pixels, with each region's ``model_seconds``. On CPU, torch uses ``threads`` threads (the
    actor's CPUs; Ray's default for a worker is one)."""

    def __init__(
        self,
        *,
        model_name: str,
        state_dict: dict,
        micro_batch: int | None,
        precision: str,
        compile: bool,
        use_gpu: bool | str,
        store_tokens: bool,
        schema: pa.Schema,
        threads: int = 1,
        decode: str = "auto",
        decode_threads: int = 0,
    ) -> None:
        self.torch = torch
        self.node = worker_node()
        # a GPU actor whose torch cannot use the GPU fails here, naming the node, rather than
        # embedding on the node's CPUs ≈ 100× slower
        self.device = inference_device(use_gpu, where=f"Ray node {self.node}" if self.node else "this process")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        model = create_model(model_name, micro_batch=default_micro_batch(self.device, micro_batch))
        model.load_state_dict(state_dict)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(precision) or fast_dtype(self.device)
        self.model = prepare_for_inference(model, device=self.device, dtype=dtype, compile=compile)
        self.store_tokens, self.schema = store_tokens, schema
        # packed regions (compressed tiles) are decoded here, next to the model
        self.decoder = decoder_for(decode, self.device, decode_threads or max(1, int(threads)))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["slide_id"])
        emb4k, mean256, tokens, seconds = [], [], [], [0.0] * n
        errors = [str(e) for e in batch["error"]]
        with warnings.catch_warnings():  # Ray's buffers are read-only; the model only reads
            warnings.simplefilter("ignore", UserWarning)
            decoded = self.decoder(batch)  # packed regions decode (on threads) while the model runs
        for i in range(n):
            img = decoded.pixels(i) if not errors[i] else ""
            if isinstance(img, str):  # a failed read, or a tile that failed to decode
                errors[i] = errors[i] or img
                emb4k.append(None), mean256.append(None), tokens.append(None)
                continue
            t0 = time.perf_counter()
            try:
                with self.torch.inference_mode():
                    out = self.model.forward_uint8(img[None])
                emb4k.append(out["emb4k"][0].cpu().numpy())
                mean256.append(out["mean256"][0].cpu().numpy())
                tokens.append(out["tokens256"][0].half().cpu().numpy().ravel() if self.store_tokens else None)
            except Exception as exc:  # e.g. out of memory on an odd region: fail the slide, go on
                log.warning(
                    "embedding failed for %s region %s", batch["slide_id"][i], batch["region_index"][i], exc_info=True
                )
                errors[i] = f"{batch['uri'][i]}: embedding failed: {type(exc).__name__}: {exc}"
                emb4k.append(None), mean256.append(None), tokens.append(None)
            seconds[i] = time.perf_counter() - t0
        columns = {name: list(batch[name]) for name in self.schema.names if name in batch}
        columns.update(
            emb4k=emb4k,
            mean256=mean256,
            tokens256=tokens,
            error=errors,
            model_node=[self.node] * n,
            model_seconds=seconds,
            decoded=decoded.where,
            decode_seconds=decoded.seconds,
            transfer_bytes=decoded.transfer_bytes,
            tile_bytes=decoded.tile_bytes,
        )
        return pa.Table.from_pydict({f.name: columns[f.name] for f in self.schema}, schema=self.schema)
