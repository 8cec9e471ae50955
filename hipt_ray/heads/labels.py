"""The labels table of a slide-level head, read and checked before anything trains.

Ids are read as text (``000`` stays ``000``). Every problem is either one :class:`LabelError`
(exit code 2) naming the file, the column, the rows and the fix, or a counted exclusion that the
command prints (an exact duplicate row is dropped; nothing else is guessed).

A table with ``case_id`` but no ``slide_id`` column holds one row per case (the usual shape of
TCGA subtyping and survival labels): it is checked in that shape, so errors name its own rows,
and then joined to the slides that ``slides.lance`` records under each case (:func:`join_cases`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from hipt_ray.config import ConfigError
from hipt_ray.storage import filesystem

if TYPE_CHECKING:
    from hipt_ray.heads.tasks import Task

ID_COLUMNS = ("slide_id", "case_id")


_MISSING = {"", "na", "nan", "n/a", "none", "null"}


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


class LabelError(ConfigError):
    """The labels table cannot be used as it is (exit code 2)."""


def read_labels(uri: str, endpoint_url: str | None = None) -> pd.DataFrame:
    """The table at ``uri`` (CSV or Parquet); CSV cells are read as text, Parquet ids as text."""
    fs, path = filesystem(uri, endpoint_url)
    try:
        with fs.open(path, "rb") as fh:
            if uri.endswith(".parquet"):
                df = pd.read_parquet(fh)
            else:
                df = pd.read_csv(fh, dtype=str, keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError:
        raise LabelError(f"labels {uri}: no such file; check --labels") from None
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise LabelError(f"labels {uri}: not a readable CSV/Parquet table ({exc})") from None
    df.attrs["source"] = uri
    df.attrs["first_line"] = 1 if uri.endswith(".parquet") else 2  # CSV: line 1 is the header
    if uri.endswith(".parquet"):  # ids stored as numbers become their text; missing stays missing
        for col in (c for c in ID_COLUMNS if c in df.columns):
            df[col] = df[col].map(lambda v: None if _missing(v) else str(v))
    return df


def where_rows(df: pd.DataFrame, mask) -> str:
    # the index is the row's position in the file (check_labels resets it before dropping rows)
    rows = (df.index.to_numpy()[np.asarray(mask, dtype=bool)] + df.attrs.get("first_line", 2)).tolist()
    kind = "row" if df.attrs.get("first_line") == 1 else "line"
    shown = ", ".join(map(str, rows[:8])) + (" …" if len(rows) > 8 else "")
    return f"{kind}{'s' if len(rows) > 1 else ''} {shown}"


def _blank(values: pd.Series) -> np.ndarray:
    return values.map(lambda v: _missing(v) or str(v).strip().lower() in _MISSING).to_numpy(dtype=bool)


def as_numbers(values: pd.Series) -> np.ndarray:
    as_text = values.map(lambda v: int(v) if isinstance(v, (bool, np.bool_)) else str(v).strip())
    return pd.to_numeric(as_text, errors="coerce").to_numpy(dtype=float)


def check_labels(df: pd.DataFrame, *, task: Task) -> tuple[pd.DataFrame, list[str]]:
    """The table with typed, validated columns (``slide_id``, ``case_id`` text; the task's label
    columns as :meth:`Task.parse_labels` types them), and what was excluded, one line each.

    Raises:
        LabelError: a problem only the table's author can fix.
    """
    src = df.attrs.get("source", "labels")
    fields = task.label_fields()
    per_case = "slide_id" not in df.columns and "case_id" in df.columns
    ids = ["case_id"] if per_case else list(ID_COLUMNS)
    need = ids + fields
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise LabelError(
            f"labels {src} lacks column(s) {missing} (has {list(df.columns)}); the {task.name} task "
            f"needs {need} (or case_id without slide_id: one row per case){task.label_hint}"
        )
    if df.empty:
        raise LabelError(f"labels {src} has no rows")
    df = df.reset_index(drop=True)
    for col in need:
        bad = _blank(df[col])
        if bad.any():
            raise LabelError(
                f"labels {src}: column {col} is empty at {where_rows(df, bad)}; fill it in or drop those rows"
            )
    for col in ids:
        df[col] = df[col].map(lambda v: str(v).strip())
    df = task.parse_labels(df, src)
    excluded = []
    dup = df.duplicated(subset=need, keep="first")
    if dup.any():
        same = "case and label" if per_case else "slide, case and label"
        excluded.append(f"{int(dup.sum())} duplicate row(s) dropped ({where_rows(df, dup)}: same {same})")
        df = df[~dup]
    if per_case:
        _one_row_per(df, "case_id", src, "e.g. two labels for one patient")
        df.attrs["per_case"] = True
        return df, excluded
    _one_row_per(df, "slide_id", src, "e.g. under two cases (a slide in train and validation at once)")
    cases = df.groupby("case_id", sort=True)
    for col in fields:
        n = cases[col].nunique()
        if (n > 1).any():
            case = n[n > 1].index[0]
            raise LabelError(
                f"labels {src}: case {case!r} has slides with different {col} "
                f"({sorted(set(df.loc[df['case_id'] == case, col].astype(str)))}); "
                f"a case has one {col}: correct those rows"
            )
    return df, excluded


def _one_row_per(df: pd.DataFrame, col: str, src: str, example: str) -> None:
    clash = df[col].duplicated(keep=False)
    if clash.any():
        first = df[clash].iloc[0][col]
        raise LabelError(
            f"labels {src}: {col.removesuffix('_id')} {first!r} has more than one row with different values "
            f"({where_rows(df, (df[col] == first).to_numpy())}), {example}; keep one row per {col}"
        )


def join_cases(df: pd.DataFrame, slide_cases: Callable[[], Mapping[str, str | None]]) -> tuple[pd.DataFrame, list[str]]:
    """A per-case table (``df.attrs["per_case"]``, from :func:`check_labels`) as one row per
    slide, through ``slide_cases()`` (slide_id → case_id, as ``slides.lance`` records it:
    :meth:`~hipt_ray.store.Store.slide_refs`; read only for a per-case table); also the labelled
    cases that have no slide there. A slide-level table comes back unchanged.

    Raises:
        LabelError: no slide records a case, so nothing can be joined.
    """
    if not df.attrs.get("per_case"):
        return df, []
    src = df.attrs.get("source", "labels")
    every = slide_cases()
    known = {sid: case for sid, case in every.items() if case}
    if not known:
        raise LabelError(
            f"labels {src} has one row per case (case_id, no slide_id column), but none of the "
            f"{len(every)} slides in slides.lance records its case (case_id comes from idc: sources "
            "and from a manifest's case_id column); add a slide_id column or re-tile from such a source"
        )
    slides = pd.DataFrame(sorted(known.items()), columns=["slide_id", "case_id"])
    out = slides.merge(df, on="case_id", how="inner", validate="many_to_one")
    out.attrs = {k: v for k, v in df.attrs.items() if k != "per_case"}
    return out, sorted(set(df["case_id"]) - set(out["case_id"]))


def check_cohort(df: pd.DataFrame, *, task: Task) -> None:
    """What the embedded part of the table must hold to train and validate a head (after the
    join with the embeddings: ``df`` is the labelled rows of embedded slides); the task checks its
    own groups (:meth:`Task.check_cases`).

    Raises:
        LabelError: too few cases, classes or events, or (survival) no comparable pair of cases.
    """
    src = df.attrs.get("source", "labels")
    cases = df.drop_duplicates("case_id")
    if len(cases) < 4:
        raise LabelError(
            f"labels {src}: only {len(cases)} labelled case(s) have embeddings; a head needs at "
            "least 4 (2 per class or event group, for 2-fold validation)"
        )
    task.check_cases(cases, src)


def check_group_sizes(counts: pd.Series, what: str, src: str) -> None:
    """Every group (class, or event value) of the embedded cases has at least 2 cases."""
    small = counts[counts < 2]
    if len(small):
        raise LabelError(
            f"labels {src}: {what}={small.index[0]!r} has {int(small.iloc[0])} embedded case; "
            "case-level folds need at least 2 per group: add cases or drop that group"
        )
