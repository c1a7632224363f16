"""The loss and the U-Net paper's weight map, against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unet_service.training.losses import (
    border_weight_map,
    class_balance_weights,
    membrane_cldice,
    nearest_two_cell_distances,
    soft_skeleton,
    weighted_bce,
)


def test_weighted_bce_hand_values() -> None:
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # BCE(sigmoid(z), y) = log(1 + e^z) - y z
    per_pixel = [
        math.log(2),
        math.log(1 + math.e**2),
        math.log(1 + math.e**-1),
        math.log(1 + math.e**3) - 3,
    ]
    assert weighted_bce(logits, target).item() == pytest.approx(sum(per_pixel) / 4, rel=1e-6)
    weight = torch.tensor([[1.0, 0.0], [2.0, 0.5]])
    expected = (per_pixel[0] + 2 * per_pixel[2] + 0.5 * per_pixel[3]) / 4
    assert weighted_bce(logits, target, weight).item() == pytest.approx(expected, rel=1e-6)


def test_class_balance_gives_both_classes_equal_total_weight() -> None:
    label = np.zeros((4, 5), np.uint8)
    label[:, :1] = 1  # 4 foreground pixels, 16 background
    w = class_balance_weights(label)
    assert w[label == 1] == pytest.approx(20 / 8)
    assert w[label == 0] == pytest.approx(20 / 32)
    assert w[label == 1].sum() == pytest.approx(w[label == 0].sum())
    assert np.all(class_balance_weights(np.ones((3, 3))) == 1)


def two_cells(gap: int) -> np.ndarray:
    label = np.zeros((30, 40), np.uint8)
    label[5:25, 5:15] = 1
    label[5:25, 15 + gap : 35] = 1
    return label


def test_distances_to_two_nearest_cells() -> None:
    label = two_cells(gap=3)  # membrane columns 15, 16, 17
    d1, d2 = nearest_two_cell_distances(label, reach=30)
    assert d1[10, 15] == pytest.approx(1) and d2[10, 15] == pytest.approx(3)
    assert d1[10, 16] == pytest.approx(2) and d2[10, 16] == pytest.approx(2)
    assert d1[10, 10] == 0  # inside the first cell
    assert d2[10, 10] == pytest.approx(8)  # column 10 to the second cell at column 18


def test_border_weight_peaks_on_the_gap_between_touching_cells() -> None:
    w0, sigma = 10.0, 5.0
    label = two_cells(gap=1)  # one-pixel membrane at column 15
    w = border_weight_map(label, w0=w0, sigma=sigma, class_balance=False)
    # d1 = d2 = 1 on the separating membrane.
    assert w[10, 15] == pytest.approx(1 + w0 * math.exp(-4 / (2 * sigma**2)), rel=1e-5)
    assert w[10, 15] == w.max()
    # Cells are not re-weighted, and the term fades far from the cells.
    assert np.all(w[label == 1] == 1)
    assert w[0, 0] < w[10, 15] and w[0, 0] >= 1
    # A wider gap weighs less than a narrow one.
    wide = border_weight_map(two_cells(gap=9), w0=w0, sigma=sigma, class_balance=False)
    assert wide[10, 19] < w[10, 15]
    # w0 = 0 leaves only the class weights.
    assert np.array_equal(
        border_weight_map(label, w0=0, class_balance=True), class_balance_weights(label)
    )


def test_border_weight_without_cells_is_the_class_weight() -> None:
    label = np.zeros((8, 8), np.uint8)
    assert np.all(border_weight_map(label, class_balance=False) == 1)


def split_cells(height: int = 40, width: int = 40) -> torch.Tensor:
    """(1, 1, H, W) cell-interior target: two cells split by a 5-px vertical membrane."""
    y = torch.ones(1, 1, height, width)
    y[..., :, 18:23] = 0
    return y


def test_soft_skeleton_of_a_band_is_its_centre_line() -> None:
    band = 1 - split_cells()
    skeleton = soft_skeleton(band, iterations=5)
    # One pixel wide, on the band's middle column, the whole height.
    assert torch.equal(skeleton[0, 0].nonzero()[:, 1].unique(), torch.tensor([20]))
    assert skeleton.sum().item() == 40


def test_membrane_cldice_counts_gaps_and_spurious_lines() -> None:
    y = split_cells()
    exact = (2 * y - 1) * 20  # confident logits: interior positive
    assert membrane_cldice(exact, y).item() == pytest.approx(0, abs=1e-3)
    # A gap of 10 rows in the membrane (the two cells merge): 10 of the true centre line's 40
    # pixels are missed. With the loss's smoothing term of 1: sensitivity 31/41, and the
    # predicted centre line (30 px) lies all on true membrane, precision 31/31.
    gap = exact.clone()
    gap[..., 15:25, 18:23] = 20
    sensitivity = 31 / 41
    expected = 1 - 2 * sensitivity / (1 + sensitivity)
    assert membrane_cldice(gap, y).item() == pytest.approx(expected, abs=1e-3)
    # A spurious 1-px membrane across both cells (a split): its centre line is not on true
    # membrane; the loss rises, and less than for a line as long as the whole membrane.
    spurious = exact.clone()
    spurious[..., 20, :] = -20
    loss = membrane_cldice(spurious, y).item()
    assert 0.1 < loss < 1


def test_membrane_cldice_gradient_closes_a_gap() -> None:
    y = split_cells()
    logits = ((2 * y - 1) * 2).clone()
    logits[..., 15:25, 18:23] = 2.0  # a gap, not saturated
    logits.requires_grad_()
    membrane_cldice(logits, y).backward()
    # Descent lowers the interior logit inside the gap (toward membrane) ...
    assert logits.grad[0, 0, 20, 20] > 0
    # ... and leaves the pixels far inside the cells alone.
    assert logits.grad[0, 0, 20, 5].abs() < 1e-6
