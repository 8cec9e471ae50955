"""``hipt-ray search``: the nearest regions to a query region across every embedded slide, as a
table and a mosaic of region thumbnails (drawn by :mod:`hipt_ray.viz.mosaic`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pandas as pd

from hipt_ray.config import Config
from hipt_ray.heads.labels import read_labels
from hipt_ray.slides.reader import make_cache, open_slide
from hipt_ray.storage import local_output_dir
from hipt_ray.store import Store
from hipt_ray.store.tables import resolve_embedding
from hipt_ray.store.vectors import find_region, refresh_index, search
from hipt_ray.viz.mosaic import mosaic_png, region_thumbnail


@dataclass
class SearchResult:
    table: pd.DataFrame
    csv: str
    mosaic: str
    index: str  # what the index refresh did

    def lines(self) -> list[str]:
        return [self.table.to_string(index=False), self.index, f"table: {self.csv}", f"mosaic: {self.mosaic}"]


def search_similar(
    cfg: Config,
    slide: str,
    xy: tuple[int, int],
    *,
    k: int | None = None,
    labels: str | None = None,
    dest: str | None = None,
    rebuild_index: bool = False,
) -> SearchResult:
    """Query with the region of ``slide`` (id or URI) containing level-0 ``xy``."""
    sc = cfg.search
    k = k or sc.k
    store = Store(cfg.out, endpoint_url=cfg.storage.s3_endpoint_url)
    mid, spec = resolve_embedding(store, sc.model_id, key="search.model_id")
    refs = store.slide_refs(spec, mid)
    slide_id = next((s for s, r in refs.items() if r.uri == slide), slide)
    index_note = refresh_index(store, sc, rebuild=rebuild_index)
    query = find_region(store, slide_id, xy, model_id=mid, spec_hash=spec)
    hits = search(store, query["emb4k"], model_id=mid, spec_hash=spec, k=k, sc=sc).to_pylist()
    # The query region itself first (an ANN index may tie or misorder near-zero distances).
    hits.sort(
        key=lambda r: (not (r["slide_id"] == slide_id and r["region_index"] == query["region_index"]), r["_distance"])
    )
    label_of: dict[str, str] = {}
    if labels:
        df = read_labels(labels, cfg.storage.s3_endpoint_url)
        column = cfg.heads.label_column if cfg.heads.label_column in df.columns else None
        if column:
            label_of = dict(zip(df["slide_id"], df[column].astype(str)))
    table = pd.DataFrame(
        [
            {
                "rank": i,
                "slide_id": r["slide_id"],
                "region_index": r["region_index"],
                "x": r["x"],
                "y": r["y"],
                "distance": round(float(r["_distance"]), 6),
                **({"label": label_of.get(r["slide_id"], "")} if label_of else {}),
            }
            for i, r in enumerate(hits)
        ]
    )
    if dest is None:
        dest = local_output_dir(cfg.out, "search")
    os.makedirs(dest, exist_ok=True)
    stem = f"{slide_id}_{query['x']}_{query['y']}"
    csv = os.path.join(dest, f"{stem}.csv")
    table.to_csv(csv, index=False)
    cache = make_cache(cfg)
    tiles = []
    for i, r in enumerate(hits):
        s, _ = open_slide(refs[r["slide_id"]], cfg, cache=cache)
        with s:
            image = region_thumbnail(s, r, sc.thumb_px)
        label = f" [{label_of.get(r['slide_id'], '')}]" if label_of else ""
        caption = (
            "query" if i == 0 else f"#{i}  d={r['_distance']:.3g}"
        ) + f"\n{r['slide_id']} r{r['region_index']}{label}"
        tiles.append((image, caption, i == 0))
    mosaic = mosaic_png(
        tiles,
        os.path.join(dest, f"{stem}_mosaic.png"),
        title=f"{k} nearest regions to {slide_id} @ {query['x']},{query['y']} ({sc.metric}, model {mid})",
    )
    return SearchResult(table=table, csv=csv, mosaic=mosaic, index=index_note)
