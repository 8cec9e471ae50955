from pathlib import Path

import pytest
import yaml

from hipt_ray.cli import main
from hipt_ray.config import CONFIG_DIR, Config, ConfigError, load_config, parse_override


def test_every_shipped_config_validates():
    files = sorted(CONFIG_DIR.rglob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        cfg = load_config(files=[f])
        assert isinstance(cfg, Config)


def test_base_yaml_is_generated_from_the_code_defaults():
    # Defaults are written once, in config.py; base.yaml is what users read, generated from it.
    from hipt_ray.config import defaults_yaml

    assert load_config() == Config()
    assert (CONFIG_DIR / "base.yaml").read_text() == defaults_yaml(), (
        "hipt_ray/configs/base.yaml is stale: run .venv/bin/python -m hipt_ray.config > hipt_ray/configs/base.yaml"
    )
    assert Config.model_validate(yaml.safe_load((CONFIG_DIR / "base.yaml").read_text())) == Config()
    assert "# Any S3-compatible endpoint (MinIO, Ceph, moto). null: the standard AWS" in defaults_yaml()


def test_overrides_layer_over_files(tmp_path: Path):
    extra = tmp_path / "x.yaml"
    extra.write_text("tiling: {mpp: 0.25, region_px: 2048}\n")
    cfg = load_config("tile", files=[extra], overrides=["tiling.region_px=1024", "qc.enabled=false"])
    assert cfg.tiling.mpp == 0.25 and cfg.tiling.region_px == 1024 and cfg.qc.enabled is False
    assert parse_override("tiling.mpp_range=[0.2, 1.0]") == {"tiling": {"mpp_range": [0.2, 1.0]}}


def test_unknown_key_names_key_and_expected():
    with pytest.raises(ConfigError, match=r"unknown key 'tiling.mppp' \(expected one of: .*mpp"):
        load_config(overrides=["tiling.mppp=0.5"])


def test_wrong_value_names_key():
    with pytest.raises(ConfigError, match=r"tiling.mpp: .*greater than or equal to 0.05"):
        load_config(overrides=["tiling.mpp=-1"])
    with pytest.raises(ConfigError, match="multiple of patch_px"):
        load_config(overrides=["tiling.region_px=1000"])


def test_config_is_frozen_and_spec_hash_tracks_tiling():
    a, b = load_config(), load_config(overrides=["tiling.mpp=0.25"])
    with pytest.raises(ValueError, match="frozen"):
        a.tiling.mpp = 1.0  # type: ignore[misc]
    assert a.tiling_spec_hash() != b.tiling_spec_hash()
    c = load_config(overrides=["tiling.mpp_overrides={s1: 0.5}", "ray.num_cpus=1"])
    assert c.tiling_spec_hash() == a.tiling_spec_hash()  # per-slide facts and Ray don't change the grid


def test_cli_config_error_exits_2_with_one_line(tmp_path, capsys):
    code = main(["tile", "--slides", str(tmp_path), "--out", str(tmp_path / "o"), "tiling.bogus=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "tiling.bogus" in err[0] and "Traceback" not in err[0]


def test_cli_usage_error_exits_2(capsys):
    assert main(["tile"]) == 2
    assert main(["no-such-command"]) == 2


@pytest.mark.parametrize("bad", ["../../../escaped_run", "a/b", "..", ".hidden", "a\\b", ""])
def test_names_used_in_paths_cannot_escape_the_output(bad, tmp_path, capsys):
    from hipt_ray.cli import main
    from hipt_ray.config import check_name
    from hipt_ray.slides.manifest import ManifestError, list_slides

    with pytest.raises(ConfigError, match="sweep.name"):
        load_config(overrides=[f"sweep.name={bad!r}"] if bad else ["sweep.name=''"])
    with pytest.raises(ConfigError, match="pretrain.run_name"):
        load_config(values={"pretrain": {"run_name": bad}})
    with pytest.raises(ConfigError, match="--run-name"):
        check_name(bad, "--run-name")
    out = tmp_path / "deep" / "er" / "out"
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,case_id,label\na,a,x\n")
    if bad:
        assert main(["train-head", "--out", str(out), "--labels", str(labels), "--run-name", bad]) == 2
        assert "--run-name" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]  # nothing written anywhere
        manifest = tmp_path / "m.csv"
        manifest.write_text(f"uri,slide_id\n/data/x.svs,{bad}\n")
        with pytest.raises(ManifestError, match="slide_id"):
            list_slides(str(manifest))
        manifest.unlink()


@pytest.mark.parametrize(
    "override, key",
    [
        ("tiling.mpp=1e-9", "tiling.mpp"),
        ("tiling.mpp=.inf", "tiling.mpp"),
        ("tiling.mpp=.nan", "tiling.mpp"),
        ("tiling.region_px=1099511627776", "tiling.region_px"),
        ("tiling.patch_px=1", "tiling.patch_px"),
        ("tissue.mask_mpp=1e-6", "tissue.mask_mpp"),
        ("tiling.mpp_range=[0.1, .inf]", "mpp_range"),
        ("tiling.mpp_overrides={a: 1e-12}", "mpp_overrides"),
    ],
)
def test_numeric_settings_have_sane_ranges(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_commands_that_run_without_ray_take_no_address(capsys):
    from hipt_ray.cli import main

    for command in (
        ["train-head", "--out", "o", "--labels", "l.csv"],
        ["search", "--out", "o", "--slide", "s", "--region", "1,1"],
    ):
        assert main([*command, "--address", "127.0.0.1:6379"]) == 2
        assert "unrecognized arguments: --address" in capsys.readouterr().err


# ---------------------------------------------------------------- shipped layers, per command


def test_a_named_layer_that_is_missing_is_an_error_listing_the_shipped_ones():
    from hipt_ray.config import layer_path, shipped_layers

    assert {"tile", "embed", "tiny", "demo", "heads/survival", "heads/subtyping", "pretrain/vit4k"} <= set(
        shipped_layers()
    )
    assert "base" not in shipped_layers()  # the generated list of defaults is for reading, not a layer
    assert layer_path("heads/survival.yaml") == layer_path("heads/survival")
    with pytest.raises(ConfigError, match=r"no shipped config layer 'heads/survivl'.*heads/survival"):
        load_config("heads/survivl")
    with pytest.raises(ConfigError, match=r"no shipped config layer 'heads/cox'"):  # filled from the settings
        load_config("heads/{heads.survival_loss}", overrides=["heads.survival_loss=cox"])


def test_config_flag_takes_a_file_or_a_shipped_layer_by_name(tmp_path, capsys):
    assert load_config(files=["tiny"]).model.name == "hipt4k_tiny"
    assert load_config(files=["demo.yaml"]) == load_config(files=["configs/demo.yaml"])  # the path before 0.2
    mine = tmp_path / "mine.yaml"
    mine.write_text("tiling: {mpp: 0.25}\n")
    assert load_config(files=[str(mine)]).tiling.mpp == 0.25
    with pytest.raises(ConfigError, match=r"config file not found: nope\.yaml \(nor is it a shipped layer: .*tiny"):
        load_config(files=["nope.yaml"])
    assert main(["search", "--out", str(tmp_path), "--slide", "s", "--region", "1,1", "--config", "nope.yaml"]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def _config_of(argv: list[str]) -> Config:
    from hipt_ray.cli import COMMANDS, build_parser

    args = build_parser().parse_args(argv)
    return COMMANDS[args.command].config(args)


def test_each_command_loads_the_layers_its_declaration_names(tmp_path):
    common = ["--out", str(tmp_path), "--labels", "l.csv"]
    survival = _config_of(["train-head", *common, "--task", "survival"])
    assert (survival.heads.task, survival.heads.survival_loss, survival.heads.epochs) == ("survival", "cox", 100)
    # the task may come from the person's own settings too, and their settings win over the layer
    assert _config_of(["train-head", *common, "heads.task=survival", "heads.epochs=7"]).heads.epochs == 7
    assert _config_of(["train-head", *common, "heads.task=survival"]).heads.survival_loss == "cox"
    subtyping = _config_of(["sweep", *common])
    assert subtyping.heads.folds == 10 and "hidden" in subtyping.sweep.space
    # a sweep.space given by the person replaces the task layer's space (no merging into it)
    own = _config_of(["sweep", *common, "sweep.space={lr: {uniform: [0.001, 0.01]}}"])
    assert own.sweep.space == {"lr": {"uniform": [0.001, 0.01]}}
    assert _config_of(["pretrain", "--stage", "vit4k", "--out", str(tmp_path)]).pretrain.out_dim == 65536
    assert _config_of(["tile", "--slides", "s", "--out", str(tmp_path)]).tiling.min_tissue_fraction == 0.1
    tiny = _config_of(["embed", "--slides", "s", "--out", str(tmp_path), "--config", "tiny"])
    assert tiny.model.name == "hipt4k_tiny"
    assert _config_of(["embed", "--slides", "s", "--out", str(tmp_path)]).model.name == "hipt4k"


def test_base_yaml_reads_the_field_descriptions(monkeypatch):
    from hipt_ray.config import StorageConfig, defaults_yaml

    field = StorageConfig.model_fields["cache_dir"]
    monkeypatch.setattr(field, "description", "where the staged slides go (a test's words)")
    assert "  cache_dir: ~/.cache/hipt-ray/slides # where the staged slides go (a test's words)" in defaults_yaml()


def test_only_input_errors_are_one_line_usage_errors(tmp_path, monkeypatch, capsys):
    """A person's input (InputError) is exit 2 in one line; a ValueError from deep inside a stage
    is a failure (exit 1) with its traceback, not a usage message that hides where it came from."""
    import hipt_ray.heads.run as heads_run
    from hipt_ray.config import InputError

    argv = ["train-head", "--out", str(tmp_path), "--labels", "l.csv"]

    def bug(cfg, run_name=None):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(heads_run, "train_head", bug)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "failed: ValueError: operands could not be broadcast" in err

    def bad_labels(cfg, run_name=None):
        raise InputError("labels l.csv: no column 'label'")

    monkeypatch.setattr(heads_run, "train_head", bad_labels)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["hipt-ray train-head: labels l.csv: no column 'label'"]
