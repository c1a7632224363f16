"""Segmentation metrics of the ISBI 2012 challenge, on binary masks (1 = cell interior).

- mismatch: the fraction of pixels whose class differs from the ground truth (not the
  challenge's pixel error, which is 1 - the best F-score over thresholds: training.challenge).
- Dice / IoU of the foreground (cell interior).
- Rand error = 1 - adapted Rand F-score (Arganda-Carreras et al. 2015; the ISBI 2012 and CREMI
  evaluation). Both masks are turned into segmentations by labelling the connected components
  of their cell interiors with 4-connectivity (a diagonal gap in a one-pixel membrane does not
  join two cells). Let n be the number of pixels inside ground-truth cells (ground-truth
  membrane pixels are ignored) and p_ij the fraction of them in ground-truth cell i and
  predicted cell j; predicted-membrane pixels inside a ground-truth cell count as singleton
  segments of their own. With a_i = sum_j p_ij (over all predicted labels, membrane included)
  and b_j = sum_i p_ij (predicted cells):
      precision (merge) = sum_ij p_ij^2 / (sum_j b_j^2 + m / n^2)
      recall (split)    = sum_ij p_ij^2 / sum_i a_i^2,  with the singletons' m / n^2 in the
                          numerator too (m = predicted-membrane pixels inside ground-truth cells)
      Rand error        = 1 - 2 P R / (P + R)
  Unlike the challenge's leaderboard, which took the best F-score over thresholds of the
  submitted probability maps, this is measured at one threshold (the model card's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

# Same connectivity as the border weights of the loss.
from unet_service.training.losses import CELL_STRUCTURE


@dataclass(frozen=True)
class RandScore:
    error: float
    precision: float  # low when predicted cells merge ground-truth cells
    recall: float  # low when predicted cells split ground-truth cells


@dataclass(frozen=True)
class Counts:
    """Pixel counts of a binary prediction against its truth; they add up over images."""

    tp: int
    fp: int
    fn: int
    tn: int

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            *(a + b for a, b in zip(asdict(self).values(), asdict(other).values(), strict=True))
        )

    @property
    def mismatch(self) -> float:
        return (self.fp + self.fn) / max(self.tp + self.fp + self.fn + self.tn, 1)

    @property
    def dice(self) -> float:
        den = 2 * self.tp + self.fp + self.fn
        return 1.0 if den == 0 else 2 * self.tp / den

    @property
    def iou(self) -> float:
        den = self.tp + self.fp + self.fn
        return 1.0 if den == 0 else self.tp / den


def confusion(pred: np.ndarray, truth: np.ndarray) -> Counts:
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    p, t = pred.astype(bool), truth.astype(bool)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    return Counts(tp, fp, fn, p.size - tp - fp - fn)


def cells(mask: np.ndarray) -> np.ndarray:
    """Connected components (4-connectivity) of a binary cell-interior mask; 0 = membrane."""
    return ndimage.label(mask.astype(bool), CELL_STRUCTURE)[0]


def adapted_rand(pred_labels: np.ndarray, true_labels: np.ndarray) -> RandScore:
    """Adapted Rand error of two label images (0 = background), as documented above."""
    if pred_labels.shape != true_labels.shape:
        raise ValueError("segmentations differ in shape")
    inside = true_labels.ravel() != 0
    t = true_labels.ravel()[inside]
    p = pred_labels.ravel()[inside]
    n = t.size
    if n == 0:
        # No ground-truth cells: nothing can be split or merged.
        return RandScore(0.0, 1.0, 1.0)
    cell = p != 0
    m = n - int(np.count_nonzero(cell))  # predicted membrane inside truth: singletons
    pair_counts = np.unique(np.stack([t[cell], p[cell]]), axis=1, return_counts=True)[1]
    a = np.unique(t, return_counts=True)[1]  # truth cells, all their pixels
    b = np.unique(p[cell], return_counts=True)[1]  # predicted cells
    # Counts squared / n^2 = fractions squared; kept as integers until the end for exactness.
    sum_ab = (float(np.sum(pair_counts.astype(np.float64) ** 2)) + m) / n**2
    sum_a = float(np.sum(a.astype(np.float64) ** 2)) / n**2
    sum_b = (float(np.sum(b.astype(np.float64) ** 2)) + m) / n**2
    precision = sum_ab / sum_b
    recall = sum_ab / sum_a
    f = 2 * precision * recall / (precision + recall)
    return RandScore(1.0 - f, precision, recall)


def rand_error(pred_mask: np.ndarray, truth_mask: np.ndarray) -> RandScore:
    """Adapted Rand error of the connected cell interiors of two binary masks."""
    return adapted_rand(cells(pred_mask), cells(truth_mask))
