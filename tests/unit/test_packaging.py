"""A non-editable install carries the shipped config layers (they are package data).

Before they were, ``pip install .`` left ``configs/`` behind in the checkout and ``train-head
--task survival`` ran with the defaults (NLL, 50 epochs) instead of the survival layer (Cox, 100
epochs), without a word."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_non_editable_install_loads_the_shipped_survival_layer(tmp_path):
    # A copy of the project: the build writes build/ and *.egg-info beside the sources it builds
    src, site = tmp_path / "src", tmp_path / "site"
    shutil.copytree(ROOT / "hipt_ray", src / "hipt_ray", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=120,
        cwd=tmp_path,
    )
    probe = """
import hipt_ray.config
from hipt_ray.cli import COMMANDS, build_parser
args = build_parser().parse_args(["train-head", "--out", "o", "--labels", "l.csv", "--task", "survival"])
h = COMMANDS[args.command].config(args).heads
print(hipt_ray.config.__file__, h.survival_loss, h.epochs)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    run = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    where, loss, epochs = run.stdout.split()
    assert Path(where).is_relative_to(site)  # the installed copy, not this checkout
    assert (loss, epochs) == ("cox", "100")
