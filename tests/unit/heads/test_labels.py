"""The labels table is checked before anything trains: one line naming the column, the rows and
the fix for each problem, or a counted exclusion; ids stay text."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pyarrow as pa
import pytest

from hipt_ray.config import HeadsConfig, load_config
from hipt_ray.heads.cohort import load_cohort
from hipt_ray.heads.labels import LabelError, check_cohort, check_labels, join_cases, read_labels
from hipt_ray.heads.tasks import task_for
from hipt_ray.store import REGIONS_SCHEMA, Store, embedding_fields

SURV = "slide_id,case_id,survival_months,event\n"


def _task(task: str, label_column: str = "label"):
    return task_for(HeadsConfig(task=task, label_column=label_column))


def _csv(tmp_path, text: str, name: str = "labels.csv") -> pd.DataFrame:
    (tmp_path / name).write_text(text)
    return read_labels(str(tmp_path / name))


def _survival(tmp_path, body: str) -> tuple[pd.DataFrame, list[str]]:
    return check_labels(_csv(tmp_path, SURV + body), task=_task("survival"))


def _subtyping(tmp_path, body: str) -> tuple[pd.DataFrame, list[str]]:
    return check_labels(_csv(tmp_path, "slide_id,case_id,label\n" + body), task=_task("subtyping"))


@pytest.mark.parametrize(
    "body, match",
    [
        ("a,c1,12.5,1\nb,c2,,0\n", r"column survival_months is empty at line 3"),
        ("a,c1,12.5,1\nb,c2,NaN,0\n", r"column survival_months is empty at line 3"),
        ("a,c1,12.5,1\nb,c2,-3,0\n", r"survival_months must be a number ≥ 0 .*line 3 hold \['-3'\]"),
        ("a,c1,12.5,1\nb,c2,inf,0\n", r"survival_months must be a number ≥ 0"),
        ("a,c1,12.5,no\nb,c2,3,0\n", r"column event must be 1 .* or 0 .*line 2 hold \['no'\]"),
        ("a,c1,12.5,2\nb,c2,3,0\n", r"column event must be 1 .*line 2 hold \['2'\]"),
        ("a,c1,12.5,1\nb,c1,3,1\n", r"case 'c1' has slides with different survival_months"),
        ("a,c1,12.5,1\nb,c1,12.5,0\n", r"case 'c1' has slides with different event"),
        ("a,c1,12.5,1\na,c2,12.5,1\n", r"slide 'a' has more than one row .*lines 2, 3.*under two cases"),
        (",c1,12.5,1\n", r"column slide_id is empty at line 2"),
    ],
)
def test_survival_tables_that_are_refused(tmp_path, body, match):
    with pytest.raises(LabelError, match=match) as err:
        _survival(tmp_path, body)
    assert "labels.csv" in str(err.value) and "\n" not in str(err.value)


def test_subtyping_tables_that_are_refused(tmp_path):
    with pytest.raises(LabelError, match=r"case 'c1' has slides with different label \(\['luad', 'lusc'\]\)"):
        _subtyping(tmp_path, "a,c1,luad\nb,c1,lusc\n")
    with pytest.raises(LabelError, match=r"column label is empty at line 3"):
        _subtyping(tmp_path, "a,c1,luad\nb,c2,NA\n")
    with pytest.raises(LabelError, match=r"lacks column\(s\) \['grade'\].*heads.label_column"):
        check_labels(_csv(tmp_path, "slide_id,case_id,label\na,c1,x\n"), task=_task("subtyping", "grade"))
    with pytest.raises(LabelError, match="no such file"):
        read_labels(str(tmp_path / "nope.csv"))


def test_ids_stay_text_and_exact_duplicates_are_counted_out(tmp_path):
    df, excluded = _subtyping(tmp_path, "000,007,luad\n0,7,lusc\n000,007,luad\n 1 ,8,lusc\n")
    assert df["slide_id"].tolist() == ["000", "0", "1"] and df["case_id"].tolist() == ["007", "7", "8"]
    assert excluded == ["1 duplicate row(s) dropped (line 4: same slide, case and label)"]
    df, _ = _survival(tmp_path, "a,c1, 12.5 ,1.0\nb,c2,3,0\n")
    assert df["survival_months"].tolist() == [12.5, 3.0] and df["event"].tolist() == [1, 0]


def test_parquet_numeric_ids_become_text(tmp_path):
    pd.DataFrame({"slide_id": [1, 2], "case_id": [10, 20], "label": ["a", "b"]}).to_parquet(tmp_path / "l.parquet")
    df, _ = check_labels(read_labels(str(tmp_path / "l.parquet")), task=_task("subtyping"))
    assert df["slide_id"].tolist() == ["1", "2"] and df["case_id"].tolist() == ["10", "20"]
    bad = pd.DataFrame(
        {"slide_id": ["a", "b"], "case_id": ["c1", "c2"], "survival_months": [1.0, None], "event": [1, 0]}
    )
    bad.to_parquet(tmp_path / "s.parquet")
    with pytest.raises(LabelError, match="survival_months is empty at row 2"):
        check_labels(read_labels(str(tmp_path / "s.parquet")), task=_task("survival"))


def test_what_the_embedded_cases_must_hold(tmp_path):
    rows = "".join(f"s{i},c{i},{'luad' if i < 6 else 'lusc'}\n" for i in range(8))
    df, _ = _subtyping(tmp_path, rows)
    check_cohort(df, task=_task("subtyping"))  # 6 + 2 cases: fine
    with pytest.raises(LabelError, match="at least two classes"):
        check_cohort(df[df["label"] == "luad"], task=_task("subtyping"))
    with pytest.raises(LabelError, match="label='lusc' has 1 embedded case"):
        check_cohort(df.iloc[:7], task=_task("subtyping"))
    with pytest.raises(LabelError, match="only 3 labelled case"):
        check_cohort(df.iloc[:3], task=_task("subtyping"))
    surv, _ = _survival(tmp_path, "".join(f"s{i},c{i},{10 + i},0\n" for i in range(6)))
    with pytest.raises(LabelError, match="no embedded case has event=1"):
        check_cohort(surv, task=_task("survival"))
    # events only at the longest time: no admissible pair for the c-index
    surv, _ = _survival(tmp_path, "".join(f"s{i},c{i},{10 + i},0\n" for i in range(4)) + "s8,c8,50,1\ns9,c9,50,1\n")
    with pytest.raises(LabelError, match="no pair of cases can be ordered"):
        check_cohort(surv, task=_task("survival"))
    surv, _ = _survival(tmp_path, "".join(f"s{i},c{i},{10 + i},{i % 2}\n" for i in range(6)))
    check_cohort(surv, task=_task("survival"))


# --- labels per case (case_id, no slide_id): the usual shape of TCGA labels ---------------------


def _per_case(tmp_path, body: str, task: str = "subtyping"):
    header = "case_id,label\n" if task == "subtyping" else "case_id,survival_months,event\n"
    return check_labels(_csv(tmp_path, header + body), task=_task(task))


def test_case_level_labels_are_checked_in_their_own_shape(tmp_path):
    df, excluded = _per_case(tmp_path, "TCGA-01,luad\nTCGA-02,lusc\nTCGA-01,luad\n")
    assert "slide_id" not in df.columns and df.attrs["per_case"]
    assert df["case_id"].tolist() == ["TCGA-01", "TCGA-02"]
    assert excluded == ["1 duplicate row(s) dropped (line 4: same case and label)"]
    with pytest.raises(LabelError, match=r"case 'TCGA-01' has more than one row .*\(lines 2, 4\).*one row per case_id"):
        _per_case(tmp_path, "TCGA-01,luad\nTCGA-02,lusc\nTCGA-01,lusc\n")
    with pytest.raises(LabelError, match=r"column case_id is empty at line 3"):
        _per_case(tmp_path, "TCGA-01,luad\n,lusc\n")
    with pytest.raises(LabelError, match=r"column event must be 1 .*line 3 hold \['yes'\]"):
        _per_case(tmp_path, "TCGA-01,12,1\nTCGA-02,3,yes\n", task="survival")
    with pytest.raises(LabelError, match=r"lacks column\(s\) \['label'\].*or case_id without slide_id"):
        check_labels(_csv(tmp_path, "case_id,grade\nc1,x\n"), task=_task("subtyping"))


def test_row_numbers_stay_the_files_after_duplicates_are_dropped(tmp_path):
    with pytest.raises(LabelError, match=r"slide 'a' has more than one row .*\(lines 2, 4\)"):
        _subtyping(tmp_path, "a,c1,luad\na,c1,luad\na,c2,lusc\n")


def test_case_level_labels_join_the_slides_of_each_case(tmp_path):
    df, _ = _per_case(tmp_path, "TCGA-01,luad\nTCGA-02,lusc\nTCGA-03,lusc\n")
    slides = {"s1": "TCGA-01", "s2": "TCGA-01", "s3": "TCGA-02", "s9": "TCGA-99", "old": None}
    joined, no_slides = join_cases(df, lambda: slides)
    assert joined[["slide_id", "case_id", "label"]].values.tolist() == [
        ["s1", "TCGA-01", "luad"],
        ["s2", "TCGA-01", "luad"],
        ["s3", "TCGA-02", "lusc"],
    ]
    assert no_slides == ["TCGA-03"] and joined.attrs["source"].endswith("labels.csv")
    with pytest.raises(LabelError, match=r"none of the 2 slides in slides.lance records its case.*add a slide_id"):
        join_cases(df, lambda: {"s1": None, "s2": ""})
    slide_level, _ = _subtyping(tmp_path, "s1,c1,luad\n")
    asked = []
    assert join_cases(slide_level, lambda: asked.append(1) or {})[0] is slide_level and not asked


def test_load_cohort_joins_case_labels_through_slides_lance(tmp_path):
    """A real Store: slides.lance's case_id takes a per-case table to its slides' embeddings."""
    out = tmp_path / "out"
    schema = pa.schema(list(REGIONS_SCHEMA) + embedding_fields(4, 3))
    store = Store(str(out))
    cases = {"s0": "c0", "s1": "c0", "s2": "c1", "s3": "c2", "s4": "c3", "s5": "c4", "s6": None}
    for i, (sid, case) in enumerate(cases.items()):
        slide = {"slide_id": sid, "uri": f"/x/{sid}.svs", "status": "ok", "spec_hash": "h", "n_regions": 1}
        slide |= {"model_id": "m", "case_id": case, "time": datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i)}
        region = {"slide_id": sid, "region_index": 0, "x": 0, "y": 0, "spec_hash": "h", "model_id": "m"}
        region |= {"emb4k": [float(i)] * 4, "mean256": [0.0] * 3}
        store.append_slides([slide], [region], regions_schema=schema)
    labels = "case_id,label\nc0,luad\nc1,luad\nc2,lusc\nc3,lusc\nc9,lusc\n"
    (tmp_path / "labels.csv").write_text(labels)
    cfg = load_config(values={"out": str(out)}, overrides=[f"heads.labels={tmp_path / 'labels.csv'}"])
    cohort = load_cohort(cfg)
    assert cohort.case_ids == ["c0", "c1", "c2", "c3"]
    assert cohort.slides == {"c0": ["s0", "s1"], "c1": ["s2"], "c2": ["s3"], "c3": ["s4"]}
    assert [b[:, 0].tolist() for b in cohort.bags] == [[0.0, 1.0], [2.0], [3.0], [4.0]]
    assert cohort.classes == ["luad", "lusc"] and cohort.labels.tolist() == [0, 0, 1, 1]
    assert cohort.missing_embeddings == ["case c9 (no slide)"] and cohort.unlabelled == ["s5", "s6"]
