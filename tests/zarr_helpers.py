"""Helpers for the OME-Zarr tests: real EM volumes written as OME-Zarr by ome-zarr itself
(NGFF 0.4 on Zarr v2, 0.5 on Zarr v3), the whole-image reference of the tiny UNet, and a
block-wise run in this process."""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path

import numpy as np
import zarr
from app_helpers import TILE, em_crop
from ome_zarr.format import FormatV04, FormatV05
from ome_zarr.writer import write_image

from unet_service.core.engine import Segmenter
from unet_service.core.runner import BatchRunner, run_tiles
from unet_service.imaging.sources import open_zarr
from unet_service.imaging.zarr_result import ZarrResult
from unet_service.imaging.zarr_source import zarr_store
from unet_service.pipeline.blocks import BlockJob
from unet_service.pipeline.outputs import Output
from unet_service.pipeline.sinks import Segmentation
from unet_service.pipeline.to_file import Progress
from unet_service.pipeline.to_store import (
    BlockCounts,
    create_results,
    plan_volume,
    segment_to_store,
    volume_of,
)

FORMATS = {"0.4": FormatV04(), "0.5": FormatV05()}
UNIT = "micrometer"
SCALE = [0.05, 0.004, 0.004]  # z, y, x of an EM stack


def em_volume(pages: int, height: int, width: int) -> np.ndarray:
    """(pages, height, width) uint8: real ISBI EM slices, one a page."""
    return np.stack([em_crop(i, 0, 0, height, width) for i in range(pages)])


def write_ome_zarr(
    location: str | Path,
    data: np.ndarray,
    *,
    version: str = "0.4",
    axes: str = "zyx",
    chunks: tuple[int, ...] | None = None,
    scale: list[float] | None = None,
) -> str:
    """`data` as an OME-Zarr image written by ome-zarr (its full resolution only), with
    units and a scale on its spatial axes; returns the location."""
    fmt = FORMATS[version]
    spatial = {"z", "y", "x"}
    axis_list = [
        {"name": a, "type": "space", "unit": UNIT}
        if a in spatial
        else {"name": a, "type": "channel"}
        for a in axes
    ]
    if scale is None:
        by_axis = dict(zip("zyx", SCALE, strict=True))
        scale = [by_axis.get(a, 1.0) for a in axes]
    store = zarr_store(str(location), read_only=False)
    group = zarr.open_group(store, mode="w", zarr_format=fmt.zarr_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_image(
            data,
            group,
            scale_factors=[],
            fmt=fmt,
            axes=axis_list,
            storage_options={"chunks": chunks or data.shape},
            coordinate_transformations=[[{"type": "scale", "scale": scale}]],
        )
    return str(location)


def whole_image(seg: Segmenter, volume: np.ndarray, tile: int = TILE) -> list[Segmentation]:
    """Every page of a (D, H, W) volume segmented whole, in one process, one tile a pass
    (as a job's tiles are computed on a CPU)."""
    return [
        seg.segment(page[:, :, None], tile, batch_size=1, probabilities=True) for page in volume
    ]


def thread_compute(seg: Segmenter, batch: int = 1):
    """A `Compute` that runs each entry's tiles in a thread, `batch` tiles a pass."""
    run = BatchRunner(seg, batch)

    async def compute(entry):
        def tiles():
            run_tiles(entry, run)
            return entry.result()

        return await asyncio.to_thread(tiles)

    return compute


def blockwise(
    seg: Segmenter,
    location: str,
    outputs: dict[Output, str],
    side: int,
    *,
    tag: int = 1,
    compute=None,
    resume: bool = False,
) -> tuple[dict[Output, ZarrResult], BlockCounts, Progress]:
    """The image at `location` segmented into result stores at `outputs`, in blocks of about
    `side` pixels (resumed from the stores when `resume`)."""
    source = open_zarr(location, max_pixels=10**10, max_pages=10**5)
    recipe = seg.recipe(TILE)
    if resume:
        results = {output: ZarrResult.open(where) for output, where in outputs.items()}
        volume = volume_of(next(iter(results.values())))
    else:
        volume = plan_volume(source, recipe, tuple(outputs), side)
        results = create_results(outputs, source, recipe, volume, {"model": "tiny"})
    job = BlockJob(volume, source, recipe, results, seg.instances, tag=tag)
    progress = Progress(tiles_total=volume.total_tiles(recipe.geometry))
    counts = asyncio.run(
        segment_to_store(
            job,
            compute=compute or thread_compute(seg),
            progress=progress,
            name="volume",
            class_names=seg.card.class_names,
        )
    )
    return results, counts, progress


def level(location: str, index: int = 0) -> np.ndarray:
    """Level `index` of the result at `location`, as zarr reads it."""
    return np.asarray(
        zarr.open_array(zarr_store(location, read_only=True), path=str(index), mode="r")[:]
    )
