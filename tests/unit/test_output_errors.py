"""A read-only or full output folder is one line naming the path and the cause, exit code 1.

Root ignores permission bits, so the refusals are injected where the writes happen: the
``OSError`` a full or read-only disk raises, and Lance's ``LanceError(IO) … (os error 28)``."""

import errno

import pytest

from hipt_ray.cli import main
from hipt_ray.storage import disk_write_error, output_error, spill_disk_error

LANCE_FULL = (
    "LanceError(IO): Generic LocalFileSystem error: Unable to copy data to file: No space left on device "
    "(os error 28), /rust/lance-io/src/object_writer.rs:201:25"
)


def test_disk_refusals_are_one_line_naming_the_path_the_cause_and_the_fix():
    ro = output_error("/data/out", OSError(errno.EROFS, "Read-only file system", "/data/out/slides.lance/x"))
    assert str(ro) == (
        "output /data/out: the file system is read-only (writing /data/out/slides.lance/x); "
        "choose a writable --out; nothing committed is lost: rerun to resume"
    )
    assert not ro.config
    full = output_error("/data/out", ValueError(LANCE_FULL))
    assert str(full) == (
        "output /data/out: no space left on the device; free some space (or choose another --out); "
        "nothing committed is lost: rerun to resume"
    )
    assert "\n" not in str(full) and "LanceError" not in str(full)
    # found through a chain (a Ray task's error wrapping the disk's), and only for the disk's refusals
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as outer:
        assert "no space left" in str(disk_write_error("/o", outer))
    assert disk_write_error("/o", OSError(errno.ENOENT, "No such file")) is None
    assert disk_write_error("/o", ValueError("shapes do not match")) is None


def test_a_read_only_output_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    import hipt_ray.runtime
    import hipt_ray.storage

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out" / ".hipt-ray-probe-x"))

    def no_ray(**kwargs):
        raise AssertionError("Ray was started for an output that cannot be written")

    monkeypatch.setattr(hipt_ray.storage.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(hipt_ray.runtime, "start_ray", no_ray)
    assert main(["tile", "--slides", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith(f"hipt-ray tile: output {tmp_path / 'out'}: the file system is read-only")


@pytest.mark.parametrize(
    "raised, cause",
    [
        (ValueError(LANCE_FULL), "no space left on the device"),
        (OSError(errno.ENOSPC, "No space left on device", "/o/qc/overview.png"), "no space left on the device"),
        (OSError(errno.EROFS, "Read-only file system", "/o/heads/run/heads.pt"), "the file system is read-only"),
    ],
)
def test_a_full_or_read_only_disk_met_mid_run_is_one_line_exit_1(raised, cause, tmp_path, monkeypatch, capsys):
    import hipt_ray.heads.run as heads_run

    def write(cfg, run_name=None):
        raise raised

    monkeypatch.setattr(heads_run, "train_head", write)
    assert main(["train-head", "--out", str(tmp_path), "--labels", "l.csv"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and "LanceError" not in err[0], err
    assert err[0].startswith(f"hipt-ray train-head: output {tmp_path}: {cause}") and "rerun to resume" in err[0]


def test_a_full_disk_while_writing_demo_data_is_one_line(tmp_path, monkeypatch, capsys):
    from hipt_ray.slides import synthetic

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(synthetic, "write_slide", full)
    assert main(["make-demo-data", str(tmp_path / "demo"), "--n-slides", "2", "--size-um", "300", "300"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err  # the estimate, then one line for the full disk
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"hipt-ray make-demo-data: output {tmp_path / 'demo'}: no space left on the device (writing ")
    ), err


def test_one_rule_for_the_local_folder_of_an_output(tmp_path, monkeypatch):
    """Head runs, search results and the MLflow store: under a local --out, else in the current
    directory (an s3:// output holds tables only); made if missing, one line if it cannot be."""
    from hipt_ray.config import load_config
    from hipt_ray.storage import OutputStoreError, local_output_dir
    from hipt_ray.tracking import tracking_uri

    monkeypatch.chdir(tmp_path)
    assert local_output_dir(str(tmp_path / "o"), "heads", "r1") == str(tmp_path / "o" / "heads" / "r1")
    assert (tmp_path / "o" / "heads" / "r1").is_dir()
    assert local_output_dir("s3://bucket/o", "search") == str(tmp_path / "search")
    assert local_output_dir(None) == str(tmp_path)
    assert tracking_uri(load_config(values={"out": f"file://{tmp_path}/t"})) == f"sqlite:///{tmp_path}/t/mlflow.db"

    def read_only(path, exist_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr("hipt_ray.storage.os.makedirs", read_only)
    with pytest.raises(OutputStoreError, match=r"^output .*/o/heads/r2: the file system is read-only"):
        local_output_dir(str(tmp_path / "o"), "heads", "r2")


def test_ray_out_of_disk_is_one_line_naming_the_node_and_the_fixes(monkeypatch, tmp_path, capsys):
    """Ray Data raises a read task's ``RayTaskError(OutOfDiskError)`` from a ``SystemException``;
    the CLI turns it into one line naming the node, the limit and three fixes (exit 1)."""
    from ray.exceptions import OutOfDiskError, RayTaskError

    import hipt_ray.cli

    task = RayTaskError("Map(read_region)", "Traceback …", OutOfDiskError(), pid=1, ip="192.0.2.2")
    err = task.as_instanceof_cause()
    line = spill_disk_error(err)
    assert line is not None and line.startswith("Ray ran out of room on node 192.0.2.2:")
    assert "--object-spilling-directory" in line and "RAY_local_fs_capacity_threshold" in line
    assert spill_disk_error(ValueError("local disk")) is None

    class Command:
        def run(self, args, cfg):
            try:
                raise err
            except Exception as exc:
                raise RuntimeError("execution failed") from exc

    monkeypatch.setitem(hipt_ray.cli.COMMANDS, "tile", Command())
    monkeypatch.setattr(hipt_ray.cli, "_run", lambda command, args: command.run(args, None))
    assert main(["tile", "--slides", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    printed = capsys.readouterr().err.strip().splitlines()
    assert printed == [f"hipt-ray tile: {line}"]


def test_bucket_endpoints_route_a_bucket_over_every_other_endpoint(monkeypatch):
    from hipt_ray import storage
    from hipt_ray.config import load_config

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.delenv(storage.BUCKET_ENDPOINTS_ENV, raising=False)  # what the test sets is undone after it
    cfg = load_config(overrides=["storage.bucket_endpoints={idc-open-data: aws, far: 'http://10.0.0.5:9000'}"])
    storage.set_bucket_endpoints(cfg.storage.bucket_endpoints)

    def endpoint(uri: str, given: str | None = None) -> str | None:
        return storage.storage_options(uri, given).get("client_kwargs", {}).get("endpoint_url")

    assert endpoint("s3://idc-open-data/x/y.dcm", "http://minio:9000") == "https://s3.amazonaws.com"
    assert endpoint("s3://far/a.svs") == "http://10.0.0.5:9000"
    assert endpoint("s3://mine/out", "http://minio:9000") == endpoint("s3://mine/out") == "http://minio:9000"
    assert storage.storage_options("/local/path") == {}
    for bad, why in (("{far: 'minio:9000'}", "is not an endpoint"), ("{'s3://far': aws}", "is not a bucket name")):
        with pytest.raises(Exception, match=why):
            load_config(overrides=[f"storage.bucket_endpoints={bad}"])
