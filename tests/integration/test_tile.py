"""`hipt-ray tile` end to end on a local Ray: local files, moto S3, bad inputs, reruns."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest

from hipt_ray.cli import main
from hipt_ray.config import load_config
from hipt_ray.store import REGIONS, SLIDES, Store

from ..conftest import EXPECTED, copy_slides

pytestmark = pytest.mark.ray


def _statuses(out: str) -> dict[str, str]:
    latest = Store(out).latest_slides()
    return dict(zip(latest["slide_id"].to_pylist(), latest["status"].to_pylist()))


def test_tile_local_dir_with_every_bad_input(ray_local, slide_set, tmp_path, capsys):
    out = str(tmp_path / "out")
    cache = f"storage.cache_dir={tmp_path / 'cache'}"
    code = main(["tile", "--slides", str(slide_set["good"].parent), "--out", out, cache])
    printed = capsys.readouterr().out
    assert code == 3  # some slides failed; every other slide completed
    assert _statuses(out) == EXPECTED
    n_ok = sum(v == "ok" for v in EXPECTED.values())
    assert f"{n_ok} ok, 6 failed, 1 no tissue" in printed
    store = Store(out)
    slides = store.read(SLIDES)
    failed = slides.filter(pc.equal(slides["status"], "failed"))
    assert all(e and u in e for e, u in zip(failed["error"].to_pylist(), failed["uri"].to_pylist()))
    # region rows match the status rows, slide by slide
    regions = store.read(REGIONS)
    counts = dict(zip(slides["slide_id"].to_pylist(), slides["n_regions"].to_pylist()))
    for sid, n in counts.items():
        assert regions.filter(pc.equal(regions["slide_id"], sid)).num_rows == n
    assert (tmp_path / "out" / "qc" / "good.png").is_file()
    # One QC page for the run: a 320 px cell per slide, 6 to a row, problems first with reasons.
    page = tmp_path / "out" / "qc" / "overview.png"
    assert f"QC page: {page}" in printed
    from PIL import Image

    img = np.asarray(Image.open(page).convert("RGB"))
    n = len(EXPECTED)
    assert img.shape[1] == 6 * 320 and img.shape[0] == 34 + -(-n // 6) * (320 + 58)
    first_cell = img[34 : 34 + 320, :320]
    assert (np.abs(first_cell.astype(int) - [200, 30, 30]).sum(-1) < 30).any()  # a failed slide's red text/frame

    # A rerun skips what is done, retries what failed, and duplicates nothing.
    code = main(["tile", "--slides", str(slide_set["good"].parent), "--out", out, cache])
    assert code == 3 and "5 already done" in capsys.readouterr().out
    assert store.read(REGIONS).num_rows == regions.num_rows

    # Fixing a slide's MPP in the config lets it through on the next run.
    code = main(
        [
            "tile",
            "--slides",
            str(slide_set["good"].parent),
            "--out",
            out,
            cache,
            "tiling.mpp_overrides={nompp: 0.5, absurd: 0.5}",
        ]
    )
    capsys.readouterr()
    assert _statuses(out)["nompp"] == "ok" and _statuses(out)["absurd"] == "ok"


def test_rerun_after_a_kill_between_commits(ray_local, slide_set, tmp_path, capsys):
    src = copy_slides(slide_set, ["good", "small"], tmp_path / "src")
    out = str(tmp_path / "out")
    assert main(["tile", "--slides", str(src), "--out", out]) == 0
    store = Store(out)
    spec = load_config("tile").tiling_spec_hash()
    full = store.regions(spec)
    # Simulate a driver killed after committing "good"'s regions but before its status row.
    store._append(REGIONS, store.read(REGIONS, filter="slide_id = 'good'"))
    store.dataset(SLIDES).delete("slide_id = 'good'")
    assert set(store.regions(spec)["slide_id"].to_pylist()) == {"small"}  # half-written is invisible
    assert main(["tile", "--slides", str(src), "--out", out]) == 0
    again = store.regions(spec)
    assert again.num_rows == full.num_rows  # exactly one row per region
    assert again.select(["slide_id", "region_index", "x", "y"]).equals(
        full.select(["slide_id", "region_index", "x", "y"])
    )
    capsys.readouterr()


def test_two_files_with_one_stem_fail_alone(ray_local, slide_set, tmp_path, capsys):
    src = copy_slides(slide_set, ["small", "objective"], tmp_path / "src")
    (src / "objective.svs").rename(src / "small.svs")  # small.tiff and small.svs: one slide id
    copy_slides(slide_set, ["good"], src)
    out = str(tmp_path / "out")
    code = main(["tile", "--slides", str(src), "--out", out, f"storage.cache_dir={tmp_path / 'cache'}"])
    printed = capsys.readouterr().out
    assert code == 3 and "slides: 3 (1 ok, 2 failed" in printed, printed
    rows = Store(out).read(SLIDES).to_pylist()
    failed = [r for r in rows if r["status"] == "failed"]
    assert sorted(r["uri"] for r in failed) == [str(src / "small.svs"), str(src / "small.tiff")]
    assert all("slide id 'small' is shared by 2 files" in r["error"] for r in failed)
    assert _statuses(out)["good"] == "ok"


def test_tile_from_s3_to_s3(ray_local, slide_set, s3fs_client, tmp_path, capsys):
    s3fs_client.mkdir("tile-bkt")
    for name in ("good", "forty", "small", "corrupt"):
        s3fs_client.put(str(slide_set[name]), f"tile-bkt/slides/{slide_set[name].name}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "uri\ns3://tile-bkt/slides/good.tiff\ns3://tile-bkt/slides/forty.svs\n"
        "s3://tile-bkt/slides/gone.svs\ns3://no-such-bucket/x.svs\n"
    )
    cache = f"storage.cache_dir={tmp_path / 'cache'}"
    # A prefix listing works too.
    code = main(["tile", "--slides", "s3://tile-bkt/slides/", "--out", "s3://tile-bkt/out", cache])
    assert code == 3
    st = _statuses("s3://tile-bkt/out")
    assert st == {"good": "ok", "forty": "ok", "small": "ok", "corrupt": "failed"}
    assert s3fs_client.exists("tile-bkt/out/qc/forty.png")
    assert s3fs_client.exists("tile-bkt/out/qc/overview.png")
    regions = Store("s3://tile-bkt/out").read(REGIONS)
    forty = regions.filter(pc.equal(regions["slide_id"], "forty"))
    # 40× slide: every region covers twice its pixel size in level-0 pixels (8192 for a full one)
    assert forty["level0_w"].to_pylist() == [2 * w for w in forty["read_w"].to_pylist()]
    assert 8192 in forty["level0_w"].to_pylist()

    code = main(["tile", "--slides", str(manifest), "--out", str(tmp_path / "o2"), cache])
    assert code == 3
    latest = Store(str(tmp_path / "o2")).latest_slides()
    errors = dict(zip(latest["slide_id"].to_pylist(), latest["error"].to_pylist()))
    assert "no such file or object" in errors["gone"] and "s3://tile-bkt/slides/gone.svs" in errors["gone"]
    assert "bucket does not exist" in errors["x"]
    assert _statuses(str(tmp_path / "o2"))["good"] == "ok"
    capsys.readouterr()


def test_wrong_credentials_fail_each_slide_with_a_reason(ray_local, s3_auth_endpoint, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\ns3://locked/a.svs\ns3://locked/b.svs\n")
    code = main(
        [
            "tile",
            "--slides",
            str(manifest),
            "--out",
            str(tmp_path / "o"),
            f"storage.s3_endpoint_url={s3_auth_endpoint}",
            f"storage.cache_dir={tmp_path / 'c'}",
        ]
    )
    assert code == 3
    latest = Store(str(tmp_path / "o")).latest_slides()
    assert latest.num_rows == 2
    for err in latest["error"].to_pylist():
        assert "access denied" in err and "AWS_ACCESS_KEY_ID" in err
    capsys.readouterr()


def test_unlistable_source_is_exit_2(ray_local, tmp_path, capsys):
    assert main(["tile", "--slides", "s3://no-such-bucket-xyz/", "--out", str(tmp_path / "o")]) == 2
    assert "no-such-bucket-xyz" in capsys.readouterr().err
