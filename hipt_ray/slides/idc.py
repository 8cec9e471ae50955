"""The NCI Imaging Data Commons (IDC) as a slide source: ``--slides idc:<collection>[?key=value&…]``.

Every TCGA slide is public in IDC as a DICOM series in the ``idc-open-data`` bucket, which anyone
can read anonymously (``storage.anonymous_buckets``). The series come from the IDC index shipped
in the optional ``idc-index-data`` package (``pip install 'hipt-ray[idc]'``), so listing them
needs no network. A slide is one series; its URI is the series folder,
``s3://<bucket>/<crdc_series_uuid>/``, which the DICOM reader opens as one slide.

By default a collection lists its FFPE diagnostic slides (``SeriesDescription`` starting
``FFPE``: what HIPT was trained and evaluated on). Query keys, joined with ``&``:

- ``sections=ffpe`` (default), ``frozen``, ``ffpe,frozen``, or ``all`` (every slide-microscopy
  series of the collection, whatever its description: collections outside TCGA name their
  series otherwise);
- ``cases=TCGA-A1-A0SB,…``: only these cases (``PatientID``), within ``sections``;
- ``series=<uid>,…``: exactly these series (``SeriesInstanceUID`` or ``crdc_series_uuid``),
  whatever ``sections`` says;
- ``limit=N``: the first N slides by slide id (a trial run).

Slide ids are readable: the case (``PatientID``) and the rest of the description after TCGA's
preparation and stain (``FFPE HE TP DX1`` → ``TCGA-3C-AALI-TP-DX1``), plus the first 8
characters of the series' UUID where two series of the collection would share an id. Ids are
made over the whole collection, so a slide keeps its id whatever the query selects.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hipt_ray.config import InputError, name_problem

SCHEME = "idc:"
EXTRA = "pip install 'hipt-ray[idc]' (the idc-index-data package)"
SECTIONS = {"ffpe": "FFPE", "frozen": "Frozen"}  # key → SeriesDescription's first word (TCGA)
QUERY_KEYS = ("sections", "cases", "series", "limit")
COLUMNS = [
    "collection_id",
    "PatientID",
    "SeriesInstanceUID",
    "SeriesDescription",
    "TransferSyntaxUID",
    "instanceCount",
    "aws_bucket",
    "crdc_series_uuid",
    "series_size_MB",
]
# The pixel codecs of slide-microscopy series, by transfer syntax UID. The index lists every syntax
# a series' instances use; Explicit VR Little Endian (uncompressed) sits beside the codec in most
# TCGA series (one of their instances is stored uncompressed), so a series' codec is the
# compressed syntax it holds.
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
CODECS = {
    "1.2.840.10008.1.2.4.50": "JPEG baseline",
    "1.2.840.10008.1.2.4.90": "JPEG 2000",  # lossless only
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.80": "JPEG-LS",
    "1.2.840.10008.1.2.4.81": "JPEG-LS",
    "1.2.840.10008.1.2.4.201": "HTJ2K",
    "1.2.840.10008.1.2.4.202": "HTJ2K",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
    "1.2.840.10008.1.2.4.110": "JPEG XL",
    "1.2.840.10008.1.2.4.111": "JPEG XL",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
}
_TCGA_DESCRIPTION = re.compile(r"^(?:FFPE|Frozen)\s+HE\s+(.*)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class IdcError(InputError):
    """An ``idc:`` source that cannot be listed as given (a usage error: exit code 2)."""


@dataclass(frozen=True)
class IdcSeries:
    """One slide (a DICOM series) of the IDC index."""

    slide_id: str
    case_id: str  # PatientID: the TCGA case (TCGA-XX-XXXX)
    series_uid: str
    crdc_series_uuid: str
    uri: str  # s3://<bucket>/<crdc_series_uuid>/ (the series folder)
    description: str
    size_bytes: int  # all instances of the series (every level, label and overview)
    instances: int
    transfer_syntaxes: tuple[str, ...]

    @property
    def codec(self) -> str:
        """The pixel codec of the series (several joined with '+'; 'uncompressed' if none)."""
        names = sorted({CODECS.get(ts, ts) for ts in self.transfer_syntaxes if ts not in UNCOMPRESSED})
        return "+".join(names) or "uncompressed"


@dataclass(frozen=True)
class IdcQuery:
    collection: str
    sections: tuple[str, ...] = ("ffpe",)  # keys of SECTIONS, or ("all",)
    cases: tuple[str, ...] = ()
    series: tuple[str, ...] = ()
    limit: int | None = None


def is_idc_source(source: str) -> bool:
    return source[: len(SCHEME)].lower() == SCHEME


def _values(source: str, key: str, text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise IdcError(f"slide source {source!r}: {key!r} has no value; e.g. {key}=a,b")
    return values


def parse_source(source: str) -> IdcQuery:
    """``idc:<collection>[?key=value&…]`` → its query (collection lower-cased, '-' → '_').

    Raises:
        IdcError: no collection, an unknown key, or a value that does not fit its key.
    """
    name, _, query = source[len(SCHEME) :].partition("?")
    collection = name.strip().lower().replace("-", "_")
    if not collection:
        raise IdcError(f"slide source {source!r} names no collection; e.g. idc:tcga_brca")
    fields: dict = {}
    for key, text in parse_qsl(query, keep_blank_values=True, separator="&"):
        if key not in QUERY_KEYS or key in fields:
            why = "is given twice" if key in fields else "is not a query key"
            raise IdcError(f"slide source {source!r}: {key!r} {why}; the keys are {', '.join(QUERY_KEYS)}")
        if key == "limit":
            if not text.strip().isdigit() or int(text) < 1:
                raise IdcError(f"slide source {source!r}: limit={text!r} is not a whole number of slides ≥ 1")
            fields[key] = int(text)
            continue
        values = _values(source, key, text)
        if key == "sections":
            known = (*SECTIONS, "all")
            values = tuple(v.lower() for v in values)
            if bad := [v for v in values if v not in known]:
                raise IdcError(f"slide source {source!r}: sections {bad} unknown; choose from {', '.join(known)}")
        fields[key] = values
    return IdcQuery(collection=collection, **fields)


@functools.cache
def index_table() -> pa.Table:
    """The slide-microscopy (``Modality`` SM) rows of the IDC index shipped in idc-index-data,
    read once per process: 76,300 of its 1,044,191 rows in release 25.0.5, 0.3-0.6 s on a
    2-core AMD EPYC with the 75 MB file in the page cache (up to 3 s with both cores busy).

    Raises:
        IdcError: idc-index-data is not installed.
    """
    try:
        import idc_index_data  # optional: only idc: sources need it
    except ImportError:
        raise IdcError(f"--slides idc:… reads the IDC index from the idc-index-data package: {EXTRA}") from None
    return pq.read_table(idc_index_data.IDC_INDEX_PARQUET_FILEPATH, columns=COLUMNS, filters=[("Modality", "==", "SM")])


def index_version() -> str:
    """The idc-index-data release the listing comes from (its version follows IDC's releases)."""
    import idc_index_data

    return str(idc_index_data.__version__)


def _readable_id(case_id: str, description: str) -> str:
    """The case and the rest of the description after TCGA's preparation and stain, in the
    characters safe in file names everywhere ('FFPE HE TP DX1' → '<case>-TP-DX1')."""
    match = _TCGA_DESCRIPTION.match(description.strip())
    parts = (case_id, match.group(1) if match else description)
    return "-".join(p for p in (_UNSAFE.sub("-", part).strip("-.") for part in parts) if p)


def _unique_ids(rows: list[dict]) -> list[str]:
    """A readable id per row, the series UUID's first 8 characters added where ids would repeat
    (the whole UUID if even that repeats, or if the id is unusable as a file name)."""
    ids = [_readable_id(r["PatientID"] or "", r["SeriesDescription"] or "") for r in rows]
    counts = Counter(ids)
    ids = [f"{sid}-{r['crdc_series_uuid'][:8]}" if counts[sid] > 1 else sid for sid, r in zip(ids, rows)]
    counts = Counter(ids)
    return [
        sid if counts[sid] == 1 and name_problem(sid) is None else r["crdc_series_uuid"] for sid, r in zip(ids, rows)
    ]


def _series(row: dict, slide_id: str) -> IdcSeries:
    uuid = row["crdc_series_uuid"]
    return IdcSeries(
        slide_id=slide_id,
        case_id=row["PatientID"] or "",
        series_uid=row["SeriesInstanceUID"],
        crdc_series_uuid=uuid,
        uri=f"s3://{row['aws_bucket']}/{uuid}/",
        description=row["SeriesDescription"] or "",
        size_bytes=round((row["series_size_MB"] or 0.0) * 1e6),  # the index's MB are 10^6 bytes
        instances=int(row["instanceCount"] or 0),
        transfer_syntaxes=tuple((row["TransferSyntaxUID"] or "").split(",")),
    )


def slide_collections() -> list[str]:
    """The collections of the index that hold slide-microscopy series."""
    return sorted(pc.unique(index_table()["collection_id"]).to_pylist())


@functools.cache
def collection_series(collection: str) -> tuple[IdcSeries, ...]:
    """Every slide-microscopy series of ``collection``, sorted by slide id (ids unique).

    Raises:
        IdcError: the index has no such collection (close names are listed).
    """
    table = index_table()
    rows = table.filter(pc.equal(table["collection_id"], collection)).to_pylist()
    if not rows:
        names = slide_collections()
        close = difflib.get_close_matches(collection, names, n=6, cutoff=0.6)
        tcga = [n for n in names if n.startswith("tcga_")]
        hint = f"close names: {', '.join(close)}" if close else f"e.g. {', '.join(tcga[:8] or names[:8])} …"
        raise IdcError(
            f"idc:{collection}: no such collection with slide-microscopy series in the IDC index "
            f"(idc-index-data {index_version()}, {len(names)} such collections); {hint}"
        )
    rows.sort(key=lambda r: (r["PatientID"] or "", r["SeriesDescription"] or "", r["crdc_series_uuid"]))
    return tuple(sorted((_series(r, sid) for r, sid in zip(rows, _unique_ids(rows))), key=lambda s: s.slide_id))


def _in_sections(series: IdcSeries, sections: Iterable[str]) -> bool:
    if "all" in sections:
        return True
    first = series.description.split(" ", 1)[0]
    return any(first == SECTIONS[s] for s in sections)


def _missing(kind: str, wanted: tuple[str, ...], found: set[str], collection: str) -> None:
    if missing := [w for w in wanted if w not in found]:
        shown = ", ".join(missing[:5]) + (f" … ({len(missing)} in all)" if len(missing) > 5 else "")
        raise IdcError(f"idc:{collection}: no {kind} {shown} in the collection; check the ids")


def list_series(source: str) -> list[IdcSeries]:
    """The slides an ``idc:`` source names, sorted by slide id.

    Raises:
        IdcError: an unknown collection, key, case or series, or nothing selected.
    """
    query = parse_source(source)
    every = collection_series(query.collection)
    if query.series:
        wanted = set(query.series)
        picked = [s for s in every if s.series_uid in wanted or s.crdc_series_uuid in wanted]
        _missing(
            "series",
            query.series,
            {s.series_uid for s in picked} | {s.crdc_series_uuid for s in picked},
            query.collection,
        )
    else:
        picked = [s for s in every if _in_sections(s, query.sections)]
    if query.cases:
        _missing("case", query.cases, {s.case_id for s in every}, query.collection)
        cases = set(query.cases)
        picked = [s for s in picked if s.case_id in cases]
    if not picked:
        raise IdcError(
            f"{source}: none of the collection's {len(every)} slide-microscopy series is selected "
            f"(sections={','.join(query.sections)} matches SeriesDescription starting "
            f"{' or '.join(repr(SECTIONS[s]) for s in query.sections if s in SECTIONS) or '…'}, "
            "TCGA's naming); add ?sections=all to list every series"
        )
    return picked[: query.limit] if query.limit else picked


@dataclass(frozen=True)
class IdcListing:
    """What an ``idc:`` source would process, told before anything runs (no network)."""

    source: str
    series: tuple[IdcSeries, ...]

    @classmethod
    def of(cls, source: str) -> IdcListing:
        return cls(source, tuple(list_series(source)))

    def lines(self, anonymous_buckets: Collection[str] = ()) -> list[str]:
        """The counts, and how the objects will be read (``anonymous_buckets``: storage.anonymous_buckets)."""
        n = len(self.series)
        size = sum(s.size_bytes for s in self.series)
        codecs: dict[str, int] = {}
        for s in self.series:
            codecs[s.codec] = codecs.get(s.codec, 0) + 1
        j2k = codecs.get("JPEG 2000", 0)
        by_codec = ", ".join(f"{c} {k:,} ({k / n:.1%})" for c, k in sorted(codecs.items(), key=lambda kv: -kv[1]))
        return [
            f"{self.source}: {n:,} slides of {len({s.case_id for s in self.series}):,} cases "
            f"(IDC index, idc-index-data {index_version()})",
            f"bytes: {size / 1e9:,.1f} GB in all (series sizes from the index: every level, label and overview)",
            f"JPEG 2000: {j2k:,} slides ({j2k / n:.1%}); by codec: {by_codec}",
            f"objects: {self.series[0].uri} …, " + self._access(anonymous_buckets),
        ]

    def _access(self, anonymous_buckets: Collection[str]) -> str:
        buckets = sorted({s.uri.split("/")[2] for s in self.series})
        if set(buckets) <= set(anonymous_buckets):
            return "read anonymously (storage.anonymous_buckets)"
        return f"read with your AWS credentials: {', '.join(buckets)} not in storage.anonymous_buckets"
