"""A section job as its JSON answer: state, progress, timestamps, an estimate of the time
left and where the result is; and the name its result downloads under."""

from __future__ import annotations

import re
import time
import unicodedata
from datetime import UTC, datetime
from pathlib import PurePosixPath
from urllib.parse import quote

from unet_service.jobs.table.records import JobRecord


def _when(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def eta_s(record: JobRecord, now: float | None = None) -> float | None:
    """Seconds left for a running job at the rate its current attempt has kept (the time of
    an earlier attempt says nothing, and the tiles a resumed attempt found done, an OME-Zarr
    result's written blocks, took none of this one's); None before the attempt's first
    tiles are done, 0 once it is finished."""
    if record.state in ("done", "failed", "cancelled"):
        return 0.0
    # Rows of an older schema have no attempt_started_at.
    since = record.attempt_started_at or record.started_at
    if record.state != "running" or not since or record.tiles_done <= 0:
        return None
    computed = record.tiles_done - record.tiles_resumed  # by this attempt
    if computed <= 0:
        return None
    elapsed = (now or time.time()) - since
    left = max(record.tiles_total - record.tiles_done, 0)
    return round(elapsed * left / computed, 1)


# Longest upload stem kept in a result's name.
MAX_STEM = 100
_NOT_ASCII_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _stem(input_name: str) -> str:
    """The upload's file name without its folders (either kind of slash) and extension,
    without control characters and quotes."""
    name = PurePosixPath(input_name.replace("\\", "/")).name
    base, dot, _ = name.rpartition(".")
    stem = base if dot else name
    kept = "".join(c for c in stem if c.isprintable() and c not in '"')
    return kept.strip(" .")[:MAX_STEM]


def download_name(record: JobRecord) -> str:
    """`<upload stem>_<output>.tif` (`section_mask.tif` for `section.tif`), or `.zarr.zip`
    for an OME-Zarr result; the job id takes the stem's place when the input had no name."""
    ending = ".zarr.zip" if record.params.get("format") == "zarr" else ".tif"
    stem = _stem(record.input_name.rstrip("/\\"))
    return f"{stem or record.id}_{record.params.get('output', 'result')}{ending}"


def content_disposition(record: JobRecord) -> str:
    """An attachment named download_name: a plain ASCII `filename` every client reads, and
    the name itself as `filename*` (RFC 6266) when it is more than that."""
    name = download_name(record)
    stem, _, ending = name.rpartition("_")  # ending: <output>.tif or <output>.zarr.zip
    # Accents dropped (é -> e), anything else not plainly safe in a header -> _.
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    ascii_stem = _NOT_ASCII_SAFE.sub("_", ascii_stem).strip("_")
    if not re.search(r"[A-Za-z0-9]", ascii_stem):  # nothing of the stem is left
        ascii_stem = record.id
    plain = f"{ascii_stem}_{ending}"
    header = f'attachment; filename="{plain}"'
    if plain != name:
        header += f"; filename*=UTF-8''{quote(name, safe='')}"
    return header


def job_json(record: JobRecord) -> dict:
    url = f"/v1/jobs/{record.id}"
    params = record.params
    done = record.state == "done"
    total = record.tiles_total
    store = params.get("store")  # where an OME-Zarr result is written
    return {
        "id": record.id,
        "state": record.state,
        "model": params.get("model"),
        "output": params.get("output"),
        "options": {k: params[k] for k in ("colour", "tta") if params.get(k) is not None},
        "format": params.get("format", "tiff"),
        "input": {
            "name": record.input_name,
            "media_type": record.input_type,
            "bytes": record.input_bytes,
            "width": params.get("width"),
            "height": params.get("height"),
            "pages": record.pages_total,
        },
        "progress": {
            "tiles_done": record.tiles_done,
            "tiles_total": total,
            "pages_done": record.pages_done,
            "pages_total": record.pages_total,
            "fraction": 1.0 if done else (round(record.tiles_done / total, 4) if total else 0.0),
        },
        "created_at": _when(record.created_at),
        "started_at": _when(record.started_at),
        "finished_at": _when(record.finished_at),
        "eta_s": eta_s(record),
        "attempts": record.attempts,
        "error": record.error,
        "result": (
            {
                "url": f"{url}/result",
                "media_type": record.result_type,
                "bytes": record.result_bytes,
                "name": download_name(record),
                **({"store": store} if store else {}),
            }
            if done
            else None
        ),
        "links": {"self": url, "result": f"{url}/result"},
    }
