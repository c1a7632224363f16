"""The challenge's scores (training.challenge) against cases worked out by hand.

Rand scores count pairs of distinct pixels: a segment of n pixels holds n^2 - n ordered
pairs. Only pixels inside ground-truth cells are scored."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label
from skimage.segmentation import watershed

from conftest import ISBI, isbi_slice
from unet_service.core.engine import DEFAULT_WEIGHTS, Segmenter
from unet_service.training.challenge import (
    challenge_scores,
    info_fscore,
    rand_fscore,
    segmentation_scores,
    thin_membranes,
    truth_segments,
)

H = 6


def two_cells(membrane_col: int = 5, width: int = 11) -> np.ndarray:
    """Binary label: cells left and right of a one-pixel membrane column."""
    label = np.ones((H, width), np.uint8)
    label[:, membrane_col] = 0
    return label


def test_two_cells_merged_through_a_gap() -> None:
    """Prediction: one segment over both cells of 30 pixels. Pairs together in both:
    2 (900 - 30) = 1740; in the prediction: 3600 - 60 = 3540; in the truth: 1740. Precision
    1740 / 3540, recall 1."""
    truth = truth_segments(two_cells())
    merged = np.ones_like(truth)
    precision = 1740 / 3540
    assert rand_fscore(merged, truth) == pytest.approx(2 * precision / (precision + 1))
    # One segment carries no information about the two cells: V_Info's merge term is 0.
    assert info_fscore(merged, truth) == pytest.approx(0.0)
    assert rand_fscore(truth, truth) == pytest.approx(1.0)
    assert info_fscore(truth, truth) == pytest.approx(1.0)


def test_a_split_cell() -> None:
    """One 60-pixel cell predicted as two halves: precision 1, recall 1740 / 3540 (the
    merge case mirrored)."""
    truth = truth_segments(np.ones((H, 10), np.uint8))
    split = np.ones((H, 10), np.int64)
    split[:, 5:] = 2
    recall = 1740 / 3540
    assert rand_fscore(split, truth) == pytest.approx(2 * recall / (1 + recall))


def test_a_shifted_border() -> None:
    """The membrane predicted one column to the right: of the right cell's 30 pixels, 6 are
    predicted membrane (a segment of its own) and 24 the right segment. Pairs together:
    900 + 36 + 576 - 60 = 1452, the same in the prediction, 1740 in the truth: precision 1,
    recall 1452 / 1740."""
    truth = truth_segments(two_cells(5))
    shifted = truth_segments(two_cells(6))
    recall = 1452 / 1740
    assert rand_fscore(shifted, truth) == pytest.approx(2 * recall / (1 + recall))


def test_thinning_scores_the_cells_not_the_membrane_width() -> None:
    """A 3-pixel membrane around the true 1-pixel one: unthinned, its pixels inside the true
    cells are one extra segment; thinned to one pixel, the two cells are what is scored."""
    label = two_cells(5)
    thick = np.ones_like(label)
    thick[:, 4:7] = 0
    pred = truth_segments(thick)
    thinned = thin_membranes(pred)
    assert set(np.unique(thinned)) == {0, 1, 2}
    assert (thinned == 0).sum() == H  # one pixel per row
    truth = truth_segments(label)
    scores = segmentation_scores([pred], [label])
    assert scores["v_rand"] > 0.95 > rand_fscore(pred, truth)
    assert scores["rand_error"] == pytest.approx(1 - scores["v_rand"])


def test_challenge_scores_take_the_best_threshold() -> None:
    """A map that is right at thresholds 0.3..0.7: pixel error and Rand error 0 there."""
    label = two_cells()
    prob = np.where(label == 1, 0.8, 0.2).astype(np.float32)
    scores = challenge_scores([prob], [label])
    assert scores["pixel_error"] == pytest.approx(0.0)
    assert scores["rand_error"] == pytest.approx(0.0)
    assert 0.2 <= scores["pixel_error_threshold"] < 0.8
    # A map whose membrane is faint (0.6): thresholds above 0.6 split the cells, below merge.
    faint = np.where(label == 1, 0.9, 0.6).astype(np.float32)
    scores = challenge_scores([faint], [label])
    assert scores["rand_error"] == pytest.approx(0.0)
    assert scores["rand_error_threshold"] >= 0.6


def fiji_v_rand(segments: np.ndarray, truth: np.ndarray) -> float:
    """The leaderboard's V_Rand as the Fiji script computes it
    (trainableSegmentation.metrics.RandError, getMaximalVRandAfterThinning at one
    threshold): the proposal binarised, its 4-connected components flooded over the
    membrane by a watershed with one-pixel lines, ground-truth membrane pruned, predicted
    membrane pixels counted as singletons, N^2 normalisation."""
    binary = segments > 0
    binary[:, :-1] &= segments[:, :-1] == segments[:, 1:]  # touching segments stay apart
    binary[:-1] &= segments[:-1] == segments[1:]
    flooded = watershed(
        np.zeros(binary.shape, np.uint8),
        label(binary, connectivity=1),
        connectivity=1,
        watershed_line=True,
    )
    t = truth_segments(truth).ravel()
    p = flooded.ravel()[t > 0]
    t = t[t > 0]
    singletons = int(np.count_nonzero(p == 0))
    pairs = np.unique(np.stack([t[p > 0], p[p > 0]]), axis=1, return_counts=True)[1]
    a = np.bincount(t).astype(np.float64)
    b = np.bincount(p[p > 0]).astype(np.float64)
    both = pairs.astype(np.float64) @ pairs + singletons
    precision, recall = both / (b @ b + singletons), both / (a @ a)
    return 2 * precision * recall / (precision + recall)


def test_v_rand_is_the_fiji_scripts_on_real_instances() -> None:
    """segmentation_scores' thinning (nearest segment, then a one-pixel cut) and its
    Rand F-score give the Fiji script's V_Rand on the shipped model's cells of a real
    validation slice, within 0.001."""
    seg = Segmenter.from_weights(DEFAULT_WEIGHTS, device="cpu")
    image = isbi_slice(21)[:, :, None]
    probs = seg.segment(image, probabilities=True).probabilities
    assert probs is not None
    cells = seg.instances(probs)
    truth = np.asarray(Image.open(ISBI / "train" / "label" / "21.png")) > 127
    ours = segmentation_scores([cells], [truth])["v_rand"]
    assert ours == pytest.approx(fiji_v_rand(cells.astype(np.int64), truth), abs=1e-3)
    assert 0.9 < ours < 1
