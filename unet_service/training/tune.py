"""Choosing the instance parameters of a model card on validation slices: the seeded
watershed's seed threshold, smoothing and minimum object size that give the lowest Rand error
(1 - V_Rand, see training.challenge) of the instances the service would return."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from unet_service.pipeline.instances import InstanceParams, label_instances
from unet_service.training.challenge import segmentation_scores

SEED_THRESHOLDS = (0.8, 0.85, 0.9, 0.93, 0.95, 0.97)
SMOOTHINGS = (0.0, 0.5, 1.0, 2.0)
MIN_SIZES = (0, 16, 64)


def tune_instances(
    maps: Sequence[np.ndarray], truths: Sequence[np.ndarray], threshold: float
) -> tuple[InstanceParams, list[dict]]:
    """The best parameters over the grid, and every candidate's scores (best first)."""
    trials = []
    for seed, smoothing, min_size in itertools.product(SEED_THRESHOLDS, SMOOTHINGS, MIN_SIZES):
        if seed <= threshold:
            continue
        params = InstanceParams(seed_threshold=seed, smoothing=smoothing, min_size=min_size)
        labels = [label_instances(m, threshold, params) for m in maps]
        scores = segmentation_scores(labels, truths)
        trials.append({"params": params.model_dump(), **scores})
    trials.sort(key=lambda t: t["rand_error"])
    return InstanceParams(**trials[0]["params"]), trials
