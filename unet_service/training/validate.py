"""Validation during training: the lowest mismatch (fraction of pixels unlike the label)
over a sweep of thresholds on the
held-out slices, measured with the engine's own tiled inference path (normalisation, tiling,
stitching) on the weights being trained; optionally also the Rand error of the cell
instances the service would cut from the same maps (`unet-train --select instances`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from unet_service.core.engine import Segmenter
from unet_service.core.weights import ModelCard
from unet_service.pipeline.instances import InstanceParams, label_instances
from unet_service.training.challenge import segmentation_scores
from unet_service.training.data import Pair

THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)
# Seed thresholds tried when instances are scored: a checkpoint whose probabilities moved
# is judged by its best seeds, as `unet-eval --tune-instances` would cut its instances,
# rather than penalised for the seeds of the weights it started from.
SEED_THRESHOLDS = (0.85, 0.9, 0.95)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode inside the block, in the mode it had (train or eval) after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class Validation:
    """One validation: the lowest mismatch, its threshold, and, when instances are scored,
    their Rand error (1 - V_Rand after thinning, training.challenge) at that threshold."""

    mismatch: float
    threshold: float
    rand_error: float | None = None
    seed_threshold: float | None = None


class LiveBackend:
    """The engine's runtime protocol over the model being trained. The serving runtimes
    freeze a copy (BatchNorm folded, or an ONNX export); this one runs the current weights,
    so one Segmenter serves every validation of a run."""

    name = "live"

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device

    def batch_shapes(self, max_batch: int) -> list[int]:
        """Eager PyTorch runs any batch size without compiling: one warm-up shape."""
        return [1]

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch).to(self.device)
        return self.model(x.contiguous(memory_format=torch.channels_last)).float()


class Validator:
    """Scores `model`, as it is when called, on the held-out `pairs` with the card's
    normalisation, in fp32; the model's train/eval mode is left as it was found. With
    `instances`, the instances cut with those parameters are scored too, with the best of
    its and SEED_THRESHOLDS' seed thresholds."""

    def __init__(
        self,
        model: torch.nn.Module,
        card: ModelCard,
        device: torch.device,
        pairs: list[Pair],
        instances: InstanceParams | None = None,
    ) -> None:
        self.model = model
        self.pairs = pairs
        self.instances = instances
        with evaluating(model):  # Segmenter puts the model it is given in eval mode
            self.segmenter = Segmenter(
                model, card, device=device, precision="fp32", backend=LiveBackend(model, device)
            )

    def __call__(self) -> Validation:
        with evaluating(self.model):
            maps = probability_maps(self.segmenter, self.pairs)
        truths = [pair.label.astype(bool) for pair in self.pairs]
        error, threshold = lowest_mismatch(maps, truths)
        if self.instances is None:
            return Validation(error, threshold)
        seeds = sorted({self.instances.seed_threshold, *SEED_THRESHOLDS})
        rand, seed = min(
            (self._rand_error(maps, truths, threshold, seed), seed)
            for seed in seeds
            if seed > threshold
        )
        return Validation(error, threshold, rand, seed)

    def _rand_error(
        self, maps: list[np.ndarray], truths: list[np.ndarray], threshold: float, seed: float
    ) -> float:
        assert self.instances is not None
        params = self.instances.model_copy(update={"seed_threshold": seed})
        labels = [label_instances(m, threshold, params) for m in maps]
        return segmentation_scores(labels, truths)["rand_error"]


def probability_maps(segmenter: Segmenter, pairs: list[Pair]) -> list[np.ndarray]:
    """The (H, W) foreground probability of each pair, one tile per slice (exact, see
    core.tiling)."""
    maps = []
    for pair in pairs:
        tile = segmenter.geometry.smallest_output_covering(max(pair.label.shape))
        probs = segmenter.segment(pair.image, tile_size=tile, probabilities=True).probabilities
        assert probs is not None
        maps.append(probs[0])
    return maps


def lowest_mismatch(maps: list[np.ndarray], truths: list[np.ndarray]) -> tuple[float, float]:
    """Lowest mismatch over THRESHOLDS, the pixels of all maps pooled, and that threshold."""
    errors = np.zeros(len(THRESHOLDS))
    total = 0
    for prob, truth in zip(maps, truths, strict=True):
        for j, t in enumerate(THRESHOLDS):
            errors[j] += np.count_nonzero((prob > t) != truth)
        total += truth.size
    best = int(np.argmin(errors))
    return float(errors[best] / total), float(THRESHOLDS[best])
