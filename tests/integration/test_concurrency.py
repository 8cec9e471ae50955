"""One writer per output (the writer lease, on disk and on moto S3) and slides whose file changed
under the same name: tiled and embedded again, their old rows retired."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from hipt_ray.cli import main
from hipt_ray.store import REGIONS, Store, read_embeddings
from hipt_ray.store.lease import LEASE, LeaseLost, OutputInUse, _ObjectLease, writer_lease

from ..conftest import TINY

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
HOLD = """import sys, time
from hipt_ray.store.lease import writer_lease
with writer_lease(sys.argv[1], "embed"):
    print("held", flush=True)
    time.sleep(300)
"""


def _hold(out: str) -> subprocess.Popen:
    """Another process holding ``out``'s writer lease, as a running `hipt-ray embed` does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, out], stdout=subprocess.PIPE, cwd=ROOT, start_new_session=True)
    assert proc.stdout.readline().strip() == b"held"
    return proc


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_writer_on_one_output_stops_with_exit_2(where, ray_local, slide_set, s3fs_client, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(slide_set["small"], src / "small.tiff")
    if where == "s3":
        s3fs_client.mkdir("lease-bkt")
        out = "s3://lease-bkt/out"
    else:
        out = str(tmp_path / "out")
    args = ["--slides", str(src), "--out", out, "--config", TINY, f"storage.cache_dir={tmp_path / 'cache'}"]
    holder = _hold(out)
    try:
        capsys.readouterr()
        assert main(["embed", *args]) == 2
        err = capsys.readouterr().err
        assert f"output {out} is being written by `hipt-ray embed`" in err and f"pid {holder.pid}" in err
        assert len(err.strip().splitlines()) == 1, err
        assert Store(out).dataset(REGIONS) is None  # refused before anything was written
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # a killed holder never blocks the next run
        holder.wait()
    assert main(["tile", *args]) == 0
    assert Store(out).completed(Store(out).latest_slides()["spec_hash"][0].as_py()).keys() == {"small"}
    if where == "s3":
        assert not s3fs_client.exists(f"lease-bkt/out/{LEASE}")  # released at the end


def test_object_lease_one_winner_expiry_and_takeover(s3fs_client):
    s3fs_client.mkdir("race-bkt")
    out = "s3://race-bkt/out"
    won, refused = [], []

    def attempt() -> None:
        lease = _ObjectLease(out, "tile", 1.0, None)
        try:
            lease.acquire()
            won.append(lease)
        except OutputInUse as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7  # a conditional create: exactly one run starts
    first = won[0]
    # The holder stalls (renewals stop) past its ttl: the next run takes the output over …
    first.stop.set()
    first.thread.join()
    time.sleep(1.3)
    second = _ObjectLease(out, "embed", 1.0, None)
    second.acquire()
    assert json.loads(s3fs_client.cat_file(f"race-bkt/out/{LEASE}"))["token"] == second.holder["token"]
    # … and the stalled run, renewing again, finds out and commits nothing more.
    first.stop.clear()
    first.thread = threading.Thread(target=first._renew, daemon=True)
    first.thread.start()
    first.thread.join(timeout=5)
    with pytest.raises(LeaseLost, match="took the output over"):
        first.check()
    second.release()
    assert not s3fs_client.exists(f"race-bkt/out/{LEASE}")


def test_a_run_whose_lease_was_taken_commits_nothing_more(s3fs_client):
    s3fs_client.mkdir("lost-bkt")
    out = "s3://lost-bkt/out"
    with writer_lease(out, "tile", ttl=1.0):
        # Someone else's lease replaces ours (what a takeover after a stall looks like).
        s3fs_client.pipe_file(f"lost-bkt/out/{LEASE}", json.dumps({"token": "other"}).encode())
        time.sleep(0.8)  # a renewal (every ttl/4) sees the ETag changed
        with pytest.raises(LeaseLost):
            Store(out).append_slides([{"slide_id": "a", "status": "ok", "spec_hash": "h", "model_id": ""}], [])
    assert Store(out).dataset("slides.lance") is None
    assert json.loads(s3fs_client.cat_file(f"lost-bkt/out/{LEASE}"))["token"] == "other"  # not deleted


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_changed_slide_is_tiled_and_embedded_again(where, ray_local, slide_set, s3fs_client, tmp_path, capsys):
    local = tmp_path / "src"
    local.mkdir()
    shutil.copy(slide_set["good"], local / "x.tiff")
    shutil.copy(slide_set["small"], local / "small.tiff")
    if where == "s3":
        s3fs_client.mkdir("changed-bkt")
        s3fs_client.put(str(local) + "/", "changed-bkt/src/", recursive=True)
        src, out = "s3://changed-bkt/src/", "s3://changed-bkt/out"
    else:
        src, out = str(local), str(tmp_path / "out")
    args = ["--slides", src, "--out", out, "--config", TINY, f"storage.cache_dir={tmp_path / 'cache'}"]
    assert main(["embed", *args]) == 0
    store = Store(out)
    first = {r["slide_id"]: r for r in store.latest_slides(model_id="").to_pylist()}
    assert first["x"]["n_regions"] > first["small"]["n_regions"]
    # The same name now holds other content (here: the small slide's).
    if where == "s3":
        s3fs_client.put(str(slide_set["small"]), "changed-bkt/src/x.tiff")
    else:
        shutil.copy(slide_set["small"], local / "x.tiff")
    capsys.readouterr()
    assert main(["embed", *args]) == 0
    printed = capsys.readouterr().out
    assert "1 embedded" in printed and "1 already done" in printed, printed
    tiled = {r["slide_id"]: r for r in store.latest_slides(model_id="").to_pylist()}
    assert tiled["x"]["size"] == tiled["small"]["size"] != first["x"]["size"]
    assert tiled["x"]["n_regions"] == tiled["small"]["n_regions"]
    emb = read_embeddings(out)
    np.testing.assert_allclose(emb["x"]["emb4k"], emb["small"]["emb4k"], atol=1e-5)  # the new pixels
    rows = store.read(REGIONS, columns=["slide_id", "model_id"], filter="slide_id = 'x'")
    n = tiled["small"]["n_regions"]
    assert pc.sum(pc.equal(rows["model_id"], "")).as_py() == n  # the old grid's rows are gone
    assert rows.num_rows == 2 * n  # n tile rows + n embedded rows
    capsys.readouterr()
    assert main(["embed", *args]) == 0
    assert "2 already done" in capsys.readouterr().out
