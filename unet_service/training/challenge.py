"""The ISBI 2012 challenge's own scores, computed from probability maps (cell interior the
positive class) rather than from one thresholded mask.

- pixel error = 1 - the best F-score of pixel similarity over the thresholds 0.0, 0.1, ...,
  1.0, the pixels of all slices pooled. The U-Net paper's 0.0611 is on this scale (the plain
  fraction of mismatched pixels of the same maps is far higher: membranes are about 5 px wide
  in the labels, and a 1-px change of their width alone is 5-6 % mismatch).
- Rand error = 1 - the best foreground-restricted Rand F-score over the same thresholds (the
  mean of the slices' scores at each threshold): predicted segments are the 4-connected
  components of the thresholded map, ground-truth segments the connected cell interiors of
  the label, and ground-truth membrane pixels are ignored. scikit-image's
  `adapted_rand_error` computes the score. The paper's 0.0382 is on this scale.
- V_Rand and V_Info (the challenge's current leaderboard): the foreground-restricted Rand
  and information-theoretic F-scores (Arganda-Carreras et al. 2015), higher is better, of
  segments whose predicted membranes were first thinned to one pixel (each membrane pixel
  joins its nearest segment, `skimage.segmentation.expand_labels`, then one pixel is cut
  between touching segments), so that membrane width is not what is scored. V_Rand comes
  from scikit-image's `adapted_rand_error`, V_Info from its `variation_of_information`
  (conditional entropies) with the segments' entropies.

Instances (a seeded watershed, `pipeline.instances`) are one segmentation, without a threshold
sweep; their Rand error is 1 - V_Rand, so that the width of the membranes left between them
is not scored (their unthinned score would count the membrane pixels inside ground-truth
cells as one segment that merges them all).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.measure import label
from skimage.metrics import adapted_rand_error, variation_of_information
from skimage.segmentation import expand_labels

THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(11))


def truth_segments(truth: np.ndarray) -> np.ndarray:
    """Connected cell interiors of a binary label (1 = cell); 0 = membrane (ignored)."""
    return label(truth.astype(bool), connectivity=1)


def rand_fscore(pred_segments: np.ndarray, truth: np.ndarray) -> float:
    """Foreground-restricted Rand F-score (1 - scikit-image's adapted Rand error)."""
    error, _, _ = adapted_rand_error(truth, pred_segments, ignore_labels=(0,))
    return 1.0 - float(error)


def info_fscore(pred_segments: np.ndarray, truth: np.ndarray) -> float:
    """Foreground-restricted information-theoretic F-score: the F-score of I(S;T)/H(S) and
    I(S;T)/H(T) over the pixels inside ground-truth cells."""
    inside = truth != 0
    s, t = pred_segments[inside], truth[inside]
    if t.size == 0:
        return 1.0
    # scikit-image returns H(image1 | image0), H(image0 | image1).
    _, h_s_given_t = variation_of_information(s, t)
    h_s, h_t = entropy(s), entropy(t)
    mutual = max(h_s - h_s_given_t, 0.0)
    split = mutual / h_s if h_s > 0 else 1.0
    merge = mutual / h_t if h_t > 0 else 1.0
    return 0.0 if split + merge == 0 else 2 * split * merge / (split + merge)


def entropy(labels: np.ndarray) -> float:
    counts = np.unique(labels, return_counts=True)[1].astype(np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def thin_membranes(segments: np.ndarray) -> np.ndarray:
    """Label image (0 = membrane) with its membranes thinned to one pixel: every membrane
    pixel joins its nearest segment, then a one-pixel border separates touching segments."""
    full = expand_labels(segments, distance=max(segments.shape))
    border = np.zeros(full.shape, bool)
    border[:, :-1] |= full[:, :-1] != full[:, 1:]
    border[:-1] |= full[:-1] != full[1:]
    thinned = full.copy()
    thinned[border] = 0
    return thinned


def challenge_scores(probabilities: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> dict:
    """The challenge's scores of (H, W) cell-interior probability maps against binary labels,
    with the thresholds at which the best F-scores were reached."""
    truth_labels = [truth_segments(t) for t in truths]
    best_pixel = (0.0, 0.0)
    best_rand = (0.0, 0.0)
    for threshold in THRESHOLDS:
        tp = fp = fn = 0
        rand = []
        for prob, truth, segments in zip(probabilities, truths, truth_labels, strict=True):
            pred = prob > threshold
            t = truth.astype(bool)
            tp += int(np.count_nonzero(pred & t))
            fp += int(np.count_nonzero(pred & ~t))
            fn += int(np.count_nonzero(~pred & t))
            rand.append(rand_fscore(label(pred, connectivity=1), segments))
        f_pixel = 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
        best_pixel = max(best_pixel, (f_pixel, threshold))
        best_rand = max(best_rand, (float(np.mean(rand)), threshold))
    return {
        "pixel_error": 1 - best_pixel[0],
        "pixel_error_threshold": best_pixel[1],
        "rand_error": 1 - best_rand[0],
        "rand_error_threshold": best_rand[1],
    }


def segmentation_scores(
    segments: Sequence[np.ndarray], truths: Sequence[np.ndarray]
) -> dict[str, float]:
    """V_Rand and V_Info of label images (0 = membrane) after thinning their membranes to
    one pixel, and the Rand error 1 - V_Rand; means over slices."""
    v_rand, v_info = [], []
    for seg, truth in zip(segments, truths, strict=True):
        t = truth_segments(truth)
        thinned = thin_membranes(seg)
        v_rand.append(rand_fscore(thinned, t))
        v_info.append(info_fscore(thinned, t))
    return {
        "rand_error": 1 - float(np.mean(v_rand)),
        "v_rand": float(np.mean(v_rand)),
        "v_info": float(np.mean(v_info)),
    }
