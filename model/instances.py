"""Cell instances from a stitched probability map: a seeded watershed.

A threshold alone merges two cells wherever the membrane between them is faint for one
pixel; Rand error counts exactly those merges. So seeds are the confidently-interior cores
(connected components above a high `seed_threshold`), and each floods outwards over the
probability map, down to the card's threshold, until it meets a neighbour: a faint gap
then separates two cells instead of merging them. Computed once per image after
stitching, so tiling stays exact.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from skimage.filters import gaussian
from skimage.measure import label
from skimage.morphology import remove_small_objects
from skimage.segmentation import relabel_sequential, watershed


class InstanceParams(BaseModel):
    """How instances are cut out; kept in the model card (`instances`), chosen by
    `unet-eval --tune-instances` on validation slices."""

    model_config = ConfigDict(extra="forbid")
    seed_threshold: float = Field(0.9, gt=0, lt=1, description="probability of seed cores")
    min_size: int = Field(16, ge=0, description="objects smaller than this (pixels) are dropped")
    smoothing: float = Field(0.0, ge=0, description="Gaussian sigma applied to the map first")


def label_instances(
    probability: np.ndarray, threshold: float, params: InstanceParams | None = None
) -> np.ndarray:
    """(H, W) probability of the foreground class -> (H, W) uint32 labels: 0 for
    background (membrane), 1..N for the N objects, numbered in their seeds' raster order."""
    params = params or InstanceParams()
    prob = probability.astype(np.float32, copy=False)
    if params.smoothing > 0:
        prob = gaussian(prob, sigma=params.smoothing, preserve_range=True).astype(np.float32)
    seeds = label(prob > max(params.seed_threshold, threshold), connectivity=1)
    labels = watershed(-prob, markers=seeds, mask=prob > threshold)
    if params.min_size > 1:
        # max_size: objects of at most this many pixels go (scikit-image >= 0.26).
        labels = remove_small_objects(labels, max_size=params.min_size - 1)
    labels, _, _ = relabel_sequential(labels)
    return labels.astype(np.uint32, copy=False)
