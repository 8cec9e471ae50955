"""``idc:<collection>`` sources, checked against the real IDC index that idc-index-data ships
(release 25.0.5 pinned in requirements.txt): no network, the index is read once per process."""

import functools
import re
import sys
from collections import Counter

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from hipt_ray.config import InputError, name_problem
from hipt_ray.slides import idc
from hipt_ray.slides.idc import IdcError, IdcListing, collection_series, index_table, list_series, parse_source
from hipt_ray.slides.manifest import list_slides

idc_index_data = pytest.importorskip("idc_index_data")

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@functools.cache
def _brca_table():
    table = pq.read_table(idc_index_data.IDC_INDEX_PARQUET_FILEPATH, filters=[("collection_id", "==", "tcga_brca")])
    return table.filter(pc.equal(table["Modality"], "SM"))


def _brca_rows(first_word: str | None = None) -> list[dict]:
    """tcga_brca's slide-microscopy rows, read straight from the parquet file (not through idc.py)."""
    rows = _brca_table().to_pylist()
    return [r for r in rows if first_word is None or r["SeriesDescription"].split(" ")[0] == first_word]


def test_tcga_brca_lists_its_1133_ffpe_slides_by_default():
    ffpe = _brca_rows("FFPE")
    assert len(ffpe) == 1133  # the count, from release 25.0.5 of the index
    specs = list_slides("idc:tcga_brca")
    assert len(specs) == len(ffpe)
    by_uuid = {r["crdc_series_uuid"]: r for r in ffpe}
    assert {s.uri.split("/")[3] for s in specs} == set(by_uuid)  # exactly the FFPE series
    assert all(by_uuid[s.uri.split("/")[3]]["SeriesDescription"].startswith("FFPE HE ") for s in specs)
    assert [s.slide_id for s in specs] == sorted(s.slide_id for s in specs)


def test_ids_are_unique_readable_and_safe_as_file_names():
    every = collection_series("tcga_brca")  # FFPE and frozen: 3,111 series
    ids = [s.slide_id for s in every]
    assert len(ids) == len(_brca_rows()) == 3111 and len(set(ids)) == len(ids)
    assert all(name_problem(i) is None and re.fullmatch(r"[A-Za-z0-9._-]+", i) for i in ids)
    one = next(s for s in every if s.crdc_series_uuid == "934f6b61-34d4-450a-a9a0-bd085f35fb6c")
    assert (one.slide_id, one.description, one.case_id) == ("TCGA-3C-AALI-TP-DX1", "FFPE HE TP DX1", "TCGA-3C-AALI")
    # two series of one case with one description: both keep the readable part, plus their UUID's start
    twins = [s for s in every if s.case_id == "TCGA-BH-A1ET" and s.description == "Frozen HE NT TSA"]
    assert len(twins) == 2
    assert sorted(s.slide_id for s in twins) == sorted(f"TCGA-BH-A1ET-NT-TSA-{s.crdc_series_uuid[:8]}" for s in twins)


def test_a_slide_keeps_its_id_whatever_the_query_selects():
    wide = {s.uri: s.slide_id for s in list_slides("idc:tcga_brca?sections=all")}
    narrow = list_slides("idc:tcga_brca?cases=TCGA-BH-A1ET&sections=frozen")
    assert narrow and all(wide[s.uri] == s.slide_id for s in narrow)


def test_uris_are_series_folders_in_the_public_bucket_and_cases_are_patient_ids():
    rows = {r["crdc_series_uuid"]: r for r in _brca_rows()}
    for s in collection_series("tcga_brca"):
        assert re.fullmatch(rf"s3://idc-open-data/{UUID}/", s.uri), s.uri
        row = rows[s.crdc_series_uuid]
        assert row["series_aws_url"] == s.uri + "*"  # the index's own bulk URL of the series
        assert s.case_id == row["PatientID"] and re.fullmatch(r"TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}", s.case_id)
        assert s.size_bytes == round(row["series_size_MB"] * 1e6) and s.size_bytes > 0
    specs = list_slides("idc:tcga_brca")
    assert all(sp.case_id == rows[sp.uri.split("/")[3]]["PatientID"] for sp in specs)
    assert len({sp.case_id for sp in specs}) == 1062  # cases with an FFPE slide


def test_query_keys_widen_and_narrow_the_listing():
    assert len(list_slides("idc:tcga_brca?sections=frozen")) == len(_brca_rows("Frozen")) == 1978
    assert len(list_slides("idc:TCGA-BRCA?sections=ffpe,frozen")) == 3111  # the name is case- and dash-insensitive
    cases = list_slides("idc:tcga_brca?cases=TCGA-3C-AALI,TCGA-3C-AALJ")
    assert [(s.slide_id, s.case_id) for s in cases] == [
        ("TCGA-3C-AALI-TP-DX1", "TCGA-3C-AALI"),
        ("TCGA-3C-AALI-TP-DX2", "TCGA-3C-AALI"),
        ("TCGA-3C-AALJ-TP-DX1", "TCGA-3C-AALJ"),
        ("TCGA-3C-AALJ-TP-DX2", "TCGA-3C-AALJ"),
    ]
    frozen = _brca_rows("Frozen")[0]
    by_uid = list_slides(f"idc:tcga_brca?series={frozen['SeriesInstanceUID']},934f6b61-34d4-450a-a9a0-bd085f35fb6c")
    assert sorted(s.uri for s in by_uid) == sorted(
        [
            f"s3://idc-open-data/{frozen['crdc_series_uuid']}/",
            "s3://idc-open-data/934f6b61-34d4-450a-a9a0-bd085f35fb6c/",
        ]
    )  # named series are listed whatever sections says (a frozen one here)
    first = list_slides("idc:tcga_brca?limit=5")
    assert [s.slide_id for s in first] == [s.slide_id for s in list_slides("idc:tcga_brca")][:5]


@pytest.mark.parametrize(
    "source, message",
    [
        ("idc:tcga_brac", r"no such collection .* close names: tcga_brca"),
        ("idc:nothing_like_it", r"no such collection .* e\.g\. tcga_acc, "),
        ("idc:", "names no collection"),
        ("idc:tcga_brca?frozen=true", r"'frozen' is not a query key; the keys are sections, cases, series, limit"),
        ("idc:tcga_brca?limit=5&limit=6", "'limit' is given twice"),
        ("idc:tcga_brca?limit=0", "not a whole number of slides"),
        ("idc:tcga_brca?sections=paraffin", r"sections \['paraffin'\] unknown; choose from ffpe, frozen, all"),
        ("idc:tcga_brca?cases=", "'cases' has no value"),
        ("idc:tcga_brca?cases=TCGA-3C-AALI,TCGA-00-0000", "no case TCGA-00-0000 in the collection"),
        ("idc:tcga_brca?series=1.2.3", "no series 1.2.3 in the collection"),
        ("idc:cptac_brca", r"none of the collection's 653 slide-microscopy series .* \?sections=all"),
    ],
)
def test_a_source_that_cannot_be_listed_is_a_usage_error_that_says_why(source, message):
    with pytest.raises(InputError, match=message):
        list_slides(source)


def test_collections_named_otherwise_list_every_series_with_sections_all():
    specs = list_slides("idc:cptac_brca?sections=all")
    assert len(specs) == 653 and len({s.slide_id for s in specs}) == 653
    assert all(s.case_id and re.fullmatch(rf"s3://idc-open-data/{UUID}/", s.uri) for s in specs)


def test_the_dry_run_listing_counts_slides_bytes_codecs_and_cases():
    listing = IdcListing.of("idc:tcga_brca")
    rows = _brca_rows("FFPE")
    j2k = [r for r in rows if "1.2.840.10008.1.2.4.91" in r["TransferSyntaxUID"].split(",")]
    assert Counter(s.codec for s in listing.series) == {"JPEG baseline": len(rows) - len(j2k), "JPEG 2000": len(j2k)}
    gb = sum(r["series_size_MB"] for r in rows) / 1e3
    text = "\n".join(listing.lines())
    assert "idc:tcga_brca: 1,133 slides of 1,062 cases" in text
    assert f"bytes: {gb:,.1f} GB" in text and f"JPEG 2000: {len(j2k)} slides ({len(j2k) / 1133:.1%})" in text


def test_without_idc_index_data_the_error_names_the_extra_to_install(monkeypatch):
    index_table.cache_clear()
    collection_series.cache_clear()
    monkeypatch.setitem(sys.modules, "idc_index_data", None)  # what `import` meets when it is not installed
    try:
        with pytest.raises(IdcError, match=r"pip install 'hipt-ray\[idc\]' \(the idc-index-data package\)"):
            list_slides("idc:tcga_brca")
    finally:
        index_table.cache_clear()
        collection_series.cache_clear()


def test_parse_source_normalises_the_collection_and_splits_lists():
    q = parse_source("idc:TCGA-LUAD?cases=A, B&sections=FFPE,frozen&limit=3")
    assert q == idc.IdcQuery(collection="tcga_luad", sections=("ffpe", "frozen"), cases=("A", "B"), limit=3)
    assert list_series("idc:tcga_luad?limit=1")[0].case_id.startswith("TCGA-")


def test_the_slides_command_prints_the_listing_and_writes_a_manifest_that_reads_back(tmp_path, capsys):
    from hipt_ray.cli import main

    csv = tmp_path / "brca.csv"
    assert main(["slides", "idc:tcga_brca?cases=TCGA-3C-AALI,TCGA-3C-AALJ", "--write", str(csv)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("idc:tcga_brca?cases=TCGA-3C-AALI,TCGA-3C-AALJ: 4 slides of 2 cases")
    assert out[2].startswith("JPEG 2000: ") and "read anonymously (storage.anonymous_buckets)" in out[3]
    assert out[-1] == f"manifest: {csv}"
    listed = list_slides("idc:tcga_brca?cases=TCGA-3C-AALI,TCGA-3C-AALJ")
    assert csv.read_text().splitlines()[:2] == [
        "uri,slide_id,case_id,mpp",
        f"{listed[0].uri},TCGA-3C-AALI-TP-DX1,TCGA-3C-AALI,",
    ]
    assert list_slides(str(csv)) == listed  # the same slides, ids and cases
    assert main(["slides", str(csv)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{csv}: 4 slides of 2 cases"]


def test_the_slides_command_says_why_a_source_cannot_be_listed(capsys):
    from hipt_ray.cli import main

    assert main(["slides", "idc:tcga_brac"]) == 2
    assert capsys.readouterr().err.startswith("hipt-ray slides: idc:tcga_brac: no such collection")
