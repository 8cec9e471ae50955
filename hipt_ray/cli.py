"""``hipt-ray <command>``: argv → config → ray.init → stage.run(cfg) → summary and exit code.

Exit codes: 0 all done; 2 usage or config error (one line, no traceback); 3 finished with some
slides failed (each recorded with its reason); 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hipt_ray.config import Config, ConfigError, InputError, load_config
from hipt_ray.storage import OutputStoreError, disk_write_error, spill_disk_error

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SLIDES_FAILED = 0, 1, 2, 3
log = logging.getLogger("hipt_ray")


def init_ray(cfg: Config, *, dashboard: bool = False) -> None:
    """Check the output can be written (if not: one line, before Ray starts), then join
    ``ray.address`` / ``RAY_ADDRESS``, or start the command's own local Ray (with its dashboard
    when ``dashboard``: Ray Train needs the State API it serves). Ray's console chatter is turned
    down unless ``--verbose``."""
    from hipt_ray.console import quiet_ray
    from hipt_ray.runtime import check_local_output, ray_address, start_ray
    from hipt_ray.storage import check_output

    if cfg.out:
        check_output(cfg.out, cfg.storage.s3_endpoint_url)  # OutputStoreError: main prints its line
    quiet_ray()
    start_ray(address=ray_address(cfg.ray.address), num_cpus=cfg.ray.num_cpus, dashboard=dashboard)
    check_local_output(cfg)  # InputError: a local --out the cluster's other nodes cannot write


def _common(p: argparse.ArgumentParser, *, uses_ray: bool = True) -> None:
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="YAML",
        help="extra config file(s) or shipped layer(s) by name (e.g. tiny), layered over the "
        "command's shipped layer (hipt_ray/configs/base.yaml lists the defaults)",
    )
    if uses_ray:  # commands that run without Ray do not take an address they would ignore
        p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. tiling.mpp=0.25 storage.cache_max_bytes=1e10",
    )


def _with_address(values: dict, args: argparse.Namespace) -> None:
    """``--address`` into the config values (``ray.address``), when given (and the command has it)."""
    if getattr(args, "address", None):
        values["ray"] = {"address": args.address}


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint-256", help="ViT-256 weights (official vit256_small_dino.pth layout)")
    p.add_argument("--checkpoint-4k", help="ViT-4K weights (official vit4k_xs_dino.pth layout)")


def _model_values(args: argparse.Namespace) -> dict:
    """``{"model": {checkpoint_256, checkpoint_4k}}`` for the flags given, else ``{}``."""
    model = {k: v for k in ("checkpoint_256", "checkpoint_4k") if (v := getattr(args, k, None))}
    return {"model": model} if model else {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hipt-ray", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _slide_commands(sub)
    _listing_command(sub)
    _head_commands(sub)
    _look_commands(sub)
    return parser


_SLIDES_HELP = (
    "a directory, a glob, an s3:// prefix, a manifest .csv (uri[,slide_id,case_id,mpp]) or an IDC collection: "
    "idc:tcga_brca[?sections=ffpe|frozen|all&cases=…&series=…&limit=N] (hipt_ray/slides/idc.py)"
)
_LABELS_HELP = "CSV/Parquet: slide_id, case_id, label | survival_months, event"


def _slide_commands(sub) -> None:
    """The commands that read slides: tile, embed, pretrain."""
    tile = sub.add_parser("tile", help="find tissue and grid 4096² regions of every slide into Lance")
    tile.add_argument("--slides", required=True, help=_SLIDES_HELP)
    tile.add_argument("--out", required=True, help="output URI (local or s3://)")
    _common(tile)

    embed = sub.add_parser("embed", help="embed every slide's regions with HIPT-4K into Lance")
    embed.add_argument("--slides", required=True, help=_SLIDES_HELP)
    embed.add_argument("--out", required=True, help="output URI (local or s3://); tile results there are reused")
    _checkpoint_args(embed)
    _common(embed)

    pre = sub.add_parser("pretrain", help="DINO pretraining of ViT-256 (stage 1) or ViT-4K (stage 2) on Ray Train")
    pre.add_argument("--stage", choices=("vit256", "vit4k"), required=True)
    pre.add_argument("--slides", help="stage 1: the slides whose tissue patches train ViT-256")
    pre.add_argument("--out", required=True, help="output URI: tiling, checkpoints, exported teacher")
    pre.add_argument("--regions-from", help="stage 2: an embed output with tokens256 (default: --out)")
    pre.add_argument("--run-name", help="Ray Train run name; rerunning the same name resumes it")
    _common(pre)


def _listing_command(sub) -> None:
    """slides: what a --slides source holds, before anything runs."""
    sl = sub.add_parser(
        "slides",
        help="list a slide source without running anything: slides and cases; for idc:<collection> "
        "also bytes and the JPEG 2000 share, from the shipped IDC index (no network)",
    )
    sl.add_argument("source", help=_SLIDES_HELP)
    sl.add_argument(
        "--write",
        metavar="CSV",
        help="also write the listing as a manifest CSV (uri, slide_id, case_id, mpp): --slides reads it back, "
        "and case-level labels join its case_id",
    )
    _common(sl, uses_ray=False)


def _head_commands(sub) -> None:
    """Slide-level heads: train-head, sweep."""
    th = sub.add_parser("train-head", help="cross-validate one slide-level head on the embeddings under --out")
    th.add_argument("--out", required=True, help="an embed output")
    th.add_argument("--labels", required=True, help=_LABELS_HELP)
    th.add_argument("--task", choices=("subtyping", "survival"))
    th.add_argument("--run-name", help="MLflow run name (default <task>-<head>)")
    _common(th, uses_ray=False)

    sw = sub.add_parser("sweep", help="Ray Tune sweep of slide-level heads, every trial logged to MLflow")
    sw.add_argument("--out", required=True, help="an embed output")
    sw.add_argument("--labels", required=True, help=_LABELS_HELP)
    sw.add_argument(
        "--task",
        choices=["subtyping", "survival"],
        help="layers the shipped heads/<task>.yaml (its search space unless sweep.space is given)",
    )
    _common(sw)


def _look_commands(sub) -> None:
    """What people look at, and data to try it on: heatmap, search, make-demo-data."""
    hm = sub.add_parser(
        "heatmap",
        help="attention heatmaps: a region's ViT-256/ViT-4K attention, or a "
        "slide-level head's attention over every region of its slides",
    )
    hm.add_argument("--out", required=True, help="directory for the PNG files")
    hm.add_argument("--slide", help="region mode: the slide (path or s3:// URI); head mode: only this slide id")
    hm.add_argument("--region", help="region mode: level-0 X,Y of the region's top-left corner")
    hm.add_argument(
        "--shifts",
        type=int,
        default=2,
        help="shifted windows per axis averaged to smooth block edges (1: none; default 2)",
    )
    hm.add_argument(
        "--head-run", help="head mode: a train-head/sweep run directory (OUT/heads/<name>) or MLflow run id"
    )
    _checkpoint_args(hm)
    _common(hm, uses_ray=False)

    se = sub.add_parser("search", help="regions most similar to one region, across every embedded slide")
    se.add_argument("--out", required=True, help="an embed output")
    se.add_argument("--slide", required=True, help="the query slide (slide id or its URI)")
    se.add_argument("--region", required=True, help="level-0 X,Y inside the query region")
    se.add_argument("-k", type=int, help="number of regions returned (default search.k)")
    se.add_argument("--labels", help="optional labels CSV/Parquet: show each hit's heads.label_column")
    se.add_argument("--dest", help="directory for the table and mosaic (default OUT/search)")
    se.add_argument("--rebuild-index", action="store_true", help="rebuild the vector index from scratch first")
    _common(se, uses_ray=False)

    demo = sub.add_parser("make-demo-data", help="write synthetic slides and labels.csv")
    demo.add_argument("out", help="output directory")
    demo.add_argument("--n-slides", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--n-subtypes", type=int, default=2)
    demo.add_argument(
        "--size-um",
        type=float,
        nargs=2,
        default=(3000.0, 6000.0),
        metavar=("MIN", "MAX"),
        help="range of the slides' sides in µm (default 3000 6000)",
    )


# ---------------------------------------------------------------- commands
# Each command is declared once, in COMMANDS: the shipped config layers it loads (over the
# defaults, under the person's --config files and key=value overrides), the config values its
# flags give, and what it runs on the resulting config. What is shared lives in one place:
# loading that config, printing the result's lines and its exit code.


def _no_values(args: argparse.Namespace) -> dict:
    return {}


@dataclass(frozen=True)
class Command:
    run: Callable[[argparse.Namespace, Config | None], object]  # → a result with lines() (and exit_code)
    # Shipped layers, by name under hipt_ray/configs/; "{key}" is filled from the person's own
    # settings (flags, --config files, overrides), e.g. "heads/{heads.task}".
    layers: tuple[str, ...] = ()
    values: Callable[[argparse.Namespace], dict] = _no_values  # config values from the flags
    configured: bool = True  # false: the command takes no config (no --config, no overrides)

    def config(self, args: argparse.Namespace) -> Config | None:
        if not self.configured:
            return None
        return load_config(*self.layers, files=args.config, overrides=args.overrides, values=self.values(args))


@dataclass
class _Lines:
    """A result that is only lines to print."""

    text: list[str]

    def lines(self) -> list[str]:
        return self.text


def _slides_values(args: argparse.Namespace) -> dict:
    values: dict = {"slides": args.slides, "out": args.out, **_model_values(args)}
    _with_address(values, args)
    return values


def _tile(args: argparse.Namespace, cfg: Config):
    init_ray(cfg)
    from hipt_ray.tile.job import run  # after ray.init: Lance warns about forks made after its import

    return run(cfg)


def _embed(args: argparse.Namespace, cfg: Config):
    init_ray(cfg)
    from hipt_ray.embed.job import run

    return run(cfg)


def _pretrain_values(args: argparse.Namespace) -> dict:
    pre: dict = {"stage": args.stage}
    if args.regions_from:
        pre["regions_from"] = args.regions_from
    if args.run_name:
        pre["run_name"] = args.run_name
    values: dict = {"out": args.out, "pretrain": pre}
    if args.slides:
        values["slides"] = args.slides
    elif args.stage == "vit256":
        raise ConfigError("stage vit256 needs --slides")
    _with_address(values, args)
    return values


def _pretrain(args: argparse.Namespace, cfg: Config):
    init_ray(cfg, dashboard=True)
    from hipt_ray.train.run import run

    return run(cfg)


def _head_values(args: argparse.Namespace) -> dict:
    """--out, --labels and --task (the task chooses the heads/<task> layer; a sweep.space given
    by the person replaces that layer's space instead of merging into it: see load_config)."""
    values: dict = {"out": args.out, "heads": {"labels": args.labels}}
    if args.task:
        values["heads"]["task"] = args.task
    _with_address(values, args)
    return values


def _train_head(args: argparse.Namespace, cfg: Config):
    from hipt_ray.heads.run import train_head

    return train_head(cfg, run_name=args.run_name)


def _sweep(args: argparse.Namespace, cfg: Config):
    init_ray(cfg)
    from hipt_ray.tune.sweep import run_sweep

    return run_sweep(cfg)


def _xy(text: str | None, flag: str = "--region") -> tuple[int, int]:
    try:
        x, y = (int(float(v)) for v in (text or "").split(","))
    except ValueError:
        raise ConfigError(f"{flag} takes level-0 pixel coordinates X,Y (e.g. {flag} 8192,4096), got {text!r}") from None
    return x, y


def _heatmap(args: argparse.Namespace, cfg: Config):
    if args.head_run:
        from hipt_ray.explain.heatmap import slide_heatmaps

        files = slide_heatmaps(cfg, args.head_run, args.out, slide_ids=[args.slide] if args.slide else None)
        more = [f"  … and {len(files) - 3} more (<slide_id>_slide_attention.png)"] if len(files) > 3 else []
        return _Lines([f"{len(files)} slide heatmaps in {args.out}:"] + [f"  {f}" for f in files[:3]] + more)
    if not (args.slide and args.region):
        raise ConfigError("give --slide and --region X,Y (a region's attention), or --head-run (slide heatmaps)")
    from hipt_ray.explain.heatmap import region_heatmaps

    files = region_heatmaps(cfg, args.slide, _xy(args.region), args.out, shifts=args.shifts)
    return _Lines([f"{name}: {path}" for name, path in files.items()])


def _search(args: argparse.Namespace, cfg: Config):
    from hipt_ray.explain.search import search_similar

    return search_similar(
        cfg,
        args.slide,
        _xy(args.region),
        k=args.k,
        labels=args.labels,
        dest=args.dest,
        rebuild_index=args.rebuild_index,
    )


def _slides(args: argparse.Namespace, cfg: Config):
    from hipt_ray.slides.idc import IdcListing, is_idc_source
    from hipt_ray.slides.manifest import list_slides, write_manifest

    assert cfg.slides
    specs = list_slides(cfg.slides, endpoint_url=cfg.storage.s3_endpoint_url)
    if is_idc_source(cfg.slides):
        lines = IdcListing.of(cfg.slides).lines(cfg.storage.anonymous_buckets)
    else:
        refused = [s for s in specs if s.error]
        cases = {s.case_id for s in specs if s.case_id}
        lines = [f"{cfg.slides}: {len(specs):,} slides" + (f" of {len(cases):,} cases" if cases else "")]
        lines += [f"refused as listed: {len(refused):,}, e.g. {refused[0].error}"] if refused else []
    if args.write:
        write_manifest(specs, args.write, endpoint_url=cfg.storage.s3_endpoint_url)
        lines.append(f"manifest: {args.write}")
    return _Lines(lines)


def _size(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def _free_bytes(path: str) -> tuple[str, int]:
    """The nearest existing folder at or above ``path``, and the bytes free on its disk."""
    import shutil

    folder = os.path.abspath(os.path.expanduser(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return folder, shutil.disk_usage(folder).free


def _make_demo_data(args: argparse.Namespace, cfg: None):
    from hipt_ray.console import Progress
    from hipt_ray.slides.synthetic import plan_demo_data, write_demo_data

    if args.n_slides < 1:
        raise ConfigError("--n-slides must be at least 1")
    lo, hi = args.size_um
    if not 0 < lo <= hi:
        raise ConfigError(f"--size-um takes MIN MAX with 0 < MIN <= MAX (µm), got {lo:g} {hi:g}")
    plan = plan_demo_data(
        args.out, n_slides=args.n_slides, seed=args.seed, n_subtypes=args.n_subtypes, size_um=tuple(args.size_um)
    )
    need = plan.estimated_bytes()
    folder, free = _free_bytes(args.out)
    if need > free:
        raise ConfigError(
            f"--n-slides {args.n_slides} would write about {_size(need)} of slides, more than "
            f"the {_size(free)} free at {folder}: ask for fewer or smaller slides "
            "(--n-slides, --size-um) or write elsewhere"
        )
    log.info(
        "make-demo-data: %d slides, about %s, into %s (%s free there)",
        args.n_slides,
        _size(need),
        args.out,
        _size(free),
    )
    with Progress("make-demo-data", total=args.n_slides, unit="slides") as progress:
        out = write_demo_data(plan, on_slide=lambda: progress.update(advance=1))
    return _Lines([f"wrote {args.n_slides} slides to {out / 'slides'} and labels to {out / 'labels.csv'}"])


# Which shipped layers each command loads (hipt_ray/configs/<layer>.yaml), in one table.
COMMANDS = {
    "tile": Command(_tile, ("tile",), _slides_values),
    "embed": Command(_embed, ("embed",), _slides_values),
    "pretrain": Command(_pretrain, ("pretrain/{pretrain.stage}",), _pretrain_values),
    "train-head": Command(_train_head, ("heads/{heads.task}",), _head_values),
    "sweep": Command(_sweep, ("heads/{heads.task}",), _head_values),
    "slides": Command(_slides, (), lambda args: {"slides": args.source}),
    "heatmap": Command(_heatmap, ("embed",), _model_values),  # it runs embed's model on a region
    "search": Command(_search, (), lambda args: {"out": args.out}),
    "make-demo-data": Command(_make_demo_data, configured=False),
}


def _run(command: Command, args: argparse.Namespace) -> int:
    cfg = command.config(args)
    if cfg is not None:  # before Ray starts: its workers inherit these through the environment
        from hipt_ray.storage import set_anonymous_buckets, set_bucket_endpoints, set_retry_budget

        set_retry_budget(cfg.storage.retries, cfg.storage.retry_seconds)
        set_anonymous_buckets(cfg.storage.anonymous_buckets)
        set_bucket_endpoints(cfg.storage.bucket_endpoints)
    result = command.run(args, cfg)
    for line in result.lines():
        print(line)
    return getattr(result, "exit_code", EXIT_OK)


class _Short(logging.Formatter):
    """``message`` for information, ``warning: message`` above it (the full format with --verbose)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {text}"


def _setup_logging(verbose: bool) -> None:
    from hipt_ray import console

    console.set_verbose(verbose)
    handler = console.ConsoleHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s") if verbose else _Short("%(message)s")
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, console.ConsoleHandler)]:
        root.removeHandler(old)  # main() called again in one process (the demo, tests)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:  # libraries' notes ("Found credentials…", "Creating initial MLflow database
        # tables…") are not the run's: below warnings, only hipt-ray's own messages are shown
        handler.addFilter(lambda r: r.levelno >= logging.WARNING or r.name.startswith("hipt_ray"))
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # it has a console handler of its own,
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # set again when mlflow is imported


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage line
        return int(exc.code or 0)
    _setup_logging(args.verbose)
    try:
        return _run(COMMANDS[args.command], args)
    except InputError as exc:  # a setting, a file or a table the person can fix: one line
        print(f"hipt-ray {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OutputStoreError as exc:  # one line: the URI, the cause, the fix
        print(f"hipt-ray {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.config else EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # imported here: hipt_ray.models brings torch and timm (3 s), which --help does not need
        from hipt_ray.models.checkpoints import CheckpointError

        if isinstance(exc, CheckpointError):
            print(f"hipt-ray {args.command}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        from hipt_ray.embed.watchdog import ModelActorsNeverStarted

        if isinstance(exc, ModelActorsNeverStarted):  # the cluster never grew: one line, a runtime failure
            print(f"hipt-ray {args.command}: {exc}", file=sys.stderr)
            return EXIT_ERROR
        # a read-only or full disk under the output, wherever it was met: one line, not a traceback
        if getattr(args, "out", None) and (disk := disk_write_error(args.out, exc)) is not None:
            print(f"hipt-ray {args.command}: {disk}", file=sys.stderr)
            return EXIT_ERROR
        if (spill := spill_disk_error(exc)) is not None:  # Ray's own disk, not the output's
            print(f"hipt-ray {args.command}: {spill}", file=sys.stderr)
            return EXIT_ERROR
        traceback.print_exc()
        print(f"hipt-ray {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
