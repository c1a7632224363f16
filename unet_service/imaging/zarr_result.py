"""A result written as an OME-Zarr image, block by block: the full-resolution array written
region by region (each region whole chunks, so writers never share a chunk and may run in
other processes), a record of the finished blocks in the store itself, then the pyramid
(`imaging.zarr_pyramid`) and the NGFF metadata, written last with ome-zarr's writer, so that
a store without it is plainly unfinished.

Layout (NGFF 0.4 on Zarr v2, or 0.5 on Zarr v3, as the input was): the group is one
multiscale image, levels "0", "1", ... halving y and x; masks and cell ids carry
`image-label` metadata (an NGFF labels image), probabilities are a float32 image with a `c`
axis when there are several classes. Beside the levels, the group `unet` holds the block
record: `blocks` (per block: 0 until written, then the tag of the attempt that wrote it),
`labels` (cell ids a block used) and, for instances, `label_map` (block-local ids to final
ones). The group's `unet` attribute says how the result was made (model, threshold, job
settings) and, under `layout`, what every block needs to agree on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from ome_zarr.format import format_from_version
from ome_zarr.writer import add_metadata, get_metadata, write_multiscales_metadata

from unet_service.imaging.errors import ImageError
from unet_service.imaging.zarr_source import NGFF_VERSIONS, zarr_store

BOOKS = "unet"  # the group of the block record


@dataclass(frozen=True)
class ResultSpec:
    """What a result image is: its axes (NGFF dicts, `c` first when present), shape and
    chunks per axis, pixel type, level-0 scale (and translation) per axis, and whether it is
    a labels image."""

    axes: list[dict[str, Any]]
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    scale: list[float]
    translation: list[float] | None
    labels: bool
    zarr_format: int
    levels: int

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(axis["name"] for axis in self.axes)

    def level_shape(self, level: int) -> tuple[int, ...]:
        """y and x halve (rounding up) at each level; c and z stay."""
        return tuple(
            -(-n // 2**level) if name in ("y", "x") else n
            for name, n in zip(self.names, self.shape, strict=True)
        )

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "shape": list(self.shape), "chunks": list(self.chunks)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResultSpec:
        return cls(**{**data, "shape": tuple(data["shape"]), "chunks": tuple(data["chunks"])})


def pyramid_levels(height: int, width: int, smallest: int = 256) -> int:
    """Levels down to the first whose larger side is at most `smallest` pixels."""
    levels = 1
    while max(-(-height // 2 ** (levels - 1)), -(-width // 2 ** (levels - 1))) > smallest:
        levels += 1
    return levels


def _index(names: tuple[str, ...], z0: int, z1: int, rows: slice, cols: slice) -> tuple:
    where = {"c": slice(None), "z": slice(z0, z1), "y": rows, "x": cols}
    return tuple(where[name] for name in names)


def _as_kzyx(names: tuple[str, ...], data: np.ndarray) -> np.ndarray:
    """An array region in the array's own axes -> (K, Z, Y, X)."""
    if "z" not in names:
        data = data[..., None, :, :] if "c" in names else data[None]
    return data if "c" in names else data[None]


class ZarrResult:
    """An OME-Zarr result store being written (`create`) or resumed (`open`)."""

    def __init__(self, location: str, group: zarr.Group) -> None:
        self.location = location
        self.group = group
        info = group.attrs.get("unet")
        if not isinstance(info, dict) or "layout" not in info or "spec" not in info:
            raise ImageError(f"{location} is not a result store written by this service")
        self.info: dict[str, Any] = info
        self.spec = ResultSpec.from_json(info["spec"])
        self.names = self.spec.names
        self.levels = [group[str(level)] for level in range(self.spec.levels)]
        self.books = group[BOOKS]

    @classmethod
    def create(
        cls, location: str, spec: ResultSpec, blocks: int, info: dict[str, Any]
    ) -> ZarrResult:
        """A new store at `location` (which must not hold one) with every level's array,
        empty, and a record of `blocks` blocks, none written. `info` goes into the group's
        `unet` attribute (with the spec, and `layout`, which the caller puts there)."""
        fmt = format_from_version(NGFF_VERSIONS[spec.zarr_format])
        store = zarr_store(location, read_only=False)
        group = zarr.open_group(store, mode="w-", zarr_format=spec.zarr_format)
        extra: dict[str, Any] = {"chunk_key_encoding": fmt.chunk_key_encoding}
        if spec.zarr_format == 3:
            extra["dimension_names"] = list(spec.names)
        for level in range(spec.levels):
            shape = spec.level_shape(level)
            chunks = tuple(min(c, n) for c, n in zip(spec.chunks, shape, strict=True))
            group.create_array(
                str(level), shape=shape, chunks=chunks, dtype=spec.dtype, fill_value=0, **extra
            )
        books = group.create_group(BOOKS)
        book = {"shape": (blocks,), "chunks": (1,), "fill_value": 0, **extra}
        book.pop("dimension_names", None)
        books.create_array("blocks", dtype="int64", **book)
        books.create_array("labels", dtype="int64", **book)
        group.attrs["unet"] = {**info, "spec": spec.to_json(), "complete": False}
        return cls(location, group)

    @classmethod
    def open(cls, location: str, *, read_only: bool = False) -> ZarrResult:
        """A store `create` made, to resume it or write blocks of it (or to read it).
        Raises ImageError."""
        try:
            store = zarr_store(location, read_only=read_only)
            group = zarr.open_group(store, mode="r" if read_only else "r+")
        except Exception as e:
            raise ImageError(f"{location} holds no result store ({e})") from None
        return cls(location, group)

    # ----- the full-resolution level, region by region -----------------------------------

    def write(self, z0: int, y0: int, x0: int, data: np.ndarray, level: int = 0) -> None:
        """(K, Z, Y, X) data into the region of `level` starting at (z0, y0, x0)."""
        _, depth, height, width = data.shape
        if "z" not in self.names:
            data = data[:, 0]
        if "c" not in self.names:
            data = data[0]
        index = _index(self.names, z0, z0 + depth, slice(y0, y0 + height), slice(x0, x0 + width))
        self.levels[level][index] = data

    def read(self, z0: int, z1: int, rows: slice, cols: slice, level: int = 0) -> np.ndarray:
        """A region of `level`, (K, Z, Y, X)."""
        return _as_kzyx(
            self.names, np.asarray(self.levels[level][_index(self.names, z0, z1, rows, cols)])
        )

    # ----- the block record --------------------------------------------------------------

    def block_tags(self) -> np.ndarray:
        """Per block: 0 until written, then the tag its writer gave (`mark_written`)."""
        return np.asarray(self.books["blocks"][:])

    def block_labels(self) -> np.ndarray:
        """Per block: how many block-local cell ids it used (instances)."""
        return np.asarray(self.books["labels"][:])

    def mark_written(self, block: int, tag: int, labels: int = 0) -> None:
        """Block `block`'s region is in the store: recorded last, each block in a chunk of
        its own (no two writers touch one)."""
        if tag < 1:
            raise ValueError("a block's tag must be at least 1")
        self.books["labels"][block] = labels
        self.books["blocks"][block] = tag

    def set_info(self, **values: Any) -> None:
        """Merge `values` into the group's `unet` attribute."""
        self.info = {**self.info, **values}
        self.group.attrs["unet"] = self.info

    # ----- the end -----------------------------------------------------------------------

    def finish(self, name: str, label_properties: list[dict[str, Any]] | None) -> None:
        """The NGFF metadata, with ome-zarr's writer (levels, axes, scales; `image-label`
        for a labels image), then `complete`."""
        spec = self.spec
        fmt = format_from_version(NGFF_VERSIONS[spec.zarr_format])
        datasets = []
        for level in range(spec.levels):
            factor = [2.0**level if n in ("y", "x") else 1.0 for n in spec.names]
            transform: list[dict[str, Any]] = [
                {"type": "scale", "scale": [s * f for s, f in zip(spec.scale, factor, strict=True)]}
            ]
            if spec.translation is not None:
                transform.append({"type": "translation", "translation": spec.translation})
            datasets.append({"path": str(level), "coordinateTransformations": transform})
        method = "nearest" if spec.labels else "mean"
        write_multiscales_metadata(
            self.group,
            datasets,
            fmt=fmt,
            axes=spec.axes,
            name=name,
            metadata={"method": f"{method} of 2 x 2 pixels (y, x) per level"},
        )
        if spec.labels:
            label: dict[str, Any] = {"version": fmt.version}
            if label_properties:
                label["properties"] = label_properties
            labels = _labels_group_of(self.location, spec.zarr_format)
            if labels is not None:  # IMAGE/labels/NAME: listed as one of the image's labels
                name = self.location.rstrip("/").rpartition("/")[2]
                listed = get_metadata(labels).get("labels", [])
                if name not in listed:  # (a resumed finish may have listed it)
                    add_metadata(labels, {"labels": [*listed, name]}, fmt=fmt)
                label["source"] = {"image": "../../"}
            add_metadata(self.group, {"image-label": label}, fmt=fmt)
        self.set_info(complete=True)


def _labels_group_of(location: str, zarr_format: int) -> zarr.Group | None:
    """The `labels` group of the OME-Zarr image a result at IMAGE/labels/NAME labels (made
    when the image has none yet), or None for a result anywhere else."""
    parent = location.rstrip("/").rpartition("/")[0]
    image, _, folder = parent.rpartition("/")
    if folder != "labels" or not image:
        return None
    try:
        group = zarr.open_group(zarr_store(image, read_only=False), mode="r+")
        if group.metadata.zarr_format != zarr_format or "multiscales" not in get_metadata(group):
            return None
    except Exception:  # no image there: the result is a labels image on its own
        return None
    return zarr.open_group(zarr_store(parent, read_only=False), mode="a", zarr_format=zarr_format)
