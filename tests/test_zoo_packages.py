"""BioImage Model Zoo packages in the model repository: a 2D package with TorchScript or ONNX
weights is served like our own models, tile by tile (its legal sizes, its halo, its padding,
its preprocessing with statistics of the whole image, its postprocessing), and its answers
equal bioimageio.core's prediction of the whole image within the package's own tolerance (and
within the 1e-5 fp32 bound of docs/inference.md); packages it cannot serve are listed FAILED
with the reason while the others serve. The packages are built here (bench/zoo_packages.py):
nothing is downloaded."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from app_helpers import em_crop, make_app, metric, png_bytes, running, save_tiny, tiff_bytes
from PIL import Image

from conftest import read_volume
from unet_service.core.geometry import HaloGeometry
from unet_service.core.tiling import border_indices, tile_sizes
from unet_service.serving.catalog import default_model, discover
from unet_service.settings import Settings

pytest.importorskip("bioimageio.core")

from bench.zoo_packages import build_package
from unet_service.zoo.package import read_package
from unet_service.zoo.segmenter import PackageSegmenter

FP32_BOUND = 1e-5  # docs/inference.md: tiled vs one pass over the whole image, fp32
FINAL = ("done", "failed", "cancelled")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our tiny model `a` (the default), a package as a .zip and unpacked as a folder, and
    two packages the service refuses: a z axis, two inputs."""
    folder = tmp_path_factory.mktemp("models")
    save_tiny(folder, name="a", seed=1)
    build_package(folder / "pkg.zip")
    with zipfile.ZipFile(folder / "pkg.zip") as z:
        z.extractall(folder / "pkgdir")
    build_package(folder / "volume.zip", z_axis=True)
    build_package(folder / "pair.zip", two_inputs=True)
    return folder


def whole_image(package: Path, pixels: np.ndarray, weights_format: str = "torchscript"):
    """bioimageio.core's prediction of the whole (H, W) image: its public `predict` when the
    size is legal for the package, else the same pipeline on a sample of any size (its
    `predict` refuses sizes the input does not declare; the pipeline pads and crops alike)."""
    from bioimageio.core import Sample, Tensor, create_prediction_pipeline, predict
    from bioimageio.spec import load_model_description

    descr = load_model_description(package)
    legal = all((s - 32) % 8 == 0 for s in pixels.shape)
    if legal and weights_format == "torchscript":
        out = predict(model=descr, inputs=pixels[None, None])
    else:
        tensor = Tensor.from_numpy(pixels[None, None], dims=("batch", "channel", "y", "x"))
        sample = Sample(members={"raw": tensor}, stat={}, id="image")
        with create_prediction_pipeline(descr, weights_format=weights_format) as pipeline:
            out = pipeline.predict_sample_without_blocking(sample)
    return np.asarray(out.members["prob"].data)[0], descr


def assert_within_package_tolerance(actual: np.ndarray, expected: np.ndarray, descr) -> None:
    """bioimageio.core's test of a package's outputs: an element mismatches beyond
    absolute + relative * |expected|, and at most the stated mismatches per million may;
    the tolerance is the package's (config.bioimageio.reproducibility_tolerance) or the
    spec's default. Then the fp32 bound, which is tighter."""
    from bioimageio.spec.model import v0_5

    stated = descr.config.bioimageio.reproducibility_tolerance
    tol = stated[0] if stated else v0_5.ReproducibilityTolerance()
    assert actual.shape == expected.shape
    bound = tol.absolute_tolerance + tol.relative_tolerance * np.abs(expected)
    mismatched_ppm = (np.abs(actual - expected) > bound).sum() / expected.size * 1e6
    assert mismatched_ppm <= tol.mismatched_elements_per_million
    assert np.abs(actual - expected).max() <= FP32_BOUND


def test_a_package_geometry_tiles_by_its_legal_sizes_and_halo() -> None:
    g = HaloGeometry(halo=8, min_input=32, step_input=8)
    assert (g.margin, g.shrink, g.step) == (8, 16, 8)
    assert g.is_legal_output(16) and g.is_legal_output(56) and not g.is_legal_output(60)
    assert g.tile_for(60) == 56 and g.tile_for(3) == 16  # the largest legal, at least the least
    assert tile_sizes(g, 60) == (16, 32, 56)
    assert g.input_for_output(56) == 72 and g.tile_stride(56) == 56
    with pytest.raises(ValueError, match="not legal"):
        g.check_tile(60)
    fixed = HaloGeometry(halo=16, min_input=256, step_input=0)
    assert fixed.tile_for(516) == fixed.tile_for(60) == 224 and tile_sizes(fixed, 516) == (224,)
    with pytest.raises(ValueError, match="no output"):
        HaloGeometry(halo=20, min_input=40, step_input=0)


def test_border_padding_is_numpys_for_every_mode_and_any_width() -> None:
    a = np.arange(5)
    for mode in ("reflect", "symmetric", "edge"):
        for pad in (0, 1, 4, 5, 13):
            expected = np.pad(a, pad, mode=mode)
            assert np.array_equal(a[border_indices(-pad, 5 + pad, 5, mode)], expected)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("size", [(96, 120), (90, 110), (203, 150)])
def test_tiles_equal_bioimageio_core_on_the_whole_image(
    repository: Path, backend: str, size: tuple[int, int]
) -> None:
    """Several tiles (56 within the 60 asked for), sizes legal for the package and not; the
    per-sample normalisation's statistics are the whole image's, as bioimageio.core's."""
    package = repository / "pkg.zip"
    pixels = em_crop(1, 7, 3, *size)
    seg = PackageSegmenter.from_package(package, device="cpu", backend=backend)
    assert seg.backend.name == {"torch": "torchscript", "onnxruntime": "onnxruntime"}[backend]
    assert len(seg.plan(*size, 60)) >= 4
    ours = seg.segment(pixels[:, :, None], 60, probabilities=True).probabilities
    fmt = "torchscript" if backend == "torch" else "onnx"
    expected, descr = whole_image(package, pixels, fmt)
    assert_within_package_tolerance(ours, expected, descr)


@pytest.mark.slow
def test_the_built_package_passes_bioimageio_cores_own_test(repository: Path) -> None:
    from bioimageio.core import test_model

    assert test_model(repository / "pkg.zip").status == "passed"


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_package_is_served_on_v1_v2_and_jobs(repository: Path, tmp_path: Path) -> None:
    pixels = em_crop(2, 0, 0, 90, 110)
    expected, descr = whole_image(repository / "pkg.zip", pixels)
    upload = {"file": ("em.png", png_bytes(pixels))}
    app = make_app(
        repository / "a.safetensors",
        models=repository,
        jobs_dir=tmp_path / "jobs",
        job_progress_s=0.05,
    )
    async with running(app) as client:
        index = {row["name"]: row for row in (await client.post("/v2/repository/index")).json()}
        assert index["a"]["state"] == "READY" and index["pkg"]["state"] == "UNAVAILABLE"
        assert index["volume"]["state"] == "FAILED"
        assert "axes batch,channel,z,y,x" in index["volume"]["reason"]
        assert "2D" in index["volume"]["reason"]
        assert index["pair"]["state"] == "FAILED" and "2 inputs" in index["pair"]["reason"]
        # v1: probabilities, mask and cell instances.
        r = await client.post(
            "/v1/segment", params={"model": "pkg", "output": "probabilities"}, files=upload
        )
        assert r.status_code == 200 and r.headers["x-model-name"] == "pkg"
        probabilities = np.load(io.BytesIO(r.content))
        assert_within_package_tolerance(probabilities[None], expected, descr)
        index = {row["name"]: row for row in (await client.post("/v2/repository/index")).json()}
        assert index["pkg"]["state"] == "READY"
        r = await client.post("/v1/segment", params={"model": "pkg"}, files=upload)
        mask = np.asarray(Image.open(io.BytesIO(r.content))) > 0
        decided = np.abs(expected[0] - 0.5) > FP32_BOUND
        np.testing.assert_array_equal(mask[decided], (expected[0] > 0.5)[decided])
        r = await client.post(
            "/v1/segment", params={"model": "pkg", "output": "instances"}, files=upload
        )
        assert r.status_code == 200
        assert np.asarray(Image.open(io.BytesIO(r.content))).shape == pixels.shape
        # The unpacked folder is the same package.
        r = await client.post(
            "/v1/segment", params={"model": "pkgdir", "output": "probabilities"}, files=upload
        )
        np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), probabilities)
        # v2: metadata and inference.
        meta = (await client.get("/v2/models/pkg")).json()
        assert meta["platform"] == "bioimageio"
        assert meta["parameters"]["class_names"] == ["foreground"]
        assert meta["parameters"]["tile_sizes"] == [16, 32, 56]
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
        r = await client.post("/v2/models/pkg/infer", json=body)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        v2 = np.asarray(out["data"], np.float32).reshape(out["shape"])
        assert_within_package_tolerance(v2[None], expected, descr)
        # A job.
        job = await client.post(
            "/v1/jobs",
            params={"model": "pkg", "output": "probabilities"},
            files={"file": ("s.tif", tiff_bytes(pixels))},
        )
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        while (state := (await client.get(f"/v1/jobs/{job_id}")).json())["state"] not in FINAL:
            await asyncio.sleep(0.01)  # the job runs in the background
        assert state["state"] == "done", state
        result = read_volume((await client.get(f"/v1/jobs/{job_id}/result")).content)
        assert_within_package_tolerance(result[None], expected, descr)
        # The package's tiles went through the worker under its own name; the others serve.
        assert await metric(client, "unet_tiles_total", model="pkg") > 0
        r = await client.post("/v1/segment", params={"model": "volume"}, files=upload)
        assert r.status_code == 503 and "only 2D images" in r.json()["error"]
        assert (await client.get("/v2/models/pair")).status_code == 503
        r = await client.post("/v1/segment", files=upload)
        assert r.status_code == 200 and r.headers["x-model-name"] == "a"


@pytest.mark.slow
def test_unet_predict_takes_a_package_by_name(repository: Path, tmp_path: Path) -> None:
    pixels = em_crop(5, 0, 0, 70, 80)
    Image.fromarray(pixels).save(tmp_path / "em.png")
    exe = shutil.which("unet-predict", path=str(Path(sys.executable).parent))
    assert exe is not None
    argv = [exe, str(tmp_path / "em.png"), "-o", str(tmp_path / "out"), "--probabilities"]
    argv += ["--models", str(repository), "--device", "cpu", "--tile-size", "60"]
    subprocess.run([*argv, "--model", "pkg"], check=True, capture_output=True)
    expected, descr = whole_image(repository / "pkg.zip", pixels)
    assert_within_package_tolerance(np.load(tmp_path / "out" / "em.npy")[None], expected, descr)
    refused = subprocess.run([*argv, "--model", "pair"], capture_output=True, text=True)
    assert refused.returncode == 2 and "2 inputs" in refused.stderr


def test_the_default_model_is_the_first_that_can_be_served(repository: Path) -> None:
    settings = Settings(models=repository)
    models = discover(settings)
    assert list(models) == ["a", "pair", "pkg", "pkgdir", "volume"]
    assert default_model(Settings(models=repository, default_model="pkg"), models) == "pkg"
    refused_first = {"0volume": repository / "volume.zip", **models}
    assert default_model(settings, refused_first) == "a"
    assert read_package(repository / "pkg.zip").geometry.halo == 8


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_refused_default_package_stops_the_start(repository: Path, tmp_path: Path) -> None:
    app = make_app(repository / "a.safetensors", models=repository, default_model="volume")
    with pytest.raises(ValueError, match="only 2D images"):
        async with running(app):
            pass


@pytest.mark.slow
def test_without_the_extra_a_package_is_failed_and_the_rest_serves(repository: Path) -> None:
    script = f"""
import sys
sys.modules["bioimageio"] = None
from pathlib import Path
import unet_service.api.app
from unet_service.serving.catalog import discover
from unet_service.serving.models import ModelRepository
from unet_service.settings import Settings
settings = Settings(models=Path({str(repository)!r}))
repo = ModelRepository(settings, lambda name, path: None, discover(settings))
for row in repo.index():
    print(row["name"], row["state"], row.get("reason", ""))
print("default", repo.default)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: line for line in run.stdout.splitlines()}
    assert rows["a"].startswith("a UNAVAILABLE") and rows["default"] == "default a"
    assert "pip install 'unet-service[bioimageio]'" in rows["pkg"] and "FAILED" in rows["pkg"]


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_job_page_too_large_to_measure_is_refused_at_once(
    repository: Path, tmp_path: Path
) -> None:
    """The package's statistics are measured over each page in memory: a job's page over
    UNET_MAX_PIXELS is refused before it is queued (our model streams it tile by tile)."""
    page = {"file": ("s.tif", tiff_bytes(em_crop(2, 0, 0, 90, 110)))}
    app = make_app(
        repository / "a.safetensors", models=repository, jobs_dir=tmp_path, max_pixels=5000
    )
    async with running(app) as client:
        r = await client.post("/v1/jobs", params={"model": "pkg"}, files=page)
        assert r.status_code == 413 and "statistics of the whole page" in r.json()["error"]
        assert (await client.post("/v1/jobs", params={"model": "a"}, files=page)).status_code == 202


@pytest.mark.anyio
async def test_asking_for_a_refused_package_unloads_nothing(repository: Path) -> None:
    """A refused package is known without loading it: a request for it is a 503 with the
    reason, and the loaded models stay loaded even at UNET_MAX_LOADED_MODELS."""
    app = make_app(repository / "a.safetensors", models=repository, max_loaded_models=2)
    upload = {"file": ("em.png", png_bytes(em_crop(3, 0, 0, 64, 64)))}
    async with running(app) as client:
        r = await client.post("/v1/segment", params={"model": "pkg"}, files=upload)
        assert r.status_code == 200
        for _ in range(2):
            r = await client.post("/v1/segment", params={"model": "pair"}, files=upload)
            assert r.status_code == 503 and "2 inputs" in r.json()["error"]
        index = {row["name"]: row for row in (await client.post("/v2/repository/index")).json()}
        assert index["a"]["state"] == index["pkg"]["state"] == "READY"


@pytest.mark.anyio
async def test_unet_weights_may_name_a_package(repository: Path) -> None:
    app = make_app(repository / "pkg.zip")
    upload = {"file": ("em.png", png_bytes(em_crop(3, 0, 0, 64, 64)))}
    async with running(app) as client:
        r = await client.post("/v1/segment", files=upload)
        assert r.status_code == 200 and r.headers["x-model-name"] == "pkg"
