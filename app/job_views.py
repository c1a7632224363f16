"""A section job as its JSON answer: state, progress, timestamps, an estimate of the time
left and where the result is."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from app.jobtable import JobRecord
from model.imageio import TIFF_MAGIC


def media_type_of(path: Path) -> str:
    """The input's media type from its header: TIFF by its magic (Pillow is not how TIFFs
    are read here), the rest as Pillow names them."""
    with open(path, "rb") as f:
        if f.read(4) in TIFF_MAGIC:
            return "image/tiff"
    try:
        with Image.open(path) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except (UnidentifiedImageError, OSError, ValueError):
        return "application/octet-stream"


def _when(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def eta_s(record: JobRecord, now: float | None = None) -> float | None:
    """Seconds left for a running job at the rate it has kept since it (re)started; None
    before its first tiles are done, 0 once it is finished."""
    if record.state in ("done", "failed", "cancelled"):
        return 0.0
    if record.state != "running" or not record.started_at or record.tiles_done <= 0:
        return None
    elapsed = (now or time.time()) - record.started_at
    left = max(record.tiles_total - record.tiles_done, 0)
    return round(elapsed * left / record.tiles_done, 1)


def job_json(record: JobRecord) -> dict:
    url = f"/v1/jobs/{record.id}"
    params = record.params
    done = record.state == "done"
    total = record.tiles_total
    return {
        "id": record.id,
        "state": record.state,
        "output": params.get("output"),
        "options": {k: params[k] for k in ("colour", "tta") if params.get(k) is not None},
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
            {"url": f"{url}/result", "media_type": record.result_type, "bytes": record.result_bytes}
            if done
            else None
        ),
        "links": {"self": url, "result": f"{url}/result"},
    }
