"""TorchServe handler for the peer benchmark: the same weights, eager PyTorch, and
TorchServe's own request batching. Requests in a batch whose images share a size are stacked
into one forward pass over their mirror-padded images (no tiling: what a TorchServe user
would write); other sizes run one by one."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

from unet_service.core.geometry import Geometry
from unet_service.core.weights import load_weights


class UNetHandler(BaseHandler):
    def initialize(self, context) -> None:
        model_dir = Path(context.system_properties.get("model_dir"))
        (weights,) = model_dir.glob("*.safetensors")  # the archive carries one model
        self.model, self.card = load_weights(weights)
        self.geometry = Geometry(self.card.depth)
        self.mean = torch.tensor(self.card.normalization.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(self.card.normalization.std).view(1, -1, 1, 1)
        self.initialized = True

    def handle(self, data, context) -> list[bytes]:
        images = []
        for row in data:
            raw = row.get("file") or row.get("data") or row.get("body")
            images.append(np.asarray(Image.open(io.BytesIO(raw)).convert("L"), np.float32))
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[image.shape].append(i)
        out: list[bytes] = [b""] * len(images)
        m = self.geometry.margin
        for (h, w), members in groups.items():
            out_h = self.geometry.smallest_output_covering(h)
            out_w = self.geometry.smallest_output_covering(w)
            batch = np.stack(
                [
                    np.pad(images[i], ((m, m + out_h - h), (m, m + out_w - w)), mode="reflect")
                    for i in members
                ]
            )
            x = (torch.from_numpy(batch)[:, None] / 255 - self.mean) / self.std
            with torch.inference_mode():
                probs = torch.sigmoid(self.model(x))[:, 0, :h, :w].numpy()
            for i, prob in zip(members, probs, strict=True):
                buf = io.BytesIO()
                mask = ((prob > self.card.threshold) * 255).astype(np.uint8)
                Image.fromarray(mask).save(buf, format="PNG")
                out[i] = buf.getvalue()
        return out
