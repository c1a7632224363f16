"""KServe v2 JSON tensors have their own limits (parsing JSON holds the interpreter), with
errors that point at the binary extension; within them, big JSON tensors, flat or nested,
give the same result as the same image sent binary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from app_helpers import binary_infer, em_crop, make_app, running, save_tiny

pytestmark = pytest.mark.anyio


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return save_tiny(tmp_path)


def json_tensor(pixels: np.ndarray, nested: bool = False) -> dict:
    data = pixels.tolist() if nested else pixels.ravel().tolist()
    return {"name": "image", "shape": list(pixels.shape), "datatype": "UINT8", "data": data}


async def test_json_body_over_its_limit_is_413_pointing_at_the_binary_extension(
    weights: Path,
) -> None:
    pixels = em_crop(0, 0, 0, 300, 300)  # about 0.4 MB of JSON
    async with running(make_app(weights, max_json_mb=0.25)) as client:
        r = await client.post("/v2/models/tiny/infer", json={"inputs": [json_tensor(pixels)]})
        assert r.status_code == 413
        error = r.json()["error"]
        assert "UNET_MAX_JSON_MB" in error and "Inference-Header-Content-Length" in error
        # The same image as binary data is far over the JSON limit and still served.
        body, headers = binary_infer(pixels, "UINT8", ["mask"])
        r = await client.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert r.status_code == 200, r.text


async def test_json_reply_over_its_limit_is_413_before_inference(weights: Path) -> None:
    pixels = em_crop(1, 0, 0, 200, 200)  # probabilities as JSON: up to 640 KB
    async with running(make_app(weights, max_json_reply_mb=0.5)) as client:
        r = await client.post("/v2/models/tiny/infer", json={"inputs": [json_tensor(pixels)]})
        assert r.status_code == 413
        error = r.json()["error"]
        assert "UNET_MAX_JSON_REPLY_MB" in error and "binary_data_output" in error
        metrics = (await client.get("/metrics")).text
        # Refused before any tile was computed (the model's series is there, at 0).
        assert 'unet_tiles_total{model="tiny"} 0.0' in metrics
        asked = {"inputs": [json_tensor(pixels)], "parameters": {"binary_data_output": True}}
        r = await client.post("/v2/models/tiny/infer", json=asked)
        assert r.status_code == 200, r.text
        mask_only = {"inputs": [json_tensor(pixels)], "outputs": [{"name": "mask"}]}
        assert (await client.post("/v2/models/tiny/infer", json=mask_only)).status_code == 200


@pytest.mark.parametrize("layout", ["flat", "nested", "nested_hwc", "nested_chw"])
async def test_big_json_tensors_in_any_layout_equal_the_binary_result(
    weights: Path, layout: str
) -> None:
    """300 x 300 = 90,000 values: more than one conversion piece."""
    pixels = em_crop(2, 0, 0, 300, 300)
    if layout == "nested_hwc":
        tensor = json_tensor(pixels[:, :, None], nested=True)
    elif layout == "nested_chw":
        tensor = json_tensor(pixels[None, None], nested=True)
    else:
        tensor = json_tensor(pixels, nested=layout == "nested")
    async with running(make_app(weights)) as client:
        as_json = await client.post("/v2/models/tiny/infer", json={"inputs": [tensor]})
        body, headers = binary_infer(pixels, "UINT8", ["probabilities"])
        as_binary = await client.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert as_json.status_code == 200 and as_binary.status_code == 200, as_json.text
    outputs = {o["name"]: o for o in as_json.json()["outputs"]}
    length = int(as_binary.headers["inference-header-content-length"])
    probs = np.frombuffer(as_binary.content[length:], "<f4").reshape(300, 300)
    # JSON writes float32 values in their shortest form, which reads back exactly.
    json_probs = np.asarray(outputs["probabilities"]["data"], np.float32).reshape(300, 300)
    assert np.array_equal(json_probs, probs)
    assert outputs["mask"]["shape"] == [300, 300] and len(outputs["mask"]["data"]) == 90_000


@pytest.mark.parametrize(
    "data",
    [
        [[1, 2, 3], [4, 5]],  # ragged
        [[1, 2], [3, 4], [5, 6]],  # nested as [3, 2], shape says [2, 3]
        [[[1, 2, 3], [4, 5, 6]]],  # too deep
        [[1, 2, 3], 4, 5],  # mixed
    ],
)
async def test_json_data_that_does_not_match_its_shape_is_422(weights: Path, data) -> None:
    tensor = {"name": "image", "shape": [2, 3], "datatype": "UINT8", "data": data}
    async with running(make_app(weights)) as client:
        r = await client.post("/v2/models/tiny/infer", json={"inputs": [tensor]})
    assert r.status_code == 422 and "error" in r.json(), r.text
