"""Where a job may read its input and write its result when it names them instead of uploading
(an OME-Zarr image at a path or URL): the operator's settings (`LocationSettings`, part of
`Settings`) and the one check of a location against them. By default nothing is allowed, so a
server reads and writes only what is uploaded to it and its own jobs folder."""

from __future__ import annotations

import posixpath
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings

from unet_service.errors import ForbiddenError, InvalidRequestError
from unet_service.imaging.location import is_url, local_path

DEFAULT_ZARR_BLOCK = 2048


class LocationSettings(BaseSettings):
    """The settings of named inputs and outputs and of block-wise OME-Zarr results (fields
    of `Settings`)."""

    data_roots: str = Field(
        "",
        description="Folders (comma-separated, absolute) under which a job may name a local "
        "input or result location; empty = none, so named paths are refused (403).",
    )
    data_urls: str = Field(
        "",
        description="URL prefixes (comma-separated, e.g. s3://bucket/,https://host/data/) "
        "under which a job may name an input or result location, read and written with "
        "fsspec; empty = none (403).",
    )
    zarr_block: int = Field(
        DEFAULT_ZARR_BLOCK,
        ge=1,
        description="Side of the blocks an OME-Zarr result is computed in, pixels (rounded up "
        "to whole chunks of the result, which has the input's chunks).",
    )

    dask_scheduler: str = Field(
        "",
        description="A Dask distributed scheduler (e.g. tcp://scheduler:8786) to compute "
        "OME-Zarr results' blocks on its workers, which load the model and read and write "
        "the same locations as the server; empty = in this server.",
    )

    @property
    def data_root_paths(self) -> list[Path]:
        return [Path(p.strip()).resolve() for p in self.data_roots.split(",") if p.strip()]

    @property
    def data_url_prefixes(self) -> list[str]:
        prefixes = [p.strip() for p in self.data_urls.split(",") if p.strip()]
        # A prefix is a folder: s3://bucket allows s3://bucket/..., never s3://bucket-other.
        return [p if p.endswith(("/", "://")) else p + "/" for p in prefixes]


def allowed_location(settings: LocationSettings, location: str, what: str) -> str:
    """`location` as a job records it (a path made absolute with its links followed, or the
    URL), when the settings allow it; else ForbiddenError (403) saying which setting. `what`
    names it in the message ("input", "output location")."""
    if not location or len(location) > 4096 or "\x00" in location:
        raise InvalidRequestError(f"the {what} must be a path or URL")
    if is_url(location):
        rest = location.partition("://")[2]
        if posixpath.normpath("/" + rest) != "/" + rest.rstrip("/") or "//" in rest:
            raise InvalidRequestError(f"the {what} {location} has empty, . or .. parts")
        if not any(location.startswith(p) for p in settings.data_url_prefixes):
            raise ForbiddenError(
                f"the {what} {location} is not under a URL this server may use (UNET_DATA_URLS)"
            )
        return location
    path = Path(local_path(location))
    if not path.is_absolute():
        raise InvalidRequestError(f"the {what} must be an absolute path, not {location}")
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in settings.data_root_paths):
        raise ForbiddenError(
            f"the {what} {location} is not under a folder this server may use (UNET_DATA_ROOTS)"
        )
    return str(resolved)
