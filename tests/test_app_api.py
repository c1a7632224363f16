"""Happy paths of every endpoint, with a tiny real UNet and real images (8-bit PNG EM crops,
16-bit multi-page TIFF), checked against the engine's own single-request result."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from app_helpers import (
    em_crop,
    make_app,
    png_bytes,
    running,
    save_tiny,
    tiff_bytes,
    to_uint16,
)
from PIL import Image

from unet_service.core.engine import Segmenter

pytestmark = pytest.mark.anyio


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return save_tiny(tmp_path)


def reference(weights: Path, image: np.ndarray, tile_size: int):
    """The engine's result for this image alone, on the same weights."""
    seg = Segmenter.from_weights(weights, device="cpu", backend="torch")
    return seg.segment(image, tile_size=tile_size, batch_size=1, probabilities=True), seg


def assert_mask_matches(mask: np.ndarray, ref, seg: Segmenter) -> None:
    """Equal masks, except where the probability is within float noise of the threshold
    (batched and unbatched convolutions may differ in the last bits)."""
    assert mask.shape == ref.mask.shape
    decided = np.abs(ref.probabilities[0] - seg.card.threshold) > 1e-5
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(mask[decided], ref.mask[decided])


async def test_segment_png_mask_equals_engine_result(weights: Path) -> None:
    pixels = em_crop(0, 40, 60, 150, 130)
    async with running(make_app(weights)) as client:
        r = await client.post(
            "/v1/segment", files={"file": ("em.png", png_bytes(pixels), "image/png")}
        )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-image-width"] == "130"
    assert r.headers["x-image-height"] == "150"
    assert r.headers["x-tile-size"] == "60"
    assert r.headers["x-tiles"] == "9"  # 3 x 3 tiles of 60 with stride 60
    for name in ("x-queue-ms", "x-inference-ms", "x-total-ms", "x-request-id"):
        assert name in r.headers
    mask = np.asarray(Image.open(io.BytesIO(r.content)))
    assert set(np.unique(mask)) <= {0, 255}
    ref, seg = reference(weights, pixels[:, :, None], 60)
    assert 0.05 < (ref.mask == 1).mean() < 0.95  # a mask with both classes
    assert_mask_matches(mask // 255, ref, seg)


async def test_segment_16bit_multipage_tiff_probabilities(weights: Path) -> None:
    first = to_uint16(em_crop(1, 100, 100, 70, 90))
    second = to_uint16(em_crop(2, 0, 0, 70, 90))
    async with running(make_app(weights)) as client:
        r = await client.post(
            "/v1/segment",
            params={"output": "probabilities"},
            files={"file": ("stack.tif", tiff_bytes(first, second), "image/tiff")},
        )
    assert r.status_code == 200, r.text
    assert r.headers["x-pages"] == "2"
    probs = np.load(io.BytesIO(r.content), allow_pickle=False)
    # Every page, each as if sent alone (tests/test_stacks.py covers stacks in depth).
    assert probs.dtype == np.float32 and probs.shape == (2, 70, 90)
    for page, pixels in zip(probs, (first, second), strict=True):
        ref, _ = reference(weights, pixels[:, :, None], int(r.headers["x-tile-size"]))
        np.testing.assert_allclose(page, ref.probabilities[0], atol=1e-5)


async def test_segment_overlay_tints_the_mask_over_the_image(weights: Path) -> None:
    pixels = em_crop(3, 0, 0, 64, 80)
    async with running(make_app(weights)) as client:
        r = await client.post(
            "/v1/segment",
            params={"output": "overlay"},
            files={"file": ("em.png", png_bytes(pixels), "image/png")},
        )
    assert r.status_code == 200, r.text
    overlay = np.asarray(Image.open(io.BytesIO(r.content)))
    assert overlay.shape == (64, 80, 3)
    ref, _ = reference(weights, pixels[:, :, None], int(r.headers["x-tile-size"]))
    grey = ref.mask == 0
    # Untinted pixels keep the image; tinted ones are no longer grey.
    np.testing.assert_array_equal(overlay[grey][:, 0], pixels[grey])
    tinted = overlay[~grey].astype(int)
    assert (tinted[:, 0] != tinted[:, 2]).mean() > 0.9


async def test_raw_body_upload_and_rgb_png_equal_multipart_grey(weights: Path) -> None:
    pixels = em_crop(4, 10, 10, 50, 50)
    rgb = np.repeat(pixels[:, :, None], 3, axis=2)
    async with running(make_app(weights)) as client:
        multipart = await client.post(
            "/v1/segment", files={"file": ("em.png", png_bytes(pixels), "image/png")}
        )
        raw = await client.post(
            "/v1/segment", content=png_bytes(pixels), headers={"content-type": "image/png"}
        )
        colour = await client.post(
            "/v1/segment", files={"file": ("em.png", png_bytes(rgb), "image/png")}
        )
    assert multipart.status_code == raw.status_code == colour.status_code == 200
    assert raw.content == multipart.content
    assert colour.content == multipart.content  # grey RGB -> identical luma


async def test_several_classes_give_class_index_masks(tmp_path: Path) -> None:
    weights = save_tiny(tmp_path, out_channels=3, name="three")
    pixels = em_crop(5, 200, 200, 90, 70)
    async with running(make_app(weights)) as client:
        mask_r = await client.post(
            "/v1/segment", files={"file": ("em.png", png_bytes(pixels), "image/png")}
        )
        probs_r = await client.post(
            "/v1/segment",
            params={"output": "probabilities"},
            files={"file": ("em.png", png_bytes(pixels), "image/png")},
        )
    assert mask_r.status_code == probs_r.status_code == 200
    mask = np.asarray(Image.open(io.BytesIO(mask_r.content)))
    probs = np.load(io.BytesIO(probs_r.content))
    assert probs.shape == (3, 90, 70)
    np.testing.assert_allclose(probs.sum(axis=0), 1, atol=1e-5)
    ref, _ = reference(weights, pixels[:, :, None], int(mask_r.headers["x-tile-size"]))
    np.testing.assert_allclose(probs, ref.probabilities, atol=1e-5)
    top2 = np.sort(ref.probabilities, axis=0)[-2:]
    decided = top2[1] - top2[0] > 1e-4
    np.testing.assert_array_equal(mask[decided], ref.mask[decided])
    assert len(np.unique(mask)) > 1


async def test_kserve_v2_endpoints(weights: Path) -> None:
    pixels = em_crop(6, 50, 50, 40, 36)
    async with running(make_app(weights)) as client:
        server = (await client.get("/v2")).json()
        assert server["name"] == "unet-service" and "version" in server
        assert (await client.get("/v2/health/live")).status_code == 200
        ready = await client.get("/v2/health/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        for path in ("/v2/health/live", "/v2/health/ready"):  # probes that send HEAD
            assert (await client.head(path)).status_code == 200
        meta = (await client.get("/v2/models/tiny")).json()
        assert meta["name"] == "tiny" and meta["platform"] == "pytorch"
        assert [o["name"] for o in meta["outputs"]] == ["mask", "probabilities", "instances"]
        assert meta["inputs"][0]["name"] == "image"
        assert (await client.get("/v2/models/tiny/ready")).json()["ready"] is True
        assert (await client.get("/v2/models/tiny/versions/1")).status_code == 200

        nested = {
            "id": "req-7",
            "inputs": [
                {"name": "image", "shape": [40, 36], "datatype": "UINT8", "data": pixels.tolist()}
            ],
        }
        r = await client.post("/v2/models/tiny/infer", json=nested)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_name"] == "tiny" and body["id"] == "req-7"
        outputs = {o["name"]: o for o in body["outputs"]}
        assert outputs["mask"]["datatype"] == "UINT8" and outputs["mask"]["shape"] == [40, 36]
        assert outputs["probabilities"]["datatype"] == "FP32"
        assert outputs["probabilities"]["shape"] == [40, 36]
        mask = np.asarray(outputs["mask"]["data"], np.uint8).reshape(40, 36)
        probs = np.asarray(outputs["probabilities"]["data"], np.float32).reshape(40, 36)
        ref, seg = reference(weights, pixels[:, :, None], int(r.headers["x-tile-size"]))
        np.testing.assert_allclose(probs, ref.probabilities[0], atol=1e-5)
        assert_mask_matches(mask, ref, seg)

        # 16-bit [1, C, H, W], flat data, only the mask asked for, versioned route.
        wide = to_uint16(pixels)
        r16 = await client.post(
            "/v2/models/tiny/versions/1/infer",
            json={
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1, 1, 40, 36],
                        "datatype": "UINT16",
                        "data": wide.ravel().tolist(),
                    }
                ],
                "outputs": [{"name": "mask"}],
            },
        )
        assert r16.status_code == 200, r16.text
        assert [o["name"] for o in r16.json()["outputs"]] == ["mask"]
        ref16, _ = reference(weights, wide[:, :, None], int(r16.headers["x-tile-size"]))
        mask16 = np.asarray(r16.json()["outputs"][0]["data"], np.uint8).reshape(40, 36)
        assert_mask_matches(mask16, ref16, seg)

        # FP32 [H, W, C] in [0, 1] is the same image as UINT8 / 255.
        rf = await client.post(
            "/v2/models/tiny/infer",
            json={
                "inputs": [
                    {
                        "name": "image",
                        "shape": [40, 36, 1],
                        "datatype": "FP32",
                        "data": (pixels / 255).ravel().tolist(),
                    }
                ],
                "outputs": [{"name": "probabilities"}],
            },
        )
        assert rf.status_code == 200, rf.text
        probs_f = np.asarray(rf.json()["outputs"][0]["data"], np.float32).reshape(40, 36)
        np.testing.assert_allclose(probs_f, ref.probabilities[0], atol=1e-5)

        missing = await client.get("/v2/models/other")
        assert missing.status_code == 404 and "tiny" in missing.json()["error"]
        r404 = await client.post("/v2/models/other/infer", json=nested)
        assert r404.status_code == 404 and "error" in r404.json()


async def test_metrics_report_requests_batches_and_queue(weights: Path) -> None:
    pixels = em_crop(7, 0, 0, 100, 100)
    async with running(make_app(weights)) as client:
        r = await client.post(
            "/v1/segment", files={"file": ("em.png", png_bytes(pixels), "image/png")}
        )
        assert r.status_code == 200
        await client.post("/v1/segment", files={"file": ("x.png", b"not an image", "image/png")})
        text = (await client.get("/metrics")).text
    assert 'unet_requests_total{endpoint="/v1/segment",method="POST",status="200"} 1.0' in text
    assert 'unet_requests_total{endpoint="/v1/segment",method="POST",status="415"} 1.0' in text
    assert "unet_queue_tiles 0.0" in text
    assert 'unet_tiles_total{model="tiny"} 4.0' in text  # 100x100 at tile 60: 2 x 2
    for name in (
        "unet_batch_tiles_bucket",
        "unet_forward_seconds_bucket",
        "unet_queue_wait_seconds_bucket",
        'unet_request_latency_seconds_bucket{endpoint="/v1/segment"',
        "unet_ready 1.0",
    ):
        assert name in text


async def test_docs_render_and_their_examples_work(weights: Path) -> None:
    async with running(make_app(weights)) as client:
        docs = await client.get("/docs")
        assert docs.status_code == 200 and "swagger-ui" in docs.text
        spec = (await client.get("/openapi.json")).json()
        segment = spec["paths"]["/v1/segment"]["post"]
        form = segment["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert form["properties"]["file"]["format"] == "binary"
        (param,) = [p for p in segment["parameters"] if p["name"] == "output"]
        assert "overlay" in str(param["schema"]) or "overlay" in str(spec["components"])
        infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
        example = infer["requestBody"]["content"]["application/json"]["example"]
        r = await client.post("/v2/models/tiny/infer", json=example)
        assert r.status_code == 200, r.text
        assert r.json()["id"] == example["id"]


async def test_api_key_guards_inference_but_not_health(weights: Path) -> None:
    pixels = em_crop(8, 0, 0, 30, 30)
    files = {"file": ("em.png", png_bytes(pixels), "image/png")}
    async with running(make_app(weights, api_key="s3cret")) as client:
        none = await client.post("/v1/segment", files=files)
        wrong = await client.post(
            "/v1/segment", files=files, headers={"Authorization": "Bearer nope"}
        )
        right = await client.post(
            "/v1/segment", files=files, headers={"Authorization": "Bearer s3cret"}
        )
        infer_none = await client.post("/v2/models/tiny/infer", json={"inputs": []})
        meta_none = await client.get("/v2/models/tiny")
        open_paths = [
            (await client.get(p)).status_code
            for p in (
                "/v2/health/live",
                "/v2/health/ready",
                "/metrics",
                "/docs",
                "/openapi.json",
                "/",  # the web page; it sends the key it is given
                "/web/app.js",
            )
        ]
    for r in (none, wrong, infer_none, meta_none):
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "error" in r.json()
    assert right.status_code == 200
    assert open_paths == [200] * 7


async def test_kserve_binary_tensor_extension(weights: Path) -> None:
    """The wire format of tritonclient's default binary_data=True: JSON header, then raw
    little-endian tensors, split by Inference-Header-Content-Length."""
    pixels = to_uint16(em_crop(9, 0, 0, 48, 40))
    raw = pixels.astype("<u2").tobytes()
    header = json.dumps(
        {
            "id": "bin",
            "inputs": [
                {
                    "name": "image",
                    "shape": [48, 40],
                    "datatype": "UINT16",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [
                {"name": "mask", "parameters": {"binary_data": True}},
                {"name": "probabilities", "parameters": {"binary_data": True}},
            ],
        }
    ).encode()
    async with running(make_app(weights)) as client:
        assert "binary_tensor_data" in (await client.get("/v2")).json()["extensions"]
        r = await client.post(
            "/v2/models/tiny/infer",
            content=header + raw,
            headers={
                "Inference-Header-Content-Length": str(len(header)),
                "Content-Type": "application/octet-stream",
            },
        )
        assert r.status_code == 200, r.text
        length = int(r.headers["inference-header-content-length"])
        meta = json.loads(r.content[:length])
        assert meta["id"] == "bin"
        blobs, offset = {}, length
        for out in meta["outputs"]:
            size = out["parameters"]["binary_data_size"]
            blobs[out["name"]] = r.content[offset : offset + size]
            offset += size
        assert offset == len(r.content)
        mask = np.frombuffer(blobs["mask"], np.uint8).reshape(48, 40)
        probs = np.frombuffer(blobs["probabilities"], "<f4").reshape(48, 40)
        ref, seg = reference(weights, pixels[:, :, None], int(r.headers["x-tile-size"]))
        np.testing.assert_allclose(probs, ref.probabilities[0], atol=1e-5)
        assert_mask_matches(mask, ref, seg)

        short = await client.post(
            "/v2/models/tiny/infer",
            content=header + raw[:-2],
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        assert short.status_code == 422 and "binary_data_size" in short.json()["error"]
