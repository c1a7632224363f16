"""An OME-Zarr image read by window: the full-resolution level of an NGFF 0.4 image (Zarr v2)
or 0.5 image (Zarr v3), at a local path or an fsspec URL, as a `Source` whose pages are its z
planes and whose channels are its `c` axis.

Everything the store says about itself is checked before a pixel is read, with ome-zarr's own
validators where it has them (the version, the axes, the coordinate transformations) and
zarr's array metadata for the rest: the array the metadata names must exist, have one
dimension per axis and a numeric pixel type. A store that lies or is broken is refused with an
`ImageError` that says what is wrong, never a raw exception: chunks are decoded by zarr, and
a chunk that cannot be (truncated, the wrong size, not what its codec wrote) is a
`CorruptImageError` naming the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from ome_zarr.axes import Axes
from ome_zarr.format import Format, format_from_version
from zarr.storage import FsspecStore, LocalStore

from unet_service.imaging.decode import standard_dtype
from unet_service.imaging.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    TooManyPagesError,
    UnsupportedImageError,
)
from unet_service.imaging.location import is_url, local_path

# The axes an image may have (NGFF order), and the OME-Zarr version of each Zarr format.
AXES = (("y", "x"), ("z", "y", "x"), ("c", "y", "x"), ("c", "z", "y", "x"))
NGFF_VERSIONS = {2: "0.4", 3: "0.5"}


def zarr_store(location: str, *, read_only: bool) -> FsspecStore | LocalStore:
    """The Zarr store at a path or URL. Raises ImageError for a URL no fsspec filesystem
    reads."""
    if not is_url(location):
        return LocalStore(local_path(location), read_only=read_only)
    try:
        return FsspecStore.from_url(location, read_only=read_only)
    except (ValueError, ImportError) as e:
        raise ImageError(f"cannot open {location}: {e}") from None


@dataclass(frozen=True)
class NgffImage:
    """What an OME-Zarr image's metadata says of its full-resolution level."""

    zarr_format: int
    version: str
    axes: list[dict[str, Any]]  # as the metadata has them: name, type, unit
    scale: list[float]  # level 0's, one per axis
    translation: list[float] | None
    chunks: tuple[int, ...]  # level 0's, one per axis
    name: str | None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(axis["name"] for axis in self.axes)

    @property
    def fmt(self) -> Format:
        return format_from_version(self.version)


def _fail(location: str, why: str) -> ImageError:
    return ImageError(f"{location} is not an OME-Zarr image this service reads: {why}")


def _multiscale(location: str, group: zarr.Group) -> tuple[dict, str]:
    """The first multiscale image of the group's metadata, and its NGFF version."""
    attrs = group.attrs.asdict()
    zarr_format = group.metadata.zarr_format
    meta = attrs.get("ome", {}) if zarr_format == 3 else attrs
    multiscales = meta.get("multiscales") if isinstance(meta, dict) else None
    if not isinstance(multiscales, list) or not multiscales:
        raise _fail(location, "its group has no multiscales metadata")
    first = multiscales[0]
    if not isinstance(first, dict):
        raise _fail(location, "its multiscales metadata is not a list of objects")
    version = meta.get("version") if zarr_format == 3 else first.get("version")
    wanted = NGFF_VERSIONS.get(zarr_format)
    if str(version) != wanted:
        raise UnsupportedImageError(
            f"{location} is OME-Zarr {version} on Zarr v{zarr_format}; this service reads "
            "OME-Zarr 0.4 on Zarr v2 and 0.5 on Zarr v3"
        )
    return first, wanted


def read_ngff(location: str, group: zarr.Group) -> tuple[NgffImage, str]:
    """The checked metadata of the image in `group`, and the path of its full-resolution
    array. Raises ImageError."""
    multiscale, version = _multiscale(location, group)
    fmt = format_from_version(version)
    try:
        axes = Axes(multiscale.get("axes"), fmt).to_list(fmt)
        names = tuple(axis["name"] for axis in axes)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise _fail(location, f"its axes are invalid ({e})") from None
    if names not in AXES:
        supported = ", ".join("(" + ", ".join(a) + ")" for a in AXES)
        raise UnsupportedImageError(
            f"{location} has axes ({', '.join(map(str, names))}); this service segments "
            f"images with axes {supported}"
        )
    datasets = multiscale.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise _fail(location, "its multiscales metadata lists no datasets")
    if not all(isinstance(d, dict) and isinstance(d.get("path"), str) for d in datasets):
        raise _fail(location, "a dataset of its multiscales metadata has no path")
    transforms = [d.get("coordinateTransformations") for d in datasets]
    try:
        fmt.validate_coordinate_transformations(len(names), len(datasets), transforms)
    except (ValueError, AssertionError, TypeError, AttributeError) as e:
        raise _fail(location, f"its coordinate transformations are invalid ({e})") from None
    first = transforms[0]
    translation = next((t["translation"] for t in first if t["type"] == "translation"), None)
    path = datasets[0]["path"]
    info = NgffImage(
        zarr_format=group.metadata.zarr_format,
        version=version,
        axes=axes,
        scale=[float(s) for s in first[0]["scale"]],
        translation=None if translation is None else [float(t) for t in translation],
        chunks=(),
        name=multiscale.get("name"),
    )
    return info, path


class ZarrSource:
    """The full-resolution level of the OME-Zarr image at `location`, as a stack of z pages
    read by window (see `imaging.sources.Source`). Pixels are mapped onto uint8, uint16 or
    float32 as an upload's are; integer types other than uint8 and uint16 need the stack's
    value range first (`set_value_range`). Raises ImageError subclasses."""

    def __init__(self, location: str, *, max_pixels: int, max_pages: int) -> None:
        self.location = location
        store = zarr_store(location, read_only=True)
        try:
            group = zarr.open_group(store, mode="r")
        except Exception as e:  # zarr raises many kinds for a missing or unreadable group
            raise _fail(location, f"no Zarr group can be read there ({e})") from None
        info, path = read_ngff(location, group)
        try:
            array = zarr.open_array(store, path=path, mode="r")
        except Exception as e:
            raise _fail(
                location, f"its metadata names the array {path!r}, which cannot be read ({e})"
            ) from None
        if array.ndim != len(info.names):
            raise _fail(
                location,
                f"the array {path!r} has {array.ndim} dimensions but the axes are "
                f"({', '.join(info.names)})",
            )
        try:
            stored = np.dtype(array.dtype)
        except TypeError:
            stored = np.dtype(object)
        if stored.kind not in "biuf":
            raise UnsupportedImageError(
                f"{location}: pixel type {array.dtype} is not a number this service reads "
                "(integers, floats or booleans)"
            )
        self.info = NgffImage(**{**info.__dict__, "chunks": tuple(array.chunks)})
        self.array = array
        self.stored = stored
        sizes = dict(zip(info.names, array.shape, strict=True))
        self.pages, self.height, self.width = sizes.get("z", 1), sizes["y"], sizes["x"]
        self.channels = sizes.get("c", 1)
        if 0 in array.shape:
            raise EmptyImageError(f"{location} is empty (shape {tuple(array.shape)})")
        if self.pages > max_pages:
            raise TooManyPagesError(
                f"{location} has {self.pages} z planes, more than the limit of {max_pages}"
            )
        if self.pixels > max_pixels:
            raise ImageTooLargeError(
                f"{location} holds {self.pixels} pixels, more than the limit of {max_pixels}"
            )
        self._value_range: tuple[int, int] | None = None
        needs_range = stored.kind == "i" or (stored.kind == "u" and stored.itemsize > 2)
        self.dtype: np.dtype | None = (
            None if needs_range else standard_dtype(np.zeros(0, stored)).dtype
        )
        # The first chunk decoded now: a store whose chunks cannot be read at all is refused
        # before any work, not hours into it.
        self.read_stored(0, 0, min(self.height, self.info.chunks[-2]), 0, 1)

    @property
    def pixels(self) -> int:
        return self.pages * self.height * self.width

    def set_value_range(self, value_range: tuple[int, int]) -> None:
        """The smallest and largest value of the whole stack (see TiffSource)."""
        self._value_range = value_range
        self.dtype = standard_dtype(np.zeros(0, self.stored), value_range).dtype

    def read(self, page: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] of z plane `page`, (h, w, channels): uint8, uint16 or
        float32."""
        if self.dtype is None:
            raise RuntimeError("the value range of this stack's integers is not known yet")
        return standard_dtype(self.read_stored(page, y0, y1, x0, x1), self._value_range)

    def read_stored(self, page: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """As `read`, in the stored pixel type."""
        where = {"c": slice(None), "z": page, "y": slice(y0, y1), "x": slice(x0, x1)}
        index = tuple(where[name] for name in self.info.names)
        try:
            window = np.asarray(self.array[index])
        except Exception as e:  # codecs raise RuntimeError, ValueError, ...
            raise CorruptImageError(
                f"{self.location}: z plane {page}, rows {y0}-{y1}, columns {x0}-{x1} cannot "
                f"be read: a chunk is truncated or corrupt ({e})"
            ) from None
        if "c" in self.info.names:
            return np.moveaxis(window, 0, -1)
        return window[..., None]

    def close(self) -> None:
        """Nothing is held open between reads."""

    def __enter__(self) -> ZarrSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
