"""Similar-region search at archive scale: index build time, query latency and recall@10 of the
Lance vector index on ``regions.emb4k``, against exact search, side by side in one run.

    .venv/bin/python bench/search.py [--sizes 100000 1000000] [--queries 200] [--types IVF_PQ IVF_HNSW_SQ]
                                     [--nprobes 32 64] [--refine 5 20]

Embeddings are synthetic but clustered like real ones (a mixture of 2,000 Gaussian "tissue
patterns" in 192 dimensions with per-cluster spread), written as a regions table with the same
columns and filter the CLI uses (one model id, one tiling spec). Queries are rows of the table.
Exact neighbours come from a NumPy brute-force cosine search; Lance's own flat search (the index
bypassed) is timed too. Latencies are medians over the queries, single-threaded callers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hipt_ray.config import load_config  # noqa: E402
from hipt_ray.store import Store  # noqa: E402
from hipt_ray.store.vectors import build_index, search  # noqa: E402

DIM = 192


def make_table(path: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((2000, DIM)).astype(np.float32)
    spread = rng.uniform(0.3, 1.0, 2000).astype(np.float32)
    vecs = np.empty((n, DIM), np.float32)
    step = 200_000
    for s in range(0, n, step):
        e = min(n, s + step)
        c = rng.integers(0, 2000, e - s)
        vecs[s:e] = centers[c] + rng.standard_normal((e - s, DIM)).astype(np.float32) * spread[c, None]
        batch = pa.table(
            {
                "slide_id": pa.array([f"s{i // 40}" for i in range(s, e)]),
                "region_index": pa.array(np.arange(s, e) % 40, pa.int32()),
                "x": pa.array(np.zeros(e - s, np.int64)),
                "y": pa.array(np.zeros(e - s, np.int64)),
                "level0_w": pa.array(np.full(e - s, 4096, np.int64)),
                "level0_h": pa.array(np.full(e - s, 4096, np.int64)),
                "read_w": pa.array(np.full(e - s, 4096, np.int32)),
                "mpp": pa.array(np.full(e - s, 0.5)),
                "spec_hash": pa.array(["spec"] * (e - s)),
                "model_id": pa.array(["m"] * (e - s)),
                "emb4k": pa.FixedSizeListArray.from_arrays(pa.array(vecs[s:e].ravel()), DIM),
            }
        )
        import lance

        lance.write_dataset(batch, os.path.join(path, "regions.lance"), mode="append" if s else "create")
    return vecs


def exact_topk(vecs_unit: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    sims = vecs_unit @ (q / np.linalg.norm(q))
    top = np.argpartition(-sims, k)[:k]
    return top[np.argsort(-sims[top])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--types", nargs="+", default=["IVF_PQ", "IVF_HNSW_SQ"])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument(
        "--nprobes", type=int, nargs="+", help="query settings tried on each index (default: search.nprobes)"
    )
    ap.add_argument("--refine", type=int, nargs="+", help="refine factors tried (default: search.refine_factor)")
    args = ap.parse_args()
    base = load_config().search
    print(
        f"{'rows':>9} {'index':>12} {'build s':>8} {'query ms':>9} {'exact ms':>9} {'numpy ms':>9} "
        f"{'recall@10':>9}  settings"
    )
    for n in args.sizes:
        tmp = tempfile.mkdtemp(prefix="hipt-search-bench-")
        try:
            vecs = make_table(tmp, n)
            unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
            rng = np.random.default_rng(1)
            qidx = rng.choice(n, args.queries, replace=False)
            t = []
            truth = []
            for i in qidx:
                t0 = time.perf_counter()
                truth.append(exact_topk(unit, vecs[i], args.k))
                t.append(time.perf_counter() - t0)
            numpy_ms = statistics.median(t) * 1e3
            store = Store(tmp)
            sc0 = base.model_copy(update={"k": args.k})
            t = []
            for i in qidx[:20]:  # Lance flat search (no index): slow at 1M, 20 queries are enough
                t0 = time.perf_counter()
                search(store, vecs[i], model_id="m", spec_hash="spec", k=args.k, sc=sc0, exact=True)
                t.append(time.perf_counter() - t0)
            flat_ms = statistics.median(t) * 1e3
            for kind in args.types:
                sc = sc0.model_copy(update={"index_type": kind})
                t0 = time.perf_counter()
                build_index(store, sc)
                build_s = time.perf_counter() - t0
                parts = max(1, min(4096, round(n**0.5)))
                for nprobes in args.nprobes or [sc.nprobes]:
                    for refine in args.refine or [sc.refine_factor]:
                        q = sc.model_copy(update={"nprobes": nprobes, "refine_factor": refine})
                        lat, hits = [], 0
                        for i, gt in zip(qidx, truth):
                            t0 = time.perf_counter()
                            res = search(store, vecs[i], model_id="m", spec_hash="spec", k=args.k, sc=q)
                            lat.append(time.perf_counter() - t0)
                            ids = set(zip(res["slide_id"].to_pylist(), res["region_index"].to_pylist()))
                            hits += sum((f"s{j // 40}", j % 40) in ids for j in gt)
                        recall = hits / (args.k * len(qidx))
                        print(
                            f"{n:>9} {kind:>12} {build_s:>8.1f} {statistics.median(lat) * 1e3:>9.1f} "
                            f"{flat_ms:>9.1f} {numpy_ms:>9.1f} {recall:>9.3f}  partitions {parts}, "
                            f"nprobes {nprobes}, refine {refine}, {sc.metric}",
                            flush=True,
                        )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
