"""A volume cut into blocks: what every block of a result, computed in this process or in
another, must agree on. It is recorded in the result store (`layout`), so a block is a pure
function of the store's record, the input and the model.

Blocks are whole chunks of the result (which has the input's chunks), so no two blocks ever
write one chunk. Their tiles are those of one tile plan of the whole page (`TilePlan`, tiles
anchored at the page's origin): a block computes the tiles that own its pixels, each from the
same input window (mirrored only at the volume's border) as the whole page's run, so a block's
result is that run's, pixel for pixel, whatever the block size. A tile whose pixels fall in
two blocks is computed by both. For cell instances each block also computes a `halo` of
pixels around itself, for the watershed's context (`pipeline.block_labels`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from unet_service.core.geometry import Geometry
from unet_service.core.tiling import TilePlan

# A block holds at most this many pixels (z planes x rows x columns), whatever the setting
# asks per side: its probabilities are held in memory while it is computed (4 bytes a pixel
# a class, 64 MiB here for one class).
MAX_BLOCK_PIXELS = 16 * 2**20
# Pixels computed around a block for the watershed of cell instances: a cell cut by the
# block's border is seen whole up to this far beyond it.
INSTANCE_HALO = 64


@dataclass(frozen=True)
class Region:
    """Planes z0..z1-1, rows y0..y1-1 and columns x0..x1-1 of a volume."""

    z0: int
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.z1 - self.z0, self.y1 - self.y0, self.x1 - self.x0

    def grown(self, halo: int, height: int, width: int) -> Region:
        """The region and `halo` pixels around it in y and x, within the page."""
        return Region(
            self.z0,
            self.z1,
            max(0, self.y0 - halo),
            min(height, self.y1 + halo),
            max(0, self.x0 - halo),
            min(width, self.x1 + halo),
        )


@dataclass(frozen=True)
class Volume:
    """`pages` planes of `height` x `width`, cut into blocks of `block` (z, y, x) pixels,
    each computed with tiles of `tile_size` and `halo` pixels around it."""

    pages: int
    height: int
    width: int
    block: tuple[int, int, int]
    tile_size: int
    halo: int = 0

    @property
    def grid(self) -> tuple[int, int, int]:
        """Blocks along z, y and x."""
        return (
            math.ceil(self.pages / self.block[0]),
            math.ceil(self.height / self.block[1]),
            math.ceil(self.width / self.block[2]),
        )

    def __len__(self) -> int:
        nz, ny, nx = self.grid
        return nz * ny * nx

    def position(self, index: int) -> tuple[int, int, int]:
        """The block's (z, y, x) place in the grid; blocks are numbered x fastest."""
        nz, ny, nx = self.grid
        if not 0 <= index < nz * ny * nx:
            raise IndexError(f"block {index} of {nz * ny * nx}")
        return index // (ny * nx), index // nx % ny, index % nx

    def index(self, bz: int, by: int, bx: int) -> int:
        _, ny, nx = self.grid
        return (bz * ny + by) * nx + bx

    def region(self, index: int) -> Region:
        bz, by, bx = self.position(index)
        dz, dy, dx = self.block
        return Region(
            bz * dz,
            min(self.pages, (bz + 1) * dz),
            by * dy,
            min(self.height, (by + 1) * dy),
            bx * dx,
            min(self.width, (bx + 1) * dx),
        )

    def computed(self, index: int) -> Region:
        """The region block `index` computes: its own and the halo around it."""
        return self.region(index).grown(self.halo, self.height, self.width)

    def plan(self, geometry: Geometry) -> TilePlan:
        """The one tile plan of every page."""
        return TilePlan(self.height, self.width, geometry, self.tile_size)

    def block_tiles(self, index: int, geometry: Geometry) -> int:
        """Tiles block `index` computes, over all its pages."""
        area = self.computed(index)
        tiles = self.plan(geometry).tiles_owning(area.y0, area.y1, area.x0, area.x1)
        return area.shape[0] * len(tiles)

    def total_tiles(self, geometry: Geometry) -> int:
        """Tiles of every block (a tile shared by two blocks is computed by both)."""
        _, ny, nx = self.grid
        plan = self.plan(geometry)
        areas = [self.computed(i) for i in range(ny * nx)]  # the blocks of one plane
        per_page = sum(len(plan.tiles_owning(a.y0, a.y1, a.x0, a.x1)) for a in areas)
        return self.pages * per_page

    def borders(self) -> Iterator[tuple[int, int, str]]:
        """(block, its neighbour after it along y or x, "y" or "x"): every shared border."""
        nz, ny, nx = self.grid
        for bz in range(nz):
            for by in range(ny):
                for bx in range(nx):
                    if by + 1 < ny:
                        yield self.index(bz, by, bx), self.index(bz, by + 1, bx), "y"
                    if bx + 1 < nx:
                        yield self.index(bz, by, bx), self.index(bz, by, bx + 1), "x"

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "block": list(self.block)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Volume:
        return cls(**{**data, "block": tuple(data["block"])})


def block_shape(
    chunks: tuple[int, int, int], side: int, shape: tuple[int, int, int]
) -> tuple[int, int, int]:
    """Blocks of whole (z, y, x) `chunks`: one chunk deep, about `side` pixels a side
    (rounded up to whole chunks), fewer while the block holds more than MAX_BLOCK_PIXELS,
    never more than the volume."""
    dz, cy, cx = chunks
    pages, height, width = shape
    ny = max(1, math.ceil(min(side, height) / cy))
    nx = max(1, math.ceil(min(side, width) / cx))
    while min(dz, pages) * ny * cy * nx * cx > MAX_BLOCK_PIXELS and (ny > 1 or nx > 1):
        if ny * cy >= nx * cx and ny > 1:
            ny -= 1
        elif nx > 1:
            nx -= 1
        else:
            ny -= 1
    return dz, ny * cy, nx * cx
