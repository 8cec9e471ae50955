"""The labels table of a slide-level head, read and checked before anything trains.

Ids are read as text (``000`` stays ``000``). Every problem is either one :class:`LabelError`
(exit code 2) naming the file, the column, the rows and the fix, or a counted exclusion that the
command prints (an exact duplicate row is dropped; nothing else is guessed).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from hipt_ray.config import ConfigError
from hipt_ray.storage import filesystem

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


def _where(df: pd.DataFrame, mask) -> str:
    rows = (np.flatnonzero(np.asarray(mask)) + df.attrs.get("first_line", 2)).tolist()
    kind = "row" if df.attrs.get("first_line") == 1 else "line"
    shown = ", ".join(map(str, rows[:8])) + (" …" if len(rows) > 8 else "")
    return f"{kind}{'s' if len(rows) > 1 else ''} {shown}"


def _blank(values: pd.Series) -> np.ndarray:
    return values.map(lambda v: _missing(v) or str(v).strip().lower() in _MISSING).to_numpy(dtype=bool)


def _numbers(values: pd.Series) -> np.ndarray:
    as_text = values.map(lambda v: int(v) if isinstance(v, (bool, np.bool_)) else str(v).strip())
    return pd.to_numeric(as_text, errors="coerce").to_numpy(dtype=float)


def check_labels(df: pd.DataFrame, *, task: str, label_column: str) -> tuple[pd.DataFrame, list[str]]:
    """The table with typed, validated columns (``slide_id``, ``case_id`` text; the label text, or
    ``survival_months`` float ≥ 0 and ``event`` 0/1), and what was excluded, one line each.

    Raises:
        LabelError: a problem only the table's author can fix.
    """
    src = df.attrs.get("source", "labels")
    need = list(ID_COLUMNS) + ([label_column] if task == "subtyping" else ["survival_months", "event"])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise LabelError(f"labels {src} lacks column(s) {missing} (has {list(df.columns)}); the {task} task "
                         f"needs {need}" + ("; set heads.label_column=… for another label column"
                                            if task == "subtyping" else ""))
    if df.empty:
        raise LabelError(f"labels {src} has no rows")
    df = df.reset_index(drop=True)
    for col in need:
        bad = _blank(df[col])
        if bad.any():
            raise LabelError(f"labels {src}: column {col} is empty at {_where(df, bad)}; fill it in or drop those rows")
    for col in ID_COLUMNS:
        df[col] = df[col].map(lambda v: str(v).strip())
    if task == "survival":
        months = _numbers(df["survival_months"])
        bad = ~np.isfinite(months) | (months < 0)
        if bad.any():
            raise LabelError(f"labels {src}: column survival_months must be a number ≥ 0 (months); "
                             f"{_where(df, bad)} hold {sorted(set(df['survival_months'][bad].astype(str)))[:5]}")
        event = _numbers(df["event"])
        bad = ~np.isin(event, (0.0, 1.0))
        if bad.any():
            raise LabelError(f"labels {src}: column event must be 1 (event observed) or 0 (censored); "
                             f"{_where(df, bad)} hold {sorted(set(df['event'][bad].astype(str)))[:5]}")
        df["survival_months"], df["event"] = months, event.astype(int)
    else:
        df[label_column] = df[label_column].map(lambda v: str(v).strip())
    excluded = []
    dup = df.duplicated(subset=need, keep="first")
    if dup.any():
        excluded.append(f"{int(dup.sum())} duplicate row(s) dropped ({_where(df, dup)}: same slide, case and label)")
        df = df[~dup]
    clash = df["slide_id"].duplicated(keep=False)
    if clash.any():
        first = df[clash].iloc[0]["slide_id"]
        raise LabelError(f"labels {src}: slide {first!r} has more than one row with different values "
                         f"({_where(df, (df['slide_id'] == first).to_numpy())}), e.g. under two cases (a slide in "
                         "train and validation at once); keep one row per slide_id")
    per_case = df.groupby("case_id", sort=True)
    fields = [label_column] if task == "subtyping" else ["survival_months", "event"]
    for col in fields:
        n = per_case[col].nunique()
        if (n > 1).any():
            case = n[n > 1].index[0]
            raise LabelError(f"labels {src}: case {case!r} has slides with different {col} "
                             f"({sorted(set(df.loc[df['case_id'] == case, col].astype(str)))}); "
                             f"a case has one {col}: correct those rows")
    return df, excluded


def check_cohort(df: pd.DataFrame, *, task: str, label_column: str) -> None:
    """What the embedded part of the table must hold to train and validate a head (after the
    join with the embeddings: ``df`` is the labelled rows of embedded slides).

    Raises:
        LabelError: too few cases or classes, or (survival) no comparable pair of cases.
    """
    src = df.attrs.get("source", "labels")
    cases = df.drop_duplicates("case_id")
    if len(cases) < 4:
        raise LabelError(f"labels {src}: only {len(cases)} labelled case(s) have embeddings; a head needs at "
                         "least 4 (2 per class or event group, for 2-fold validation)")
    strata = cases[label_column] if task == "subtyping" else cases["event"]
    counts = strata.value_counts()
    if task == "subtyping" and len(counts) < 2:
        raise LabelError(f"labels {src}: every embedded case has {label_column}={counts.index[0]!r}; "
                         "a classifier needs at least two classes")
    if task == "survival" and counts.get(1, 0) == 0:
        raise LabelError(f"labels {src}: no embedded case has event=1; survival models and the c-index need "
                         "observed events")
    small = counts[counts < 2]
    if len(small) and (task == "subtyping" or len(counts) > 1):
        what = label_column if task == "subtyping" else "event"
        raise LabelError(f"labels {src}: {what}={small.index[0]!r} has {int(small.iloc[0])} embedded case; "
                         "case-level folds need at least 2 per group: add cases or drop that group")
    if task == "survival":
        times, events = cases["survival_months"].to_numpy(), cases["event"].to_numpy()
        if not any(e and (times > t).any() for t, e in zip(times, events)):
            raise LabelError(f"labels {src}: no pair of cases can be ordered (every event is at the longest "
                             "time); the c-index needs an event earlier than another case's time")
