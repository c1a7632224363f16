"""The U-Net paper's loss: pixel-wise binary cross-entropy weighted by
    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))
where w_c balances the class frequencies and d1, d2 are the distances to the nearest and the
second nearest cell, so the thin membranes separating touching cells weigh most."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

# 4-connectivity: diagonal gaps in a one-pixel membrane do not join two cells.
CELL_STRUCTURE = ndimage.generate_binary_structure(2, 1)


def class_balance_weights(label: np.ndarray) -> np.ndarray:
    """w_c(x) = N / (2 * N_class(x)): both classes contribute equally to the loss; 1 where a
    class is absent or the image is all one class."""
    label = label.astype(bool)
    n = label.size
    fg = int(label.sum())
    w = np.ones(label.shape, np.float32)
    if 0 < fg < n:
        w[label] = n / (2 * fg)
        w[~label] = n / (2 * (n - fg))
    return w


def nearest_two_cell_distances(label: np.ndarray, reach: float) -> tuple[np.ndarray, np.ndarray]:
    """(d1, d2): Euclidean distance of every pixel to the nearest and second-nearest cell
    (connected component of the foreground). Distances beyond `reach` are only needed as
    "far", so each cell's distance transform is computed in its box grown by `reach`, and
    pixels outside it count as infinitely far."""
    cells, count = ndimage.label(label.astype(bool), CELL_STRUCTURE)
    d1 = np.full(label.shape, np.inf, np.float32)
    d2 = np.full(label.shape, np.inf, np.float32)
    grow = int(np.ceil(reach)) + 1
    h, w = label.shape
    for k, box in enumerate(ndimage.find_objects(cells), start=1):
        if box is None:
            continue
        r0, r1 = max(box[0].start - grow, 0), min(box[0].stop + grow, h)
        c0, c1 = max(box[1].start - grow, 0), min(box[1].stop + grow, w)
        window = cells[r0:r1, c0:c1] != k
        d = ndimage.distance_transform_edt(window).astype(np.float32)
        a, b = d1[r0:r1, c0:c1], d2[r0:r1, c0:c1]
        # Insert d into the sorted pair (a <= b).
        b[:] = np.minimum(b, np.maximum(a, d))
        a[:] = np.minimum(a, d)
    del count
    return d1, d2


def border_weight_map(
    label: np.ndarray, w0: float = 10.0, sigma: float = 5.0, class_balance: bool = True
) -> np.ndarray:
    """The paper's weight map for a 0/1 label (1 = cell interior). The border term is applied
    to background (membrane) pixels, where the separation between cells is learned; inside a
    cell d1 is 0 and the term would only re-weight the cell's rim."""
    w = class_balance_weights(label) if class_balance else np.ones(label.shape, np.float32)
    if w0 <= 0:
        return w
    # exp(-(d1 + d2)^2 / (2 sigma^2)) < 1e-6 once d1 + d2 > 5.3 sigma.
    d1, d2 = nearest_two_cell_distances(label, reach=6 * sigma)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
    background = ~label.astype(bool)
    w[background] += np.nan_to_num(border[background], nan=0.0, posinf=0.0).astype(np.float32)
    return w


def weighted_bce(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over pixels of w(x) * BCE(sigmoid(logit), target)."""
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if weight is not None:
        loss = loss * weight
    return loss.mean()


def _soft_erode(x: torch.Tensor) -> torch.Tensor:
    # A minimum over the 4-neighbourhood cross (plus the pixel), as two 1-D min-pools.
    return torch.minimum(-F.max_pool2d(-x, (3, 1), 1, (1, 0)), -F.max_pool2d(-x, (1, 3), 1, (0, 1)))


def _soft_open(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(_soft_erode(x), 3, 1, 1)


def soft_skeleton(x: torch.Tensor, iterations: int) -> torch.Tensor:
    """A differentiable skeleton of a (N, 1, H, W) map in [0, 1] (Shit et al., clDice, CVPR
    2021): what each erosion removes that an opening would not restore, accumulated; thin
    ridges of up to about 2 * iterations pixels' width are kept as their centre lines."""
    skeleton = F.relu(x - _soft_open(x))
    for _ in range(iterations):
        x = _soft_erode(x)
        delta = F.relu(x - _soft_open(x))
        skeleton = skeleton + F.relu(delta - skeleton * delta)
    return skeleton


def membrane_cldice(
    logits: torch.Tensor, target: torch.Tensor, iterations: int = 5, smooth: float = 1.0
) -> torch.Tensor:
    """1 - clDice of the membranes (the complement of the cell-interior target): how much of
    the true membranes' centre lines the predicted membrane covers (a gap there merges two
    cells) and how much of the predicted membranes' centre lines lies on true membrane (a
    spurious line splits one). Both are topology, which the pixel-wise loss barely sees."""
    pred = 1 - torch.sigmoid(logits)
    true = 1 - target
    skel_pred = soft_skeleton(pred, iterations)
    skel_true = soft_skeleton(true, iterations)
    precision = ((skel_pred * true).sum() + smooth) / (skel_pred.sum() + smooth)
    sensitivity = ((skel_true * pred).sum() + smooth) / (skel_true.sum() + smooth)
    return 1 - 2 * precision * sensitivity / (precision + sensitivity)
