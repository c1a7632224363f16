"""The server users write from tutorials, as the baseline peer: per request it decodes the
image, mirror-pads it to a legal size, runs the whole image through the eager model in one
pass, thresholds and encodes. No batching, no tiling, no queue.

Run: python -m bench.naive_server WEIGHTS PORT
"""

from __future__ import annotations

import io
import sys

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, UploadFile
from fastapi.responses import Response
from PIL import Image

from unet_service.core.geometry import Geometry
from unet_service.core.weights import load_weights


def build(weights: str) -> FastAPI:
    model, card = load_weights(weights)
    geometry = Geometry(card.depth)
    mean = torch.tensor(card.normalization.mean).view(1, -1, 1, 1)
    std = torch.tensor(card.normalization.std).view(1, -1, 1, 1)
    app = FastAPI()

    @app.get("/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v1/segment")
    def segment(file: UploadFile) -> Response:
        image = np.asarray(Image.open(io.BytesIO(file.file.read())).convert("L"), np.float32)
        h, w = image.shape
        m = geometry.margin
        out_h = geometry.smallest_output_covering(h)
        out_w = geometry.smallest_output_covering(w)
        padded = np.pad(image, ((m, m + out_h - h), (m, m + out_w - w)), mode="reflect")
        x = (torch.from_numpy(padded)[None, None] / 255 - mean) / std
        with torch.no_grad():
            prob = torch.sigmoid(model(x))[0, 0, :h, :w].numpy()
        buf = io.BytesIO()
        Image.fromarray(((prob > card.threshold) * 255).astype(np.uint8)).save(buf, "PNG")
        return Response(buf.getvalue(), media_type="image/png")

    return app


if __name__ == "__main__":
    uvicorn.run(build(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
