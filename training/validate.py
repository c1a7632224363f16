"""Validation during training: the best pixel error over a sweep of thresholds on the
held-out slices, measured with the engine's own tiled inference path."""

from __future__ import annotations

import numpy as np

from model.engine import Segmenter
from training.data import Pair

THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)


def validate(segmenter: Segmenter, pairs: list[Pair]) -> tuple[float, float]:
    """Best pixel error over THRESHOLDS on the validation pairs, and that threshold, using
    one tile per slice (exact, see model.tiling)."""
    errors = np.zeros(len(THRESHOLDS))
    total = 0
    for pair in pairs:
        tile = segmenter.geometry.smallest_output_covering(max(pair.label.shape))
        probs = segmenter.segment(pair.image, tile_size=tile, probabilities=True).probabilities
        assert probs is not None
        truth = pair.label.astype(bool)
        for j, t in enumerate(THRESHOLDS):
            errors[j] += np.count_nonzero((probs[0] > t) != truth)
        total += truth.size
    best = int(np.argmin(errors))
    return float(errors[best] / total), float(THRESHOLDS[best])
