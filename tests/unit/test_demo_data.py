"""``hipt-ray make-demo-data``: labels that fit train-head's defaults, an estimate of the size up
front, a refusal of what the disk cannot hold, and progress while it writes."""

import os
import re
from collections import namedtuple

from hipt_ray.cli import main
from hipt_ray.config import HeadsConfig
from hipt_ray.slides.synthetic import plan_demo_data, write_demo_data


def test_demo_labels_fit_train_heads_defaults(tmp_path):
    from hipt_ray.heads.labels import check_labels, read_labels
    from hipt_ray.heads.tasks import task_for

    out = write_demo_data(plan_demo_data(tmp_path, n_slides=5, seed=0, size_um=(300.0, 400.0)))
    df, excluded = check_labels(read_labels(str(out / "labels.csv")), task=task_for(HeadsConfig(task="subtyping")))
    assert not excluded and set(df["label"]) <= {"subtype-0", "subtype-1"}
    assert (df["label"] == "subtype-" + df["subtype"].astype(str)).all()  # the class, named


def test_the_estimate_is_near_what_is_written(tmp_path):
    plan = plan_demo_data(tmp_path, n_slides=6, seed=0, size_um=(600.0, 900.0))
    write_demo_data(plan)
    written = sum(f.stat().st_size for f in (tmp_path / "slides").iterdir())
    assert 0.5 < written / plan.estimated_bytes() < 2.0, (written, plan.estimated_bytes())


def test_more_than_the_disk_holds_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import shutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 5 * 10**9, 5 * 10**9))
    assert main(["make-demo-data", str(tmp_path / "new" / "demo"), "--n-slides", "100000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("hipt-ray make-demo-data: --n-slides 100000 would write about 1,")
    assert f"more than the 5.0 GB free at {tmp_path}" in err[0]
    assert os.listdir(tmp_path) == []


def test_the_estimate_comes_first_then_progress(tmp_path, capsys):
    assert main(["make-demo-data", str(tmp_path / "d"), "--n-slides", "2", "--size-um", "300", "300"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert re.fullmatch(
        rf"make-demo-data: 2 slides, about \d+ kB, into {tmp_path / 'd'} \([\d.,]+ [kMG]B free there\)", err[0]
    ), err
    assert err[-1].startswith("make-demo-data: 2/2 slides")
