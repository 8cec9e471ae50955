"""Which slides a job works on: a directory, a glob, an ``s3://`` prefix, a manifest CSV, or an
Imaging Data Commons collection (``idc:<collection>``, :mod:`hipt_ray.slides.idc`)."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from hipt_ray.config import NAME_RULE, InputError, name_problem
from hipt_ray.slide_ref import SlideRef
from hipt_ray.slides.idc import is_idc_source, list_series
from hipt_ray.storage import filesystem, is_remote

# Extensions of the single- and multi-file formats OpenSlide 4 reads.
SLIDE_EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
    ".czi",
)


class ManifestError(InputError):
    """The slide source cannot be listed or parsed (a usage error: exit code 2)."""


@dataclass(frozen=True)
class SlideSpec:
    slide_id: str
    uri: str
    mpp: float | None = None  # a per-slide override for files without usable MPP metadata
    error: str = ""  # set when the slide cannot be processed as listed (an id two files share)
    case_id: str = ""  # the patient (TCGA case) when the source says: IDC's PatientID, a manifest's case_id

    def to_ref(self, overrides: Mapping[str, float] | None = None) -> SlideRef:
        """The reference of this slide as listed, before any tiling: its MPP override is the
        manifest's ``mpp``, else its entry in ``overrides`` (``tiling.mpp_overrides``)."""
        mpp = self.mpp if self.mpp is not None else (overrides or {}).get(self.slide_id)
        return SlideRef(slide_id=self.slide_id, uri=self.uri, mpp_override=mpp, case_id=self.case_id or None)


def checked_slide(slide_id: str, uri: str, mpp: float | None = None) -> SlideSpec:
    """A slide whose id was taken from its file (or object) name: a name that is unsafe as a file
    name under the output is that slide's failure, with the reason (the run goes on). The one
    check of ids made from names, for every source (directories, globs, prefixes, manifests
    without a slide_id)."""
    problem = name_problem(slide_id)
    shown = uri if uri.isprintable() else repr(uri)  # one line, even for a name with a newline
    error = (
        (
            f"{shown}: the slide id {slide_id[:80]!r} taken from the file name {problem} ({NAME_RULE}); "
            "rename the file, or list it in a manifest CSV with a slide_id"
        )
        if problem
        else ""
    )
    return SlideSpec(slide_id, uri, mpp, error)


def slide_id_from_uri(uri: str) -> str:
    name = PurePosixPath(uri.rstrip("/")).name
    for ext in sorted(SLIDE_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name.rsplit(".", 1)[0] if "." in name else name


def _with_protocol(source: str, path: str) -> str:
    if is_remote(source):
        return f"{source.split('://', 1)[0]}://{path}"
    return path


def series_as_slides(paths: list[str]) -> list[str]:
    """``paths`` with each DICOM instance (``.dcm``) replaced by its folder, once, with a
    trailing slash: a DICOM slide is a series, the instances in one folder (an IDC series
    folder), read by :class:`hipt_ray.slides.dicom.DicomSlide`."""
    out: dict[str, None] = {}
    for p in paths:
        out[p.rsplit("/", 1)[0] + "/" if p.lower().endswith(".dcm") else p] = None
    return list(out)


def _read_manifest(source: str, endpoint_url: str | None) -> list[SlideSpec]:
    fs, path = filesystem(source, endpoint_url)
    with fs.open(path, "rb") as fh:
        text = fh.read().decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or "uri" not in rows[0]:
        raise ManifestError(f"manifest {source} needs a header with a 'uri' column (optional: slide_id, case_id, mpp)")
    specs = []
    base = source.rsplit("/", 1)[0]
    for i, row in enumerate(rows, start=2):
        uri = (row.get("uri") or "").strip()
        if not uri:
            raise ManifestError(f"manifest {source}, line {i}: empty 'uri'")
        if "://" not in uri and not uri.startswith("/"):
            uri = f"{base}/{uri}"  # relative to the manifest
        mpp_text = (row.get("mpp") or "").strip()
        try:
            mpp = float(mpp_text) if mpp_text else None
        except ValueError:
            raise ManifestError(f"manifest {source}, line {i}: mpp {mpp_text!r} is not a number") from None
        given = (row.get("slide_id") or "").strip()
        if given and (problem := name_problem(given)) is not None:
            raise ManifestError(f"manifest {source}, line {i}: slide_id {given[:80]!r} {problem} ({NAME_RULE})")
        spec = SlideSpec(given, uri, mpp) if given else checked_slide(slide_id_from_uri(uri), uri, mpp)
        specs.append(replace(spec, case_id=(row.get("case_id") or "").strip()))
    return specs


def _idc_slides(source: str) -> list[SlideSpec]:
    """The slides of an ``idc:<collection>[?…]`` source, from the IDC index (no network)."""
    return [SlideSpec(s.slide_id, s.uri, case_id=s.case_id) for s in list_series(source)]


def write_manifest(specs: list[SlideSpec], uri: str, *, endpoint_url: str | None = None) -> None:
    """``specs`` as a manifest CSV (``uri,slide_id,case_id,mpp``) that ``--slides`` reads back
    as the same slides, and whose ``slide_id``/``case_id`` columns a case-level labels table
    (TCGA clinical data, say) joins to (slides refused as listed are left out)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["uri", "slide_id", "case_id", "mpp"])
    for s in specs:
        if not s.error:
            writer.writerow([s.uri, s.slide_id, s.case_id, "" if s.mpp is None else repr(s.mpp)])
    fs, path = filesystem(uri, endpoint_url)
    with fs.open(path, "wb") as fh:
        fh.write(buf.getvalue().encode())


def list_slides(source: str, *, endpoint_url: str | None = None) -> list[SlideSpec]:
    """Resolve a slide source to slide specs, sorted by slide id.

    Slides that share an id (``a.svs`` and ``a.tiff``, or ``x/a.svs`` and ``y/a.svs``), and slides
    whose file name makes an unsafe id (too long, a control character), are listed with
    ``error`` set, and the tile stage fails each with that reason: the rest of the run goes on.

    Raises:
        ManifestError: nothing matched, the listing failed, or a manifest's slide_id is unusable
            as a file name.
        IdcError: an ``idc:`` source names an unknown collection, key, case or series, or
            idc-index-data is not installed.
    """
    if is_idc_source(source):  # ids unique and name-safe by construction
        return _idc_slides(source)
    if source.lower().endswith(".csv"):
        specs = _read_manifest(source, endpoint_url)
    else:
        fs, path = filesystem(source, endpoint_url)
        fs.invalidate_cache()  # list what is there now, not what an earlier run of this process saw
        try:
            if re.search(r"[*?\[]", path):
                paths = fs.glob(path)
            elif fs.isdir(path):
                paths = [p for p in fs.find(path) if p.lower().endswith(SLIDE_EXTENSIONS)]
            elif fs.exists(path):
                paths = [path]
            else:
                raise ManifestError(
                    f"slide source {source} does not exist; pass a directory, a glob, "
                    "an s3:// prefix or a manifest .csv"
                )
        except ManifestError:
            raise
        except Exception as exc:
            raise ManifestError(f"cannot list slides at {source}: {type(exc).__name__}: {exc}") from None
        paths = series_as_slides(sorted(paths))
        specs = [checked_slide(slide_id_from_uri(p), _with_protocol(source, p)) for p in paths]
    if not specs:
        raise ManifestError(f"no slides found at {source} (extensions: {', '.join(SLIDE_EXTENSIONS)})")
    uris: dict[str, list[str]] = {}
    for spec in specs:
        uris.setdefault(spec.slide_id, []).append(spec.uri)
    out = []
    for spec in specs:
        shared = uris[spec.slide_id]
        if len(shared) > 1 and not spec.error:
            spec = replace(
                spec,
                error=(
                    f"{spec.uri}: slide id {spec.slide_id!r} is shared by {len(shared)} files ({', '.join(shared)}); "
                    "none of them is processed: rename one, or list them in a manifest CSV with distinct "
                    "slide_id values"
                ),
            )
        out.append(spec)
    return sorted(out, key=lambda s: (s.slide_id, s.uri))
