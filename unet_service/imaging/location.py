"""An image named by location rather than uploaded: a local path (or file:// URL), or a URL
that fsspec reads (s3://, gs://, https://, memory://...)."""

from __future__ import annotations

import os
import shutil


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
    fs, path = _fs(location)
    return bool(fs.exists(path))


def _fs(location: str):
    import fsspec  # only for URLs

    return fsspec.core.url_to_fs(location)


def is_empty(location: str) -> bool:
    """Whether `location` holds no file (a folder made and nothing written into it yet)."""
    if not is_url(location):
        return not any(files for _, _, files in os.walk(local_path(location)))
    fs, path = _fs(location)
    return not fs.find(path)


def remove_location(location: str) -> None:
    """Remove whatever is at `location`, folders and all."""
    if not is_url(location):
        shutil.rmtree(local_path(location), ignore_errors=True)
        return
    fs, path = _fs(location)
    if fs.exists(path):
        fs.rm(path, recursive=True)
