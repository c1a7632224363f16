"""Sizes of the valid-convolution U-Net, derived from its depth d (number of poolings).

Each double conv trims 4 pixels; pooling halves, up-sampling doubles. Working back from the
bottleneck gives, for an output of size o:
    input  = o + shrink,           shrink = 12 * 2^d - 8   (184 for d = 4)
    margin = shrink / 2 per side = 6 * 2^d - 4              (92 for d = 4)
    legal o = 4 + 2^d * j, j >= 0                           (388 = 4 + 16 * 24)
Shifting the input by a multiple of 2^d shifts the output by the same amount and changes
nothing else, which is what makes overlap-tile inference exact.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    depth: int

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
