"""An OME-Zarr store as one download: a zip archive of its files (stored, not compressed
again: its chunks are compressed already), streamed as it is made, so a store of any size
passes through memory a file at a time. The store is read with fsspec, wherever it is."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

import fsspec

from unet_service.imaging.location import is_url, local_path


class _Spool(io.RawIOBase):
    """A write-only stream whose bytes are taken away as they come (zipfile writes to it)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        self.parts.append(bytes(data))
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def zipped_store(location: str, folder: str) -> Iterator[bytes]:
    """The files of the store at `location`, each as `folder/<its path in the store>`,
    as the bytes of a zip archive (zip64 where it needs to be)."""
    fs, root = fsspec.core.url_to_fs(location if is_url(location) else local_path(location))
    root = root.rstrip("/")
    spool = _Spool()
    with zipfile.ZipFile(spool, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for path in sorted(fs.find(root)):
            name = f"{folder}/{path[len(root) :].lstrip('/')}"
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as entry:
                entry.write(fs.cat_file(path))
            yield spool.take()
    yield spool.take()
