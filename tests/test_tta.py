"""Test-time augmentation through the service and the CLI: the 8 views of every tile go
through the shared batches, and the answer equals the engine's own average."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from app_helpers import em_crop, make_app, metric, png_bytes, running, save_tiny

from unet_service.cli.predict import main as predict
from unet_service.core.engine import Segmenter

pytestmark = pytest.mark.anyio


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return save_tiny(tmp_path)


async def test_tta_on_v1_and_v2_equals_the_engines_average(weights: Path) -> None:
    pixels = em_crop(5, 20, 30, 90, 70)
    seg = Segmenter.from_weights(weights, device="cpu", backend="torch")
    async with running(make_app(weights)) as client:
        files = {"file": ("a.png", png_bytes(pixels))}
        plain = await client.post("/v1/segment", params={"output": "probabilities"}, files=files)
        averaged = await client.post(
            "/v1/segment", params={"output": "probabilities", "tta": 8}, files=files
        )
        assert averaged.status_code == 200, averaged.text
        assert int(averaged.headers["x-tiles"]) == 8 * int(plain.headers["x-tiles"])
        tile = int(averaged.headers["x-tile-size"])
        expected = seg.segment(pixels[:, :, None], tile, probabilities=True, tta=8)
        probs = np.load(io.BytesIO(averaged.content))
        np.testing.assert_allclose(probs, expected.probabilities[0], atol=1e-5)
        assert np.abs(probs - np.load(io.BytesIO(plain.content))).max() > 1e-4

        tensor = {"name": "image", "shape": [90, 70], "datatype": "UINT8"}
        request = {
            "inputs": [{**tensor, "data": pixels.ravel().tolist()}],
            "parameters": {"tta": 8},
            "outputs": [{"name": "probabilities"}],
        }
        v2 = await client.post("/v2/models/tiny/infer", json=request)
        assert v2.status_code == 200, v2.text
        data = np.asarray(v2.json()["outputs"][0]["data"], np.float32).reshape(90, 70)
        np.testing.assert_allclose(data, expected.probabilities[0], atol=1e-5)
        # Every view's tiles went through the shared batches.
        tiles = await metric(client, "unet_tiles_total")
        assert tiles == int(plain.headers["x-tiles"]) * (1 + 8 + 8)

        for bad in (2, True, "8", 8.0):
            request["parameters"] = {"tta": bad}
            r = await client.post("/v2/models/tiny/infer", json=request)
            assert r.status_code == 422 and "tta" in r.json()["error"]
        r = await client.post("/v1/segment", params={"tta": 3}, files=files)
        assert r.status_code == 422


async def test_server_default_tta(weights: Path) -> None:
    pixels = em_crop(6, 0, 0, 40, 40)
    async with running(make_app(weights, tta=8)) as client:
        files = {"file": ("a.png", png_bytes(pixels))}
        default = await client.post("/v1/segment", files=files)
        off = await client.post("/v1/segment", params={"tta": 1}, files=files)
    assert int(default.headers["x-tiles"]) == 8 * int(off.headers["x-tiles"])


def test_cli_tta(weights: Path, tmp_path: Path) -> None:
    pixels = em_crop(7, 0, 0, 60, 50)
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(pixels))
    out = tmp_path / "out"
    argv = [str(path), "-o", str(out), "--weights", str(weights), "--tile-size", "36"]
    assert predict([*argv, "--probabilities", "--tta", "--device", "cpu"]) == 0
    seg = Segmenter.from_weights(weights, device="cpu")
    expected = seg.segment(pixels[:, :, None], 36, probabilities=True, tta=8)
    np.testing.assert_allclose(np.load(out / "a.npy"), expected.probabilities[0], atol=1e-5)
