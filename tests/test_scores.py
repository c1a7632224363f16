"""Metrics on hand-made masks with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from unet_service.training.scores import adapted_rand, cells, confusion, rand_error


def test_mismatch_dice_iou() -> None:
    truth = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])
    pred = np.array([[1, 0, 0, 0], [1, 1, 1, 0]])
    c = confusion(pred, truth)
    assert (c.tp, c.fp, c.fn, c.tn) == (3, 1, 1, 3)
    assert c.mismatch == pytest.approx(2 / 8)
    assert c.dice == pytest.approx(6 / 8)
    assert c.iou == pytest.approx(3 / 5)
    both = c + confusion(truth, truth)
    assert both.mismatch == pytest.approx(2 / 16)
    assert confusion(np.zeros((2, 2)), np.zeros((2, 2))).dice == 1.0
    with pytest.raises(ValueError, match="shape"):
        confusion(pred, truth[:, :2])


def test_rand_error_zero_for_identical_segmentations() -> None:
    truth = np.array([[1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert rand_error(truth, truth).error == 0
    # Relabelling does not matter, only the partition.
    labels = cells(truth)
    assert adapted_rand(labels * 7 + (labels > 0), labels).error == pytest.approx(0)


def test_rand_error_of_a_split_and_a_merge() -> None:
    # One true cell of 4 pixels split into two halves: precision 1, recall 1/2, F = 2/3.
    split = adapted_rand(np.array([[1, 1, 2, 2]]), np.array([[1, 1, 1, 1]]))
    assert (split.precision, split.recall) == (pytest.approx(1), pytest.approx(0.5))
    assert split.error == pytest.approx(1 / 3)
    # Two true cells merged: precision 1/2, recall 1.
    merge = adapted_rand(np.array([[5, 5, 5, 5]]), np.array([[1, 1, 2, 2]]))
    assert (merge.precision, merge.recall) == (pytest.approx(0.5), pytest.approx(1))
    assert merge.error == pytest.approx(1 / 3)


def test_membrane_predicted_inside_a_cell_counts_as_singletons() -> None:
    # Truth: one 4-pixel cell; prediction: membrane everywhere. Each pixel is its own
    # segment: sum p_ij^2 = 4/16, sum a_i^2 = 1, so recall 1/4, precision 1, error 1 - 0.4.
    r = adapted_rand(np.zeros((1, 4), int), np.ones((1, 4), int))
    assert r.error == pytest.approx(0.6)


def test_rand_error_ignores_true_membrane_and_uses_4_connectivity() -> None:
    truth = np.array([[1, 0, 1], [0, 0, 0], [1, 0, 1]])
    # Predicted cells on true membrane pixels are ignored: still a perfect score.
    assert rand_error(np.ones((3, 3)), np.ones((3, 3))).error == 0
    assert rand_error(truth | np.array([[0, 1, 0], [0, 0, 0], [0, 0, 0]]), truth).error > 0
    # Diagonal neighbours are separate cells (4-connectivity).
    diagonal = np.array([[1, 0], [0, 1]])
    assert cells(diagonal).max() == 2
