"""Sizes of the valid-convolution U-Net, derived from its depth d (number of poolings).

Each double conv trims 4 pixels; pooling halves, up-sampling doubles. Working back from the
bottleneck gives, for an output of size o:
    input  = o + shrink,           shrink = 12 * 2^d - 8   (184 for d = 4)
    margin = shrink / 2 per side = 6 * 2^d - 4              (92 for d = 4)
    legal o = 4 + 2^d * j, j >= 0                           (388 = 4 + 16 * 24)
Shifting the input by a multiple of 2^d shifts the output by the same amount and changes
nothing else, which is what makes overlap-tile inference exact.

`HaloGeometry` is the same interface for a bioimage.io package's network: one that keeps its
input's size (padded convolutions) or trims a fixed border itself (valid convolutions, a
negative size offset, as our own exported packages declare), its outputs then cropped by the
package's halo; it "shrinks" by twice the trim and the halo, and its legal sizes are the
package's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

# How an image is extended past its border for the tiles that reach over it (numpy's modes):
# "reflect" mirrors about the edge pixel (our U-Net's, as in the U-Net paper), "symmetric"
# repeats it (bioimage.io's default), "edge" repeats the edge pixel outwards.
PADDINGS = ("reflect", "symmetric", "edge")


class TileGeometry(Protocol):
    """What tiling needs of a network's sizes (`Geometry`, `HaloGeometry`)."""

    @property
    def step(self) -> int: ...
    @property
    def shrink(self) -> int: ...
    @property
    def margin(self) -> int: ...
    @property
    def min_tile(self) -> int: ...
    @property
    def padding(self) -> str: ...
    def check_tile(self, size: int) -> int: ...
    def tile_for(self, size: int) -> int: ...
    def tile_stride(self, output_tile: int) -> int: ...
    def smallest_output_covering(self, size: int) -> int: ...
    def input_for_output(self, size: int) -> int: ...


@dataclass(frozen=True)
class Geometry:
    depth: int
    padding = "reflect"

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")

    @property
    def step(self) -> int:
        """Output sizes, and shifts that keep results identical, come in steps of 2^d."""
        return 2**self.depth

    @property
    def shrink(self) -> int:
        return 12 * self.step - 8

    @property
    def margin(self) -> int:
        return 6 * self.step - 4

    @property
    def min_output(self) -> int:
        return 4

    def is_legal_output(self, size: int) -> bool:
        return size >= self.min_output and (size - 4) % self.step == 0

    def nearest_legal_outputs(self, size: int) -> tuple[int, int]:
        below = max(self.min_output, 4 + (size - 4) // self.step * self.step)
        above = below if below >= size else below + self.step
        return below, above

    def check_output(self, size: int) -> int:
        if not self.is_legal_output(size):
            lo, hi = self.nearest_legal_outputs(size)
            near = f"{lo}" if lo == hi or size < self.min_output else f"{lo} or {hi}"
            raise ValueError(
                f"output size {size} is not legal for a depth-{self.depth} UNet "
                f"(legal sizes are 4 + {self.step}*j); nearest legal: {near}"
            )
        return size

    @property
    def min_tile(self) -> int:
        """Smallest output tile for overlap tiling: tile origins are multiples of 2^d, so a
        tile narrower than 2^d would leave gaps between neighbours (4 for d <= 2, else
        4 + 2^d)."""
        return self.smallest_output_covering(self.step)

    def check_tile(self, size: int) -> int:
        """A legal output size that can also tile an image (see `min_tile`)."""
        self.check_output(size)
        if size < self.min_tile:
            raise ValueError(
                f"tile size {size} is narrower than the tile stride of a depth-{self.depth} "
                f"UNet ({self.step}), so tiles would leave gaps; smallest legal tile: "
                f"{self.min_tile}"
            )
        return size

    def tile_for(self, size: int) -> int:
        """The output tile used when `size` is asked for (UNET_TILE_SIZE): `size`, which
        must be a legal tile (ValueError naming the nearest legal ones otherwise)."""
        return self.check_tile(size)

    def input_for_output(self, size: int) -> int:
        return self.check_output(size) + self.shrink

    def output_for_input(self, size: int) -> int:
        out = size - self.shrink
        if not self.is_legal_output(out):
            lo, hi = self.nearest_legal_outputs(max(out, self.min_output))
            raise ValueError(
                f"input size {size} is not legal for a depth-{self.depth} UNet; nearest legal "
                f"inputs: {lo + self.shrink} or {hi + self.shrink}"
                if lo != hi
                else f"input size {size} is not legal for a depth-{self.depth} UNet; "
                f"nearest legal input: {lo + self.shrink}"
            )
        return out

    def tile_stride(self, output_tile: int) -> int:
        """Largest multiple of 2^d not above the output tile: neighbouring tiles overlap by
        output_tile - stride pixels and each output pixel is taken from exactly one tile."""
        self.check_tile(output_tile)
        return output_tile // self.step * self.step

    def smallest_output_covering(self, size: int) -> int:
        """Smallest legal output size >= size."""
        return self.nearest_legal_outputs(max(size, self.min_output))[1]


@dataclass(frozen=True)
class HaloGeometry:
    """A network whose output has its input's size less `trim` pixels at each border (0 for
    padded convolutions; a package's output size offset is -2 trim), `halo` pixels of it at
    each border not to be trusted (a bioimage.io package's output halo): a tile's input is a
    legal input size
    (`min_input + step_input * n`; only `min_input` when `step_input` is 0), its output that
    input less twice the halo. Tile origins are multiples of `step_input`, the size's own
    granularity (a network that pools k times declares a step of 2^k), so every tile is a
    window of one pass over the padded image."""

    halo: int
    min_input: int
    step_input: int
    padding: str = "symmetric"
    trim: int = 0

    def __post_init__(self) -> None:
        if self.halo < 0 or self.trim < 0 or self.min_input < 1 or self.step_input < 0:
            raise ValueError(f"not a size: {self}")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, not {self.padding}")
        if self.step_input == 0 and self.min_input <= self.shrink:
            raise ValueError(
                f"an input of {self.min_input} pixels leaves no output inside a halo of "
                f"{self.halo} and a trim of {self.trim}"
            )

    @property
    def step(self) -> int:
        return self.step_input or 1

    @property
    def shrink(self) -> int:
        return 2 * self.margin

    @property
    def margin(self) -> int:
        return self.halo + self.trim

    def _first(self) -> int:
        """The smallest legal output (at least 1 pixel)."""
        base = self.min_input - self.shrink
        if self.step_input == 0 or base >= 1:
            return base
        return base + math.ceil((1 - base) / self.step_input) * self.step_input

    def is_legal_output(self, size: int) -> bool:
        first = self._first()
        if self.step_input == 0:
            return size == first
        return size >= first and (size - first) % self.step_input == 0

    def check_output(self, size: int) -> int:
        if not self.is_legal_output(size):
            legal = (
                f"{self._first()} only"
                if self.step_input == 0
                else f"{self._first()} + {self.step_input}*j"
            )
            raise ValueError(
                f"output size {size} is not legal for this package (its inputs are "
                f"{self._inputs()}, less {self.margin} per side: outputs {legal})"
            )
        return size

    def _inputs(self) -> str:
        if self.step_input == 0:
            return f"{self.min_input} pixels"
        return f"{self.min_input} + {self.step_input}*n pixels"

    @property
    def min_tile(self) -> int:
        return self.smallest_output_covering(self.step)

    def check_tile(self, size: int) -> int:
        self.check_output(size)
        if size < self.min_tile:
            raise ValueError(f"tile size {size} is narrower than the tile stride {self.step}")
        return size

    def tile_for(self, size: int) -> int:
        """The output tile used when `size` is asked for (UNET_TILE_SIZE bounds it): the
        largest legal tile not above `size`, or the smallest legal tile when none is."""
        if self.step_input == 0:
            return self._first()
        below = self._first() + max(0, (size - self._first()) // self.step_input) * self.step_input
        return max(below, self.min_tile)

    def tile_stride(self, output_tile: int) -> int:
        self.check_tile(output_tile)
        return output_tile // self.step * self.step

    def smallest_output_covering(self, size: int) -> int:
        """Smallest legal output >= size (for a fixed size, that size itself)."""
        first = self._first()
        if self.step_input == 0 or size <= first:
            return first
        return first + math.ceil((size - first) / self.step_input) * self.step_input

    def input_for_output(self, size: int) -> int:
        return self.check_output(size) + self.shrink
