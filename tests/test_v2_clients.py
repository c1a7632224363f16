"""Real KServe v2 / Triton clients against a real server: a client that does not know the
model's name finds it in the repository index, then infers with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from app_helpers import em_crop, make_app, running, save_tiny
from browser import live_server

from unet_service.core.engine import Segmenter


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return save_tiny(tmp_path, name="membranes")


def test_tritonclient_discovers_the_model_and_infers(weights: Path) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    pixels = em_crop(3, 10, 20, 64, 48)
    with live_server(make_app(weights)) as base:
        client = httpclient.InferenceServerClient(base.removeprefix("http://"))
        index = client.get_model_repository_index()
        assert index == [{"name": "membranes", "version": "1", "state": "READY"}]
        name = index[0]["name"]
        assert client.is_model_ready(name)
        image = httpclient.InferInput("image", list(pixels.shape), "UINT8")
        image.set_data_from_numpy(pixels)
        result = client.infer(name, [image])
        mask = result.as_numpy("mask")
        probs = result.as_numpy("probabilities")
        # A stack of pages: [D, H, W] with the request parameter "layout": "DHW".
        stack = np.stack([pixels, em_crop(4, 0, 0, 64, 48)])
        pages = httpclient.InferInput("image", list(stack.shape), "UINT8")
        pages.set_data_from_numpy(stack)
        stacked = client.infer(name, [pages], parameters={"layout": "DHW"})
        stack_probs = stacked.as_numpy("probabilities")
    seg = Segmenter.from_weights(weights, device="cpu", backend="torch")
    alone = seg.segment(pixels[:, :, None], 60, probabilities=True)
    np.testing.assert_allclose(probs, alone.probabilities[0], atol=1e-5)
    decided = np.abs(alone.probabilities[0] - seg.card.threshold) > 1e-5
    np.testing.assert_array_equal(mask[decided], alone.mask[decided])
    assert stack_probs.shape == (2, 64, 48) and stacked.as_numpy("mask").shape == (2, 64, 48)
    for page, page_probs in zip(stack, stack_probs, strict=True):
        expected = seg.segment(page[:, :, None], 60, probabilities=True).probabilities[0]
        np.testing.assert_allclose(page_probs, expected, atol=1e-5)


@pytest.mark.anyio
async def test_repository_index_body_forms_and_auth(weights: Path) -> None:
    async with running(make_app(weights, api_key="s3cret")) as client:
        auth = {"Authorization": "Bearer s3cret"}
        assert (await client.post("/v2/repository/index")).status_code == 401
        for body in (b"", b"{}", b'{"ready": true}', b'{"ready": false}'):
            r = await client.post("/v2/repository/index", content=body, headers=auth)
            assert r.status_code == 200, body
            assert r.json() == [{"name": "membranes", "version": "1", "state": "READY"}]
        bad = await client.post("/v2/repository/index", content=b'{"ready": "yes"}', headers=auth)
        assert bad.status_code == 422 and "ready" in bad.json()["error"]
