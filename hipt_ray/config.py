"""Typed, strict configuration: the defaults below + a command's YAML + ``key=value`` overrides.

Every section is a frozen pydantic model with ``extra="forbid"``, so a misspelt key is an error
that names the key instead of a silently ignored setting. Configs cross Ray boundaries as plain
dicts (``cfg.model_dump(mode="json")``) and are re-validated on the other side.

The defaults are written here only: ``configs/base.yaml`` is generated from these classes and the
comments beside their fields (``python -m hipt_ray.config > configs/base.yaml``; a test checks it
is current) for people to read, and is not loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration problem a person can fix; the CLI prints it on one line, exit code 2."""


def check_name(value: str, key: str) -> str:
    """``value`` if it is safe as one path component (a run name, a slide id), else ConfigError
    naming ``key``: no path separators, no ``..``, not empty, no leading dot."""
    if not value or value in (".", "..") or value.startswith(".") or any(c in value for c in "/\\\0"):
        raise ConfigError(
            f"{key}={value!r} is used as a file name under the output: use letters, digits, '-', '_' "
            "or '.', with no '/', no '..' and no leading '.'"
        )
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageConfig(_Section):
    """Where remote slides are staged for OpenSlide, which only reads local files."""

    cache_dir: str = "~/.cache/hipt-ray/slides"  # local staging of s3:// slides for OpenSlide
    cache_max_bytes: int = Field(default=50 * 2**30, gt=0, le=2**50)  # 50 GiB, least-recently-used eviction
    # Any S3-compatible endpoint (MinIO, Ceph, moto). None: the standard AWS variables/config.
    s3_endpoint_url: str | None = None
    retries: int = Field(default=3, ge=0, le=20)
    # An object-storage output's writer lease expires this long after its run stops renewing it
    # (a killed run blocks the next one on that output at most this long; local disk: never).
    lease_seconds: float = Field(default=120.0, ge=10.0, le=3600.0)
    # Table versions older than this are deleted after each embed run (time travel within it).
    keep_versions_days: float = Field(default=7.0, ge=0.0)


class TilingConfig(_Section):
    """The region grid: ``region_px`` pixels at exactly ``mpp`` µm/px, cut into patches."""

    # Bounds keep a typo from planning 10^17 regions: 0.05 µm/px is finer than any scanner's level 0.
    mpp: float = Field(default=0.5, ge=0.05, le=64.0)
    region_px: int = Field(default=4096, ge=64, le=16384)
    patch_px: int = Field(default=256, ge=16, le=4096)
    overlap: float = Field(default=0.0, ge=0.0, lt=1.0)
    min_tissue_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    # A slide MPP outside this range is an error (a broken tag), never a guess.
    mpp_range: tuple[float, float] = (0.1, 2.0)
    # Per-slide MPP for slides whose files carry none: {slide_id: mpp}.
    mpp_overrides: dict[str, float] = Field(default_factory=dict)
    # A slide whose grid would hold more regions than this fails with a reason (the tile task
    # never builds it): 200,000 regions of 4096² at 0.5 µm/px is 67 cm² of tissue.
    max_regions_per_slide: int = Field(default=200_000, ge=1, le=10_000_000)

    @model_validator(mode="after")
    def _check(self) -> TilingConfig:
        if self.region_px % self.patch_px:
            raise ValueError(
                f"region_px ({self.region_px}) must be a multiple of patch_px ({self.patch_px})"
            )
        for sid, v in self.mpp_overrides.items():
            if not (math.isfinite(v) and 0.01 <= v <= 100):
                raise ValueError(f"mpp_overrides[{sid!r}] = {v} µm/px is not a plausible slide MPP (0.01–100)")
        lo, hi = self.mpp_range
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
            raise ValueError(f"mpp_range must be (low, high) with 0 < low < high, got {lo, hi}")
        return self

    @property
    def stride_px(self) -> int:
        """Grid step at the target MPP (a region minus the configured overlap)."""
        return max(self.patch_px, int(round(self.region_px * (1.0 - self.overlap))))


class TissueConfig(_Section):
    """Tissue detection on a low-resolution image of the slide (physical units throughout)."""

    mask_mpp: float = Field(default=8.0, ge=1.0, le=256.0)
    # saturation: stained tissue vs colourless glass; luminance: darkness, for grayscale slides;
    # auto: luminance when the slide's low-resolution image has no colour, else saturation.
    method: Literal["auto", "saturation", "luminance"] = "auto"
    # None: Otsu's threshold on HSV saturation, kept within [min_saturation, max_saturation].
    saturation_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    min_saturation: float = Field(default=0.05, ge=0.0, le=1.0)
    max_saturation: float = Field(default=0.15, ge=0.0, le=1.0)
    # None: Otsu on darkness (1 − luma) within [0.12, 0.5]; used by the luminance method only.
    luminance_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    blur_um: float = Field(default=40.0, ge=0.0)
    closing_um: float = Field(default=80.0, ge=0.0)
    fill_holes: bool = True
    min_area_um2: float = Field(default=40_000.0, ge=0.0)


class ReaderConfig(_Section):
    """How slide pixels are read: ``tiles`` decodes just the TIFF tiles a region needs, fetched
    by byte range (local or straight from ``s3://``, nothing staged; generic tiled TIFF and Aperio
    SVS); ``openslide`` stages remote slides whole and reads through OpenSlide; ``auto`` uses
    ``tiles`` where the format allows it and OpenSlide for everything else."""

    # tiles (byte-range TIFF tiles, no staging) | openslide | auto: tiles where the format allows
    backend: Literal["auto", "tiles", "openslide"] = "auto"
    # Tile byte ranges closer than this are fetched in one request (fewer requests, a few more bytes).
    range_gap_bytes: int = Field(default=64 * 1024, ge=0, le=64 * 2**20)
    # Opt-in: a region read from a level 2/4/8× finer than tiling.mpp (a 40× slide cut at 20×) has
    # its JPEG tiles decoded at the wanted size by libjpeg-turbo's DCT scaling instead of decoded
    # whole and box-averaged: ≈ 4× faster at 40×, pixels close to but not equal to the exact path
    # (bench/read.py gives the PSNR and embedding cosine). Tile backend only; part of the tiling
    # spec when on, so its embeddings never mix with exact ones.
    scaled_decode: bool = False


class QCConfig(_Section):
    enabled: bool = True
    thumb_px: int = Field(default=1024, ge=64, le=16384)


class ModelConfig(_Section):
    """Which HIPT model embeds, and with which weights."""

    name: str = "hipt4k"  # hipt4k (ViT-S/16 + ViT-4K XS) or hipt4k_tiny (tests, demo)
    checkpoint_256: str | None = None  # official vit256_small_dino.pth layout, path or s3://
    checkpoint_4k: str | None = None  # vit4k_xs_dino.pth
    # Without checkpoints the job refuses to run unless this is true (then the model id says so).
    allow_random_weights: bool = False
    seed: int = 0  # for random weights: every actor builds the same model
    # Checkpoints, heads.pt and DINO resume files load as tensors + plain types only (a crafted
    # pickle cannot run code). true: full unpickling, for files you trust and nothing else.
    allow_unsafe_pickle: bool = False
    # 256 px patches per ViT-256 forward; None: 32 on CPU, 256 on a GPU (the fastest measured in
    # bench/models.py and, on an H100, bench/gpu.py: 60 vs 50 regions/s bf16 for 256 vs 64)
    micro_batch: int | None = Field(default=None, gt=0)


class EmbedConfig(_Section):
    """The embedding job's execution: precision, compilation, resources, outputs."""

    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the device runs it natively
    compile: bool = True  # torch.compile + freezing (falls back to eager if it fails)
    use_gpu: bool | Literal["auto"] = "auto"  # auto: when the cluster has GPUs
    model_actors: int | None = Field(default=None, gt=0)  # None: one per GPU, else 1
    actor_cpus: float = Field(default=1.0, gt=0)
    actor_memory_gb: float = Field(default=2.5, gt=0)  # the real-size model actor peaked at 1.9 GiB on CPU
    read_cpus: float = Field(default=1.0, gt=0)
    store_tokens: bool = True  # tokens256 column: needed by stage-2 pretraining and ViT-4K heads
    regions_per_task: int = Field(default=16, gt=0)  # regions one read task reads (≈ 1 s from JPEG tiles)
    write_regions: int = Field(default=32, gt=0)  # region rows per Lance fragment a worker writes
    actor_batch_regions: int = Field(default=4, gt=0)  # regions per model-actor call (fewer tasks for the driver)
    # Custom Ray resources each read/write task and each model actor asks for, to place them on
    # the nodes meant for them (cluster.yaml: {decode: 1} on cpu_decode nodes).
    read_resources: dict[str, float] = Field(default_factory=dict)
    actor_resources: dict[str, float] = Field(default_factory=dict)


class PretrainConfig(_Section):
    """Two-stage DINO pretraining (published DINO/HIPT defaults)."""

    # vit256: 256 px patches from slides; vit4k: token grids from an embed output
    stage: Literal["vit256", "vit4k"] = "vit256"
    size: Literal["real", "tiny"] = "real"  # real: vit256_s16 / vit4k_xs; tiny twins for tests
    regions_from: str | None = None  # stage 2: an `embed` output holding tokens256 (default: out)
    model_id: str | None = None  # stage 2: which embedding model's tokens (None: the only one)
    epochs: int = Field(default=100, gt=0)
    steps_per_epoch: int | None = Field(default=None, gt=0)  # None: estimated from the data
    batch_size_per_worker: int = Field(default=64, gt=0)
    lr: float = Field(default=5e-4, gt=0)  # scaled by total batch / 256
    min_lr: float = Field(default=1e-6, ge=0)
    warmup_epochs: float = Field(default=10, ge=0)
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = Field(default=0.996, ge=0, le=1)
    out_dim: int = Field(default=65536, gt=0)
    norm_last_layer: bool = True
    freeze_last_layer: int = Field(default=1, ge=0)
    warmup_teacher_temp: float = Field(default=0.04, gt=0)
    teacher_temp: float = Field(default=0.04, gt=0)
    warmup_teacher_temp_epochs: float = Field(default=0, ge=0)
    student_temp: float = Field(default=0.1, gt=0)
    center_momentum: float = Field(default=0.9, ge=0, le=1)
    clip_grad: float = Field(default=3.0, ge=0)
    drop_path: float = Field(default=0.1, ge=0, lt=1)
    n_local_crops: int = Field(default=8, ge=0)
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    rotate_grids: bool = False  # stage 2: random 90° turns of the token crops
    patches_per_region: int = Field(default=64, gt=0)  # stage 1: tissue patches sampled per region
    min_patch_tissue: float = Field(default=0.5, ge=0, le=1)
    shuffle_buffer: int = Field(default=256, ge=0)
    cache_dataset: bool = False  # materialise the training data in the object store (small data only)
    seed: int = 0
    num_workers: int = Field(default=1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=0.5, gt=0)  # < 1 leaves CPUs for Ray Data on small nodes
    checkpoint_every_steps: int = Field(default=200, gt=0)
    num_to_keep: int = Field(default=2, gt=0)
    max_failures: int = Field(default=3, ge=-1)
    run_name: str = "hipt-pretrain"
    storage_path: str | None = None  # None: <out>/pretrain

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, v: str) -> str:
        return check_name(v, "pretrain.run_name")


class HeadsConfig(_Section):
    """Slide-level heads on bags of region embeddings (one bag per case)."""

    task: Literal["subtyping", "survival"] = "subtyping"
    labels: str | None = None  # CSV/Parquet: slide_id, case_id, label | survival_months + event
    label_column: str = "label"
    head: Literal["hipt_lgp", "abmil", "mean_mlp"] = "hipt_lgp"  # hipt_lgp | abmil | mean_mlp
    # hipt_lgp only: run this ViT-4K (e.g. vit4k_xs) over the stored tokens256 of each region
    # instead of reading emb4k; weights from local_vit_checkpoint (official layout), else random.
    local_vit: str | None = None
    local_vit_checkpoint: str | None = None  # its weights (official vit4k_xs_dino.pth layout); None: random
    freeze_local: bool = True  # false: fine-tune the ViT-4K with the head
    folds: int | None = Field(default=None, ge=2)  # None: 10 for subtyping, 5 for survival
    train_fraction: float = Field(default=1.0, gt=0, le=1)
    epochs: int = Field(default=50, gt=0)  # defaults measured on the planted demo cohort (heads/*.yaml: per task)
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    dropout: float = Field(default=0.25, ge=0, lt=1)
    hidden: int = Field(default=128, gt=0)  # abmil / mean_mlp hidden size (hipt_lgp keeps its 192)
    # Bags (cases) per optimiser step, run as one padded batch: 8 trains 3–4× faster than 1 at
    # the same AUC on the demo cohort (bench/heads.py), with lr 2e-3 for the fewer steps.
    batch_bags: int = Field(default=8, gt=0)
    # Preprocessing fitted on each fold's training cases only, saved with the fold's head.
    standardize: bool = True
    pca: int | None = Field(default=None, gt=0)  # keep this many principal components
    whiten: bool = False  # with pca: unit variance per component
    class_weights: bool = True  # subtyping: cross-entropy weighted by inverse class frequency
    # Inner validation split of each training fold (case-level, stratified, seeded): the epoch
    # with the lowest validation loss is the fold's model; the outer fold is never looked at.
    val_fraction: float = Field(default=0.2, ge=0, lt=1)  # 0: no inner split, the last epoch
    patience: int | None = Field(default=20, gt=0)  # stop a fold after this many epochs without improvement
    survival_loss: Literal["nll", "cox"] = "nll"  # nll (4 discrete-time bins) | cox
    alpha_surv: float = Field(default=0.0, ge=0, le=1)
    n_bins: int = Field(default=4, ge=2)
    model_id: str | None = None  # which embeddings under --out (None: the only one)
    seed: int = 0


class SweepConfig(_Section):
    """Ray Tune over head configurations: ``space`` maps a ``heads`` key to one distribution,
    e.g. ``{lr: {loguniform: [1e-4, 1e-2]}, head: {choice: [abmil, hipt_lgp]}}``."""

    num_samples: int = Field(default=8, gt=0)
    metric: str | None = None  # None: auc (subtyping) or c_index (survival), maximised
    # heads.* key → one of choice | grid | uniform | loguniform | randint,
    # e.g. {lr: {loguniform: [1.0e-4, 1.0e-2]}, head: {grid: [abmil, hipt_lgp]}}
    space: dict[str, dict[str, list]] = Field(default_factory=dict)
    grace_period: int = Field(default=5, gt=0)  # ASHA: epochs before a trial can be stopped
    max_concurrent: int | None = Field(default=None, gt=0)
    cpus_per_trial: float = Field(default=1.0, gt=0)
    name: str = "hipt-sweep"

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v, "sweep.name")


class TrackingConfig(_Section):
    # None: sqlite:///<out>/mlflow.db for a local --out, else ./mlflow.db
    mlflow_uri: str | None = None
    experiment: str = "hipt-ray"


class SearchConfig(_Section):
    """Similar-region search: a vector index on ``regions.emb4k`` (refreshed after every embed)."""

    # IVF_PQ | IVF_HNSW_SQ | IVF_HNSW_PQ | IVF_FLAT
    index_type: Literal["IVF_PQ", "IVF_HNSW_SQ", "IVF_HNSW_PQ", "IVF_FLAT"] = "IVF_PQ"
    metric: Literal["cosine", "L2", "dot"] = "cosine"
    num_partitions: int | None = Field(default=None, gt=0)  # None: about √rows
    num_sub_vectors: int | None = Field(default=None, gt=0)  # PQ: None = dim/8 (8 dims per code)
    min_rows: int = Field(default=1000, gt=0)  # fewer embedded regions: exact search, no index
    nprobes: int = Field(default=32, gt=0)
    refine_factor: int | None = Field(default=30, gt=0)  # re-rank k·refine_factor by exact distance (bench: 5 → recall@10 0.65, 30 → 0.99 at 1M)
    k: int = Field(default=16, gt=0)
    thumb_px: int = Field(default=192, ge=32)  # mosaic tile size
    model_id: str | None = None  # which embeddings under --out (None: the only one)


class RayConfig(_Section):
    # None: RAY_ADDRESS if set, else a local Ray started for the command (the embedded default).
    address: str | None = None
    num_cpus: int | None = Field(default=None, gt=0)
    # Slide tasks kept in flight; None: twice the cluster's CPUs.
    max_in_flight: int | None = Field(default=None, gt=0)
    # Slides whose results are written to Lance in one commit.
    write_batch_slides: int = Field(default=32, gt=0)


class Config(_Section):
    slides: str | None = None
    out: str | None = None
    storage: StorageConfig = StorageConfig()
    tiling: TilingConfig = TilingConfig()
    tissue: TissueConfig = TissueConfig()
    reader: ReaderConfig = ReaderConfig()
    qc: QCConfig = QCConfig()
    model: ModelConfig = ModelConfig()
    embed: EmbedConfig = EmbedConfig()
    pretrain: PretrainConfig = PretrainConfig()
    heads: HeadsConfig = HeadsConfig()
    sweep: SweepConfig = SweepConfig()
    tracking: TrackingConfig = TrackingConfig()
    search: SearchConfig = SearchConfig()
    ray: RayConfig = RayConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def tiling_spec_hash(self) -> str:
        """Identity of the tiling: two runs with the same hash cut the same regions."""
        spec = {"tiling": self.tiling.model_dump(mode="json"), "tissue": self.tissue.model_dump(mode="json")}
        spec["tiling"].pop("mpp_overrides")  # per-slide facts, not part of the grid rule
        spec["tiling"].pop("max_regions_per_slide")  # a guard: it fails a slide, never changes a grid
        if self.reader.scaled_decode:  # other pixels: kept apart (off leaves earlier hashes as they were)
            spec["scaled_decode"] = True
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=value`` → ``{"a": {"b": value}}`` with the value parsed as YAML (numbers, lists…)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(root)"
    if err["type"] == "extra_forbidden":
        section: type[BaseModel] = Config
        for part in err["loc"][:-1]:
            field = section.model_fields.get(str(part))
            if field is None or not isinstance(field.annotation, type):
                break
            section = field.annotation
        known = ", ".join(sorted(section.model_fields))
        return f"config error: unknown key '{key}' (expected one of: {known})"
    got = err.get("input")
    return f"config error: {key}: {err['msg']} (got {got!r})"


def load_config(
    command: str | None = None,
    *,
    files: list[str | Path] = (),
    overrides: list[str] = (),
    values: dict[str, Any] | None = None,
) -> Config:
    """Layer ``configs/<command>.yaml`` (if present), ``files``, ``values`` (from CLI flags) and
    ``key=value`` overrides over the defaults, then validate once.

    Raises:
        ConfigError: a missing file, bad YAML, an unknown key or a value of the wrong kind.
    """
    data: dict[str, Any] = {}
    if command and (CONFIG_DIR / f"{command}.yaml").is_file():
        data = _deep_merge(data, _read_yaml(CONFIG_DIR / f"{command}.yaml"))
    for f in files:
        data = _deep_merge(data, _read_yaml(Path(f)))
    if values:
        data = _deep_merge(data, values)
    for text in overrides:
        data = _deep_merge(data, parse_override(text))
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


_HEADER = """\
# The defaults of every hipt-ray setting, with what each one means. Generated from
# hipt_ray/config.py (python -m hipt_ray.config > configs/base.yaml): change a default there, not
# here; this file is for reading and is not loaded. Layering: these defaults < configs/<command>.yaml
# < --config files < key=value overrides on the command line. Unknown keys are errors.
"""


def _field_comments(section: type[BaseModel]) -> dict[str, tuple[list[str], str]]:
    """field → (comment lines just above it, comment at the end of its line) in this module."""
    import inspect
    import io
    import re
    import textwrap
    import tokenize

    found: dict[str, tuple[list[str], str]] = {}
    above: list[str] = []
    for line in textwrap.dedent(inspect.getsource(section)).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text[1:].strip())
            continue
        name = re.match(r"(\w+)\s*:", text)
        if name and name.group(1) in section.model_fields:
            tokens = tokenize.generate_tokens(io.StringIO(text + "\n").readline)
            trailing = next((t.string[1:].strip() for t in tokens if t.type == tokenize.COMMENT), "")
            found[name.group(1)] = (above, trailing)
        above = []
    return found


def _yaml_words(comment: str) -> str:
    """A comment written beside Python code, as read beside YAML (None is null there)."""
    import re

    return re.sub(r"\bNone\b", "null", comment)


def defaults_yaml() -> str:
    """``configs/base.yaml``: every section's defaults with the comments written beside them."""
    def scalar(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).split("\n...")[0].strip()

    defaults = Config().model_dump(mode="json")
    out = [_HEADER.rstrip("\n")]
    for name, field in Config.model_fields.items():
        section = field.annotation
        if not (isinstance(section, type) and issubclass(section, _Section)):
            continue
        out.append(f"{name}:")
        comments = _field_comments(section)
        for key, value in defaults[name].items():
            above, trailing = comments.get(key, ([], ""))
            out += [f"  # {_yaml_words(c)}" for c in above]
            line = f"  {key}: {scalar(value)}"
            out.append(f"{line:<32} # {_yaml_words(trailing)}" if trailing else line)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(defaults_yaml(), end="")
