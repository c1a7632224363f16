"""An image named by location rather than uploaded: a local path (or file:// URL), or a URL
that fsspec reads (s3://, gs://, https://, memory://...)."""

from __future__ import annotations

import os


def is_url(location: str) -> bool:
    """Whether `location` is a URL other than file:// (read with fsspec), not a path."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file"


def local_path(location: str) -> str:
    """The path of a location that is not a URL."""
    return location.removeprefix("file://")


def location_exists(location: str) -> bool:
    """Whether anything is at `location` (a URL is asked of its fsspec filesystem)."""
    if not is_url(location):
        return os.path.lexists(local_path(location))
    import fsspec  # only for URLs

    fs, path = fsspec.core.url_to_fs(location)
    return bool(fs.exists(path))
