"""A source's pages through the pipeline into OME-Zarr result stores, block by block: the
same for a section job in the service and for `unet-predict` on an OME-Zarr volume. Like
`pipeline.to_file`, only the way tiles are computed differs (`Compute`).

A result has the input's chunks (a TIFF's: one page deep, 512 x 512), its axes and its
scales when the input is OME-Zarr; it is made (`create_results`) with its layout (the
`Volume`) recorded, then its blocks are computed (`pipeline.blocks.compute_block`), those
already written skipped, so a job resumed after a restart computes only the blocks it had not
finished. Then, for cell instances, the ids are made unique and joined across block borders
(`pipeline.block_labels`), the pyramid is built and the NGFF metadata written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from unet_service.imaging.sources import Source
from unet_service.imaging.zarr_pyramid import build_pyramid
from unet_service.imaging.zarr_result import ResultSpec, ZarrResult, pyramid_levels
from unet_service.imaging.zarr_source import NgffImage
from unet_service.pipeline.block_labels import relabel
from unet_service.pipeline.blocks import BlockJob, compute_block
from unet_service.pipeline.outputs import Output
from unet_service.pipeline.recipe import Recipe
from unet_service.pipeline.to_file import Compute, Progress
from unet_service.pipeline.volume import INSTANCE_HALO, Volume, block_shape

# A TIFF's pages as a result's chunks: one page deep, this many pixels a side; and the
# OME-Zarr version of such a result (ome-zarr's current one, on Zarr v3).
TIFF_CHUNK = 512
TIFF_ZARR_FORMAT = 3
DTYPES: dict[str, str] = {"mask": "uint8", "probabilities": "float32", "instances": "uint32"}


def _spatial(
    source: Source,
) -> tuple[list[dict[str, Any]], list[float], list[float] | None, tuple[int, ...]]:
    """The result's z, y, x axes (no z for one plane of y, x), their scale, translation
    and chunks: the input's, for OME-Zarr."""
    info: NgffImage | None = getattr(source, "info", None)
    if info is None:
        names = ("z", "y", "x") if source.pages > 1 else ("y", "x")
        chunks = {"z": 1, "y": min(TIFF_CHUNK, source.height), "x": min(TIFF_CHUNK, source.width)}
        axes = [{"name": n, "type": "space"} for n in names]
        return axes, [1.0] * len(names), None, tuple(chunks[n] for n in names)
    keep = [i for i, n in enumerate(info.names) if n != "c"]
    translation = None if info.translation is None else [info.translation[i] for i in keep]
    return (
        [info.axes[i] for i in keep],
        [info.scale[i] for i in keep],
        translation,
        tuple(info.chunks[i] for i in keep),
    )


def result_spec(source: Source, output: Output, classes: int) -> ResultSpec:
    """A result of `source` for `output`: masks and cell ids a labels image of its axes,
    probabilities a float32 image with a `c` axis first for several classes."""
    axes, scale, translation, chunks = _spatial(source)
    sizes = {"z": source.pages, "y": source.height, "x": source.width}
    shape = tuple(sizes[a["name"]] for a in axes)
    if output == "probabilities" and classes > 1:
        axes = [{"name": "c", "type": "channel"}, *axes]
        shape, chunks, scale = (classes, *shape), (1, *chunks), [1.0, *scale]
        translation = None if translation is None else [0.0, *translation]
    info: NgffImage | None = getattr(source, "info", None)
    return ResultSpec(
        axes=axes,
        shape=shape,
        chunks=chunks,
        dtype=DTYPES[output],
        scale=scale,
        translation=translation,
        labels=output != "probabilities",
        zarr_format=info.zarr_format if info is not None else TIFF_ZARR_FORMAT,
        levels=pyramid_levels(source.height, source.width),
    )


def plan_volume(source: Source, recipe: Recipe, outputs: tuple[Output, ...], side: int) -> Volume:
    """The blocks of `source`: whole chunks of its results, about `side` pixels a side, and
    the tile size the whole page would be computed with."""
    _, _, _, chunks = _spatial(source)
    depth = chunks[0] if len(chunks) == 3 else 1
    shape = (source.pages, source.height, source.width)
    return Volume(
        source.pages,
        source.height,
        source.width,
        block_shape((depth, chunks[-2], chunks[-1]), side, shape),
        recipe.plan(source.height, source.width).tile_size,
        INSTANCE_HALO if "instances" in outputs else 0,
    )


def create_results(
    locations: Mapping[Output, str],
    source: Source,
    recipe: Recipe,
    volume: Volume,
    info: dict[str, Any],
) -> dict[Output, ZarrResult]:
    """A new, empty result store per output at its location (blocking)."""
    return {
        output: ZarrResult.create(
            location,
            result_spec(source, output, recipe.out_channels),
            len(volume),
            {**info, "output": output, "layout": volume.to_json()},
        )
        for output, location in locations.items()
    }


def volume_of(result: ZarrResult) -> Volume:
    """The layout a result store was made with (`create_results`)."""
    return Volume.from_json(result.info["layout"])


def label_properties(output: Output, class_names: list[str]) -> list[dict[str, Any]] | None:
    """What a labels image's values are: the class of each mask value, none for cell ids."""
    if output != "mask":
        return None
    if len(class_names) == 1:
        return [{"label-value": 1, "class": class_names[0]}]
    return [{"label-value": k, "class": name} for k, name in enumerate(class_names)]


@dataclass
class BlockCounts:
    total: int
    skipped: int  # written by an earlier attempt

    @property
    def computed(self) -> int:
        return self.total - self.skipped


BlockFinished = Callable[[int], None]
# Computes the blocks `indices` of a job (in any order, any of them at once), counting their
# tiles in the progress and calling `finished(index)` as each is written.
BlockRunner = Callable[[BlockJob, list[int], Progress, BlockFinished], Awaitable[None]]


def in_process(compute: Compute) -> BlockRunner:
    """The blocks one after the other in this process, their tiles through `compute`."""

    async def run(
        job: BlockJob, indices: list[int], progress: Progress, finished: BlockFinished
    ) -> None:
        for index in indices:
            await compute_block(job, index, compute, progress)
            finished(index)

    return run


async def segment_to_store(
    job: BlockJob,
    *,
    compute: Compute | None = None,
    runner: BlockRunner | None = None,
    progress: Progress,
    name: str,
    class_names: list[str],
) -> BlockCounts:
    """Every block of `job` not written yet (by `runner`, or in this process through
    `compute`), then the finishing passes and the metadata of each result (named `name`)."""
    if runner is None:
        if compute is None:
            raise ValueError("segment_to_store needs a compute or a block runner")
        runner = in_process(compute)
    volume = job.volume
    written = await asyncio.to_thread(job.written)
    todo = [index for index in range(len(volume)) if not written[index]]
    for index in np.flatnonzero(written):
        tiles = await asyncio.to_thread(job.tiles, int(index))
        progress.finished_tiles += tiles
        progress.resumed_tiles += tiles
    done = np.asarray(written, bool).copy()
    _, ny, nx = volume.grid
    planes = done.reshape(-1, ny * nx).all(axis=1)

    def count_pages() -> None:
        # Pages are done up to the first row of blocks with a block still to do.
        rows_done = len(planes) if planes.all() else int(np.argmin(planes))
        pages = volume.region(rows_done * ny * nx - 1).z1 if rows_done else 0
        if pages != progress.pages_done:
            progress.pages_done = pages
            if progress.on_page is not None:
                progress.on_page(progress)

    def finished(index: int) -> None:
        done[index] = True
        row = index // (ny * nx)
        planes[row] = done[row * ny * nx : (row + 1) * ny * nx].all()
        count_pages()

    count_pages()
    await runner(job, todo, progress, finished)
    for output, result in job.results.items():
        if result.info.get("complete"):
            continue
        if output == "instances":
            await asyncio.to_thread(relabel, volume, result)
        await asyncio.to_thread(build_pyramid, result)
        properties = label_properties(output, class_names)
        await asyncio.to_thread(result.finish, name, properties)
    return BlockCounts(len(volume), len(volume) - len(todo))
