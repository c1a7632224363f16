"""Overlap-tile planning and stitching (U-Net paper, Fig. 2), exact by construction.

The planner lays output tiles on a grid whose origins are multiples of 2^d, so every tile is
a shifted window of one big virtual forward pass over the mirror-padded image, and a tiled
result equals that single pass. The image is extended past its border as the geometry says
(`padding`: our U-Net reflects, a bioimage.io package pads as it declares). Each output
pixel is taken from exactly one tile: nothing is blended. Planner and stitcher are
separate, so one batch may hold tiles of many images. Tiles are cut lazily from the original
(integer) image by index arithmetic: no padded or float copy of the whole image is ever
made.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from unet_service.core.geometry import TileGeometry


def reflect_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Source indices for positions start..stop-1 of an axis of length `size` extended by
    mirror reflection about the edge pixels (numpy's/torch's "reflect"), for any pad width:
    reflection repeats with period 2 * (size - 1), so a pad larger than the image works."""
    positions = np.arange(start, stop)
    if size == 1:
        return np.zeros_like(positions)
    period = 2 * (size - 1)
    positions = np.mod(positions, period)
    return np.where(positions < size, positions, period - positions)


def border_indices(start: int, stop: int, size: int, padding: str = "reflect") -> np.ndarray:
    """`reflect_indices` for any of numpy's padding modes the geometries use: "reflect",
    "symmetric" (the edge pixel repeated, then mirrored: period 2 * size) or "edge"."""
    if padding == "reflect":
        return reflect_indices(start, stop, size)
    positions = np.arange(start, stop)
    if padding == "edge":
        return np.clip(positions, 0, size - 1)
    if padding == "symmetric":
        positions = np.mod(positions, 2 * size)
        return np.where(positions < size, positions, 2 * size - 1 - positions)
    raise ValueError(f"unknown padding {padding!r}")


def mirror_pad(
    image: np.ndarray, top: int, bottom: int, left: int, right: int, padding: str = "reflect"
) -> np.ndarray:
    """Pad the first two axes of an (H, W, ...) array by any amounts (mirrored by default,
    or as `padding` says: see `border_indices`)."""
    h, w = image.shape[:2]
    ys = border_indices(-top, h + bottom, h, padding)
    xs = border_indices(-left, w + right, w, padding)
    return image[ys][:, xs]


@dataclass(frozen=True)
class Tile:
    index: int
    row: int  # output rows row .. row + size - 1, in image coordinates
    col: int


@dataclass(frozen=True)
class TilePlan:
    """Square output tiles of `tile_size` covering an image of height x width."""

    height: int
    width: int
    geometry: TileGeometry
    tile_size: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image must be at least 1x1, got {self.height}x{self.width}")
        self.geometry.check_tile(self.tile_size)

    @property
    def stride(self) -> int:
        return self.geometry.tile_stride(self.tile_size)

    @property
    def input_size(self) -> int:
        return self.tile_size + self.geometry.shrink

    def _origins(self, length: int) -> list[int]:
        n = 1 if length <= self.tile_size else -(-(length - self.tile_size) // self.stride) + 1
        return [i * self.stride for i in range(n)]

    @property
    def rows(self) -> list[int]:
        return self._origins(self.height)

    @property
    def cols(self) -> list[int]:
        return self._origins(self.width)

    @property
    def covered_height(self) -> int:
        """Output extent of the equivalent single pass (legal, >= height)."""
        return self.rows[-1] + self.tile_size

    @property
    def covered_width(self) -> int:
        return self.cols[-1] + self.tile_size

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def __iter__(self) -> Iterator[Tile]:
        cols = self.cols
        for i, row in enumerate(self.rows):
            for j, col in enumerate(cols):
                yield Tile(i * len(cols) + j, row, col)

    def tiles_owning(self, y0: int, y1: int, x0: int, x1: int) -> list[Tile]:
        """The tiles that own (`write_window`) some pixel of rows y0..y1-1 and columns
        x0..x1-1, in plan order and with their plan indices: what a block of the image
        computes, so that each of its pixels comes from the tile the whole plan takes it
        from."""

        def owners(origins: list[int], lo: int, hi: int, length: int) -> list[int]:
            ends = [*origins[1:], length]
            return [
                i for i, (o, e) in enumerate(zip(origins, ends, strict=True)) if o < hi and e > lo
            ]

        cols = self.cols
        return [
            Tile(i * len(cols) + j, self.rows[i], cols[j])
            for i in owners(self.rows, y0, y1, self.height)
            for j in owners(cols, x0, x1, self.width)
        ]

    @property
    def computed_pixels(self) -> int:
        return len(self) * self.tile_size**2

    def input_indices(self, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
        """The image rows and columns of the tile's input window, mirrored at the borders."""
        m, padding = self.geometry.margin, self.geometry.padding
        ys = border_indices(tile.row - m, tile.row - m + self.input_size, self.height, padding)
        xs = border_indices(tile.col - m, tile.col - m + self.input_size, self.width, padding)
        return ys, xs

    def extract(self, image: np.ndarray, tile: Tile) -> np.ndarray:
        """The tile's input window, (C, S, S) in the image's dtype, from an (H, W, C) image."""
        ys, xs = self.input_indices(tile)
        return np.ascontiguousarray(image[ys][:, xs].transpose(2, 0, 1))

    def padded_image(self, image: np.ndarray) -> np.ndarray:
        """The whole mirror-padded canvas whose single forward pass the tiles reproduce,
        (H', W', C). For reference and tests; the tiled path never builds it."""
        m = self.geometry.margin
        return mirror_pad(
            image,
            m,
            m + self.covered_height - self.height,
            m,
            m + self.covered_width - self.width,
            self.geometry.padding,
        )

    def write_window(self, tile: Tile) -> tuple[slice, slice]:
        """The part of the tile's output this tile owns, in tile coordinates. Tile k owns
        [origin_k, origin_{k+1}) (the last one up to the image edge), so the small overlap
        between neighbours is computed twice and written once."""

        def extent(origin: int, length: int) -> int:
            is_last = origin + self.tile_size >= length
            return length - origin if is_last else self.stride

        return slice(0, extent(tile.row, self.height)), slice(0, extent(tile.col, self.width))


def tile_sizes(geometry: TileGeometry, max_tile: int) -> tuple[int, ...]:
    """Legal output tile sizes to plan images with: about a quarter, a half and all of
    `max_tile` (for depth 4 and 516: 132, 260, 516). A few sizes keep batches full (tiles of
    one size share a shape whatever image they come from) while small images are not padded
    up to the full tile. `max_tile` is taken as the geometry takes it (`tile_for`)."""
    max_tile = geometry.tile_for(max_tile)
    sizes = {max_tile}
    for fraction in (4, 2):
        wanted = max(math.ceil(max_tile / fraction), geometry.min_tile)
        size = geometry.smallest_output_covering(wanted)
        if size < max_tile:
            sizes.add(size)
    return tuple(sorted(sizes))


def choose_tile_size(
    height: int, width: int, sizes: tuple[int, ...], geometry: TileGeometry
) -> int:
    """The tile size that computes the image with the least work: the network's cost is
    about proportional to the input area, so minimise tiles x (tile + shrink)^2. Small images
    get a small tile instead of being padded up; large ones the largest, whose margins cost
    least per output pixel. Ties go to the larger tile (fewer tiles to schedule)."""

    def cost(size: int) -> int:
        plan = TilePlan(height, width, geometry, size)
        return len(plan) * plan.input_size**2

    return min(sorted(sizes, reverse=True), key=cost)


def plan_image(height: int, width: int, geometry: TileGeometry, sizes: tuple[int, ...]) -> TilePlan:
    """The plan of an image with the cheapest of the offered tile sizes."""
    return TilePlan(height, width, geometry, choose_tile_size(height, width, sizes, geometry))


class Stitcher:
    """Collects tile outputs into a (C, H, W) array: `aggregate(values, tile)` per tile in any
    order, then `finalize()`. `track_coverage=True` counts writes per pixel (for tests). With
    `add_into`, a (C, H, W) array (or view) given by the caller, values are added to it
    instead of written: test-time augmentation sums its variants so."""

    def __init__(
        self,
        plan: TilePlan,
        channels: int,
        dtype: np.dtype | type = np.float32,
        track_coverage: bool = False,
        add_into: np.ndarray | None = None,
    ) -> None:
        self.plan = plan
        self._adding = add_into is not None
        if add_into is not None:
            if add_into.shape != (channels, plan.height, plan.width):
                raise ValueError(f"add_into must be {(channels, plan.height, plan.width)}")
            self.output = add_into
        else:
            self.output = np.empty((channels, plan.height, plan.width), dtype=dtype)
        self.coverage = (
            np.zeros((plan.height, plan.width), dtype=np.uint16) if track_coverage else None
        )
        self._done = np.zeros(len(plan), dtype=bool)

    def aggregate(self, values: np.ndarray, tile: Tile) -> None:
        """values: (C, tile_size, tile_size) output of the tile's input window."""
        size = self.plan.tile_size
        if values.shape[-2:] != (size, size):
            raise ValueError(f"tile output must be {size}x{size}, got {values.shape[-2:]}")
        if self._done[tile.index]:
            raise ValueError(f"tile {tile.index} was already aggregated")
        rows, cols = self.plan.write_window(tile)
        dst = (
            slice(tile.row, tile.row + rows.stop),
            slice(tile.col, tile.col + cols.stop),
        )
        if self._adding:
            self.output[(slice(None), *dst)] += values[:, rows, cols]
        else:
            self.output[(slice(None), *dst)] = values[:, rows, cols]
        if self.coverage is not None:
            self.coverage[dst] += 1
        self._done[tile.index] = True

    @property
    def complete(self) -> bool:
        return bool(self._done.all())

    def finalize(self) -> np.ndarray:
        if not self.complete:
            missing = int((~self._done).sum())
            raise RuntimeError(f"{missing} of {len(self.plan)} tiles were never aggregated")
        return self.output


class TileCounts:
    """The queue's counters of a tile source, from its `total` tiles, those `taken` (handed
    out) and those `done` (stitched): shared by every kind of TileImage."""

    total: int
    taken: int
    done: int

    @property
    def pending(self) -> int:
        """Tiles not handed out yet."""
        return self.total - self.taken

    @property
    def outstanding(self) -> int:
        """Tiles not stitched yet."""
        return self.total - self.done

    @property
    def complete(self) -> bool:
        return self.done == self.total
