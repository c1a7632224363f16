"""What each optimiser step learns from: the pairs split into training and validation slices,
their pixels on the [0, 1] scale with the statistics the card's normalisation records, the
loss weights, and a sampler of augmented crops turned into the network's input tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from unet_service.core.geometry import Geometry
from unet_service.core.normalize import Normalizer, to_unit
from unet_service.imaging.decode import match_channels
from unet_service.training.augment import Crop, CropSampler
from unet_service.training.config import TrainConfig
from unet_service.training.data import DataError, Pair, load_pairs, parse_slices
from unet_service.training.losses import border_weight_map


@dataclass
class TrainingData:
    train_pairs: list[Pair]
    val_pairs: list[Pair]
    sampler: CropSampler
    mean: float  # of the training pixels on the [0, 1] scale
    std: float
    weighted: bool  # whether the loss weighs pixels (border or class-balance weights)

    def batch(
        self, rng: np.random.Generator, size: int, normalize: Normalizer, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`size` fresh crops as the tensors of one step (see `to_tensors`)."""
        crops = [self.sampler.sample(rng) for _ in range(size)]
        return to_tensors(crops, normalize, device, self.weighted)


def to_tensors(
    crops: list[Crop], normalize: Normalizer, device: torch.device, weighted: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Crops -> (input, target, weight) tensors on `device`, the input normalised by the
    engine's own code; the weight is None when the loss does not weigh pixels."""
    # The crops are float32 on the [0, 1] scale, which the normaliser takes as is.
    x = torch.from_numpy(normalize(np.stack([c.image for c in crops])[:, None]))
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(np.stack([c.label for c in crops])[:, None]).to(device)
    w = torch.from_numpy(np.stack([c.weight for c in crops])[:, None]).to(device)
    return x, y, w if weighted else None


def unit_image(image: np.ndarray) -> np.ndarray:
    """Decoded (H, W, C) pixels -> (H, W) float32 on the [0, 1] scale that augmentation and
    the card's mean and std work on: the channel the engine gives a one-channel model (luma
    of RGB), scaled by the engine's own code. The shipped models are grey-scale."""
    return to_unit(match_channels(image, 1)[:, :, 0])


def load_training_data(config: TrainConfig, geometry: Geometry) -> TrainingData:
    pairs = load_pairs(config.data)
    val_idx = parse_slices(config.val_slices, len(pairs))
    train_pairs = [p for i, p in enumerate(pairs) if i not in val_idx]
    if not train_pairs:
        raise DataError("every slice is a validation slice: nothing left to train on")
    images = [unit_image(p.image) for p in train_pairs]
    labels = [p.label for p in train_pairs]
    stacked = np.concatenate([im.ravel() for im in images])
    weighted = config.border_weight > 0 or config.class_balance
    weights = None
    if weighted:
        weights = [
            border_weight_map(lb, config.border_weight, config.border_sigma, config.class_balance)
            for lb in labels
        ]
    sampler = CropSampler(
        images,
        labels,
        weights,
        geometry,
        config.output_size,
        elastic_sigma=config.elastic_sigma,
        elastic_grid=config.elastic_grid,
        jitter=config.jitter,
    )
    return TrainingData(
        train_pairs,
        [pairs[i] for i in val_idx],
        sampler,
        float(stacked.mean()),
        float(stacked.std()),
        weighted,
    )
