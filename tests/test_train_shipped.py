"""The shipped default model: its card's metrics are what `unet-eval` measures now, and it
meets the issue's target on its validation slices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ISBI
from unet_service.core.engine import DEFAULT_WEIGHTS
from unet_service.core.weights import ModelCard, load_card
from unet_service.training.evaluate import main


@pytest.fixture(scope="module")
def card() -> ModelCard:
    if not (ISBI / "train").is_dir():
        pytest.skip(f"ISBI data not found at {ISBI}")
    return load_card(DEFAULT_WEIGHTS)


def test_card_records_how_the_model_was_made(card: ModelCard) -> None:
    training = card.training
    assert training["command"].startswith("unet-train ")
    assert isinstance(training["seed"], int)
    assert training["data"].endswith("isbi2012/train")
    assert set(training["validation_slices"]).isdisjoint(training["train_slices"])
    assert card.class_names == ["cell_interior"]
    assert card.metrics["slices"] == training["validation_slices"]
    assert card.metrics["threshold"] == card.threshold
    assert DEFAULT_WEIGHTS.stat().st_size < 20 * 2**20


def test_unet_eval_reproduces_the_card_metrics(card: ModelCard, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    slices = ",".join(str(int(s)) for s in card.metrics["slices"])
    tile = str(card.metrics["tile_size"])
    args = [str(DEFAULT_WEIGHTS), "--slices", slices, "--tile-size", tile, "--json", str(out)]
    assert main([*args, "--device", "cpu"]) == 0
    measured = json.loads(out.read_text())
    assert measured["slices"] == card.metrics["slices"]
    # Another CPU may round a few convolutions differently and flip a handful of pixels on
    # the threshold; the Rand error, being about connectivity, gets a wider margin.
    for key in ("mismatch", "dice", "iou"):
        assert measured["overall"][key] == pytest.approx(card.metrics["overall"][key], abs=2e-4)
    assert measured["overall"]["components_rand_error"] == pytest.approx(
        card.metrics["overall"]["components_rand_error"], abs=5e-3
    )
    for name, row in card.metrics["per_image"].items():
        assert measured["per_image"][name]["mismatch"] == pytest.approx(row["mismatch"], abs=5e-4)


def test_shipped_model_keeps_its_measured_accuracy(card: ModelCard) -> None:
    """Guards against shipping a worse model, on the scores #13 defines: the challenge's
    pixel error, and the Rand error of the served cell instances no worse than the model
    before these weights (0.0425 on these slices; see weights/README.md). The plain
    mismatch is bounded too: predicting "cell interior" everywhere scores 0.21 on these
    slices. (The one-threshold Rand error of connected components is not bounded: a single
    gap in a membrane moves it by 0.05, and the served instances do not use it.)"""
    metrics = card.metrics
    assert metrics["overall"]["mismatch"] <= 0.08
    assert metrics["challenge"]["pixel_error"] <= 0.05
    assert metrics["instances"]["rand_error"] < 0.0425
    assert card.instances is not None
    assert metrics["instances"]["params"] == card.instances.model_dump()


def test_card_records_bf16_agreement_with_fp32(card: ModelCard) -> None:
    """What bf16 does to the masks, measured by `unet-eval --precision bf16 --update-card`
    on the validation slices: >= 99.9% of mask pixels as in fp32, mismatch within 0.002."""
    bf16 = card.metrics["precisions"]["bf16"]
    assert bf16["slices"] == card.metrics["slices"]
    assert bf16["overall"]["agreement_with_fp32"] >= 0.999
    assert abs(bf16["overall"]["mismatch"] - card.metrics["overall"]["mismatch"]) <= 0.002
