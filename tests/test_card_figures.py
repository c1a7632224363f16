"""The model card's figures under one name each: `pixel_error` only on the ISBI 2012
challenge's scale, the mismatch and the components' Rand error under their own names, old
cards read in today's names; the shipped card describes its model; and docs/training.md and
weights/README.md quote the card's figures, figure for figure. (tests/test_web_card.py
holds the v2 metadata and the web page to the same figures.)"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from conftest import REPO
from unet_service.core.engine import DEFAULT_WEIGHTS
from unet_service.core.weights import ModelCard, card_path, load_card

OLD_AT_THRESHOLD = {
    "pixel_error": 0.0785,
    "mismatch": 0.0785,
    "dice": 0.95,
    "iou": 0.9,
    "rand_error": 0.18,
    "rand_precision": 0.7,
    "rand_recall": 0.93,
}


def old_card() -> dict[str, Any]:
    """A card as `unet-eval` and `unet-train` wrote them before this naming."""
    return {
        "name": "old",
        "channels": [1, 4, 8, 16],
        "threshold": 0.35,
        "training": {
            "validation_slices": ["20", "21"],
            "validation_pixel_error_at_best": 0.0785,
            "init": {"training": {"validation_pixel_error_at_best": 0.079}},
        },
        "metrics": {
            "slices": ["20", "21"],
            "threshold": 0.35,
            "overall": dict(OLD_AT_THRESHOLD),
            "per_image": {"20": {"pixel_error": 0.08, "rand_error": 0.2}},  # no `mismatch` yet
            "challenge": {"pixel_error": 0.0493, "pixel_error_threshold": 0.3},
            "tta8": {"overall": dict(OLD_AT_THRESHOLD)},
            "precisions": {"bf16": {"overall": {**OLD_AT_THRESHOLD, "agreement_with_fp32": 1}}},
        },
    }


def pixel_error_paths(tree: Any, path: str = "") -> list[str]:
    """Where a `pixel_error` key occurs in a card's JSON."""
    if isinstance(tree, dict):
        found = [f"{path}.{k}" for k in tree if k == "pixel_error"]
        for key, value in tree.items():
            found += pixel_error_paths(value, f"{path}.{key}")
        return found
    if isinstance(tree, list):
        return [p for i, v in enumerate(tree) for p in pixel_error_paths(v, f"{path}[{i}]")]
    return []


def test_an_old_card_is_read_with_todays_names() -> None:
    card = ModelCard.model_validate(old_card())
    metrics = card.metrics
    expected = {
        "mismatch": 0.0785,
        "dice": 0.95,
        "iou": 0.9,
        "components_rand_error": 0.18,
        "components_rand_precision": 0.7,
        "components_rand_recall": 0.93,
    }
    assert metrics["overall"] == expected  # in the order it was written
    assert list(metrics["overall"]) == list(expected)
    assert metrics["per_image"]["20"] == {"mismatch": 0.08, "components_rand_error": 0.2}
    assert metrics["tta8"]["overall"] == expected
    assert metrics["precisions"]["bf16"]["overall"] == {**expected, "agreement_with_fp32": 1}
    assert metrics["challenge"]["pixel_error"] == 0.0493  # the challenge's own: kept
    assert pixel_error_paths(card.model_dump()) == [".metrics.challenge.pixel_error"]
    assert card.training["validation_mismatch_at_best"] == 0.0785
    assert card.training["init"]["training"] == {"validation_mismatch_at_best": 0.079}
    # The summary calls each figure by its name: the mismatch is not a pixel error.
    summary = card.metrics_summary()
    assert list(summary) == ["pixel_error", "mismatch"]
    assert summary["pixel_error"]["value"] == 0.0493
    assert summary["mismatch"]["value"] == 0.0785
    assert summary["mismatch"]["measured_on"] == "validation slices 20, 21 (held out from training)"
    # Read again, a current card is what it was.
    assert ModelCard.model_validate(card.model_dump()) == card


@pytest.fixture(scope="module")
def shipped() -> ModelCard:
    return load_card(DEFAULT_WEIGHTS)


def test_the_shipped_card_names_pixel_error_only_on_the_challenge_scale(
    shipped: ModelCard,
) -> None:
    on_disk = json.loads(card_path(DEFAULT_WEIGHTS).read_text())
    assert pixel_error_paths(on_disk) == [
        ".metrics.challenge.pixel_error",
        ".metrics.tta8.challenge.pixel_error",
    ]
    # As read, as written: the file is already in today's names.
    assert ModelCard.model_validate(on_disk).model_dump() == on_disk
    summary = shipped.metrics_summary()
    metrics = shipped.metrics
    assert {k: v["value"] for k, v in summary.items()} == {
        "pixel_error": metrics["challenge"]["pixel_error"],
        "instances_rand_error": metrics["instances"]["rand_error"],
        "mismatch": metrics["overall"]["mismatch"],
    }
    for figure in summary.values():
        assert figure["slices"] == ["20", "21", "22", "23"]
        assert figure["measured_on"] == "validation slices 20-23 (held out from training)"
        assert figure["command"] == metrics["command"]
    assert "0.0611" in summary["pixel_error"]["definition"]
    assert "1 - V_Rand" in summary["instances_rand_error"]["label"]
    assert summary["instances_rand_error"]["params"] == shipped.instances.model_dump()
    assert summary["mismatch"]["label"] == "mismatch at threshold 0.3"


def test_the_shipped_card_describes_its_model(shipped: ModelCard) -> None:
    text = shipped.description
    for words in (
        "Cell interiors versus neuronal membranes",
        "serial-section transmission electron microscopy",
        "Drosophila",
        "ventral nerve cord",
        "ISBI 2012",
        "4 x 4 nm pixels",
        "50 nm",
        "slices 00-19",
        "held out for validation",
        "clDice",
        "Known failures",
        "validation slice 20",
    ):
        assert words in text, words


def table_row(markdown: str, first_cell: str) -> list[str]:
    """The cells of the one table row whose first cell is `first_cell`, bold and the
    '(at 0.3)' of a best threshold stripped."""
    rows = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("**", "") for c in line.strip("| ").split("|")]
            rows.append([re.sub(r"\s*\(at [0-9.]+\)$", "", c) for c in cells])
    found = [row for row in rows if row[0] == first_cell]
    assert len(found) == 1, f"{len(found)} rows start with {first_cell!r}"
    return found[0]


def four(value: float) -> str:
    return f"{value:.4f}"


# The docs' table of the shipped model's figures (the README links to it).
FIGURES_DOC = REPO / "docs" / "training.md"


def test_the_docs_quote_the_cards_figures(shipped: ModelCard) -> None:
    doc = FIGURES_DOC.read_text()
    assert "## The shipped model's figures" in doc
    for figure in shipped.metrics_summary().values():
        assert table_row(doc, figure["label"])[1] == four(figure["value"]), figure["label"]


def test_weights_readme_quotes_the_cards_figures(shipped: ModelCard) -> None:
    readme = (REPO / "weights" / "README.md").read_text()
    m = shipped.metrics
    row = table_row(readme, "version 2 (shipped)")
    challenge, instances = m["challenge"], m["instances"]
    assert row[1:] == [
        four(challenge["pixel_error"]),
        four(challenge["rand_error"]),
        four(instances["rand_error"]),
        four(instances["v_rand"]),
        four(instances["v_info"]),
        four(m["overall"]["mismatch"]),
    ]
    tta = m["tta8"]
    assert table_row(readme, "same, 8-way averaging (`tta=8`)")[1:] == [
        four(tta["challenge"]["pixel_error"]),
        four(tta["challenge"]["rand_error"]),
        four(tta["instances"]["rand_error"]),
        four(tta["instances"]["v_rand"]),
        four(tta["instances"]["v_info"]),
        four(tta["overall"]["mismatch"]),
    ]
    keys = ("mismatch", "dice", "iou", "components_rand_error")
    assert table_row(readme, "all four")[1:] == [four(m["overall"][k]) for k in keys]
    for name, figures in m["per_image"].items():
        assert table_row(readme, name)[1:] == [four(figures[k]) for k in keys], name
    header = table_row(readme, "slice")
    assert header[1:] == ["mismatch", "Dice", "IoU", "Rand error of components"]
