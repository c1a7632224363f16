"""unet-predict on real EM slices with a tiny real model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import isbi_slice, read_volume
from unet_service.cli.predict import main
from unet_service.core.engine import Segmenter


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = []
    for i, (h, w) in enumerate([(512, 512), (37, 300)]):
        path = tmp_path / "in" / f"slice{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(isbi_slice(i)[:h, :w]).save(path)
        paths.append(path)
    return paths


def test_writes_masks_and_probabilities(tiny_weights: Path, images: list[Path], tmp_path) -> None:
    out = tmp_path / "out"
    argv = [*map(str, images), "-o", str(out), "--weights", str(tiny_weights), "--tile-size", "96"]
    assert main([*argv, "--probabilities"]) == 0
    seg = Segmenter.from_weights(tiny_weights, device="cpu")
    for path in images:
        image = np.asarray(Image.open(path))
        mask = np.asarray(Image.open(out / f"{path.stem}.png"))
        probs = np.load(out / f"{path.stem}.npy")
        assert mask.shape == probs.shape == image.shape
        assert probs.dtype == np.float32
        assert set(np.unique(mask)) <= {0, 255}
        expected = seg.segment(image[..., None], tile_size=96, probabilities=True)
        # Masks are equal wherever float noise (<= 1e-5, docs/inference.md's bound) cannot flip
        # them.
        decided = np.abs(expected.probabilities[0] - seg.card.threshold) > 1e-5
        assert np.array_equal(mask[decided], expected.mask[decided] * 255)
        assert np.abs(probs - expected.probabilities[0]).max() <= 1e-5
        # The tile size changes the work, not the result.
        other_tiles = seg.segment(image[..., None], tile_size=36).mask
        assert np.array_equal(other_tiles[decided], expected.mask[decided])


def test_a_stack_gives_imagej_volumes_each_page_as_if_alone(
    tiny_weights: Path, tmp_path: Path
) -> None:
    pages = [isbi_slice(i)[:70, :90] for i in range(3)]
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "stack.tif", np.stack(pages), photometric="minisblack")
    singles = []
    for i, page in enumerate(pages):
        singles.append(tmp_path / "in" / f"page{i}.png")
        Image.fromarray(page).save(singles[-1])
    out = tmp_path / "out"
    argv = ["-o", str(out), "--weights", str(tiny_weights), "--tile-size", "60", "--instances"]
    assert main([str(tmp_path / "in" / "stack.tif"), *map(str, singles), *argv]) == 0
    masks = read_volume(out / "stack.tif")
    labels = read_volume(out / "stack.instances.tif")
    assert masks.shape == labels.shape == (3, 70, 90)
    assert masks.dtype == np.uint8 and labels.dtype == np.uint16
    for i in range(3):
        assert np.array_equal(masks[i], np.asarray(Image.open(out / f"page{i}.png")))
        assert np.array_equal(labels[i], np.asarray(Image.open(out / f"page{i}.instances.png")))


def test_bad_image_is_reported_and_the_rest_still_done(
    tiny_weights: Path, images: list[Path], tmp_path: Path, capsys
) -> None:
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main([str(bad), str(images[1]), "-o", str(out), "--weights", str(tiny_weights)]) == 1
    assert "broken.png" in capsys.readouterr().err
    assert (out / "slice1.png").is_file() and not (out / "broken.npy").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tile-size", "390"], "nearest legal"),
        (["--weights", "missing.safetensors"], "not found"),
        (["--precision", "fp16", "--device", "cpu"], "fp16 is supported on CUDA"),
    ],
)
def test_one_line_errors(
    tiny_weights: Path, images: list[Path], tmp_path: Path, capsys, extra, message
) -> None:
    argv = [str(images[0]), "-o", str(tmp_path / "o"), "--weights", str(tiny_weights), *extra]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unet-predict: error:") and message in err and "\n" not in err


def test_console_script_runs(tiny_weights: Path, images: list[Path], tmp_path: Path) -> None:
    exe = shutil.which("unet-predict", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("unet-predict is not installed in this environment")
    out = tmp_path / "cli"
    proc = subprocess.run(
        [exe, str(images[1]), "--output-dir", str(out), "--weights", str(tiny_weights)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert np.asarray(Image.open(out / "slice1.png")).shape == (37, 300)


def test_outputs_never_overwrite_inputs_or_each_other(tiny_weights: Path, tmp_path: Path) -> None:
    slice_png = tmp_path / "a" / "x.png"
    other = tmp_path / "b" / "x.png"
    for path in (slice_png, other):
        path.parent.mkdir()
        Image.fromarray(isbi_slice(0)[:40, :40]).save(path)
    before = slice_png.read_bytes()
    weights = ["--weights", str(tiny_weights)]
    with pytest.raises(SystemExit) as same:
        main([str(slice_png), "-o", str(slice_png.parent), *weights])
    assert same.value.code == 2 and slice_png.read_bytes() == before
    with pytest.raises(SystemExit) as clash:
        main([str(slice_png), str(other), "-o", str(tmp_path / "out"), *weights])
    assert clash.value.code == 2 and not (tmp_path / "out").exists()
