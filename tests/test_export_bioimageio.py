"""`unet-export bioimageio`: the packages pass bioimageio.core's own model test in all three
weight formats, declare the legal tile sizes and the valid convolutions' shrink, and predict
what the service answers. A tiny real UNet for most; the shipped model once, through the
command line and the `bioimageio test` command."""

from __future__ import annotations

import ast
import asyncio
import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import bioimageio.core
import numpy as np
import pytest
from bioimageio.core import create_prediction_pipeline, load_model_description, predict
from bioimageio.spec import settings as bioimageio_settings
from bioimageio.spec.model import v0_5
from PIL import Image

from conftest import ISBI, REPO, TINY_CHANNELS, isbi_slice, tiny_unet
from unet_service.cli.export import main
from unet_service.core import unet
from unet_service.core.engine import Segmenter
from unet_service.core.geometry import Geometry
from unet_service.core.weights import ModelCard, load_card, save_weights
from unet_service.interop.bioimageio_export import export_bioimageio
from unet_service.interop.bioimageio_sample import recorded_sample

FORMATS = ("pytorch_state_dict", "torchscript", "onnx")
SHIPPED = REPO / "weights" / "isbi2012.safetensors"


def sample_slice() -> Path:
    path = ISBI / "train" / "image" / "20.png"
    if not path.is_file():
        pytest.skip(f"ISBI data not found at {ISBI}")
    return path


@pytest.fixture(autouse=True, scope="module")
def bioimageio_cache_in_a_temporary_folder(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[None]:
    """bioimageio keeps downloads in a user cache; these tests download nothing, and keep
    even the cache's folder out of the user's."""
    previous = bioimageio_settings.cache_path
    bioimageio_settings.cache_path = tmp_path_factory.mktemp("bioimageio-cache")
    yield
    bioimageio_settings.cache_path = previous


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    card = ModelCard(
        name="tiny",
        channels=TINY_CHANNELS,
        class_names=["cell_interior"],
        normalization={"mean": [0.5], "std": [0.25]},
    )
    return save_weights(tiny_unet(), card, tmp_path_factory.mktemp("tiny") / "tiny.safetensors")


@pytest.fixture(scope="module")
def tiny_package(tiny_model: Path) -> Path:
    return export_bioimageio(tiny_model, tiny_model.with_suffix(".zip"), sample=sample_slice())


@pytest.fixture(scope="module")
def shipped_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model exported by the command line, as the docs show it."""
    out = tmp_path_factory.mktemp("shipped") / "isbi2012.zip"
    argv = ["bioimageio", str(SHIPPED), "-o", str(out), "--sample", str(sample_slice())]
    assert main([*argv, "--tag", "electron-microscopy", "--tag", "cell-membrane"]) == 0
    return out


def assert_passed_in_every_format(summary: dict) -> None:
    """A `bioimageio test` summary (as JSON) passed, and tested each of the three formats:
    the test outputs reproduced, and inference at sizes min + n * step, n = 0, 1, 2."""
    assert summary["status"] == "passed", [
        (d["name"], d["errors"]) for d in summary["details"] if d["status"] != "passed"
    ]
    for weights in FORMATS:
        ran = [d for d in summary["details"] if d["loc"] == ["weights", weights]]
        names = [d["name"] for d in ran]
        assert f"Reproduce test outputs from test inputs ({weights})" in names
        assert sum("size parameter n" in name for name in names) == 6  # batch 1, 2 x n 0, 1, 2
        assert all(d["status"] == "passed" for d in ran)


def test_the_tiny_package_passes_bioimageio_test_in_all_three_formats(tiny_package: Path) -> None:
    summary = bioimageio.core.test_model(tiny_package)
    assert_passed_in_every_format(json.loads(summary.model_dump_json()))


@pytest.mark.slow
def test_the_shipped_package_passes_the_bioimageio_test_command(
    shipped_package: Path, tmp_path: Path
) -> None:
    report = tmp_path / "summary.json"
    command = [str(Path(sys.executable).with_name("bioimageio")), "test", str(shipped_package)]
    run = subprocess.run([*command, "--summary", str(report)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_passed_in_every_format(json.loads(report.read_text()))


def test_a_package_whose_preprocessing_differs_from_the_card_fails_the_test(
    tiny_package: Path, tmp_path: Path
) -> None:
    """The test has teeth: the same package scaling its uint8 pixels as if 16-bit."""
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(tiny_package) as source, zipfile.ZipFile(broken, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "rdf.yaml":
                text = data.decode()
                assert f"gain: {1 / 255!r}" in text
                data = text.replace(f"gain: {1 / 255!r}", f"gain: {1 / 65535!r}").encode()
            target.writestr(item, data)
    summary = bioimageio.core.test_model(broken, weight_format="onnx")
    failed = [d.name for d in summary.details if d.status == "failed"]
    assert failed == ["Reproduce test outputs from test inputs (onnx)"]


@pytest.mark.parametrize("which", ["tiny", "shipped"])
def test_the_axes_are_the_legal_tiles_and_the_output_shrinks_by_the_margins(
    which: str, request: pytest.FixtureRequest
) -> None:
    package = request.getfixturevalue(f"{which}_package")
    model = load_model_description(package)
    geometry = Geometry(load_card(SHIPPED).depth if which == "shipped" else len(TINY_CHANNELS) - 2)
    (model_input,) = model.inputs
    assert [str(a.id) for a in model_input.axes] == ["batch", "channel", "y", "x"]
    for axis in model_input.axes[2:]:
        size = axis.size
        assert isinstance(size, v0_5.ParameterizedSize) and size.step == geometry.step
        # The smallest input is that of the smallest legal tile, and every step is one too.
        assert size.min == geometry.input_for_output(geometry.min_tile)
        for n in range(6):
            geometry.check_tile(geometry.output_for_input(size.get_size(n)))
        with pytest.raises(ValueError):
            geometry.check_tile(size.min - geometry.step - geometry.shrink)
    for n in range(3):
        inputs, outputs = model.get_axis_sizes(
            {(model_input.id, a.id): n for a in model_input.axes[2:]}
        )
        for axis in ("y", "x"):
            side = inputs[(model_input.id, v0_5.AxisId(axis))]
            assert outputs[(model.outputs[0].id, v0_5.AxisId(axis))] == side - geometry.shrink
    if which == "shipped":
        assert model_input.axes[2].size.min == 204 and model_input.axes[2].size.step == 16


@pytest.mark.parametrize("weights", FORMATS)
def test_the_package_predicts_what_the_service_answers(
    weights: str, tiny_model: Path, tiny_package: Path
) -> None:
    """An image the service tiles into several tiles; the package, given the mirror-padded
    canvas that the tiles reproduce (a legal input), returns the same probabilities."""
    image = isbi_slice(3)[40:170, 100:250, None]  # 130 x 150, not square, not a legal size
    seg = Segmenter.from_weights(tiny_model, device="cpu")
    expected = seg.segment(image, tile_size=48, probabilities=True).probabilities
    plan = seg.plan(*image.shape[:2], tile_size=48)
    assert len(plan) > 1
    canvas = plan.padded_image(image).transpose(2, 0, 1)[None]  # (1, C, H', W') uint8
    model = load_model_description(tiny_package)
    # predict() loads and unloads the pipeline itself.
    pipeline = create_prediction_pipeline(model, weight_format=weights, devices=["cpu"])
    sample = predict(model=pipeline, inputs={"input": canvas})
    got = sample.members["output"].data.to_numpy()
    assert got.shape == (1, 1, *(s - seg.geometry.shrink for s in canvas.shape[2:]))
    np.testing.assert_allclose(got[0, :, : image.shape[0], : image.shape[1]], expected, atol=1e-5)


def test_the_architecture_is_the_services_unet_and_stands_alone(
    tiny_package: Path, tmp_path: Path
) -> None:
    """unet.py is core/unet.py as it is, imports only torch and the standard library, and
    loads the package's state dict where unet_service cannot be imported."""
    with zipfile.ZipFile(tiny_package) as package:
        package.extractall(tmp_path)
    source = (tmp_path / "unet.py").read_text()
    assert source == Path(unet.__file__).read_text()
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported <= {"__future__", "dataclasses", "torch"}
    script = (
        "import sys, importlib.util, torch\n"
        "sys.modules['unet_service'] = None\n"
        "spec = importlib.util.spec_from_file_location('arch', 'unet.py')\n"
        "arch = importlib.util.module_from_spec(spec); sys.modules['arch'] = arch\n"
        "spec.loader.exec_module(arch)\n"
        f"net = arch.UNetProbabilities(channels={TINY_CHANNELS}, out_channels=1)\n"
        "net.load_state_dict(torch.load('weights.pt', weights_only=True))\n"
        "out = net.eval()(torch.zeros(1, 1, 44, 44))\n"
        "assert out.shape == (1, 1, 4, 4) and 0 <= out.min() <= out.max() <= 1\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr


def test_the_page_cover_and_metadata_come_from_the_card(shipped_package: Path) -> None:
    card = load_card(SHIPPED)
    with zipfile.ZipFile(shipped_package) as package:
        page = package.read("README.md").decode()
        cover = Image.open(io.BytesIO(package.read("cover.png")))
    assert cover.size[0] == 2 * cover.size[1]
    summary = card.metrics_summary()
    for figure in ("pixel_error", "instances_rand_error", "mismatch"):
        assert f"| {summary[figure]['label']} | {summary[figure]['value']:.4g} |" in page
    assert "validation slices 20-23 (held out from training)" in page
    assert f"mean {card.normalization.mean} and std {card.normalization.std}" in page
    model = load_model_description(shipped_package)
    assert model.name == "isbi2012 U-Net"
    assert len(model.description) <= 512 and card.description.startswith(model.description)
    assert {"electron-microscopy", "cell-membrane", "unet", "pytorch"} <= set(model.tags)
    assert [c.doi for c in model.cite] == [v0_5.Doi("10.1007/978-3-319-24574-4_28")]
    assert model.outputs[0].axes[1].channel_names == card.class_names


def test_uint16_samples_are_scaled_as_the_service_scales_them(
    tiny_model: Path, tmp_path: Path
) -> None:
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(isbi_slice(20).astype(np.uint16) * 257).save(sixteen)
    package = export_bioimageio(tiny_model, tmp_path / "sixteen.zip", sample=sixteen)
    model = load_model_description(package)
    assert model.inputs[0].data.type == "uint16"
    assert model.inputs[0].preprocessing[1].kwargs.gain == pytest.approx(1 / 65535)
    assert (
        bioimageio.core.test_model(package, weight_format="pytorch_state_dict").status == "passed"
    )


def test_the_default_sample_is_the_first_validation_slice_the_card_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = sample_slice()
    monkeypatch.chdir(REPO)  # the card records the data relative to the checkout
    assert recorded_sample(load_card(SHIPPED)).resolve() == expected.resolve()
    monkeypatch.chdir(REPO / "tests")
    assert recorded_sample(load_card(SHIPPED)) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.safetensors"], "weights file missing.safetensors not found"),
        (["{tiny}"], "no sample image: pass --sample IMAGE"),
        (["{tiny}", "--sample", "{small}"], "the sample image is 40x30; this model needs"),
        (["{tiny}", "--sample", "{tiny}"], "tiny.safetensors: not a supported image"),
        (["{tiny}", "--sample", "missing.png"], "sample image missing.png: [Errno 2]"),
        (["{tiny}", "--sample", "{slice}", "--license", "not-a-license"], "license"),
    ],
)
def test_errors_are_one_line(
    args: list[str], message: str, tiny_model: Path, tmp_path: Path, capsys
) -> None:
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(small)
    names = {"tiny": tiny_model, "small": small, "slice": sample_slice()}
    argv = ["bioimageio", *(a.format(**names) for a in args), "-o", str(tmp_path / "x.zip")]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("unet-export: error: ") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "x.zip").exists()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_the_exported_package_served_from_a_repository_answers_as_its_weights(
    backend: str, tiny_model: Path, tiny_package: Path, tmp_path: Path
) -> None:
    """Our package back in a model repository: its valid convolutions' offset is the trim of
    its tiles, so the service tiles it exactly as it tiles the weights themselves, over HTTP
    too (the package's own sizes, min + n * step)."""
    from app_helpers import make_app, png_bytes, running

    from unet_service.zoo.segmenter import PackageSegmenter

    image = isbi_slice(5)[30:230, 60:235]  # 200 x 175: several tiles, not a legal size
    served = PackageSegmenter.from_package(tiny_package, device="cpu", backend=backend)
    weights = Segmenter.from_weights(tiny_model, device="cpu")
    assert served.geometry.shrink == weights.geometry.shrink
    assert served.geometry.trim == weights.geometry.margin and served.geometry.halo == 0
    assert served.package.card == load_card(tiny_model)
    assert len(served.plan(*image.shape, 48)) > 1
    ours = served.segment(image[:, :, None], 48, probabilities=True).probabilities
    expected = weights.segment(image[:, :, None], 48, probabilities=True).probabilities
    np.testing.assert_allclose(ours, expected, atol=1e-5)

    folder = tmp_path / "models"
    folder.mkdir()
    for suffix in (".safetensors", ".json"):
        (folder / f"tiny{suffix}").write_bytes(tiny_model.with_suffix(suffix).read_bytes())
    (folder / "exported.zip").write_bytes(tiny_package.read_bytes())
    app = make_app(tiny_model, models=folder, default_model="tiny", backend=backend)

    async def both() -> list[np.ndarray]:
        answers = []
        async with running(app) as client:
            for name in ("exported", "tiny"):
                r = await client.post(
                    "/v1/segment",
                    params={"model": name, "output": "probabilities"},
                    files={"file": ("em.png", png_bytes(image))},
                )
                assert r.status_code == 200, r.text
                answers.append(np.load(io.BytesIO(r.content)))
        return answers

    package_answer, weights_answer = asyncio.run(both())
    np.testing.assert_allclose(package_answer, weights_answer, atol=1e-5)
    # The package declares uint8 inputs: 16-bit and float images of the same picture are
    # brought to its scale as the service scales them for the weights.
    for same in (image.astype(np.uint16) * 257, image.astype(np.float32) / 255):
        again = served.segment(same[:, :, None], 48, probabilities=True).probabilities
        np.testing.assert_allclose(again, ours, atol=1e-6)


def test_a_repository_serving_our_package_keeps_the_cards_threshold_and_figures(
    shipped_package: Path,
) -> None:
    """The package carries the card (config.unet_service.card): masks at 0.3, not the 0.5 of
    packages that say nothing, the instance parameters and the validation figures."""
    from unet_service.serving.catalog import package_info
    from unet_service.settings import Settings
    from unet_service.zoo.package import read_package
    from unet_service.zoo.segmenter import PackageSegmenter

    card = load_card(SHIPPED)
    package = read_package(shipped_package)
    assert package.card == card and package.threshold == card.threshold == 0.3
    served = PackageSegmenter(package, device="cpu")
    assert served.instance_params == card.instances
    info = package_info("isbi2012", package, Settings())
    assert info.threshold == 0.3 and info.metrics == card.metrics_summary() != {}
