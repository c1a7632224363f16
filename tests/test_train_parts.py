"""Training's parts meet the engine where they must: the network sees the same normalised
pixels in training as in serving, and validation scores the weights being trained without
changing them or the mode the model is in."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import TINY_CHANNELS, isbi_slice, tiny_unet
from unet_service.core.engine import Segmenter
from unet_service.core.normalize import Normalizer
from unet_service.core.weights import ModelCard
from unet_service.training.augment import CropSampler
from unet_service.training.batches import to_tensors, unit_image
from unet_service.training.data import Pair
from unet_service.training.validate import Validator

CARD = ModelCard(
    name="tiny",
    channels=TINY_CHANNELS,
    class_names=["cell_interior"],
    normalization={"mean": [0.486477], "std": [0.166526]},
)


def as_type(grey: np.ndarray, kind: str) -> np.ndarray:
    """A real (H, W) uint8 slice as the (H, W, C) image of one pixel type."""
    if kind == "uint8":
        return grey[:, :, None]
    if kind == "uint16":
        return (grey.astype(np.uint16) * 257)[:, :, None]
    if kind == "float32":
        return (grey / np.float32(255)).astype(np.float32)[:, :, None]
    return np.stack([grey, grey // 2, 255 - grey], axis=2)  # rgb


@pytest.mark.parametrize("kind", ["uint8", "uint16", "float32", "rgb"])
def test_training_and_the_engine_normalise_identically(kind: str) -> None:
    """A crop without augmentation, as a training step feeds it to the network, is the very
    float32 array the engine feeds it for the same window of the same image."""
    image = as_type(isbi_slice(0), kind)
    segmenter = Segmenter(tiny_unet(), CARD, device="cpu", backend="torch")
    geometry, output = segmenter.geometry, 44
    label = np.zeros(image.shape[:2], np.uint8)
    sampler = CropSampler(
        [unit_image(image)], [label], None, geometry, output, elastic_sigma=0, jitter=0.0
    )
    sampler.flips = False
    row, col = 100, 150
    crop = sampler.crop_at(0, row, col, np.random.default_rng(0))
    x, _, _ = to_tensors([crop], Normalizer(CARD.normalization, 1), torch.device("cpu"), False)

    top, left, size = row - geometry.margin, col - geometry.margin, output + geometry.shrink
    window = segmenter.prepare(image)[top : top + size, left : left + size]
    served = segmenter.normalize(window.transpose(2, 0, 1))
    assert served.dtype == np.float32 and x.dtype == torch.float32
    np.testing.assert_array_equal(x[0].numpy(), served)


def test_validation_scores_the_live_weights_and_keeps_the_mode() -> None:
    grey = isbi_slice(1)[:64, :64]
    label = (grey > 120).astype(np.uint8)
    pairs = [Pair("01", grey[:, :, None], label)]
    model = tiny_unet().train()
    validator = Validator(model, CARD, torch.device("cpu"), pairs)
    assert model.training
    state = copy.deepcopy(model.state_dict())
    v = validator()
    error, threshold = v.mismatch, v.threshold
    assert v.rand_error is None
    assert model.training
    # Validation runs in eval mode: BatchNorm's running statistics are left as they were.
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert 0 <= error <= 1 and 0 < threshold < 1
    # Weights changed after the validator was built are the ones it scores: with every
    # probability ~0 every foreground pixel is an error, whatever the threshold.
    with torch.no_grad():
        model.head.bias.fill_(-1e4)
    error = validator().mismatch
    assert error == pytest.approx(label.mean(), abs=1e-12)
    assert model.training
    model.eval()
    validator()
    assert not model.training
