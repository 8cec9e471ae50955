"""Typed, strict configuration: the defaults below + a command's YAML + ``key=value`` overrides.

Every section is a frozen pydantic model with ``extra="forbid"``, so a misspelt key is an error
that names the key instead of a silently ignored setting. Configs cross Ray boundaries as plain
dicts (``cfg.model_dump(mode="json")``) and are re-validated on the other side.

The defaults are written here only: ``configs/base.yaml`` is generated from these classes and the
descriptions of their fields (``python -m hipt_ray.config > hipt_ray/configs/base.yaml``; a test
checks it is current) for people to read, and is not loaded. The shipped layers live in
``hipt_ray/configs/`` as package data; which of them a command loads is declared with the command
(``hipt_ray.cli.COMMANDS``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The shipped layers (base.yaml, tiny.yaml, demo.yaml, heads/<task>.yaml, …) are package data:
# they travel with a non-editable install (pyproject's package-data), never found beside a checkout.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class InputError(ValueError):
    """Input a person can fix (a setting, a file, a table that does not fit): the CLI prints it on
    one line with exit code 2. Every other exception, ``ValueError`` included, is a failure with
    its traceback (exit code 1)."""


class ConfigError(InputError):
    """A configuration problem a person can fix; the CLI prints it on one line, exit code 2."""


# A name used as one path component under the output (a slide id, a run name) leaves room for
# the longest suffix added to it (``_slide_attention.png``, ``_<x>_<y>_mosaic.png``) within the
# 255 bytes a file name may have.
NAME_MAX_BYTES = 200


def name_problem(value: str) -> str | None:
    """What makes ``value`` unsafe as one file name under the output, or None when it is safe:
    empty, longer than NAME_MAX_BYTES in UTF-8, a control character, a path separator, or a
    leading dot (which also rules out ``.`` and ``..``)."""
    if not value:
        return "is empty"
    if len(value.encode()) > NAME_MAX_BYTES:
        return f"is {len(value.encode())} bytes long (at most {NAME_MAX_BYTES} in UTF-8)"
    if bad := next((c for c in value if unicodedata.category(c) == "Cc"), None):
        return f"holds the control character {bad!r}"
    if bad := next((c for c in value if c in "/\\"), None):
        return f"holds the path separator {bad!r}"
    if value.startswith("."):
        return "starts with '.'"
    return None


NAME_RULE = (
    f"a name used as a file name under the output: at most {NAME_MAX_BYTES} bytes, no control "
    "characters, no '/' or '\\', no leading '.'"
)


def check_name(value: str, key: str) -> str:
    """``value`` if it is safe as one file name under the output (a run name, a slide id), else
    ConfigError naming ``key``, what is wrong with it and the rule (see :func:`name_problem`)."""
    if (problem := name_problem(value)) is not None:
        raise ConfigError(f"{key}={value[:80]!r}{'…' if len(value) > 80 else ''} {problem}: {NAME_RULE}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageConfig(_Section):
    """Where remote slides are staged for OpenSlide, which only reads local files."""

    cache_dir: str = Field(
        default="~/.cache/hipt-ray/slides",
        description="local staging of s3:// slides for OpenSlide",
    )
    cache_max_bytes: int = Field(default=50 * 2**30, gt=0, le=2**50, description="50 GiB, least-recently-used eviction")
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Any S3-compatible endpoint (MinIO, Ceph, moto). None: the standard AWS variables/config.",
    )
    retries: int = Field(
        default=3,
        ge=0,
        le=20,
        description="Retries of an object-store request that failed in a way that may pass (a timeout, a refused "
        "connection, a 5xx), with backoff 0.5, 1, 2 … s; each retry is one warning line.",
    )
    retry_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="The most time one object-store request spends retrying before it fails with a one-line "
        "error (Lance's client retries and request timeout get one try's share). "
        "Also read by Ray workers as HIPT_RAY_STORAGE_RETRY_SECONDS.",
    )
    anonymous_buckets: list[str] = Field(
        default=["idc-open-data"],
        description="Buckets read without credentials (unsigned requests): public data such as the Imaging Data "
        "Commons' idc-open-data. Also read by Ray workers as HIPT_RAY_ANONYMOUS_BUCKETS (comma-separated).",
    )
    shared_output: bool = Field(
        default=False,
        description="A local --out is on a filesystem every node of the cluster mounts (NFS, Lustre, EFS). Without "
        "it, tile, embed, pretrain and sweep refuse a local --out on a cluster that has or can add other nodes: "
        "their workers would write to their own disks. Use an s3:// --out there, or set this.",
    )
    bucket_endpoints: dict[str, str] = Field(
        default_factory=dict,
        description="The S3 endpoint of a bucket that is not at s3_endpoint_url: {bucket: http(s)://host:port}, or "
        "{bucket: aws} for AWS's own (e.g. {idc-open-data: aws} while the output is on MinIO). Over s3_endpoint_url "
        "and AWS_ENDPOINT_URL; also read by Ray workers as HIPT_RAY_BUCKET_ENDPOINTS (JSON).",
    )
    lease_seconds: float = Field(
        default=120.0,
        ge=10.0,
        le=3600.0,
        description="An object-storage output's writer lease expires this long after its run stops renewing it "
        "(a killed run blocks the next one on that output at most this long; local disk: never).",
    )
    keep_versions_days: float = Field(
        default=7.0,
        ge=0.0,
        description="Table versions older than this are deleted after each embed run (time travel within it).",
    )

    @field_validator("bucket_endpoints")
    @classmethod
    def _endpoints(cls, v: dict[str, str]) -> dict[str, str]:
        cls._bucket_names(list(v))
        for name, url in v.items():
            if url != "aws" and not re.fullmatch(r"https?://[^\s/]+/?", url):
                raise ValueError(
                    f"bucket_endpoints[{name!r}] = {url!r} is not an endpoint: give http(s)://host[:port], or aws "
                    "for AWS's own S3"
                )
        return v

    @field_validator("anonymous_buckets")
    @classmethod
    def _bucket_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", name):
                raise ValueError(
                    f"{name!r} is not a bucket name (3-63 lower-case letters, digits, '.' or '-'); "
                    "give the bare name, e.g. idc-open-data, not s3://idc-open-data/…"
                )
        return v


class TilingConfig(_Section):
    """The region grid: ``region_px`` pixels at exactly ``mpp`` µm/px, cut into patches."""

    mpp: float = Field(
        default=0.5,
        ge=0.05,
        le=64.0,
        description="Bounds keep a typo from planning 10^17 regions: 0.05 µm/px is finer than any scanner's level 0.",
    )
    region_px: int = Field(default=4096, ge=64, le=16384)
    patch_px: int = Field(default=256, ge=16, le=4096)
    overlap: float = Field(default=0.0, ge=0.0, lt=1.0)
    min_tissue_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    mpp_tolerance: float = Field(
        default=0.0,
        ge=0.0,
        le=0.05,
        description="Read a slide whose MPP is within this share of mpp (or of mpp/2, mpp/3 …) as exactly that: at "
        "0.02, 0.504 µm/px is read as 0.5 (whole) and 0.2527 as 0.25 (reduced by 2), with no Lanczos resize, as HIPT "
        "read TCGA's 20× levels. 0 (default): every region is exactly mpp µm/px.",
    )
    mpp_range: tuple[float, float] = Field(
        default=(0.1, 2.0),
        description="A slide MPP outside this range is an error (a broken tag), never a guess.",
    )
    mpp_overrides: dict[str, float] = Field(
        default_factory=dict,
        description="Per-slide MPP for slides whose files carry none: {slide_id: mpp}.",
    )
    max_regions_per_slide: int = Field(
        default=200_000,
        ge=1,
        le=10_000_000,
        description="A slide whose grid would hold more regions than this fails with a reason (the tile task "
        "never builds it): 200,000 regions of 4096² at 0.5 µm/px is 67 cm² of tissue.",
    )

    @model_validator(mode="after")
    def _check(self) -> TilingConfig:
        if self.region_px % self.patch_px:
            raise ValueError(f"region_px ({self.region_px}) must be a multiple of patch_px ({self.patch_px})")
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
    method: Literal["auto", "saturation", "luminance"] = Field(
        default="auto",
        description="saturation: stained tissue vs colourless glass; luminance: darkness, for grayscale slides;"
        " auto: luminance when the slide's low-resolution image has no colour, else saturation.",
    )
    saturation_threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="None: Otsu's threshold on HSV saturation, kept within [min_saturation, max_saturation].",
    )
    min_saturation: float = Field(default=0.05, ge=0.0, le=1.0)
    max_saturation: float = Field(default=0.15, ge=0.0, le=1.0)
    luminance_threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="None: Otsu on darkness (1 − luma) within [0.12, 0.5]; used by the luminance method only.",
    )
    blur_um: float = Field(default=40.0, ge=0.0)
    closing_um: float = Field(default=80.0, ge=0.0)
    fill_holes: bool = True
    min_area_um2: float = Field(default=40_000.0, ge=0.0)


class ReaderConfig(_Section):
    """How slide pixels are read: ``tiles`` decodes just the TIFF tiles a region needs, fetched
    by byte range (local or straight from ``s3://``, nothing staged; generic tiled TIFF and Aperio
    SVS); ``openslide`` stages remote slides whole and reads through OpenSlide; ``auto`` uses
    ``tiles`` where the format allows it and OpenSlide for everything else."""

    backend: Literal["auto", "tiles", "openslide"] = Field(
        default="auto",
        description="tiles (byte-range TIFF tiles, no staging) | openslide | auto: tiles where the format allows",
    )
    range_gap_bytes: int = Field(
        default=64 * 1024,
        ge=0,
        le=64 * 2**20,
        description="Tile byte ranges closer than this are fetched in one request (fewer requests, a few more bytes).",
    )
    scaled_decode: bool = Field(
        default=False,
        description="Opt-in: a region read from a level 2/4/8× finer than tiling.mpp (a 40× slide cut at 20×) "
        "has its JPEG tiles decoded at the wanted size by libjpeg-turbo's DCT scaling instead of "
        "decoded whole and box-averaged: ≈ 4× faster at 40×, pixels close to but not equal to the "
        "exact path (bench/read.py gives the PSNR and embedding cosine). Tile backend only; part of"
        " the tiling spec when on, so its embeddings never mix with exact ones.",
    )


class QCConfig(_Section):
    enabled: bool = True
    thumb_px: int = Field(default=1024, ge=64, le=16384)


class ModelConfig(_Section):
    """Which HIPT model embeds, and with which weights."""

    name: str = Field(default="hipt4k", description="hipt4k (ViT-S/16 + ViT-4K XS) or hipt4k_tiny (tests, demo)")
    patch_encoder: str | None = Field(
        default=None,
        description="The patch level: None keeps the model's own ViT-256 (vit256_s16 for hipt4k, vit256_tiny for "
        "hipt4k_tiny); a registered patch encoder (uni, uni2_h, virchow2, h_optimus_0, gigapath, …; "
        "vit256_s16 is HIPT's) runs under a ViT-4K whose input is that encoder's embedding width.",
    )
    patch_geometry: Literal["auto", "native", "resize", "tiling"] = Field(
        default="auto",
        description="With patch_encoder: native (= auto) cuts patches of the encoder's own input size (16 × 224 "
        "px = a 3584 px region for UNI); resize cuts tiling.patch_px (256) and resizes each patch to "
        "the encoder's input (as TRIDENT/UNI do); tiling feeds tiling.patch_px as it is (encoders whose "
        "patch size divides it). Part of the tiling spec (what is cut) and of the model id.",
    )
    checkpoint_256: str | None = Field(
        default=None,
        description="official vit256_small_dino.pth layout, or the patch encoder's published weight file; path or s3://",
    )
    checkpoint_4k: str | None = Field(default=None, description="vit4k_xs_dino.pth")
    allow_random_weights: bool = Field(
        default=False,
        description="Without checkpoints the job refuses to run unless this is true (then the model id says so).",
    )
    seed: int = Field(default=0, description="for random weights: every actor builds the same model")
    allow_unsafe_pickle: bool = Field(
        default=False,
        description="Checkpoints, heads.pt and DINO resume files load as tensors + plain types only (a crafted "
        "pickle cannot run code). true: full unpickling, for files you trust and nothing else.",
    )
    micro_batch: int | None = Field(
        default=None,
        gt=0,
        description="256 px patches per ViT-256 forward; None: 32 on CPU, 256 on a GPU (the fastest measured in"
        " bench/models.py and, on an H100, bench/gpu.py: 60 vs 50 regions/s bf16 for 256 vs 64)",
    )


class EmbedConfig(_Section):
    """The embedding job's execution: precision, compilation, resources, outputs."""

    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="auto: bf16 where the device runs it natively",
    )
    compile: bool = Field(default=True, description="torch.compile + freezing (falls back to eager if it fails)")
    use_gpu: bool | Literal["auto"] = Field(
        default="auto",
        description="auto: when the cluster has GPU nodes or its autoscaler can add them; true with no GPU "
        "anywhere is an error; an actor given a GPU that torch cannot use fails the run",
    )
    model_actors: int | None = Field(
        default=None, gt=0, description="a fixed pool of this many actors; None: a pool that grows as nodes join"
    )
    max_model_actors: int | None = Field(
        default=None,
        gt=0,
        description="the growing pool's limit; None: as many as the cluster can hold fully grown when actors "
        "have nodes of their own (GPUs or actor_resources), else 1",
    )
    actor_cpus: float = Field(default=1.0, gt=0)
    actor_memory_gb: float = Field(
        default=2.5,
        ge=0,
        description="the real-size model actor peaked at 1.9 GiB on CPU; 0: no memory request (node types "
        "that do not declare memory, e.g. Ray's fake autoscaling nodes, can then scale up for it)",
    )
    read_cpus: float = Field(default=1.0, gt=0)
    decode: Literal["auto", "reader", "cpu", "gpu"] = Field(
        default="auto",
        description="where a tile-backend region's JPEG tiles are decoded. auto: next to the model (read tasks "
        "send the compressed tiles, ≈ 1/16 of the pixels' bytes), on the actor's GPU when it has one, else on "
        "its CPUs in threads overlapped with the model; cpu / gpu: next to the model, on that; reader: in the "
        "read tasks, pixels sent (for model nodes without spare CPUs). OpenSlide slides always decode in the "
        "read tasks",
    )
    decode_threads: int = Field(
        default=0, ge=0, description="threads a model actor decodes on its CPUs with; 0: embed.actor_cpus, at least 1"
    )
    store_tokens: bool = Field(
        default=True,
        description="tokens256 column: needed by stage-2 pretraining and ViT-4K heads",
    )
    regions_per_task: int = Field(default=16, gt=0, description="regions one read task reads (≈ 1 s from JPEG tiles)")
    write_regions: int = Field(default=32, gt=0, description="region rows per Lance fragment a worker writes")
    actor_batch_regions: int = Field(
        default=4,
        gt=0,
        description="regions per model-actor call (fewer tasks for the driver)",
    )
    read_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each read/write task and each model actor asks for, to place them on "
        "the nodes meant for them (e.g. {decode: 1} with a node type that declares decode: N).",
    )
    actor_resources: dict[str, float] = Field(default_factory=dict)
    actor_start_timeout_s: float = Field(
        default=900.0,
        ge=0,
        description="how long the job waits for its first model actor to start and embed (a node to be added, "
        "booted and set up, the model loaded) before it ends with exit 1 naming the actor's resources and the "
        "node types that could hold it (an autoscaler that never delivers: capacity, quota, failed launches); "
        "0: wait for ever",
    )


class PretrainConfig(_Section):
    """Two-stage DINO pretraining (published DINO/HIPT defaults)."""

    stage: Literal["vit256", "vit4k"] = Field(
        default="vit256",
        description="vit256: 256 px patches from slides; vit4k: token grids from an embed output",
    )
    size: Literal["real", "tiny"] = Field(
        default="real",
        description="real: vit256_s16 / vit4k_xs; tiny twins for tests",
    )
    regions_from: str | None = Field(
        default=None,
        description="stage 2: an `embed` output holding tokens256 (default: out)",
    )
    model_id: str | None = Field(
        default=None,
        description="stage 2: which embedding model's tokens (None: the only one)",
    )
    epochs: int = Field(default=100, gt=0)
    steps_per_epoch: int | None = Field(default=None, gt=0, description="None: estimated from the data")
    batch_size_per_worker: int = Field(default=64, gt=0)
    lr: float = Field(default=5e-4, gt=0, description="scaled by total batch / 256")
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
    rotate_grids: bool = Field(default=False, description="stage 2: random 90° turns of the token crops")
    patches_per_region: int = Field(default=64, gt=0, description="stage 1: tissue patches sampled per region")
    min_patch_tissue: float = Field(default=0.5, ge=0, le=1)
    shuffle_buffer: int = Field(default=256, ge=0)
    cache_dataset: bool = Field(
        default=False,
        description="materialise the training data in the object store (small data only)",
    )
    seed: int = 0
    num_workers: int = Field(default=1, gt=0)
    use_gpu: bool | Literal["auto"] = Field(
        default="auto", description="auto: when the cluster has GPU nodes or its autoscaler can add them"
    )
    cpus_per_worker: float = Field(default=0.5, gt=0, description="< 1 leaves CPUs for Ray Data on small nodes")
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each training worker asks for, to place workers on the nodes meant "
        "for them (e.g. {model: 1}: one worker per node of a type that declares model: 1)",
    )
    checkpoint_every_steps: int = Field(default=200, gt=0)
    num_to_keep: int = Field(default=2, gt=0)
    max_failures: int = Field(default=3, ge=-1)
    run_name: str = "hipt-pretrain"
    storage_path: str | None = Field(default=None, description="None: <out>/pretrain")

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, v: str) -> str:
        return check_name(v, "pretrain.run_name")


class HeadsConfig(_Section):
    """Slide-level heads on bags of region embeddings (one bag per case)."""

    task: Literal["subtyping", "survival"] = "subtyping"
    labels: str | None = Field(
        default=None,
        description="CSV/Parquet: slide_id, case_id, label | survival_months + event",
    )
    label_column: str = "label"
    head: Literal["hipt_lgp", "abmil", "mean_mlp"] = Field(
        default="hipt_lgp",
        description="hipt_lgp | abmil | mean_mlp",
    )
    local_vit: str | None = Field(
        default=None,
        description="hipt_lgp only: run this ViT-4K (e.g. vit4k_xs) over the stored tokens256 of each region "
        "instead of reading emb4k; weights from local_vit_checkpoint (official layout), else "
        "random.",
    )
    local_vit_checkpoint: str | None = Field(
        default=None,
        description="its weights (official vit4k_xs_dino.pth layout); None: random",
    )
    freeze_local: bool = Field(default=True, description="false: fine-tune the ViT-4K with the head")
    folds: int | None = Field(default=None, ge=2, description="None: 10 for subtyping, 5 for survival")
    train_fraction: float = Field(default=1.0, gt=0, le=1)
    epochs: int = Field(
        default=50,
        gt=0,
        description="defaults measured on the planted demo cohort (heads/*.yaml: per task)",
    )
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    dropout: float = Field(default=0.25, ge=0, lt=1)
    hidden: int = Field(default=128, gt=0, description="abmil / mean_mlp hidden size (hipt_lgp keeps its 192)")
    batch_bags: int = Field(
        default=8,
        gt=0,
        description="Bags (cases) per optimiser step, run as one padded batch: 8 trains 3–4× faster than 1 at "
        "the same AUC on the demo cohort (bench/heads.py), with lr 2e-3 for the fewer steps.",
    )
    standardize: bool = Field(
        default=True,
        description="Preprocessing fitted on each fold's training cases only, saved with the fold's head.",
    )
    pca: int | None = Field(default=None, gt=0, description="keep this many principal components")
    whiten: bool = Field(default=False, description="with pca: unit variance per component")
    class_weights: bool = Field(
        default=True,
        description="subtyping: cross-entropy weighted by inverse class frequency",
    )
    val_fraction: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="Inner validation split of each training fold (case-level, stratified, seeded): the epoch "
        "with the lowest validation loss is the fold's model; the outer fold is never looked at. 0:"
        " no inner split, the last epoch",
    )
    patience: int | None = Field(default=20, gt=0, description="stop a fold after this many epochs without improvement")
    survival_loss: Literal["nll", "cox"] = Field(default="nll", description="nll (4 discrete-time bins) | cox")
    alpha_surv: float = Field(default=0.0, ge=0, le=1)
    n_bins: int = Field(default=4, ge=2)
    model_id: str | None = Field(default=None, description="which embeddings under --out (None: the only one)")
    seed: int = 0


class SweepConfig(_Section):
    """Ray Tune over head configurations: ``space`` maps a ``heads`` key to one distribution,
    e.g. ``{lr: {loguniform: [1e-4, 1e-2]}, head: {choice: [abmil, hipt_lgp]}}``."""

    num_samples: int = Field(default=8, gt=0)
    metric: str | None = Field(default=None, description="None: auc (subtyping) or c_index (survival), maximised")
    space: dict[str, dict[str, list]] = Field(
        default_factory=dict,
        description="heads.* key → one of choice | grid | uniform | loguniform | randint, e.g. {lr: "
        "{loguniform: [1.0e-4, 1.0e-2]}, head: {grid: [abmil, hipt_lgp]}}",
    )
    grace_period: int = Field(default=5, gt=0, description="ASHA: epochs before a trial can be stopped")
    max_concurrent: int | None = Field(default=None, gt=0)
    cpus_per_trial: float = Field(default=1.0, gt=0)
    name: str = "hipt-sweep"

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v, "sweep.name")


class TrackingConfig(_Section):
    mlflow_uri: str | None = Field(
        default=None,
        description="None: sqlite:///<out>/mlflow.db for a local --out, else ./mlflow.db",
    )
    experiment: str = "hipt-ray"


class SearchConfig(_Section):
    """Similar-region search: a vector index on ``regions.emb4k`` (refreshed after every embed)."""

    index_type: Literal["IVF_PQ", "IVF_HNSW_SQ", "IVF_HNSW_PQ", "IVF_FLAT"] = Field(
        default="IVF_PQ",
        description="IVF_PQ | IVF_HNSW_SQ | IVF_HNSW_PQ | IVF_FLAT",
    )
    metric: Literal["cosine", "L2", "dot"] = "cosine"
    num_partitions: int | None = Field(default=None, gt=0, description="None: about √rows")
    num_sub_vectors: int | None = Field(default=None, gt=0, description="PQ: None = dim/8 (8 dims per code)")
    min_rows: int = Field(default=1000, gt=0, description="fewer embedded regions: exact search, no index")
    nprobes: int = Field(default=32, gt=0)
    refine_factor: int | None = Field(
        default=30,
        gt=0,
        description="re-rank k·refine_factor by exact distance (bench: 5 → recall@10 0.65, 30 → 0.99 at 1M)",
    )
    k: int = Field(default=16, gt=0)
    thumb_px: int = Field(default=192, ge=32, description="mosaic tile size")
    model_id: str | None = Field(default=None, description="which embeddings under --out (None: the only one)")


class RayConfig(_Section):
    address: str | None = Field(
        default=None,
        description="None: RAY_ADDRESS if set, else a local Ray started for the command (the embedded default).",
    )
    num_cpus: int | None = Field(default=None, gt=0)
    max_in_flight: int | None = Field(
        default=None,
        gt=0,
        description="Slide tasks kept in flight; None: twice the cluster's CPUs.",
    )
    write_batch_slides: int = Field(
        default=32,
        gt=0,
        description="Slides whose results are written to Lance in one commit.",
    )


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
        spec: dict[str, Any] = {
            "tiling": self.tiling.model_dump(mode="json"),
            "tissue": self.tissue.model_dump(mode="json"),
        }
        spec["tiling"].pop("mpp_overrides")  # per-slide facts, not part of the grid rule
        spec["tiling"].pop("max_regions_per_slide")  # a guard: it fails a slide, never changes a grid
        if not spec["tiling"]["mpp_tolerance"]:  # 0 leaves earlier hashes as they were
            spec["tiling"].pop("mpp_tolerance")
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


def shipped_layers() -> list[str]:
    """Names of the config layers shipped with the package (``tiny``, ``heads/survival``, …);
    ``base`` is the generated list of defaults, for reading, and is not a layer."""
    names = (p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml"))
    return sorted(n for n in names if n != "base")


def layer_path(name: str) -> Path:
    """The file of the shipped layer ``name`` (``heads/survival`` or ``heads/survival.yaml``).

    Raises:
        ConfigError: no such layer; the message lists the shipped ones.
    """
    name = name.removesuffix(".yaml")
    if name not in shipped_layers():
        raise ConfigError(
            f"no shipped config layer {name!r} (in {CONFIG_DIR}); the layers are: {', '.join(shipped_layers())}"
        )
    return CONFIG_DIR / f"{name}.yaml"


def config_file(text: str | Path) -> Path:
    """A ``--config`` argument as a file: a path that exists, else a shipped layer by name
    (``--config tiny``, ``--config demo.yaml``, and the pre-package ``configs/demo.yaml``).

    Raises:
        ConfigError: neither a file nor a shipped layer.
    """
    path = Path(text).expanduser()
    if path.is_file():
        return path
    name = str(text).removeprefix("configs/").removesuffix(".yaml")
    if name in shipped_layers():
        return layer_path(name)
    raise ConfigError(f"config file not found: {text} (nor is it a shipped layer: {', '.join(shipped_layers())})")


def parse_override(text: str) -> dict[str, Any]:
    """``a.b=value`` → ``{"a": {"b": value}}`` with the value parsed as YAML (numbers, lists…)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    *sections, leaf = key.strip().split(".")
    nested: dict[str, Any] = {leaf: value}
    for part in reversed(sections):
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


# Settings that a person's input replaces whole instead of merging into a shipped layer's: a
# sweep.space given by the user is the space searched, not added to the task's default space.
_REPLACED_WHOLE = (("sweep", "space"),)


def _fill(layer: str, cfg: Config) -> str:
    """``heads/{heads.task}`` → ``heads/survival``: a layer name with config keys filled in."""

    def value(match: re.Match[str]) -> str:
        obj: Any = cfg
        for part in match.group(1).split("."):
            obj = getattr(obj, part)
        return str(obj)

    return re.sub(r"\{([\w.]+)\}", value, layer)


def load_config(
    *layers: str,
    files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    values: dict[str, Any] | None = None,
) -> Config:
    """Layer the shipped ``layers`` (names such as ``tile`` or ``heads/{heads.task}``, whose
    ``{key}`` is filled from the person's own settings), then ``files``, ``values`` (from CLI
    flags) and ``key=value`` overrides over the defaults, and validate once.

    Raises:
        ConfigError: a missing layer or file, bad YAML, an unknown key or a value of the wrong kind.
    """
    user: dict[str, Any] = {}
    for f in files:
        user = _deep_merge(user, _read_yaml(config_file(f)))
    user = _deep_merge(user, values or {})
    for text in overrides:
        user = _deep_merge(user, parse_override(text))
    if not layers:
        return validate_config(user)
    # the person's settings alone choose the layers whose names hold a {key}
    own = validate_config(user) if any("{" in layer for layer in layers) else Config()
    data: dict[str, Any] = {}
    for layer in layers:
        data = _deep_merge(data, _read_yaml(layer_path(_fill(layer, own))))
    for section, key in _REPLACED_WHOLE:
        if key in user.get(section, {}) and key in data.get(section, {}):
            data[section] = {k: v for k, v in data[section].items() if k != key}
    return validate_config(_deep_merge(data, user))


def validate_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


_HEADER = """\
# The defaults of every hipt-ray setting, with what each one means. Generated from
# hipt_ray/config.py (python -m hipt_ray.config > hipt_ray/configs/base.yaml): change a default
# there, not here; this file is for reading and is not loaded. Layering: these defaults < the
# command's shipped layer (tile.yaml, embed.yaml, pretrain/<stage>.yaml, heads/<task>.yaml) <
# --config files < key=value overrides on the command line. Unknown keys are errors.
"""


def defaults_yaml() -> str:
    """``configs/base.yaml``: every section's defaults, each with its field's description (a
    short one beside the value, a longer one wrapped above it)."""
    import textwrap

    def scalar(value: Any) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000)
        return text.split("\n...")[0].strip()

    defaults = Config().model_dump(mode="json")
    out = [_HEADER.rstrip("\n")]
    for name, field in Config.model_fields.items():
        section = field.annotation
        if not (isinstance(section, type) and issubclass(section, _Section)):
            continue
        out.append(f"{name}:")
        for key, value in defaults[name].items():
            line = f"  {key}: {scalar(value)}"
            # None is null in YAML: the description is read beside YAML values
            about = re.sub(r"\bNone\b", "null", section.model_fields[key].description or "")
            if not about:
                out.append(line)
            elif len(f"{line:<32} # {about}") <= 110:
                out.append(f"{line:<32} # {about}")
            else:
                out += [f"  # {text}" for text in textwrap.wrap(about, 96)]
                out.append(line)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(defaults_yaml(), end="")
