"""`unet-eval` on a tiny real UNet and real ISBI crops: its numbers are the metrics of the
masks the engine produces, written as JSON; bad input is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_card_figures import pixel_error_paths

from conftest import isbi_pairs
from unet_service.core.engine import Segmenter
from unet_service.core.weights import card_path, load_card
from unet_service.training.evaluate import main
from unet_service.training.scores import confusion, rand_error


@pytest.fixture
def pairs_dir(tmp_path: Path) -> Path:
    return isbi_pairs(tmp_path / "pairs", [4, 5], (0, 0, 96, 80))


def test_eval_reports_the_metrics_of_the_engine_masks(
    tiny_weights: Path, pairs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    args = [str(tiny_weights), "--data", str(pairs_dir), "--tile-size", "36", "--json", str(out)]
    assert main([*args, "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["slices"] == ["04", "05"] and report["rand_connectivity"] == 4
    seg = Segmenter.from_weights(tiny_weights, device="cpu")
    pooled = None
    for name in ("04", "05"):
        image = np.asarray(Image.open(pairs_dir / "image" / f"{name}.png"))[:, :, None]
        label = np.asarray(Image.open(pairs_dir / "label" / f"{name}.png")) > 127
        mask = seg.segment(image, tile_size=36).mask
        counts = confusion(mask, label)
        pooled = counts if pooled is None else pooled + counts
        row = report["per_image"][name]
        assert row["mismatch"] == pytest.approx(counts.mismatch, abs=1e-6)
        assert row["dice"] == pytest.approx(counts.dice, abs=1e-6)
        assert row["components_rand_error"] == pytest.approx(
            rand_error(mask, label).error, abs=1e-6
        )
        # `pixel_error` is the challenge's scale only (core.card_metrics).
        assert "pixel_error" not in row and "rand_error" not in row
    assert report["overall"]["mismatch"] == pytest.approx(pooled.mismatch, abs=1e-6)
    assert "pixel_error" not in report["overall"]
    assert 0 <= report["challenge"]["pixel_error"] <= 1
    printed = capsys.readouterr().out
    assert "overall" in printed and "04" in printed


def test_update_card_and_precision_agreement(tiny_weights: Path, pairs_dir: Path) -> None:
    args = [str(tiny_weights), "--data", str(pairs_dir), "--slices", "1", "--device", "cpu"]
    assert main([*args, "--update-card"]) == 0
    metrics = load_card(tiny_weights).metrics
    assert metrics["slices"] == ["05"] and metrics["precision"] == "fp32"
    # On disk, `pixel_error` is the challenge's scale only; the mismatch has its own name.
    written = json.loads(card_path(tiny_weights).read_text())
    assert pixel_error_paths(written) == [".metrics.challenge.pixel_error"]
    assert written["metrics"]["overall"]["mismatch"] == metrics["overall"]["mismatch"]
    assert main([*args, "--precision", "bf16", "--update-card"]) == 0
    after = load_card(tiny_weights).metrics
    # bf16 goes beside the fp32 metrics, which stay the card's own.
    assert after["precision"] == "fp32" and after["overall"] == metrics["overall"]
    bf16 = after["precisions"]["bf16"]["overall"]
    assert 0.9 < bf16["agreement_with_fp32"] <= 1.0
    # Re-measuring fp32 keeps the other precisions' entries.
    assert main([*args, "--update-card"]) == 0
    assert load_card(tiny_weights).metrics["precisions"]["bf16"]["overall"] == bf16


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--slices", "9"], "out of range"),
        (["--slices", "x"], "bad slice list"),
        (["--tile-size", "37"], "not legal"),
        (["--precision", "fp16", "--device", "cpu"], "fp16 is supported on CUDA"),
    ],
)
def test_bad_input_is_a_one_line_error(
    tiny_weights: Path,
    pairs_dir: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([str(tiny_weights), "--data", str(pairs_dir), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unet-eval: error: " in err and message in err


def test_missing_weights_and_unpaired_data(
    tiny_weights: Path, pairs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([str(tiny_weights.with_name("none.safetensors")), "--data", str(pairs_dir)])
    assert "not found" in capsys.readouterr().err
    (pairs_dir / "label" / "05.png").unlink()
    with pytest.raises(SystemExit):
        main([str(tiny_weights), "--data", str(pairs_dir)])
    assert "do not pair up: 05" in capsys.readouterr().err
