"""`hipt-ray embed` end to end on a local Ray with moto S3: failures quarantined, resume after a
SIGKILL of the driver, embeddings equal to the in-process model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from hipt_ray.cli import main
from hipt_ray.config import load_config
from hipt_ray.embed.job import build_model
from hipt_ray.models import normalize_uint8
from hipt_ray.slides import synthetic
from hipt_ray.slides.reader import Slide
from hipt_ray.store import REGIONS, SLIDES, Store, read_embeddings

from ..conftest import TINY

pytestmark = pytest.mark.ray


def _latest(out: str, model_id: str) -> dict[str, dict]:
    return {r["slide_id"]: r for r in Store(out).latest_slides(model_id=model_id).to_pylist()}


def test_embed_from_s3_with_failures(ray_local, slide_set, s3fs_client, tmp_path, capsys):
    bucket = "embed-bkt"
    s3fs_client.mkdir(bucket)
    for name in ("good", "forty", "small", "blank", "notaslide"):
        s3fs_client.put(str(slide_set[name]), f"{bucket}/slides/{slide_set[name].name}")
    # Two slides that tile cleanly and then break before embedding: one whose tiles stop
    # decoding (re-uploaded damaged), one whose object vanishes.
    for name in ("breaks", "vanishes"):
        synthetic.make_slide(tmp_path / f"{name}.tiff", width_um=2500, height_um=2100, seed=30)
        s3fs_client.put(str(tmp_path / f"{name}.tiff"), f"{bucket}/slides/{name}.tiff")
    out = f"s3://{bucket}/out"
    args = [
        "--slides",
        f"s3://{bucket}/slides/",
        "--out",
        out,
        "--config",
        TINY,
        f"storage.cache_dir={tmp_path / 'cache'}",
    ]
    assert main(["tile", *args]) == 3  # notaslide
    tiled = {r["slide_id"]: r for r in Store(out).latest_slides(model_id="").to_pylist()}
    assert tiled["breaks"]["status"] == tiled["vanishes"]["status"] == "ok"
    synthetic.corrupt_tiles(tmp_path / "breaks.tiff")
    s3fs_client.put(str(tmp_path / "breaks.tiff"), f"{bucket}/slides/breaks.tiff")
    s3fs_client.rm(f"{bucket}/slides/vanishes.tiff")
    # the manifest keeps listing the vanished slide, as a stale manifest would
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "uri\n"
        + "".join(
            f"s3://{bucket}/slides/{n}\n"
            for n in [
                "good.tiff",
                "forty.svs",
                "small.tiff",
                "blank.tiff",
                "notaslide.svs",
                "breaks.tiff",
                "vanishes.tiff",
            ]
        )
    )
    args[1] = str(manifest)
    capsys.readouterr()
    code = main(["embed", *args])
    printed = capsys.readouterr().out
    assert code == 3, printed
    assert "3 embedded, 3 failed, 1 no tissue" in printed
    store = Store(out)
    mid = (
        store.latest_slides(model_id=None)
        .filter(pc.starts_with(store.latest_slides(model_id=None)["model_id"], "random-"))["model_id"][0]
        .as_py()
    )
    status = _latest(out, mid)
    assert {k: v["status"] for k, v in status.items()} == {
        "good": "ok",
        "forty": "ok",
        "small": "ok",
        "blank": "no_tissue",
        "notaslide": "failed",
        "breaks": "failed",
        "vanishes": "failed",
    }
    assert "failed to decode" in status["breaks"]["error"]
    assert "no such file" in status["vanishes"]["error"] and "vanishes.tiff" in status["vanishes"]["error"]
    emb = read_embeddings(out)
    for sid in ("good", "forty", "small"):  # one embedded row per tiled region
        assert len(emb[sid]["emb4k"]) == tiled[sid]["n_regions"] == status[sid]["n_regions"]
    assert set(emb) == {"good", "forty", "small"}
    regions = store.read(REGIONS, filter=f"model_id = '{mid}'")
    assert regions.schema.field("emb4k").type.list_size == 32
    tokens = regions["tokens256"].to_pylist()
    assert all(
        len(t) == (r // 256) * (c // 256) * 48
        for t, r, c in zip(tokens, regions["read_h"].to_pylist(), regions["read_w"].to_pylist())
    )

    # rerun: nothing new is embedded, failed slides are retried and still fail
    code = main(["embed", *args])
    assert code == 3 and "4 already done" in capsys.readouterr().out  # 3 ok + 1 no tissue
    assert store.read(REGIONS, filter=f"model_id = '{mid}'").num_rows == regions.num_rows


def test_embeddings_equal_the_in_process_model(ray_local, slide_set, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(slide_set["forty"], src / "forty.svs")
    out = str(tmp_path / "out")
    assert (
        main(["embed", "--slides", str(src), "--out", out, "--config", TINY, f"storage.cache_dir={tmp_path / 'c'}"])
        == 0
    )
    capsys.readouterr()
    assert Store(out).latest_slides(model_id="")["backend"].to_pylist() == ["tiles"]  # compared with OpenSlide below
    cfg = load_config("embed", files=[TINY], values={"slides": str(src), "out": out})
    model, mid = build_model(cfg)
    rows = Store(out).regions(cfg.tiling_spec_hash(), model_id=mid).to_pylist()
    assert rows
    with Slide(str(slide_set["forty"])) as slide, torch.no_grad():
        for r in rows:
            rgb, _ = slide.read_region((r["x"], r["y"]), (r["read_w"], r["read_h"]), 0.5)
            feats = model.forward_features(normalize_uint8(torch.from_numpy(rgb)[None]))
            assert np.allclose(r["emb4k"], feats["emb4k"][0].numpy(), atol=1e-5)
            assert np.allclose(r["mean256"], feats["mean256"][0].numpy(), atol=1e-5)
            assert np.allclose(
                np.asarray(r["tokens256"], np.float32), feats["tokens256"][0].half().float().numpy().ravel(), atol=1e-3
            )


def test_compressed_tiles_cross_to_the_model_and_embed_as_pixels_do(ray_local, slide_set, tmp_path, capsys):
    """embed.decode=auto sends tile-backend regions as their compressed tiles (≤ 1.2× their
    bytes) and decodes them in the model actor: the same embeddings as the pixel route; a slide
    read through OpenSlide in the same run still moves pixels (mixed rows in one pipeline)."""
    import re

    import tifffile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("good", "forty"):
        os.symlink(slide_set[name], src / slide_set[name].name)
    rgb, _ = synthetic.render(2048, 1024, mpp=0.5, seed=12)  # grey: only OpenSlide reads it
    gray = (rgb.mean(axis=2)).astype(np.uint8)
    tifffile.imwrite(src / "gray.tiff", gray, tile=(256, 256), compression="jpeg", photometric="minisblack")
    common = ["--config", TINY, f"storage.cache_dir={tmp_path / 'c'}", "tiling.mpp_overrides={gray: 0.5}"]
    embedded, lines = {}, {}
    for route in ("reader", "auto"):
        out = str(tmp_path / route)
        assert main(["embed", "--slides", str(src), "--out", out, *common, f"embed.decode={route}"]) == 0
        lines[route] = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("transfer:"))
        cfg = load_config("embed", files=[TINY], values={"slides": str(src), "out": out})
        rows = Store(out).regions(cfg.tiling_spec_hash(), model_id=build_model(cfg)[1]).to_pylist()
        embedded[route] = {(r["slide_id"], r["region_index"]): r for r in rows}
    print(lines)
    assert embedded["auto"].keys() == embedded["reader"].keys() and len(embedded["auto"]) > 3
    assert {k[0] for k in embedded["auto"]} == {"good", "forty", "gray"}
    for key, r in embedded["auto"].items():
        assert np.allclose(r["emb4k"], embedded["reader"][key]["emb4k"], atol=1e-6), key
        assert np.allclose(r["tokens256"], embedded["reader"][key]["tokens256"], atol=1e-3), key
    n_gray = sum(k[0] == "gray" for k in embedded["auto"])
    ratio = float(re.search(r"region through the object store, ([\d.]+)× its compressed tiles", lines["auto"])[1])
    assert ratio <= 1.2, lines["auto"]
    assert f"{n_gray} of {len(embedded['auto'])} regions moved as pixels" in lines["auto"]
    assert f"decoded: cpu {len(embedded['auto']) - n_gray}, reader {n_gray}" in lines["auto"]
    assert "compressed tiles" not in lines["reader"] and "decoded: reader" in lines["reader"]
    per_region = [float(re.search(r"transfer: ([\d.]+) MB", lines[k])[1]) for k in ("reader", "auto")]
    assert per_region[0] > 3 * per_region[1], per_region


def test_resume_after_sigkill_of_the_driver(ray_local, tmp_path):
    import ray

    src = tmp_path / "slides"
    src.mkdir()
    n_slides = 10  # 6 finished between two polls on a fast Zen 5 (all committed before the kill)
    for i in range(n_slides):
        synthetic.make_slide(src / f"s{i}.tiff", width_um=2500, height_um=2100, seed=40 + i)
    out = str(tmp_path / "out")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [
        sys.executable,
        "-m",
        "hipt_ray.cli",
        "embed",
        "--slides",
        str(src),
        "--out",
        out,
        "--config",
        TINY,
        "ray.write_batch_slides=1",
        "embed.write_regions=2",
        "embed.regions_per_task=1",
        f"storage.cache_dir={tmp_path / 'c'}",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    store = Store(out)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once at least one slide is committed, before all are
        try:
            latest = store.latest_slides(model_id=None)
            n = latest.filter(pc.starts_with(latest["model_id"], "random-")).num_rows
        except Exception:
            n = 0
        if n >= 1:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1 <= n < n_slides, "the kill should land mid-run"
    tiled = {r["slide_id"]: r["n_regions"] for r in store.latest_slides(model_id="").to_pylist()}
    time.sleep(2)  # let Ray notice the dead driver and release its actors
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=400).returncode == 0
    mid = [m for m in store.read(SLIDES)["model_id"].to_pylist() if m.startswith("random-")][0]
    regions = store.read(REGIONS, filter=f"model_id = '{mid}'")
    keys = list(zip(regions["slide_id"].to_pylist(), regions["region_index"].to_pylist()))
    assert len(keys) == len(set(keys)) == sum(tiled.values())  # none duplicated, none missing
    assert {r["slide_id"]: r["status"] for r in store.latest_slides(model_id=mid).to_pylist()} == {
        f"s{i}": "ok" for i in range(n_slides)
    }
    # the fragments the killed run wrote but never committed are gone: every file is in a version
    ds = store.dataset(REGIONS)
    referenced = {
        f.path
        for v in ds.versions()
        for frag in ds.checkout_version(v["version"]).get_fragments()
        for f in frag.data_files()
    }
    assert set(os.listdir(Path(out) / REGIONS / "data")) == referenced


def test_a_slide_whose_mpp_is_only_an_override_is_searchable(ray_local, slide_set, tmp_path, capsys):
    """The MPP a slide was tiled with is what every later reader opens it with (search here
    runs without the override it was tiled with)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("nompp", "small"):
        (src / slide_set[name].name).write_bytes(slide_set[name].read_bytes())
    out = str(tmp_path / "out")
    common = ["--out", out, "--config", TINY, f"storage.cache_dir={tmp_path / 'cache'}"]
    assert main(["embed", "--slides", str(src), *common, "tiling.mpp_overrides={nompp: 0.5}"]) == 0
    row = (
        Store(out)
        .latest_slides(model_id="")
        .filter(pc.equal(Store(out).latest_slides(model_id="")["slide_id"], "nompp"))
    )
    assert row["mpp_source"][0].as_py() == "override" and row["backend"][0].as_py() == "tiles"
    capsys.readouterr()
    assert main(["search", "--slide", "nompp", "--region", "10,10", "-k", "2", *common]) == 0
    assert (tmp_path / "out" / "search" / "nompp_0_0_mosaic.png").is_file()
