"""Stacks, synchronously: a multi-page TIFF on /v1/segment, a [D, H, W] tensor on v2 and a
multi-page TIFF for unet-predict give the same pages back, each equal to that page sent
alone; the limits count all pages; the pages batch with other requests without starving
them; a failure of one page fails the stack and leaves nothing in the queue."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from app_helpers import (
    binary_infer,
    em_crop,
    gated,
    make_app,
    metric,
    png_bytes,
    running,
    save_tiny,
    service_of,
    stepped,
    tiff_bytes,
)
from PIL import Image

from conftest import read_volume
from unet_service.cli.predict import main as predict

pytestmark = pytest.mark.anyio

# Three real EM crops of one size, 2 x 2 tiles of 60 each (the tiny model's largest tile).
PAGES = [em_crop(i, 30 * i, 20, 70, 90) for i in range(3)]
OUTPUTS = ("mask", "probabilities", "instances", "overlay")


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    return save_tiny(tmp_path)


def tiff_pages(data: bytes) -> np.ndarray:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        return np.stack([page.asarray() for page in tif.pages])


def one_page(r) -> np.ndarray:
    if r.headers["content-type"] == "application/octet-stream":
        return np.load(io.BytesIO(r.content), allow_pickle=False)
    return np.asarray(Image.open(io.BytesIO(r.content)))


async def segment(client, data: bytes, output: str, name: str = "stack.tif"):
    params = {"output": output}
    return await client.post("/v1/segment", params=params, files={"file": (name, data)})


async def test_v1_a_stack_in_gives_the_same_pages_out_each_as_if_alone(weights: Path) -> None:
    # One tile per pass: every tile is computed exactly as when its page is sent alone, so
    # every output must be equal, bit for bit (batch composition is covered by docs/inference.md's
    # bounds and by the tests of batching).
    async with running(make_app(weights, max_batch_tiles=1)) as client:
        for output in OUTPUTS:
            r = await segment(client, tiff_bytes(*PAGES), output)
            assert r.status_code == 200, (output, r.text)
            assert r.headers["x-pages"] == "3" and r.headers["x-tiles"] == "12"
            alone = [await segment(client, png_bytes(p), output, "p.png") for p in PAGES]
            assert all(a.headers["x-pages"] == "1" for a in alone)
            expected = np.stack([one_page(a) for a in alone])
            if output == "probabilities":
                got = np.load(io.BytesIO(r.content), allow_pickle=False)
                assert got.dtype == np.float32
            else:
                assert r.headers["content-type"] == "image/tiff"
                got = tiff_pages(r.content)
            assert got.shape == expected.shape == (3, 70, 90, 3)[: expected.ndim], output
            np.testing.assert_array_equal(got, expected, err_msg=output)
            if output == "instances":
                # Each page labelled on its own: every page's ids start at 1.
                assert got.dtype == np.uint16 and all(page.max() >= 1 for page in got)


async def test_a_stack_answer_is_one_imagej_volume(weights: Path) -> None:
    """What scikit-image, napari (tifffile.imread) and Fiji open: the whole (D, H, W) stack,
    not its first page; every page as that page sent alone."""
    async with running(make_app(weights, max_batch_tiles=1)) as client:
        for output, dtype in (("mask", np.uint8), ("instances", np.uint16), ("overlay", np.uint8)):
            r = await segment(client, tiff_bytes(*PAGES), output)
            assert r.status_code == 200, (output, r.text)
            volume = read_volume(r.content)
            alone = [await segment(client, png_bytes(p), output, "p.png") for p in PAGES]
            expected = np.stack([one_page(a) for a in alone])
            assert volume.shape == (3, 70, 90, 3)[: expected.ndim] and volume.dtype == dtype
            np.testing.assert_array_equal(volume, expected, err_msg=output)


async def test_a_one_page_tiff_is_answered_as_before(weights: Path) -> None:
    async with running(make_app(weights)) as client:
        for output in OUTPUTS:
            tiff = await segment(client, tiff_bytes(PAGES[0]), output)
            png = await segment(client, png_bytes(PAGES[0]), output, "p.png")
            assert tiff.status_code == png.status_code == 200, output
            assert tiff.headers["x-pages"] == "1"
            assert tiff.headers["content-type"] == png.headers["content-type"] != "image/tiff"
            assert tiff.content == png.content, output


async def test_v2_json_binary_and_cli_agree_with_v1(weights: Path, tmp_path: Path) -> None:
    stack = np.stack(PAGES)
    async with running(make_app(weights, max_batch_tiles=1)) as client:
        v1 = {
            o: await segment(client, tiff_bytes(*PAGES), o)
            for o in ("mask", "probabilities", "instances")
        }
        names = ["mask", "probabilities", "instances"]
        body = {
            "inputs": [
                {"name": "image", "shape": [3, 70, 90], "datatype": "UINT8", "data": stack.tolist()}
            ],
            "outputs": [{"name": n} for n in names],
            "parameters": {"layout": "DHW"},
        }
        r = await client.post("/v2/models/tiny/infer", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["parameters"]["pages"] == 3 and r.headers["x-pages"] == "3"
        as_json = {
            o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]
        }
        data, headers = binary_infer(stack, "UINT8", names, parameters={"layout": "DHW"})
        b = await client.post("/v2/models/tiny/infer", content=data, headers=headers)
        assert b.status_code == 200, b.text
        as_binary = _binary_outputs(b)
    v1_arrays = {
        "mask": tiff_pages(v1["mask"].content) // 255,
        "probabilities": np.load(io.BytesIO(v1["probabilities"].content)),
        "instances": tiff_pages(v1["instances"].content),
    }
    for name in names:
        assert as_json[name].shape == as_binary[name].shape == (3, 70, 90), name
        np.testing.assert_array_equal(as_binary[name], v1_arrays[name], err_msg=name)
        np.testing.assert_allclose(as_json[name], v1_arrays[name], atol=1e-6, err_msg=name)

    # unet-predict (its own backend and batches: docs/inference.md's bounds, not bits).
    source = tmp_path / "stack.tif"
    source.write_bytes(tiff_bytes(*PAGES))
    out = tmp_path / "out"
    argv = [str(source), "-o", str(out), "--weights", str(weights), "--tile-size", "60"]
    assert predict([*argv, "--probabilities", "--instances"]) == 0
    probs = np.load(out / "stack.npy")
    np.testing.assert_allclose(probs, v1_arrays["probabilities"], atol=1e-5)
    masks = tiff_pages((out / "stack.tif").read_bytes())
    assert masks.shape == (3, 70, 90) and set(np.unique(masks)) <= {0, 255}
    decided = np.abs(probs - service_threshold(weights)) > 1e-5
    np.testing.assert_array_equal(masks[decided] // 255, v1_arrays["mask"][decided])
    labels = tiff_pages((out / "stack.instances.tif").read_bytes())
    assert labels.shape == (3, 70, 90)
    assert (labels == v1_arrays["instances"]).mean() > 0.99


def service_threshold(weights: Path) -> float:
    return json.loads(weights.with_suffix(".json").read_text())["threshold"]


def _binary_outputs(r) -> dict[str, np.ndarray]:
    length = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:length])
    dtypes = {"UINT8": "<u1", "FP32": "<f4", "UINT32": "<u4"}
    arrays, offset = {}, length
    for o in header["outputs"]:
        size = o["parameters"]["binary_data_size"]
        raw = r.content[offset : offset + size]
        arrays[o["name"]] = np.frombuffer(raw, dtypes[o["datatype"]]).reshape(o["shape"])
        offset += size
    return arrays


async def test_v2_shape_rule_is_explicit(weights: Path) -> None:
    def body(shape: list[int], **parameters: object) -> dict:
        data = np.zeros(shape, np.uint8).ravel().tolist()
        tensor = {"name": "image", "shape": shape, "datatype": "UINT8", "data": data}
        return {"inputs": [tensor], "outputs": [{"name": "mask"}], "parameters": parameters}

    async with running(make_app(weights)) as client:
        infer = "/v2/models/tiny/infer"
        r = await client.post(infer, json=body([20, 24, 1]))  # [H, W, C] as always
        assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [20, 24]
        r = await client.post(infer, json=body([1, 20, 24], layout="DHW"))
        assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 20, 24]
        r = await client.post(infer, json=body([2, 20, 24, 1], layout="DHWC"))
        assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [2, 20, 24]
        r = await client.post(infer, json=body([5, 20, 24]))  # a stack without its layout
        assert r.status_code == 422 and '"layout": "DHW"' in r.json()["error"]
        r = await client.post(infer, json=body([20, 24], layout="DHW"))
        assert r.status_code == 422 and "DHW" in r.json()["error"]
        r = await client.post(infer, json=body([2, 20, 24], layout="ZYX"))
        assert r.status_code == 422 and "layout" in r.json()["error"]
        meta = (await client.get("/v2/models/tiny")).json()["inputs"][0]["parameters"]
        assert "DHW" in meta["layout_parameter"] and meta["max_pages"] == 1000


async def test_limits_count_all_pages(weights: Path) -> None:
    pixels = 70 * 90
    app = make_app(weights, max_pixels=3 * pixels - 1, max_pages=4, max_queue_tiles=5)
    async with running(app) as client:
        one = await segment(client, tiff_bytes(PAGES[0]), "mask")  # one page fits
        assert one.status_code == 200 and one.headers["content-type"] == "image/png"
        r = await segment(client, tiff_bytes(*PAGES), "mask")
        assert r.status_code == 413 and "all pages count" in r.json()["error"]
        stack = np.stack(PAGES)
        data, headers = binary_infer(stack, "UINT8", ["mask"], parameters={"layout": "DHW"})
        r = await client.post("/v2/models/tiny/infer", content=data, headers=headers)
        assert r.status_code == 413 and "stack of 3 pages" in r.json()["error"]
        five = tiff_bytes(*[PAGES[0][:10, :10]] * 5)
        r = await segment(client, five, "mask")
        assert r.status_code == 413 and "limit of 4 pages" in r.json()["error"]
        # Three pages of two tiles: more than the five the whole queue holds.
        r = await segment(client, tiff_bytes(*[p[:, :60] for p in PAGES]), "mask")
        assert r.status_code == 413 and "stack of 3 pages needs 6 tiles" in r.json()["error"]


async def test_broken_stacks_are_clear_4xx(weights: Path) -> None:
    async with running(make_app(weights)) as client:
        r = await segment(client, tiff_bytes(PAGES[0], PAGES[1][:, :80]), "mask")
        assert r.status_code == 422
        assert "page 2 is 80x70 but page 1 is 90x70" in r.json()["error"]
        data = tiff_bytes(*PAGES)
        r = await segment(client, data[: len(data) * 2 // 3], "mask")
        assert r.status_code == 422 and "truncated or corrupt" in r.json()["error"]
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.stack(PAGES), imagej=True, metadata={"axes": "ZYX"})
        lying = buf.getvalue().replace(b"images=3\nslices=3", b"images=1000000\nslices=1000000")
        r = await segment(client, lying, "mask")
        assert r.status_code == 413 and "declares 1000000 pages" in r.json()["error"]
        assert await metric(client, "unet_queue_tiles") == 0


async def test_stack_pages_batch_with_others_and_do_not_starve_them(weights: Path) -> None:
    """Passes run only when allowed. While a first request holds the worker, a 4-page
    stack and a single page queue up; with two tiles per pass, the next pass holds one
    tile of each (the stack is one line of the round-robin), so the single page is done
    after that one pass while the stack still waits, and the stack's next pass holds two
    of its own pages' tiles."""
    pages = [p[:50, :50] for p in PAGES] + [PAGES[0][10:60, 30:80]]  # one tile of 60 each
    app = make_app(weights, max_batch_tiles=2, max_wait_ms=0)
    async with running(app) as client:
        with stepped(service_of(app)) as stepper:
            opener = asyncio.ensure_future(segment(client, png_bytes(PAGES[2][:12, :12]), "mask"))
            await asyncio.to_thread(stepper.entered.wait, 30)
            stack = asyncio.ensure_future(segment(client, tiff_bytes(*pages), "mask"))
            while await metric(client, "unet_queue_images") < 2:
                await asyncio.sleep(0.005)
            single = asyncio.ensure_future(segment(client, png_bytes(PAGES[1][:50, :50]), "mask"))
            while await metric(client, "unet_queue_images") < 3:
                await asyncio.sleep(0.005)
            await stepper.allow(2)  # the opener's pass, then one of the stack and the single
            r_single = await asyncio.wait_for(single, 60)
            assert r_single.status_code == 200 and r_single.headers["x-batches"] == "1"
            assert not stack.done()
            assert await metric(client, "unet_queue_tiles") == 3
            await stepper.allow(2)
            r_stack = await asyncio.wait_for(stack, 60)
        assert (await opener).status_code == 200
        assert r_stack.status_code == 200 and r_stack.headers["x-batches"] == "3"
        assert await metric(client, "unet_forward_passes_total") == 4
        assert await metric(client, "unet_queue_tiles") == 0


async def test_a_failing_page_fails_the_stack_at_once_and_leaves_no_tiles(
    weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = np.full((70, 90), 77, np.uint8)
    app = make_app(weights, max_batch_tiles=1, max_wait_ms=0, request_timeout_s=60)
    async with running(app) as client:
        segmenter = service_of(app).segmenter
        real_forward = segmenter.forward
        victim_value = segmenter.normalize(victim[None, :1, :1])[0, 0, 0]

        def forward(batch: np.ndarray) -> np.ndarray:
            if np.any(np.all(batch == victim_value, axis=(1, 2, 3))):
                raise RuntimeError("the forward pass failed")
            return real_forward(batch)

        monkeypatch.setattr(segmenter, "forward", forward)
        r = await segment(client, tiff_bytes(PAGES[0], victim, PAGES[1]), "mask")
        assert r.status_code == 500 and "inference failed" in r.json()["error"]
        # Page 1's four tiles ran, the victim's first failed, page 3's never ran.
        assert await metric(client, "unet_tiles_total") == 4
        assert await metric(client, "unet_queue_tiles") == 0
        assert await metric(client, "unet_queue_images") == 0
        monkeypatch.undo()
        again = await segment(client, tiff_bytes(*PAGES), "mask")
        assert again.status_code == 200 and again.headers["x-pages"] == "3"


async def test_a_cancelled_stack_leaves_the_queue_with_all_its_pages(weights: Path) -> None:
    app = make_app(weights, max_batch_tiles=2, drain_timeout_s=1)
    async with running(app) as client:
        batcher = service_of(app).batcher
        with gated(service_of(app)) as gate:
            request = asyncio.ensure_future(segment(client, tiff_bytes(*PAGES), "mask"))
            while not (gate.entered.is_set() and batcher.queued_tiles == 12):
                await asyncio.sleep(0.005)
            request.cancel()  # the client gives up with 10 tiles of 3 pages still queued
            with pytest.raises(asyncio.CancelledError):
                await request
            assert batcher.queued_tiles == 0 and batcher.queued_images == 0
        r = await segment(client, png_bytes(PAGES[0][:50, :50]), "mask", "a.png")
        assert r.status_code == 200
        # The batch in flight, then the new image: the stack's other tiles never ran.
        assert await metric(client, "unet_tiles_total") == 2 + 1
