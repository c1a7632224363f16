"""Cell instances from a stitched probability map: a seeded watershed.

A threshold alone merges two cells wherever the membrane between them is faint for one
pixel; Rand error counts exactly those merges. So seeds are the confidently-interior cores
(connected components above a high `seed_threshold`), and each floods outwards over the
probability map, down to the card's threshold, until it meets a neighbour: a faint gap
then separates two cells instead of merging them. Computed once per image after
stitching, so tiling stays exact.

Cost: a flood never crosses the membrane (the pixels at or below the threshold), so each
connected region of the thresholded map is flooded on its own, inside its bounding box,
and only where it holds two or more seed cores; a region with one core is one cell as it
is, one without is background. On EM slices most regions hold one core, so this is several
times faster than one watershed of the whole image, and the whole image is only ever held
as one byte per pixel (the map quantised, `interior_levels`) plus the output labels (four
bytes), so huge images need about 5 bytes per pixel rather than the 60-70 of a whole-image
watershed (measured by `python -m bench.instances`).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi
from skimage.segmentation import watershed

# Rows of the map smoothed and quantised at a time: the float copies stay strip-sized.
STRIP_ROWS = 256
# The quantised map's codes: 0 = membrane (at or below the threshold), 255 = seed core;
# 1..254 order the pixels between, from the threshold up to the seed threshold.
MEMBRANE, CORE = 0, 255
# Gaussian radius in sigmas, as scikit-image's and SciPy's default.
TRUNCATE = 4.0


class InstanceParams(BaseModel):
    """How instances are cut out; kept in the model card (`instances`), chosen by
    `unet-eval --tune-instances` on validation slices."""

    model_config = ConfigDict(extra="forbid")
    seed_threshold: float = Field(0.9, gt=0, lt=1, description="probability of seed cores")
    min_size: int = Field(16, ge=0, description="objects smaller than this (pixels) are dropped")
    smoothing: float = Field(0.0, ge=0, description="Gaussian sigma applied to the map first")


def interior_levels(
    probability: np.ndarray, threshold: float, params: InstanceParams
) -> np.ndarray:
    """(H, W) probability -> (H, W) uint8 codes of the (smoothed) map: MEMBRANE at or
    below `threshold`, CORE above the seed threshold, and 1..254 rising with the
    probability in between (the flooding order: 1/253 steps, which change the labels of a
    few pixels in 10^5 against a float map, and flood about twice as fast)."""
    height = probability.shape[0]
    levels = np.empty(probability.shape, np.uint8)
    seed = max(params.seed_threshold, threshold)
    sigma = params.smoothing
    halo = int(TRUNCATE * sigma + 0.5) if sigma > 0 else 0
    for top in range(0, height, STRIP_ROWS):
        bottom = min(top + STRIP_ROWS, height)
        # A strip and `halo` rows either side smooth exactly as the whole map would: the
        # rows kept never reach the strip's cut edges (only the image's own edges).
        low, high = max(top - halo, 0), min(bottom + halo, height)
        strip = probability[low:high].astype(np.float32, copy=False)
        if sigma > 0:
            strip = ndi.gaussian_filter(strip, sigma, mode="nearest", truncate=TRUNCATE)
        strip = strip[top - low : top - low + bottom - top]
        out = levels[top:bottom]
        np.clip(np.rint(strip * 253), 0, 253, out=out, casting="unsafe")
        out += 1
        out[strip <= threshold] = MEMBRANE
        out[strip > seed] = CORE
    return levels


def label_instances(
    probability: np.ndarray, threshold: float, params: InstanceParams | None = None
) -> np.ndarray:
    """(H, W) probability of the foreground class -> (H, W) uint32 labels: 0 for
    background (membrane), 1..N for the N objects."""
    params = params or InstanceParams()
    levels = interior_levels(probability, threshold, params)
    labels = np.empty(levels.shape, np.int32)
    # The seed cores first, into the array the output will be, just to note one pixel of
    # each: that pixel's region, once the regions are labelled, says how many cores each
    # region holds. (A second whole-image label array would add 4 bytes per pixel.)
    n_cores = ndi.label(levels == CORE, output=labels)
    core_pixels = [_first_pixel(labels, box, core) for core, box in _boxes(labels)]
    # Then the connected regions above the threshold, 4-connected as the flood.
    n_regions = ndi.label(levels, output=labels)  # nonzero codes
    cores_per_region = np.zeros(n_regions + 1, np.int64)
    if n_cores:
        rows, cols = np.array(core_pixels).T
        np.add.at(cores_per_region, labels[rows, cols], 1)
    keep = cores_per_region > 0  # a region without a confident core is background
    extra: list[bool] = []  # whether each id added for a split region is kept
    next_id = n_regions + 1
    for region, box in _boxes(labels, cores_per_region > 1):
        crop = labels[box]
        inside = crop == region
        codes = levels[box]
        cores, n = ndi.label((codes == CORE) & inside)
        # Flood from the cores over this region only (deepest = highest code); the first
        # core keeps the region's id, the others get new ones.
        flooded = watershed(CORE - codes, markers=cores, mask=inside)
        pieces = np.where(flooded == 1, region, flooded + (next_id - 2))
        crop[inside] = pieces[inside]
        sizes = np.bincount(flooded[inside], minlength=n + 1)[1:]
        keep[region] = bool(sizes[0] >= params.min_size)
        extra.extend(bool(size >= params.min_size) for size in sizes[1:])
        next_id += n - 1
    kept = np.concatenate([keep, np.array(extra, bool)])
    if params.min_size > 1:
        kept &= _sizes(labels, next_id) >= params.min_size
    # Renumber the kept ids 1..N (dropped ones to 0), a strip at a time so no whole-image
    # temporary is made.
    table = np.zeros(next_id, np.int32)
    table[kept] = np.arange(1, np.count_nonzero(kept) + 1, dtype=np.int32)
    for top in range(0, labels.shape[0], STRIP_ROWS):
        rows = labels[top : top + STRIP_ROWS]
        np.take(table, rows, out=rows)
    return labels.view(np.uint32)


def _boxes(
    labels: np.ndarray, wanted: np.ndarray | None = None
) -> list[tuple[int, tuple[slice, slice]]]:
    """(id, bounding box) of the ids present in `labels` (those with `wanted[id]`)."""
    top = None if wanted is None else int(np.flatnonzero(wanted).max(initial=0))
    if top == 0:
        return []
    found = ndi.find_objects(labels, max_label=top or 0)
    return [
        (i, box)
        for i, box in enumerate(found, start=1)
        if box is not None and (wanted is None or wanted[i])
    ]


def _first_pixel(labels: np.ndarray, box: tuple[slice, slice], value: int) -> tuple[int, int]:
    """A pixel of `value` inside its bounding box: on the box's first row, by definition."""
    row = box[0].start
    line = labels[row, box[1]]
    return row, box[1].start + int(np.argmax(line == value))


def _sizes(labels: np.ndarray, count: int) -> np.ndarray:
    """Pixels per id, counted a strip at a time (np.bincount would copy the whole image
    to 64-bit first)."""
    sizes = np.zeros(count, np.int64)
    for top in range(0, labels.shape[0], STRIP_ROWS):
        sizes += np.bincount(labels[top : top + STRIP_ROWS].ravel(), minlength=count)
    return sizes
