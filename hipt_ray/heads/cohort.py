"""Cohorts: a labels table joined with the Lance embeddings into one bag per case."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from hipt_ray.config import Config, ConfigError, InputError
from hipt_ray.heads.labels import check_cohort, check_labels, join_cases, read_labels
from hipt_ray.heads.tasks import task_for
from hipt_ray.store import REGIONS, Store, read_embeddings
from hipt_ray.store.tables import resolve_embedding, tokens_to_grid

log = logging.getLogger(__name__)


@dataclass
class Cohort:
    case_ids: list[str]
    bags: list[torch.Tensor]  # per case: emb4k of all its slides' regions [M, D]
    labels: np.ndarray | None = None  # subtyping: class index per case
    classes: list[str] = field(default_factory=list)
    times: np.ndarray | None = None  # survival
    events: np.ndarray | None = None
    missing_embeddings: list[str] = field(default_factory=list)  # labelled slides not embedded
    unlabelled: list[str] = field(default_factory=list)  # embedded slides without labels
    model_id: str = ""
    table_version: int = 0
    # With heads.local_vit: per case, the ViT-256 token grid of each region ``[D256, rows, cols]``
    # (edge regions may have fewer rows/columns), which the head's own ViT-4K embeds.
    token_bags: list[list[torch.Tensor]] | None = None
    slides: dict[str, list[str]] = field(default_factory=dict)  # case → its embedded slides
    excluded: list[str] = field(default_factory=list)  # rows of the labels table left out, and why

    @property
    def inputs(self) -> list:
        """What the head reads per case: token grids with a local ViT-4K, else emb4k."""
        return self.token_bags if self.token_bags is not None else self.bags


def grid_shape(cells: int, read_w: int, read_h: int) -> tuple[int, int]:
    """(rows, cols) of a region of ``read_w`` × ``read_h`` pixels cut into ``cells`` square
    patches."""
    patch = round(math.sqrt(read_w * read_h / cells))
    return read_h // patch, read_w // patch


def read_token_grids(
    store: Store, spec_hash: str, model_id: str, slide_ids: list[str]
) -> dict[str, list[torch.Tensor]]:
    """Per slide, each region's patch tokens as a float32 grid ``[D, rows, cols]``: D is the
    width of the model's patch encoder, the grid follows from the number of tokens and the
    region's aspect (a patch encoder's geometry cuts patches of other sizes than HIPT's 256 px)."""
    dim = store.token_width(model_id)
    rows = store.regions(
        spec_hash, slide_ids, model_id=model_id, columns=["slide_id", "region_index", "read_w", "read_h", "tokens256"]
    )
    out: dict[str, list[torch.Tensor]] = {}
    for sid, w, h, flat in zip(
        rows["slide_id"].to_pylist(),
        rows["read_w"].to_pylist(),
        rows["read_h"].to_pylist(),
        rows["tokens256"].to_numpy(zero_copy_only=False),
    ):
        if flat is None:
            raise InputError(
                f"{store.out}: slide {sid} was embedded without tokens256 (embed.store_tokens="
                "false); re-embed with embed.store_tokens=true or drop heads.local_vit"
            )
        r, c = grid_shape(len(flat) // dim, w, h)
        grid = torch.from_numpy(tokens_to_grid(np.asarray(flat, dtype=np.float32), r, c))
        out.setdefault(sid, []).append(grid.contiguous())
    return out


def load_cohort(cfg: Config) -> Cohort:
    """Bags per case for ``cfg.heads`` from the embeddings under ``cfg.out``."""
    h = cfg.heads
    if not h.labels:
        raise ConfigError("heads.labels (--labels) is required: a CSV/Parquet with slide_id, case_id and labels")
    task = task_for(h)
    df, excluded = check_labels(read_labels(h.labels, cfg.storage.s3_endpoint_url), task=task)
    store = Store(cfg.out, endpoint_url=cfg.storage.s3_endpoint_url)
    model_id, spec_hash = resolve_embedding(store, h.model_id, key="heads.model_id")
    emb = read_embeddings(cfg.out, model_id=model_id, spec_hash=spec_hash, endpoint_url=cfg.storage.s3_endpoint_url)
    # labels per case (no slide_id): one row per slide that slides.lance records under the case
    df, no_slides = join_cases(df, lambda: {s: ref.case_id for s, ref in store.slide_refs(spec_hash, model_id).items()})
    labelled = set(df["slide_id"])
    cohort = Cohort(
        [],
        [],
        missing_embeddings=sorted(labelled - set(emb)) + [f"case {c} (no slide)" for c in no_slides],
        unlabelled=sorted(set(emb) - labelled),
        model_id=model_id,
        excluded=excluded,
    )
    if cohort.missing_embeddings:
        log.warning(
            "%d labelled slides have no embeddings: %s",
            len(cohort.missing_embeddings),
            ", ".join(cohort.missing_embeddings[:10]),
        )
    df = df[df["slide_id"].isin(emb)]
    check_cohort(df, task=task)
    per_case = df.groupby("case_id", sort=True)
    tokens = read_token_grids(store, spec_hash, model_id, sorted(set(df["slide_id"]))) if h.local_vit else None
    if tokens is not None:
        cohort.token_bags = []
    for case_id, rows in per_case:
        cohort.case_ids.append(case_id)
        cohort.slides[case_id] = list(rows["slide_id"])
        cohort.bags.append(torch.from_numpy(np.concatenate([emb[s]["emb4k"] for s in rows["slide_id"]])))
        if tokens is not None:
            cohort.token_bags.append([g for s in rows["slide_id"] for g in tokens[s]])
    task.attach_targets(cohort, per_case.first())  # check_labels: one label, time and event per case
    ds = store.dataset(REGIONS)
    cohort.table_version = ds.version if ds is not None else 0
    return cohort
