"""The embedded default is hermetic: with no address a command starts its own local Ray, whatever
`ray start` left on the machine — a live head of somebody else's, or the address of a dead one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from hipt_ray.store import Store

from ..conftest import VENV_BIN, copy_slides, ray_head, stop_process_group

# What the suite's `ray_local` fixture and every command without an address run.
PROBE = (
    "import ray; from hipt_ray.runtime import start_ray; start_ray(num_cpus=1); "
    "print(ray.get_runtime_context().gcs_address)"
)


def _env() -> dict:
    # Token auth on both sides, as Ray 2.60 recommends: without it a bare ray.init() cannot join the
    # foreign head and falls back to a local Ray, which would hide the bug this test is about.
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
    }
    env.pop("RAY_ADDRESS", None)
    return env


def _tile_and_probe(src, out, tmp_path) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """A command (`tile`) and the suite's own start-up, side by side (each waits mostly on Ray)."""
    procs = [
        subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd in (
            [
                str(VENV_BIN / "hipt-ray"),
                "tile",
                "--slides",
                str(src),
                "--out",
                str(out),
                f"storage.cache_dir={tmp_path / 'cache'}",
                "qc.enabled=false",
            ],
            [sys.executable, "-c", PROBE],
        )
    ]
    done = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done[0], done[1]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_commands_ignore_a_live_foreign_head_and_a_dead_one(slide_set, tmp_path):
    src = copy_slides(slide_set, ["small"], tmp_path / "slides")
    with ray_head(env=_env()) as (head, foreign, address_file):
        live, probe = _tile_and_probe(src, tmp_path / "out_live", tmp_path)
        assert probe.returncode == 0, probe.stderr[-2000:]
        own = probe.stdout.strip().splitlines()[-1]
        assert own and own != foreign  # its own Ray, not the head `ray start` left running
        assert live.returncode == 0, live.stderr[-3000:]
        assert "slides: 1 (1 ok" in live.stdout
        # The foreign cluster saw no driver but the one below that asks it (a bare ray.init() would
        # have run the tile command on it).
        ask = f"import ray; from ray._private import state; ray.init(address='{foreign}'); print(len(state.jobs()))"
        seen = subprocess.run([sys.executable, "-c", ask], env=_env(), capture_output=True, text=True, timeout=180)
        assert seen.returncode == 0 and seen.stdout.strip().splitlines()[-1] == "1", seen.stderr[-2000:]

        stop_process_group(head)
        # What a head that hung or sits on an unreachable node leaves behind: the recorded address
        # accepts connections but never answers (a bare ray.init() then retries the GCS for minutes;
        # a port that refuses outright would let Ray fall back to a local instance).
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(16)
            address_file.write_text(f"127.0.0.1:{silent.getsockname()[1]}")
            dead, probe = _tile_and_probe(src, tmp_path / "out_dead", tmp_path)
        assert dead.returncode == 0, dead.stderr[-3000:]
        assert "Failed to connect to GCS" not in dead.stderr
        assert Store(str(tmp_path / "out_dead")).latest_slides()["status"].to_pylist() == ["ok"]
        assert probe.returncode == 0 and probe.stdout.strip().splitlines()[-1] != foreign
