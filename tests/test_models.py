"""Several models served at once from a repository folder (UNET_MODELS): each by name on v1,
v2, jobs and the command line, its tiles batched with its own only; the one worker serves them
in turn, so a flood for one does not starve another; loaded on demand, at most
UNET_MAX_LOADED_MODELS at once (least recently used out first), loaded and unloaded through
Triton's repository API; a model that fails to load is reported as such while the others
serve."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from app_helpers import (
    TILE,
    em_crop,
    make_app,
    metric,
    png_bytes,
    running,
    save_tiny,
    service_of,
    stepped,
    tiff_bytes,
)
from browser import live_server
from PIL import Image

from conftest import read_volume
from unet_service.core.engine import Segmenter

pytestmark = pytest.mark.anyio
FINAL = ("done", "failed", "cancelled")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny models of different weights (c: three classes) and a broken one."""
    folder = tmp_path_factory.mktemp("models")
    save_tiny(folder, name="a", seed=1)
    save_tiny(folder, name="b", seed=2)
    save_tiny(folder, out_channels=3, name="c", seed=3)
    broken = save_tiny(folder, name="broken", seed=4)
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    return folder


def app_of(repository: Path, tmp_path: Path, **overrides: object):
    return make_app(
        repository / "a.safetensors",
        models=repository,
        default_model="a",
        jobs_dir=tmp_path / "jobs",
        job_progress_s=0.05,
        **overrides,
    )


def alone(repository: Path, name: str, pixels: np.ndarray):
    seg = Segmenter.from_weights(repository / f"{name}.safetensors", device="cpu", backend="torch")
    return seg, seg.segment(pixels[:, :, None], TILE, probabilities=True)


async def wait_done(client, job_id: str) -> dict:
    loop = asyncio.get_running_loop()
    end = loop.time() + 120  # a bound against a hang only
    while (body := (await client.get(f"/v1/jobs/{job_id}")).json())["state"] not in FINAL:
        assert loop.time() < end, body
        await asyncio.sleep(0.01)
    return body


async def test_two_models_by_name_on_v1_v2_and_jobs(repository: Path, tmp_path: Path) -> None:
    pixels = em_crop(2, 0, 0, 90, 110)
    upload = {"file": ("em.png", png_bytes(pixels))}
    async with running(app_of(repository, tmp_path)) as client:
        answers = {}
        for name in ("a", "b"):
            r = await client.post(
                "/v1/segment", params={"model": name, "output": "probabilities"}, files=upload
            )
            assert r.status_code == 200 and r.headers["x-model-name"] == name
            answers[name] = np.load(io.BytesIO(r.content))
        default = await client.post("/v1/segment", params={"output": "probabilities"}, files=upload)
        assert default.headers["x-model-name"] == "a"
        np.testing.assert_array_equal(np.load(io.BytesIO(default.content)), answers["a"])
        # Several classes: its mask is class indices.
        r = await client.post("/v1/segment", params={"model": "c"}, files=upload)
        mask_c = np.asarray(Image.open(io.BytesIO(r.content)))
        # v2: every model under its own name.
        body = {
            "inputs": [
                {
                    "name": "image",
                    "shape": list(pixels.shape),
                    "datatype": "UINT8",
                    "data": pixels.ravel().tolist(),
                }
            ],
            "outputs": [{"name": "probabilities"}],
        }
        v2 = {}
        for name in ("a", "b"):
            r = await client.post(f"/v2/models/{name}/infer", json=body)
            assert r.status_code == 200 and r.json()["model_name"] == name
            out = r.json()["outputs"][0]
            v2[name] = np.asarray(out["data"], np.float32).reshape(out["shape"])
            meta = (await client.get(f"/v2/models/{name}")).json()
            assert meta["name"] == name
        # A job names its model too, and its record says which.
        job = await client.post(
            "/v1/jobs",
            params={"model": "b", "output": "probabilities"},
            files={"file": ("s.tif", tiff_bytes(pixels))},
        )
        assert job.status_code == 202 and job.json()["model"] == "b"
        done = await wait_done(client, job.json()["id"])
        assert done["state"] == "done", done
        result = read_volume((await client.get(f"/v1/jobs/{done['id']}/result")).content)
        # Unknown names: 404s that list the models.
        r = await client.post("/v1/segment", params={"model": "zz"}, files=upload)
        assert r.status_code == 404 and "'a', 'b'" in r.json()["error"]
        assert (await client.get("/v2/models/zz")).status_code == 404
        r = await client.post("/v1/jobs", params={"model": "zz"}, files=upload)
        assert r.status_code == 404
        tiles_a = await metric(client, "unet_tiles_total", model="a")
        tiles_b = await metric(client, "unet_tiles_total", model="b")
    for name in ("a", "b"):
        _, expected = alone(repository, name, pixels)
        np.testing.assert_allclose(answers[name], expected.probabilities[0], atol=1e-5)
        np.testing.assert_allclose(v2[name], expected.probabilities[0], atol=1e-5)
    np.testing.assert_allclose(result, answers["b"], atol=1e-5)
    assert not np.allclose(answers["a"], answers["b"])  # two different models indeed
    _, expected_c = alone(repository, "c", pixels)
    decided = np.sort(expected_c.probabilities, axis=0)
    decided = decided[-1] - decided[-2] > 1e-5
    np.testing.assert_array_equal(mask_c[decided], expected_c.mask[decided])
    assert tiles_a > 0 and tiles_b > 0


async def test_load_unload_and_least_recently_used(repository: Path, tmp_path: Path) -> None:
    pixels = em_crop(1, 0, 0, 40, 40)
    upload = {"file": ("em.png", png_bytes(pixels))}
    async with running(app_of(repository, tmp_path, max_loaded_models=2)) as client:

        async def states() -> dict[str, str]:
            index = (await client.post("/v2/repository/index")).json()
            return {row["name"]: row["state"] for row in index}

        assert await states() == {
            "a": "READY",
            "b": "UNAVAILABLE",
            "broken": "UNAVAILABLE",
            "c": "UNAVAILABLE",
        }
        assert (await client.get("/v2/models/b/ready")).status_code == 503
        ok = await client.post("/v1/segment", params={"model": "b"}, files=upload)
        assert ok.status_code == 200  # loaded on demand
        assert (await states())["b"] == "READY"
        assert await metric(client, "unet_model_loaded", model="b") == 1
        # A third model: the least recently used idle one (b; never the default a) goes.
        assert (
            await client.post("/v1/segment", params={"model": "c"}, files=upload)
        ).status_code == 200
        assert await states() == {
            "a": "READY",
            "b": "UNAVAILABLE",
            "broken": "UNAVAILABLE",
            "c": "READY",
        }
        # Triton's repository API: load and unload by name.
        assert (await client.post("/v2/repository/models/c/unload")).status_code == 200
        assert (await client.post("/v2/repository/models/b/load")).status_code == 200
        assert await states() == {
            "a": "READY",
            "b": "READY",
            "broken": "UNAVAILABLE",
            "c": "UNAVAILABLE",
        }
        r = await client.post("/v2/repository/models/a/unload")
        assert r.status_code == 503 and "default" in r.json()["error"]
        assert (await client.post("/v2/repository/models/zz/load")).status_code == 404
        ready_only = (await client.post("/v2/repository/index", json={"ready": True})).json()
        assert [row["name"] for row in ready_only] == ["a", "b"]


async def test_a_broken_model_is_reported_and_the_others_serve(
    repository: Path, tmp_path: Path
) -> None:
    upload = {"file": ("em.png", png_bytes(em_crop(0, 0, 0, 40, 40)))}
    app = app_of(repository, tmp_path)
    async with running(app) as client:
        r = await client.post("/v1/segment", params={"model": "broken"}, files=upload)
        assert r.status_code == 503 and "failed to load" in r.json()["error"]
        (row,) = [
            row
            for row in (await client.post("/v2/repository/index")).json()
            if row["name"] == "broken"
        ]
        assert row["state"] == "FAILED" and row["reason"]
        for name in ("a", "b"):
            ok = await client.post("/v1/segment", params={"model": name}, files=upload)
            assert ok.status_code == 200
        # v1's listing (the web page's picker): the same rows, and the default model.
        listing = (await client.get("/v1/models")).json()
        assert listing == {
            "default": "a",
            "models": (await client.post("/v2/repository/index")).json(),
        }
        assert [m["state"] for m in listing["models"]] == [
            "READY",
            "READY",
            "FAILED",
            "UNAVAILABLE",
        ]
        # Draining: no model takes work, whatever is loaded.
        service_of(app).begin_drain()
        for rows in (
            (await client.get("/v1/models")).json()["models"],
            (await client.post("/v2/repository/index")).json(),
        ):
            assert [(m["state"], m.get("reason")) for m in rows] == [
                ("UNAVAILABLE", "loading or shutting down"),
                ("UNAVAILABLE", "loading or shutting down"),
                ("FAILED", row["reason"]),
                ("UNAVAILABLE", None),
            ]


async def test_the_repository_api_needs_the_key(repository: Path, tmp_path: Path) -> None:
    async with running(app_of(repository, tmp_path, api_key="k")) as client:
        for path in ("/v2/repository/models/b/load", "/v2/repository/models/b/unload"):
            assert (await client.post(path)).status_code == 401
        assert (await client.get("/v1/models")).status_code == 401
        auth = {"Authorization": "Bearer k"}
        assert (await client.get("/v1/models", headers=auth)).json()["default"] == "a"
        assert (await client.post("/v2/repository/models/b/load", headers=auth)).status_code == 200


async def test_a_flood_for_one_model_does_not_starve_another(
    repository: Path, tmp_path: Path
) -> None:
    """Twelve images of 16 tiles queued for a, then one of one tile for b: with the worker
    held pass by pass, b's request is answered after at most two more passes, while most of
    a's tiles still wait."""
    flood = {"file": ("big.png", png_bytes(em_crop(3, 0, 0, 240, 240)))}
    small = {"file": ("small.png", png_bytes(em_crop(4, 0, 0, 40, 40)))}
    async with running(app_of(repository, tmp_path, max_batch_tiles=2)) as client:
        service = service_of(client._transport.app)  # type: ignore[attr-defined]
        await service.models.load("b")
        with stepped(service) as stepper:
            floods = [
                asyncio.ensure_future(
                    client.post("/v1/segment", params={"model": "a"}, files=flood)
                )
                for _ in range(12)
            ]
            while service.batcher.queued_tiles < 12 * 16 - 2:
                await asyncio.sleep(0.01)
            other = asyncio.ensure_future(
                client.post("/v1/segment", params={"model": "b"}, files=small)
            )
            while service.batcher.queued_images < 13:
                await asyncio.sleep(0.01)
            await stepper.allow(2)
            # (A bound against a hang only: an unfair worker would hold b behind a's flood.)
            r = await asyncio.wait_for(other, 60)
            assert r.status_code == 200 and r.headers["x-model-name"] == "b"
            assert service.batcher.queued_tiles > 12 * 16 - 10  # a's flood barely started
            stepper.open()
            answers = [await f for f in floods]
            assert all(answer.status_code == 200 for answer in answers)


def test_unet_predict_takes_a_model_by_name(repository: Path, tmp_path: Path) -> None:
    pixels = em_crop(5, 0, 0, 70, 80)
    Image.fromarray(pixels).save(tmp_path / "em.png")
    exe = shutil.which("unet-predict", path=str(Path(sys.executable).parent))
    assert exe is not None
    argv = [exe, str(tmp_path / "em.png"), "-o", str(tmp_path / "out"), "--probabilities"]
    argv += ["--model", "b", "--models", str(repository), "--device", "cpu"]
    argv += ["--tile-size", str(TILE)]
    subprocess.run(argv, check=True, capture_output=True)
    _, expected = alone(repository, "b", pixels)
    np.testing.assert_allclose(
        np.load(tmp_path / "out" / "em.npy"), expected.probabilities[0], atol=1e-5
    )
    done = subprocess.run([*argv[:-2], "--model", "zz"], capture_output=True, text=True)
    assert done.returncode == 2 and "no model 'zz'" in done.stderr and "a, b" in done.stderr


def test_tritonclient_lists_and_calls_both_models(repository: Path, tmp_path: Path) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    pixels = em_crop(3, 0, 0, 48, 64)
    with live_server(app_of(repository, tmp_path)) as base:
        client = httpclient.InferenceServerClient(base.removeprefix("http://"))
        names = [row["name"] for row in client.get_model_repository_index()]
        assert names == ["a", "b", "broken", "c"]
        client.load_model("b")
        got = {}
        for name in ("a", "b"):
            image = httpclient.InferInput("image", list(pixels.shape), "UINT8")
            image.set_data_from_numpy(pixels)
            got[name] = client.infer(name, [image]).as_numpy("probabilities")
        client.unload_model("b")
        assert not client.is_model_ready("b")
    for name in ("a", "b"):
        _, expected = alone(repository, name, pixels)
        np.testing.assert_allclose(got[name], expected.probabilities[0], atol=1e-5)


async def test_a_model_with_a_broken_card_is_a_503_everywhere(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    save_tiny(folder, name="a", seed=1)
    save_tiny(folder, name="badcard", seed=2)
    (folder / "badcard.json").write_text('{"channels": [1, 4')  # cut off mid-file
    upload = {"file": ("em.png", png_bytes(em_crop(0, 0, 0, 40, 40)))}
    app = app_of(folder, tmp_path)
    async with running(app) as client:
        answers = [
            await client.get("/v2/models/badcard"),
            await client.post("/v1/preview", params={"model": "badcard"}, files=upload),
            await client.post("/v1/segment", params={"model": "badcard"}, files=upload),
            await client.post("/v1/jobs", params={"model": "badcard"}, files=upload),
        ]
        for r in answers:
            assert r.status_code == 503, (r.request.url, r.text)
            assert "badcard" in r.json()["error"]
        (row,) = [
            row
            for row in (await client.post("/v2/repository/index")).json()
            if row["name"] == "badcard"
        ]
        assert row["state"] == "FAILED" and "badcard.json" in row["reason"]
        ok = await client.post("/v1/segment", files=upload)
        assert ok.status_code == 200
