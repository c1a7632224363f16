"""Elastic deformation, flips and rotations keep image, label and weights aligned."""

from __future__ import annotations

import numpy as np
import pytest

from unet_service.core.geometry import Geometry
from unet_service.training.augment import CropSampler, displacement_field

GEOMETRY = Geometry(2)  # margin 20, shrink 40
OUTPUT = 44


def coordinate_sampler(axis: int, elastic_sigma: float = 10.0) -> CropSampler:
    """Image and label both hold a pixel coordinate; the image is interpolated linearly
    (exact for a linear ramp) and the label by nearest neighbour."""
    ramp = np.indices((300, 300), dtype=np.float32)[axis]
    return CropSampler(
        [ramp],
        [ramp.astype(np.int32)],
        [ramp * 2],
        GEOMETRY,
        OUTPUT,
        elastic_sigma=elastic_sigma,
        jitter=0.0,
    )


@pytest.mark.parametrize("axis", [0, 1])
def test_deformed_image_label_and_weights_stay_aligned(axis: int) -> None:
    sampler = coordinate_sampler(axis)
    m, o = GEOMETRY.margin, OUTPUT
    moved = 0.0
    for seed in range(20):
        crop = sampler.crop_at(0, 120, 110, np.random.default_rng(seed))
        assert crop.image.shape == (o + GEOMETRY.shrink,) * 2
        assert crop.label.shape == crop.weight.shape == (o, o)
        centre = crop.image[m : m + o, m : m + o]
        # The label is the nearest-neighbour sample at the same deformed coordinate...
        assert np.max(np.abs(centre - crop.label)) <= 0.5 + 1e-4
        assert np.all(crop.label == np.round(crop.label))  # labels are never blended
        # ...and the weights the linear one.
        np.testing.assert_allclose(crop.weight, 2 * centre, atol=1e-3)
        moved = max(moved, float(np.max(np.abs(np.diff(centre, axis=axis) - 1))))
    # The deformation really bends the grid (local stretching and shrinking).
    assert moved > 0.05


def test_without_deformation_a_crop_is_the_mirror_padded_window() -> None:
    image = np.arange(60 * 70, dtype=np.float32).reshape(60, 70)
    label = (image % 3 == 0).astype(np.uint8)
    sampler = CropSampler([image], [label], None, GEOMETRY, 4, elastic_sigma=0, jitter=0.0)
    sampler.flips = False
    crop = sampler.crop_at(0, 25, 30, np.random.default_rng(0))
    m = GEOMETRY.margin
    np.testing.assert_array_equal(crop.image, image[25 - m : 29 + m, 30 - m : 34 + m])
    np.testing.assert_array_equal(crop.label, label[25:29, 30:34])
    assert np.all(crop.weight == 1)
    # At the top-left corner the context comes from the mirrored image (numpy "reflect").
    corner = sampler.crop_at(0, 0, 0, np.random.default_rng(0))
    padded = np.pad(image, m, mode="reflect")
    np.testing.assert_array_equal(corner.image, padded[: 4 + 2 * m, : 4 + 2 * m])


def test_displacement_field_is_smooth_with_the_requested_spread() -> None:
    field = displacement_field(200, np.random.default_rng(1), sigma=10, grid=3)
    assert field.shape == (2, 200, 200)
    # Smooth: neighbouring pixels move almost together.
    assert np.max(np.abs(np.diff(field, axis=1))) < 1.0
    spread = np.std([displacement_field(50, np.random.default_rng(s))[:, 0, 0] for s in range(200)])
    assert 8 < spread < 12


def test_samples_are_reproducible_from_the_seed() -> None:
    sampler = coordinate_sampler(0)
    a = sampler.sample(np.random.default_rng(5))
    b = sampler.sample(np.random.default_rng(5))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
