"""One output holding two patch encoders' embeddings side by side, keyed by model id (#29 item 2):
a second encoder's ``mean256`` of another width gets a column of its own, readers pick each
model's, and a reader that names no model is told which there are."""

from __future__ import annotations

from datetime import UTC, datetime

import lance
import numpy as np
import pyarrow as pa
import pytest

from hipt_ray.config import InputError
from hipt_ray.heads.cohort import grid_shape
from hipt_ray.store import REGIONS, REGIONS_SCHEMA, Store, embedding_fields, read_embeddings
from hipt_ray.store.fragments import write_region_fragments
from hipt_ray.store.tables import resolve_embedding


def _write(store: Store, model_id: str, dim: int, spec: str, value: float) -> None:
    """Two slides of one region each, embedded by ``model_id`` (patch embeddings ``dim`` wide)."""
    column = store.mean_column(dim)
    schema = pa.schema(list(REGIONS_SCHEMA) + embedding_fields(192, dim, column))
    regions = [
        {
            "slide_id": sid,
            "region_index": 0,
            "spec_hash": spec,
            "model_id": model_id,
            "emb4k": np.full(192, value, np.float32),
            column: np.full(dim, value, np.float32),
            "tokens256": np.full(4 * dim, value, np.float16),
        }
        for sid in ("a", "b")
    ]
    slides = [
        {"slide_id": sid, "uri": sid, "status": "ok", "spec_hash": spec, "model_id": model_id, "n_regions": 1}
        | {"time": datetime(2026, 1, 1, tzinfo=UTC)}
        for sid in ("a", "b")
    ]
    store.append_slides(slides, pa.Table.from_pylist(regions, schema=schema), schema)


def test_two_encoders_share_one_table_and_each_reads_its_own(tmp_path):
    store = Store(str(tmp_path))
    assert store.mean_column(384) == "mean256"  # a new table: the usual column
    _write(store, "hipt", 384, "s4096", 1.0)
    assert store.mean_column(384) == "mean256" and store.mean_column(1024) == "mean256_1024"
    _write(store, "uni-native224-x", 1024, "s3584", 2.0)
    names = store.read(REGIONS).schema.names
    assert "mean256" in names and "mean256_1024" in names
    hipt = read_embeddings(str(tmp_path), model_id="hipt")
    uni = read_embeddings(str(tmp_path), model_id="uni-native224-x")
    assert hipt["a"]["mean256"].shape == (1, 384) and float(hipt["a"]["mean256"][0, 0]) == 1.0
    assert uni["b"]["mean256"].shape == (1, 1024) and float(uni["b"]["emb4k"][0, 0]) == 2.0
    assert store.token_width("hipt") == 384 and store.token_width("uni-native224-x") == 1024
    # each model's tiling is found from its own rows
    assert resolve_embedding(store, "uni-native224-x") == ("uni-native224-x", "s3584")


def test_a_head_that_names_no_model_is_told_which_there_are(tmp_path):
    store = Store(str(tmp_path))
    _write(store, "hipt", 384, "s4096", 1.0)
    assert resolve_embedding(store, key="heads.model_id") == ("hipt", "s4096")  # one model: no choice needed
    _write(store, "uni-native224-x", 1024, "s3584", 2.0)
    with pytest.raises(InputError, match=r"2 models: hipt \(2 slides\), uni-native224-x \(2 slides\).*heads.model_id"):
        resolve_embedding(store, key="heads.model_id")
    with pytest.raises(InputError, match=r"no embeddings of heads.model_id=virchow.*'hipt'"):
        resolve_embedding(store, "virchow", key="heads.model_id")


def test_fragment_writes_put_the_mean_in_the_tables_column(tmp_path):
    store = Store(str(tmp_path))
    _write(store, "hipt", 384, "s4096", 1.0)
    schema = store.prepare_regions(pa.schema(list(REGIONS_SCHEMA) + embedding_fields(192, 96, "mean256_96")))
    batch = pa.table(
        {
            "slide_id": ["c"],
            "region_index": pa.array([0], pa.int32()),
            "spec_hash": ["s"],
            "error": [""],
            "emb4k": pa.array([np.zeros(192, np.float32)], pa.list_(pa.float32(), 192)),
            "mean256": pa.array([np.ones(96, np.float32)], pa.list_(pa.float32(), 96)),
        }
    )
    meta = write_region_fragments(
        batch, uri=store.uri(REGIONS), schema=schema, model_id="v2", columns={"mean256": "mean256_96"}
    )
    assert meta["error"].to_pylist() == [""]
    frags = [lance.FragmentMetadata.from_json(j) for j in meta["fragment_json"].to_pylist() if j]
    store._commit_fragments(frags)
    row = store.read(REGIONS, filter="model_id = 'v2'", columns=["mean256", "mean256_96"]).to_pylist()[0]
    assert row["mean256"] is None and row["mean256_96"] == [1.0] * 96


@pytest.mark.parametrize(
    ("cells", "w", "h", "expected"),
    [(256, 4096, 4096, (16, 16)), (256, 3584, 3584, (16, 16)), (128, 3584, 1792, (8, 16)), (6, 672, 448, (2, 3))],
)
def test_token_grid_shape_follows_from_the_token_count(cells, w, h, expected):
    assert grid_shape(cells, w, h) == expected
