"""Planning, resuming and reading at 1,000 and 10,000 slides, with synthetic tables.

    .venv/bin/python bench/tables.py [--slides 1000,10000] [--regions-per-slide 40]

No slide is read: a manifest of N entries points at N one-byte files (the plan stats files only
to see whether a finished one changed), and the tables are filled as a real run would leave
them: N tiling status rows and N embedding status rows committed in batches of 32 slides, with
``regions-per-slide`` coordinate rows and embedded rows (emb4k of the real ViT-4K: 192 floats;
tokens left out) per slide, the embedded ones as one fragment per slide (what the workers
write). For each N it prints, in seconds (median of 3):
  list        list_slides over the manifest;
  resume      what `tile` and `embed` do before their first task: the finished slides, the
              changed-file check of every one (16 threads), and the embed plan (the region
              coordinates of every slide still to embed, here all of them);
  read emb4k  the whole emb4k column as `train-head` reads it (read_embeddings), before and after
              Store.tidy, with the fragments and versions each time.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hipt_ray.store import REGIONS, REGIONS_SCHEMA, SLIDES, SLIDES_SCHEMA, Store, embedding_fields  # noqa: E402

WORK = Path(tempfile.gettempdir()) / "hipt-ray-bench-tables"
SPEC, MID, DIM = "specbench", "modelbench", 192


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def build(n: int, per_slide: int) -> tuple[Path, Path]:
    from lance.fragment import FragmentMetadata

    from hipt_ray.storage import stat
    from hipt_ray.store.fragments import write_region_fragments

    d = WORK / f"n{n}"
    shutil.rmtree(d, ignore_errors=True)
    (d / "slides").mkdir(parents=True)
    uris = []
    for i in range(n):
        p = d / "slides" / f"s{i:05d}.tiff"
        p.write_bytes(b"x")
        uris.append(str(p))
    (d / "manifest.csv").write_text("uri\n" + "\n".join(uris) + "\n")
    store = Store(str(d / "out"))
    schema = store.prepare_regions(pa.schema(list(REGIONS_SCHEMA) + embedding_fields(DIM, 384)))
    rng = np.random.default_rng(0)
    for start in range(0, n, 32):
        ids = range(start, min(n, start + 32))
        coords, status = [], []
        for i in ids:
            sid, uri = f"s{i:05d}", uris[i]
            info = stat(uri)
            for r in range(per_slide):
                coords.append(
                    {
                        "slide_id": sid,
                        "region_index": r,
                        "x": r * 8192,
                        "y": 0,
                        "level": 0,
                        "level0_w": 4096,
                        "level0_h": 4096,
                        "read_w": 4096,
                        "read_h": 4096,
                        "valid_w": 4096,
                        "valid_h": 4096,
                        "mpp": 0.5,
                        "read_mpp": 0.5,
                        "mpp_source": "metadata",
                        "tissue_fraction": 0.9,
                        "spec_hash": SPEC,
                        "model_id": "",
                        "slide_version": f"{info.size}:{info.version}",
                    }
                )
            base = {f.name: None for f in SLIDES_SCHEMA} | {
                "slide_id": sid,
                "uri": uri,
                "size": info.size,
                "etag": info.version,
                "status": "ok",
                "error": "",
                "n_regions": per_slide,
                "spec_hash": SPEC,
                "mpp": 0.5,
                "backend": "tiles",
                "time": datetime.now(UTC),
            }
            status.append(base | {"model_id": ""})
        store.append_slides(status, coords)
        emb = pa.Table.from_pylist(coords).drop_columns(["model_id"])
        emb = emb.append_column(
            "emb4k", pa.FixedSizeListArray.from_arrays(rng.standard_normal(emb.num_rows * DIM).astype(np.float32), DIM)
        )
        emb = emb.append_column(
            "mean256", pa.FixedSizeListArray.from_arrays(np.zeros(emb.num_rows * 384, np.float32), 384)
        )
        emb = emb.append_column("error", pa.array([""] * emb.num_rows))
        meta = write_region_fragments(emb, uri=store.uri(REGIONS), schema=schema, model_id=MID)
        frags = [FragmentMetadata.from_json(j) for j in meta["fragment_json"].to_pylist() if j]
        store.append_slides([r | {"model_id": MID, "time": datetime.now(UTC)} for r in status], fragments=frags)
    return d, d / "manifest.csv"


def shape(store: Store) -> str:
    return ", ".join(
        f"{t} {len(ds.get_fragments())} fragments / {len(ds.versions())} versions"
        for t in (REGIONS, SLIDES)
        if (ds := store.dataset(t)) is not None
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", default="1000,10000")
    ap.add_argument("--regions-per-slide", type=int, default=40)
    args = ap.parse_args()
    import os
    import subprocess

    from hipt_ray.slides.manifest import list_slides
    from hipt_ray.store import read_embeddings
    from hipt_ray.store.run import file_versions
    from hipt_ray.store.tables import row_version

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    print(
        f"# bench/tables.py  cpu: {name}, {os.cpu_count()} cores  load: {os.getloadavg()[0]:.2f}  "
        f"regions per slide: {args.regions_per_slide}"
    )
    for n in (int(s) for s in args.slides.split(",")):
        t0 = time.perf_counter()
        d, manifest = build(n, args.regions_per_slide)
        print(f"\nN = {n}: {n * args.regions_per_slide} region rows, tables built in {time.perf_counter() - t0:.0f} s")
        store = Store(str(d / "out"))
        t_list, specs = timed(lambda: list_slides(str(manifest)))
        t_done, done = timed(lambda: store.done_rows(SPEC))
        t_changed, now = timed(lambda: file_versions([s.to_ref() for s in specs if s.slide_id in done], None))
        changed = [sid for sid, v in now.items() if v != row_version(done[sid])]
        assert not changed, f"{len(changed)} reported changed"
        t_plan, coords = timed(
            lambda: store.regions(SPEC, sorted(done), model_id="", columns=["slide_id", "region_index", "x", "y"])
        )
        print(
            f"  list {t_list:.2f} s · finished slides {t_done:.2f} s · changed-file check {t_changed:.2f} s · "
            f"embed plan ({coords.num_rows} regions) {t_plan:.2f} s · "
            f"total {t_list + t_done + t_changed + t_plan:.2f} s"
        )
        for when in ("before tidy", "after tidy"):
            if when == "after tidy":
                t_tidy, _ = timed(lambda: store.tidy(keep_versions_days=0), repeat=1)
                print(f"  tidy {t_tidy:.1f} s")
            t_read, emb = timed(lambda: read_embeddings(str(d / "out"), model_id=MID, spec_hash=SPEC))
            assert len(emb) == n
            print(f"  read emb4k {when}: {t_read:.2f} s  ({shape(store)})")


if __name__ == "__main__":
    main()
