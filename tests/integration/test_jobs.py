"""Cluster config validation, `jobs/*.py --help`, and `ray job submit` against a local Ray head."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hipt_ray.store import Store, read_embeddings

from ..conftest import ROOT, VENV_BIN, copy_slides, free_port, ray_head, stop_process_group


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    types = raw["available_node_types"]
    assert raw["head_node_type"] == "head" and {"cpu", "gpu"} <= set(types)
    assert any("requirements.txt" in c for c in raw["setup_commands"])
    from jsonschema.exceptions import ValidationError

    bad = {**raw, "max_workers": "many"}
    with pytest.raises(ValidationError):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.py")))
def test_job_help_exits_0(job):
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / job), "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "usage" in out.stdout


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_ray_job_submit_tile_and_embed(slide_set, tmp_path):
    src = copy_slides(slide_set, ["good", "small", "blank"], tmp_path / "slides")
    out = tmp_path / "out"
    dash, agent = free_port(), free_port()
    # Token auth is on by default in Ray 2.60; the CLI clients only send the token in "token" mode.
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = (
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent}",
    )
    # Two nodes, as cluster.yaml places work: the model actor where `model` is (the head here),
    # region reads on a worker node that joined with a `decode` resource.
    with ray_head(
        num_cpus=2, temp_dir=Path("/tmp") / f"rayjob{dash}", env=env, extra=(*dashboard, '--resources={"model": 1}')
    ) as (_, gcs, _f):
        worker = subprocess.Popen(
            [
                str(VENV_BIN / "ray"),
                "start",
                f"--address={gcs}",
                "--num-cpus=1",
                '--resources={"decode": 1}',
                # its own session folder, as on a machine of its own (nodes sharing one unpack the
                # job's working_dir over each other)
                f"--temp-dir=/tmp/rayjobw{dash}",
                "--block",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            _submit_tile_and_embed(src, out, tmp_path, env, dash)
        finally:
            stop_process_group(worker)


def _submit_tile_and_embed(src: Path, out: Path, tmp_path: Path, env: dict, dash: int) -> None:
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        probe = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True, text=True
        )
        if probe.returncode == 0:
            break
        time.sleep(2)
    else:
        pytest.fail("local Ray head did not come up")
    # Two jobs at once on the cluster (separate outputs: each holds its output's writer lease):
    # tile alone, and embed (which tiles first).
    tile_out = tmp_path / "tile_out"
    tile_job = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(ROOT),
            "--",
            "python",
            "jobs/tile.py",
            "--slides",
            str(src),
            "--out",
            str(tile_out),
            f"storage.cache_dir={tmp_path / 'cache_tile'}",
            "storage.shared_output=true",  # both nodes of this test cluster mount this disk
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        job = subprocess.run(
            [
                str(VENV_BIN / "ray"),
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                str(ROOT),
                "--",
                "python",
                "jobs/embed.py",
                "--slides",
                str(src),
                "--out",
                str(out),
                "--config",
                "tiny",
                "embed.read_resources={decode: 1}",
                "embed.actor_resources={model: 1}",
                "storage.shared_output=true",
                f"storage.cache_dir={tmp_path / 'cache'}",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        tile_printed, _ = tile_job.communicate(timeout=300)
    finally:
        if tile_job.poll() is None:
            tile_job.kill()
    assert tile_job.returncode == 0, tile_printed[-3000:]
    assert "succeeded" in tile_printed.lower() and "slides: 3 (2 ok, 0 failed, 1 no tissue" in tile_printed
    assert sorted(Store(str(tile_out)).latest_slides()["status"].to_pylist()) == ["no_tissue", "ok", "ok"]
    assert (tile_out / "qc" / "good.png").is_file()
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "slides: 3 (2 embedded, 0 failed, 1 no tissue, 0 already done)" in job.stdout
    assert "succeeded" in (job.stdout + job.stderr).lower()  # the job status SUCCEEDED
    # The job's log is a pipe, not a terminal: each stage's progress as plain lines, then the
    # summary; Ray Data's execution plans and progress records stay in the session's log folder.
    assert re.search(r"^embed: (\d+)/\1 regions", job.stdout, re.M), job.stdout
    for chatter in ("Execution plan", "Starting execution", "Progress bars disabled"):
        assert chatter not in job.stdout + job.stderr, job.stdout
    assert len(job.stdout.splitlines()) < 60, job.stdout
    line = next(ln for ln in job.stdout.splitlines() if "pipeline:" in ln)
    placed = dict(re.findall(r"(read|model) on ([^;]+)", line))
    assert placed["read"].count("×") == placed["model"].count("×") == 1, line  # one node each
    assert placed["read"].split("×")[0] != placed["model"].split("×")[0], line  # not the same one
    # where a region's time went, measured by the workers and carried back with the metadata
    stages = re.search(
        r"^stages: read (\S+) s and model (\S+) s a region; "
        r"1 model actor busy (\d+) % of the pipeline$",
        job.stdout,
        re.M,
    )
    assert stages and float(stages[1]) > 0 and float(stages[2]) > 0 and 0 < int(stages[3]) <= 100, job.stdout
    emb = read_embeddings(str(out))
    assert set(emb) == {"good", "small"} and emb["small"]["emb4k"].shape == (1, 32)
