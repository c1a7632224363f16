"""Bad input gets one clear JSON error with the right status, and nothing else breaks:
upload limits (413 before the body is read), decompression bombs, non-images, truncated
and empty files, bad tensors; a full queue (503), deadlines (504), a failing forward pass
(500 for that batch only), draining (503)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import httpx
import numpy as np
import pytest
from app_helpers import (
    em_crop,
    gated,
    make_app,
    metric,
    png_bytes,
    running,
    save_tiny,
    service_of,
)
from pydantic import ValidationError

from unet_service.settings import Settings

pytestmark = pytest.mark.anyio

LIMIT_MB = 0.05  # 52 KB
CHUNK = 16 * 1024


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return save_tiny(tmp_path)


async def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def assert_json_error(r, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert "Traceback" not in body["error"]
    for word in words:
        assert word in body["error"], body["error"]


async def drive(
    app,
    headers: dict[str, str],
    chunks: Iterable[bytes],
    path: str = "/v1/segment",
    hang_up: bool = False,
    stall: bool = False,
) -> tuple[int, int]:
    """POST `path` straight through ASGI, feeding the body chunk by chunk. Returns the
    status and how many chunks the app pulled. With `hang_up`, the client disconnects after
    the last chunk instead of finishing the body; with `stall`, it stays connected and sends
    nothing more."""
    chunk_list = list(chunks)
    pulled = 0
    status = 0

    async def receive() -> dict:
        nonlocal pulled
        if pulled < len(chunk_list):
            pulled += 1
            more = hang_up or stall or pulled < len(chunk_list)
            return {"type": "http.request", "body": chunk_list[pulled - 1], "more_body": more}
        if not hang_up:
            await asyncio.Event().wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("test", 80),
        "state": {},
    }
    await app(scope, receive, send)
    return status, pulled


async def test_oversized_upload_gets_413_without_reading_the_rest(weights: Path) -> None:
    app = make_app(weights, max_upload_mb=LIMIT_MB)
    body = [b"\0" * CHUNK] * 200  # 3.2 MB
    boundary = "b0undary"
    multipart = {"content-type": f"multipart/form-data; boundary={boundary}"}
    async with running(app):
        # Declared too large: refused before a byte of the body is read.
        declared = {**multipart, "content-length": str(CHUNK * 200)}
        status, pulled = await drive(app, declared, body)
        assert (status, pulled) == (413, 0)
        # Chunked (no length) multipart and raw bodies: stopped right after the limit.
        most = int(LIMIT_MB * 2**20 + 64 * 1024) // CHUNK + 2
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a"'
        status, pulled = await drive(app, multipart, [(head + "\r\n\r\n").encode(), *body])
        assert status == 413 and pulled <= most
        status, pulled = await drive(app, {"content-type": "image/png"}, body)
        assert status == 413 and pulled <= most
        # Nothing was queued, and the service still works.
        assert service_of(app).batcher.queued_tiles == 0
        small = png_bytes(em_crop(0, 0, 0, 40, 40))
        status, _ = await drive(app, {"content-type": "image/png"}, [small])
        assert status == 200


async def test_client_gone_mid_upload_is_499_not_a_server_error(weights: Path) -> None:
    app = make_app(weights)
    png = png_bytes(em_crop(0, 0, 0, 64, 64))
    part = png[: len(png) // 2]
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
    async with running(app) as client:
        raw = {"content-type": "image/png", "content-length": str(len(png))}
        assert (await drive(app, raw, [part], hang_up=True))[0] == 499
        multipart = {"content-type": f"multipart/form-data; boundary={boundary}"}
        status, _ = await drive(app, multipart, [head.encode(), part], hang_up=True)
        assert status == 499
        v2 = {"content-type": "application/json"}
        path = "/v2/models/tiny/infer"
        status, _ = await drive(app, v2, [b'{"inputs": [{"name"'], path, hang_up=True)
        assert status == 499
        metrics = (await client.get("/metrics")).text
        assert 'status="500"' not in metrics
        assert 'unet_requests_total{endpoint="/v1/segment",method="POST",status="499"} 2.0' in (
            metrics
        )
        r = await client.post("/v1/segment", files={"file": ("a.png", png, "image/png")})
        assert r.status_code == 200


async def test_a_stalled_upload_is_408_at_the_request_deadline(weights: Path) -> None:
    """A client that stops sending mid-body does not hold its connection forever: the
    request's deadline (UNET_REQUEST_TIMEOUT_S, from arrival) covers the upload too."""
    app = make_app(weights, request_timeout_s=0.5)
    png = png_bytes(em_crop(0, 0, 0, 64, 64))
    async with running(app) as client:
        raw = {"content-type": "image/png", "content-length": str(len(png))}
        status, pulled = await drive(app, raw, [png[:100]], stall=True)
        assert status == 408 and pulled == 1
        v2 = {"content-type": "application/json"}
        status, _ = await drive(app, v2, [b'{"inputs": '], "/v2/models/tiny/infer", stall=True)
        assert status == 408
        r = await client.post("/v1/segment", files={"file": ("a.png", png, "image/png")})
        assert r.status_code == 200


async def test_too_many_pixels_is_413(weights: Path) -> None:
    # 25 megapixels of zeros compress to a few kilobytes: a decompression bomb in miniature.
    bomb = png_bytes(np.zeros((5000, 5000), np.uint8))
    assert len(bomb) < 100_000
    async with running(make_app(weights, max_pixels=1_000_000)) as client:
        r = await client.post("/v1/segment", files={"file": ("bomb.png", bomb, "image/png")})
        assert_json_error(r, 413, "pixels", "1000000")
        # Refused from the header, never decoded: the same header with its pixel data cut
        # off is still 413 (decoding it would find it truncated, a 422).
        header_only = bomb[: bomb.index(b"IDAT") + 64]
        r = await client.post("/v1/segment", files={"file": ("bomb.png", header_only)})
        assert_json_error(r, 413, "pixels", "1000000")
        tensor = {"name": "image", "shape": [2000, 1000], "datatype": "UINT8", "data": [0]}
        r = await client.post("/v2/models/tiny/infer", json={"inputs": [tensor]})
        assert_json_error(r, 413, "pixels")


async def test_non_images_and_broken_images(weights: Path) -> None:
    good = png_bytes(em_crop(0, 0, 0, 64, 64))
    async with running(make_app(weights)) as client:

        async def upload(data: bytes, name: str = "x.png"):
            return await client.post("/v1/segment", files={"file": (name, data, "image/png")})

        assert_json_error(await upload(b"hello, I am text\n"), 415, "not a supported image")
        assert_json_error(await upload(good[: len(good) // 2]), 422, "truncated or corrupt")
        # A PNG whose header declares zero width: Pillow refuses to open it at all, but it
        # is a broken PNG (422), not an unknown format (415).
        zero_width = good[:16] + b"\0\0\0\0" + good[20:]
        assert_json_error(await upload(zero_width), 422, "truncated or corrupt")
        assert_json_error(await upload(b""), 422, "empty")
        r = await client.post(
            "/v1/segment", content=b"hello", headers={"content-type": "text/plain"}
        )
        assert_json_error(r, 415, "Content-Type")
        r = await client.post("/v1/segment", files={"other": ("x.png", good, "image/png")})
        assert_json_error(r, 422, "'file'")
        r = await client.post(
            "/v1/segment", content=b"--x\r\n", headers={"content-type": "multipart/form-data"}
        )
        assert_json_error(r, 422, "multipart")
        r = await client.post(
            "/v1/segment", params={"output": "jpeg"}, files={"file": ("a.png", good)}
        )
        assert_json_error(r, 422, "output")
        assert_json_error(await client.get("/v2/nothing/here"), 404)
        assert_json_error(await client.get("/v1/segment"), 405)
        # After all that, a good image still works.
        assert (await upload(good)).status_code == 200


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        ({"shape": [4, 4], "datatype": "INT64", "data": [0] * 16}, ["datatype", "UINT8"]),
        ({"shape": [4, 4], "datatype": "BYTES", "data": ["a"] * 16}, ["datatype"]),
        ({"shape": [1, 2, 2, 2, 2], "datatype": "UINT8", "data": [0] * 16}, ["shape"]),
        ({"shape": [2, 1, 4, 4], "datatype": "UINT8", "data": [0] * 32}, ["one image"]),
        ({"shape": [0, 4], "datatype": "UINT8", "data": []}, ["empty"]),
        ({"shape": [4, 4], "datatype": "UINT8", "data": [0] * 15}, ["15 values", "16"]),
        ({"shape": [4, 4], "datatype": "UINT8", "data": [300] * 16}, ["range"]),
        ({"shape": [4, 4], "datatype": "UINT8", "data": [0.5] * 16}, ["integers"]),
        ({"shape": [2, 2], "datatype": "UINT8", "data": [10**30] * 4}, ["integers in 0..255"]),
        # Finite as JSON (float64), infinite as FP32: NaN probabilities, NaN in the JSON reply.
        ({"shape": [2, 2], "datatype": "FP32", "data": [1e300] * 4}, ["FP32 range"]),
        # Within FP32 range, but the normalisation would overflow to NaN.
        ({"shape": [2, 2], "datatype": "FP32", "data": [3e38] * 4}, ["within", "[0, 1]"]),
        ({"shape": [2, 2], "datatype": "UINT8", "data": [[1, 2], [3]]}, ["ragged"]),
        ({"shape": [2, 2], "datatype": "FP32", "data": "abcd"}, ["list"]),
        ({"shape": [4, 4, 2], "datatype": "UINT8", "data": [0] * 32}, ["2 channels"]),
    ],
)
async def test_bad_tensors_are_422(weights: Path, tensor: dict, words: list[str]) -> None:
    async with running(make_app(weights)) as client:
        r = await client.post(
            "/v2/models/tiny/infer", json={"inputs": [{"name": "image", **tensor}]}
        )
    assert_json_error(r, 422, *words)


async def test_bad_infer_requests_are_422(weights: Path) -> None:
    one = {"name": "image", "shape": [2, 2], "datatype": "UINT8", "data": [1, 2, 3, 4]}
    async with running(make_app(weights)) as client:
        post = client.post
        r = await post("/v2/models/tiny/infer", content=b"{not json")
        assert_json_error(r, 422, "invalid inference request")
        assert_json_error(await post("/v2/models/tiny/infer", json={"inputs": []}), 422)
        r = await post("/v2/models/tiny/infer", json={"inputs": [one, one]})
        assert_json_error(r, 422, "exactly one input")
        r = await post("/v2/models/tiny/infer", json={"inputs": [one], "outputs": [{"name": "x"}]})
        assert_json_error(r, 422, "unknown output")
        # The string "false" is not false: refused, not taken as true.
        r = await post(
            "/v2/models/tiny/infer",
            json={"inputs": [one], "parameters": {"binary_data_output": "false"}},
        )
        assert_json_error(r, 422, "binary_data_output", "true or false")
        r = await post(
            "/v2/models/tiny/infer",
            json={"inputs": [one], "outputs": [{"name": "mask", "parameters": {"binary_data": 0}}]},
        )
        assert_json_error(r, 422, "binary_data")
        r = await post("/v2/models/tiny/infer", json={"inputs": [one]})
        assert r.status_code == 200


async def test_full_queue_is_503_at_once_and_oversized_images_413(weights: Path) -> None:
    app = make_app(weights, max_queue_tiles=8, max_batch_tiles=4, drain_timeout_s=1)
    async with running(app) as client:
        batcher = service_of(app).batcher
        with gated(service_of(app)) as gate:
            four = png_bytes(em_crop(0, 0, 0, 100, 100))  # 2 x 2 tiles of 60
            first = asyncio.ensure_future(
                client.post("/v1/segment", files={"file": ("a.png", four)})
            )
            await wait_until(lambda: batcher.queued_tiles == 4 and gate.entered.is_set())
            six = png_bytes(em_crop(1, 0, 0, 100, 150))  # 2 x 3 tiles: 4 + 6 > 8
            # Refused at once: the worker is held, so an answer that waited for room in
            # the queue would never come.
            r = await client.post("/v1/segment", files={"file": ("b.png", six)})
            assert_json_error(r, 503, "queue is full")
            assert int(r.headers["retry-after"]) >= 1
            sixteen = png_bytes(em_crop(2, 0, 0, 240, 240))  # 4 x 4 tiles > the whole queue
            r = await client.post("/v1/segment", files={"file": ("c.png", sixteen)})
            assert_json_error(r, 413, "UNET_MAX_QUEUE_TILES")
            assert batcher.queued_tiles == 4
        assert (await first).status_code == 200
        assert batcher.queued_tiles == 0
        r = await client.post("/v1/segment", files={"file": ("b.png", six)})
        assert r.status_code == 200


async def test_deadline_is_504_and_drops_the_remaining_tiles(weights: Path) -> None:
    app = make_app(weights, request_timeout_s=0.5, max_batch_tiles=2, drain_timeout_s=1)
    async with running(app) as client:
        batcher = service_of(app).batcher
        with gated(service_of(app)):
            image = png_bytes(em_crop(3, 0, 0, 240, 240))  # 16 tiles
            start = time.monotonic()
            r = await client.post("/v1/segment", files={"file": ("a.png", image)})
            assert_json_error(r, 504, "UNET_REQUEST_TIMEOUT_S")
            assert time.monotonic() - start >= 0.5  # never before the deadline
            assert batcher.queued_tiles == 0 and batcher.queued_images == 0
        small = png_bytes(em_crop(3, 0, 0, 50, 50))
        assert (
            await client.post("/v1/segment", files={"file": ("b.png", small)})
        ).status_code == 200
        # The held batch, then the new image only: the dropped tiles were never computed.
        assert await metric(client, "unet_tiles_total") == 2 + 1


async def test_failed_forward_pass_fails_only_its_batch(weights: Path) -> None:
    app = make_app(weights, max_wait_ms=50)
    async with running(app) as client:
        batcher = service_of(app).batcher
        segmenter = service_of(app).segmenter
        real = segmenter.forward
        failures = []

        def fail_first_small_batch(batch: np.ndarray) -> np.ndarray:
            if batch.shape[-1] == 32 + 40 and not failures:  # bucket 32 + shrink 40
                failures.append(len(batch))
                raise RuntimeError("simulated device fault")
            return real(batch)

        segmenter.forward = fail_first_small_batch
        small = png_bytes(em_crop(4, 0, 0, 30, 30))  # bucket 32
        large = png_bytes(em_crop(4, 0, 0, 100, 100))  # bucket 60
        r_small, r_large = await asyncio.gather(
            client.post("/v1/segment", files={"file": ("s.png", small)}),
            client.post("/v1/segment", files={"file": ("l.png", large)}),
        )
        assert_json_error(r_small, 500, "inference failed", "server log")
        assert "simulated" not in r_small.text
        assert r_large.status_code == 200
        assert failures == [1]
        # The worker lives on.
        again = await client.post("/v1/segment", files={"file": ("s.png", small)})
        assert again.status_code == 200
        assert batcher.queued_tiles == 0
        metrics = (await client.get("/metrics")).text
        assert "unet_worker_errors_total 1.0" in metrics


async def test_draining_server_refuses_new_work(weights: Path) -> None:
    app = make_app(weights)
    async with running(app) as client:
        service_of(app).begin_drain()
        r = await client.post(
            "/v1/segment", files={"file": ("a.png", png_bytes(em_crop(0, 0, 0, 20, 20)))}
        )
        assert_json_error(r, 503, "shutting down")
        assert "retry-after" in r.headers
        assert (await client.get("/v2/health/ready")).status_code == 503
        assert (await client.head("/v2/health/ready")).status_code == 503
        assert (await client.get("/v2/health/live")).status_code == 200


async def test_illegal_tile_size_stops_startup_with_a_clear_error(weights: Path) -> None:
    app = make_app(weights, tile_size=62)
    with pytest.raises(ValueError, match=r"UNET_TILE_SIZE=62.*nearest legal: 60 or 64"):
        async with running(app):
            pass


def test_settings_reject_bad_values(weights: Path) -> None:
    with pytest.raises(ValidationError, match="precision"):
        Settings(weights=weights, precision="fp64")
    with pytest.raises(ValidationError, match="max_batch_tiles"):
        Settings(weights=weights, max_batch_tiles=-1)
    cpu, cuda = "cpu", "cuda"
    assert Settings(weights=weights).batch_tiles_for(cpu) == 2
    assert Settings(weights=weights).batch_tiles_for(cuda) == 8
    assert Settings(weights=weights, max_batch_tiles=5).batch_tiles_for(cpu) == 5
    assert Settings(weights=weights, api_key="").api_key is None
    assert json.loads(Settings(weights=weights).model_dump_json())["api_key"] is None


async def test_not_ready_until_the_model_is_loaded_and_warm(weights: Path) -> None:
    app = make_app(weights)
    transport = httpx.ASGITransport(app=app)  # no lifespan: the model was never loaded
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/v2/health/live")).status_code == 200
        ready = await client.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.json() == {"ready": False}
        r = await client.post(
            "/v1/segment", files={"file": ("a.png", png_bytes(em_crop(0, 0, 0, 20, 20)))}
        )
        assert_json_error(r, 503, "loading")
    async with running(app) as client:
        assert (await client.get("/v2/health/ready")).status_code == 200
