"""One block of a volume (`pipeline.volume`): the one pure step of a block-wise result,
`compute_block(job, index, compute)`, which reads the block's input window, computes its tiles
through `compute` (the service's tile queue, or a batch runner anywhere else), writes its
region of every result store and records the block as written. Nothing it needs lives
outside its arguments, so any process holding the model can run any block, in any order,
any number of times: a block written twice is written the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from unet_service.core.tiling import Tile, TilePlan, reflect_indices
from unet_service.imaging.sources import Source
from unet_service.imaging.zarr_result import ZarrResult
from unet_service.pipeline.outputs import Output
from unet_service.pipeline.recipe import Recipe
from unet_service.pipeline.sinks import Segmentation
from unet_service.pipeline.tiled_image import TiledImage, TiledStack
from unet_service.pipeline.to_file import Compute, Progress
from unet_service.pipeline.volume import Region, Volume

# (K, H, W) probabilities -> (H, W) cell ids from 1 (0 background), as Segmenter.instances.
Labeller = Callable[[np.ndarray], np.ndarray]


class BlockAbandoned(Exception):
    """A block computed for a job that no longer wants it; nothing was written."""


class BlockWindow:
    """The pages of a block's source held for the rows and columns its tiles read, each read
    from the source once (not once per tile); looks like the whole source to the tiles."""

    def __init__(self, source: Source, area: Region, rows: range, cols: range) -> None:
        self.pages, self.height, self.width = source.pages, source.height, source.width
        self.channels, self.dtype = source.channels, source.dtype
        self._top, self._left = rows.start, cols.start
        self._planes = {
            page: source.read(page, rows.start, rows.stop, cols.start, cols.stop)
            for page in range(area.z0, area.z1)
        }

    @property
    def pixels(self) -> int:
        return self.pages * self.height * self.width

    def read(self, page: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        top, left = self._top, self._left
        return self._planes[page][y0 - top : y1 - top, x0 - left : x1 - left]

    def close(self) -> None:
        self._planes.clear()


def window_of(plan: TilePlan, tiles: list[Tile]) -> tuple[range, range]:
    """The rows and columns of the page that the tiles' inputs read (mirrored at its
    border, `TilePlan.input_indices`)."""
    m, size = plan.geometry.margin, plan.input_size

    def span(origins: set[int], length: int) -> range:
        read = [reflect_indices(o - m, o - m + size, length) for o in origins]
        return range(min(int(r.min()) for r in read), max(int(r.max()) for r in read) + 1)

    return span({t.row for t in tiles}, plan.height), span({t.col for t in tiles}, plan.width)


class RegionSink:
    """The outputs of the tiles of a block, kept where they fall in `area` (rows and
    columns of the page): each pixel from the tile the whole page's plan takes it from."""

    def __init__(self, plan: TilePlan, area: Region, classes: int, probabilities: bool) -> None:
        self.plan, self.area = plan, area
        _, height, width = area.shape
        self.mask = np.zeros((height, width), np.uint8)
        self.probabilities = (
            np.zeros((classes, height, width), np.float32) if probabilities else None
        )
        self.tiles = 0

    def aggregate(self, tile: Tile, probabilities: np.ndarray, mask: np.ndarray) -> None:
        rows, cols = self.plan.write_window(tile)
        a = self.area
        y0, y1 = max(tile.row, a.y0), min(tile.row + rows.stop, a.y1)
        x0, x1 = max(tile.col, a.x0), min(tile.col + cols.stop, a.x1)
        if y0 < y1 and x0 < x1:
            src = (slice(y0 - tile.row, y1 - tile.row), slice(x0 - tile.col, x1 - tile.col))
            dst = (slice(y0 - a.y0, y1 - a.y0), slice(x0 - a.x0, x1 - a.x0))
            self.mask[dst] = mask[src]
            if self.probabilities is not None:
                self.probabilities[(slice(None), *dst)] = probabilities[(slice(None), *src)]
        self.tiles += 1

    def finish(self) -> Segmentation:
        return Segmentation(self.mask, self.probabilities)


@dataclass
class BlockJob:
    """What every block of one volume's results needs: the volume's layout, its input, the
    model's recipe, the result stores by output, the labelling for instances, and the tag
    recorded for each block written (the attempt, for a job)."""

    volume: Volume
    source: Source
    recipe: Recipe
    results: Mapping[Output, ZarrResult]
    labeller: Labeller | None = None
    tag: int = 1
    # Asked before a block is written (when given): a job cancelled or deleted while one of
    # its blocks was computed elsewhere writes nothing into stores that may be gone.
    wanted: Callable[[], bool] | None = None

    def plan(self) -> TilePlan:
        return self.volume.plan(self.recipe.geometry)

    def tiles(self, index: int) -> int:
        """Tiles block `index` computes (every page's)."""
        return self.volume.block_tiles(index, self.recipe.geometry)

    def written(self) -> np.ndarray:
        """Per block, whether every result has it."""
        tags = [result.block_tags() for result in self.results.values()]
        return np.logical_and.reduce([t > 0 for t in tags])


def _entry(job: BlockJob, index: int) -> TiledImage | TiledStack:
    """The block's pages as one entry of the tile queue (blocking: it reads the window)."""
    plan, area = job.plan(), job.volume.computed(index)
    tiles = plan.tiles_owning(area.y0, area.y1, area.x0, area.x1)
    window = BlockWindow(job.source, area, *window_of(plan, tiles))
    keep = "probabilities" in job.results or "instances" in job.results
    pages = [
        TiledImage(
            window,
            page,
            plan,
            RegionSink(plan, area, job.recipe.out_channels, keep),
            job.recipe.in_channels,
            # The whole page's, from the whole source: a block normalises as the page does.
            statistics=job.recipe.statistics(job.source, page),
            tiles=tiles,
        )
        for page in range(area.z0, area.z1)
    ]
    return pages[0] if len(pages) == 1 else TiledStack(pages)


async def compute_block(
    job: BlockJob, index: int, compute: Compute, progress: Progress | None = None
) -> int:
    """Block `index` of `job`: computed, written to every result, recorded. Returns its
    tiles. `progress` counts them as they are done."""
    entry = await asyncio.to_thread(_entry, job, index)
    if progress is not None:
        progress.page = entry
    try:
        result = await compute(entry)
    finally:
        if progress is not None:
            progress.page = None
    pages = [result] if isinstance(entry, TiledImage) else result
    if job.wanted is not None and not await asyncio.to_thread(job.wanted):
        raise BlockAbandoned(f"block {index}: its result stores are gone")
    await asyncio.to_thread(write_block, job, index, pages)
    if progress is not None:
        progress.finished_tiles += entry.total
    return entry.total


def write_block(job: BlockJob, index: int, pages: list[Segmentation]) -> None:
    """The block's region of each result, then the record that it is written (blocking)."""
    region, area = job.volume.region(index), job.volume.computed(index)
    inside = (
        slice(region.y0 - area.y0, region.y1 - area.y0),
        slice(region.x0 - area.x0, region.x1 - area.x0),
    )
    labels_used = 0
    for output, result in job.results.items():
        if output == "mask":
            data = np.stack([page.mask[inside] for page in pages])[None]
        elif output == "probabilities":
            data = np.stack([page.probabilities[(slice(None), *inside)] for page in pages], 1)
        else:
            data, labels_used = _block_ids(job, pages, inside)
        result.write(region.z0, region.y0, region.x0, data)
    for result in job.results.values():
        result.mark_written(index, job.tag, labels_used)


def _block_ids(
    job: BlockJob, pages: list[Segmentation], inside: tuple[slice, slice]
) -> tuple[np.ndarray, int]:
    """(1, Z, H, W) cell ids of the block, numbered 1.. over all its pages (each page's
    watershed run on the block and its halo, then cut to the block), and how many."""
    if job.labeller is None:
        raise ValueError("cell instances need the model's labelling")
    planes, used = [], 0
    for page in pages:
        cut = job.labeller(page.probabilities)[inside]
        ids, local = np.unique(cut, return_inverse=True)
        local = local.reshape(cut.shape).astype(np.uint32)
        if ids[0] != 0:  # no background in the block: every id is a cell
            local += 1
        count = len(ids) - (ids[0] == 0)
        planes.append(np.where(local > 0, local + used, 0).astype(np.uint32))
        used += count
    return np.stack(planes)[None], used
