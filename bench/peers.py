"""MONAI's sliding_window_inference on the same network and image, against our tiles.

MONAI's windows must come back at the window's own size, so the valid-convolution network
is wrapped to mirror-pad each window by the margin and crop nothing: every window then
sees made-up context near its own edges, which MONAI hides by gaussian blending. Our tiles
take their context from the real neighbouring pixels, so seams are exact."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from unet_service.core.engine import Segmenter


@dataclass
class PeerResult:
    ours_s: float
    monai_s: float
    ours_max_diff: float  # against the single pass over the whole padded image
    monai_max_diff: float
    monai_mask_disagreement: float  # fraction of pixels whose mask differs from the exact one


def monai_vs_ours(seg: Segmenter, image: np.ndarray, tile_size: int, batch: int) -> PeerResult:
    from monai.inferers import sliding_window_inference

    h, w = image.shape[:2]
    margin = seg.geometry.margin
    window = tile_size  # a legal output size, so the padded window comes back at its size

    def padded_model(x: torch.Tensor) -> torch.Tensor:
        return seg.model(F.pad(x, (margin, margin, margin, margin), mode="reflect"))

    x = torch.from_numpy(seg.normalize(seg.prepare(image).transpose(2, 0, 1)))[None]
    start = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(
            x, (window, window), batch, padded_model, overlap=0.25, mode="gaussian"
        )
    monai_probs = torch.sigmoid(logits)[0].numpy()
    monai_s = time.perf_counter() - start

    start = time.perf_counter()
    ours = seg.segment(image, tile_size=tile_size, batch_size=batch, probabilities=True)
    ours_s = time.perf_counter() - start

    plan = seg.plan(h, w, tile_size)
    canvas = seg.normalize(plan.padded_image(seg.prepare(image)).transpose(2, 0, 1))[None]
    exact = seg.forward(canvas)[0][:, :h, :w]
    exact_mask = seg.to_mask(exact)
    return PeerResult(
        ours_s,
        monai_s,
        float(np.abs(ours.probabilities - exact).max()),
        float(np.abs(monai_probs - exact).max()),
        float((seg.to_mask(monai_probs) != exact_mask).mean()),
    )
