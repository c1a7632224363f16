"""What can be asked of an image, in one place: the outputs, what each needs computed, how
each is laid out in a result file, and a description of one request (`SegmentRequest`) that
every transport (v1, v2, jobs, the command line) parses its own input into."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

Output = Literal["mask", "probabilities", "overlay", "instances"]
OUTPUTS: tuple[Output, ...] = get_args(Output)
Colour = Literal["classes", "instances"]
COLOURS: tuple[Colour, ...] = get_args(Colour)
# Test-time augmentation: 1 view (off) or the 8 rotations and mirrorings averaged.
TTA_VIEWS = (1, 8)
# Outputs a job computes tile by tile into its file (the others hold each page whole).
STREAMED: tuple[Output, ...] = ("mask", "probabilities")
# What a job's result is written as: a TIFF volume, or an OME-Zarr store (computed block by
# block, for these outputs only).
ResultFormat = Literal["tiff", "zarr"]
RESULT_FORMATS: tuple[ResultFormat, ...] = get_args(ResultFormat)
STORE_OUTPUTS: tuple[Output, ...] = ("mask", "probabilities", "instances")
# Bytes per pixel of a job's result beyond its classes: cell ids are spooled as uint32 and,
# at the end, copied as uint16 beside the spool (6 at the peak); RGB.
WHOLE_PAGE_PIXEL_BYTES = {"instances": 6, "overlay": 3}
# Room for a result file's own structure: its header and metadata, and each page's header.
FILE_OVERHEAD = 64 << 10
PAGE_OVERHEAD = 4 << 10


@dataclass(frozen=True)
class SegmentRequest:
    """What was asked of one image (or stack): the outputs (v1 and jobs ask one, v2 several),
    the overlay's colouring, and how many views are averaged."""

    outputs: tuple[Output, ...] = ("mask",)
    colour: Colour | None = None
    tta: int = 1

    def __post_init__(self) -> None:
        unknown = [o for o in self.outputs if o not in OUTPUTS]
        if unknown or not self.outputs:
            raise ValueError(f"outputs must be among {list(OUTPUTS)}, got {list(self.outputs)}")
        if self.tta not in TTA_VIEWS:
            raise ValueError(f"tta must be 1 or 8, got {self.tta}")
        if self.colour is not None and "overlay" not in self.outputs:
            raise ValueError("colour applies to output=overlay only")

    @property
    def labels(self) -> bool:
        """Whether cell instances are computed: asked for, or to colour the overlay."""
        return "instances" in self.outputs or self.colour == "instances"

    @property
    def probabilities(self) -> bool:
        """Whether the probabilities are kept (asked for, or instances are cut from them)."""
        return "probabilities" in self.outputs or self.labels

    @property
    def streamed(self) -> bool:
        """Whether a job computes it tile by tile from its file (else page by page whole)."""
        return len(self.outputs) == 1 and self.outputs[0] in STREAMED and self.tta == 1


def result_layout(output: Output, out_channels: int) -> tuple[np.dtype, int]:
    """(dtype, samples per pixel) of a streamed result file: a uint8 mask, or float32
    probabilities with one sample per class (contiguous, so rows stream out in order)."""
    if output == "mask":
        return np.dtype(np.uint8), 1
    return np.dtype(np.float32), out_channels


def result_nbytes(pixels: int, pages: int, output: Output, out_channels: int) -> int:
    """The most bytes a job's result file takes, for keeping room for it before the job
    starts: its pixel bytes (mask 1 a pixel, probabilities 4 a class, instances 6, overlay
    3) and what compression and the file's structure can add. Deflate grows incompressible
    data by well under 1/256 and tiles' offset tables take 16 bytes a tile, so the 1/256
    margin covers both; each page adds its header."""
    if output in STREAMED:
        dtype, samples = result_layout(output, out_channels)
        per_pixel = samples * dtype.itemsize
    else:
        per_pixel = WHOLE_PAGE_PIXEL_BYTES[output]
    pixel_bytes = pixels * per_pixel
    return pixel_bytes + pixel_bytes // 256 + pages * PAGE_OVERHEAD + FILE_OVERHEAD


def store_nbytes(pixels: int, output: Output, out_channels: int) -> int:
    """The most bytes an OME-Zarr result takes: its full resolution uncompressed (mask 1 a
    pixel, probabilities 4 a class, cell ids 4), a third more for the pyramid's levels, and
    room for the metadata and each chunk's codec header."""
    per_pixel = {"mask": 1, "instances": 4}.get(output, 4 * out_channels)
    pixel_bytes = pixels * per_pixel
    return pixel_bytes + pixel_bytes // 3 + pixel_bytes // 256 + FILE_OVERHEAD
