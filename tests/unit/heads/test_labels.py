"""The labels table is checked before anything trains: one line naming the column, the rows and
the fix for each problem, or a counted exclusion; ids stay text."""

from __future__ import annotations

import pandas as pd
import pytest

from hipt_ray.config import HeadsConfig
from hipt_ray.heads.labels import LabelError, check_cohort, check_labels, read_labels
from hipt_ray.heads.tasks import task_for

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
