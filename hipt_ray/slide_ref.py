"""A slide's identity: what every stage needs to open a slide and to know it is the same file.

:class:`SlideRef` sits below both :mod:`hipt_ray.slides` (which opens it) and
:mod:`hipt_ray.store` (which builds it from ``slides.lance`` rows), so that neither package
imports the other. New slides get theirs from the manifest
(:meth:`hipt_ray.slides.manifest.SlideSpec.to_ref`); tiled slides from the store
(:meth:`hipt_ray.store.tables.Store.slide_refs`), with the MPP override their tiling used and
the file version it recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def slide_version(size: int | None, etag: str | None) -> str:
    """The identity of a slide file's content as the tables record it: size and ETag (object
    storage) or mtime (local files)."""
    return f"{size}:{etag or ''}"


def same_version(recorded: str, now: str) -> bool:
    """Whether a file whose version is ``now`` is the one a table recorded as ``recorded``.
    Local versions carry a content fingerprint (``mtime#hash``, see
    :func:`hipt_ray.storage.stat`); tables written before it record the mtime alone, and for
    those the fingerprint is left out of the comparison rather than every slide redone."""
    if recorded == now:
        return True
    return "#" not in recorded and "#" in now and now.rsplit("#", 1)[0] == recorded


@dataclass(frozen=True)
class SlideRef:
    """One slide, as every reader opens it.

    Attributes:
        slide_id: the id its rows carry.
        uri: where the file is (local path, ``file://`` or ``s3://``).
        mpp_override: the MPP to open it with instead of its metadata (a manifest ``mpp``,
            ``tiling.mpp_overrides``, or what its tiling recorded); ``None``: its metadata.
        version: :func:`slide_version` of the file its rows were cut from; ``None`` for a slide
            not tiled yet. A file whose version differs now is refused when opened.
        case_id: the patient the slide comes from, when its source says (IDC's ``PatientID``, a
            manifest's ``case_id``); recorded in ``slides.lance`` so labels can join by case.
    """

    slide_id: str
    uri: str
    mpp_override: float | None = None
    version: str | None = None
    case_id: str | None = None

    # The columns a region row to be read carries the reference in (see :meth:`of_region`).
    COLUMNS = ("slide_id", "uri", "mpp_override", "slide_version")

    @classmethod
    def of_region(cls, row: Mapping[str, Any]) -> SlideRef:
        """The reference a region row to be read carries in :attr:`COLUMNS` (Ray Data rows
        hold plain columns, not objects)."""
        mpp = row.get("mpp_override")
        mpp = None if mpp is None or mpp != mpp else float(mpp)  # null may arrive as NaN
        return cls(slide_id=row["slide_id"], uri=row["uri"], mpp_override=mpp, version=row.get("slide_version"))
