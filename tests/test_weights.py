"""Weights round trip through safetensors + card, and clear errors for bad files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import tiny_unet
from unet_service.core.weights import (
    ModelCard,
    WeightsError,
    card_path,
    load_card,
    load_weights,
    save_weights,
)


def test_round_trip_gives_identical_outputs(tiny_weights: Path) -> None:
    model, card = load_weights(tiny_weights)
    assert not model.training
    assert card.channels == [1, 4, 8, 16] and card.class_names == ["cell_interior"]
    x = torch.rand(2, 1, 80, 80)
    with torch.no_grad():
        assert torch.equal(model(x), tiny_unet()(x))


def test_files_are_safetensors_and_json_not_pickle(tiny_weights: Path) -> None:
    raw = tiny_weights.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "unet-service/1"
    assert not raw.startswith(b"\x80")  # no pickle protocol marker
    assert json.loads(card_path(tiny_weights).read_text())["channels"] == [1, 4, 8, 16]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_weights(tmp_path / "nope.safetensors")


def test_missing_card(tiny_weights: Path) -> None:
    card_path(tiny_weights).unlink()
    with pytest.raises(WeightsError, match=r"model card .* not found"):
        load_weights(tiny_weights)


def test_truncated_file(tiny_weights: Path) -> None:
    raw = tiny_weights.read_bytes()
    tiny_weights.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_weights(tiny_weights)


def test_garbage_file(tiny_weights: Path) -> None:
    tiny_weights.write_bytes(b"\x80\x04this is a pickle, not tensors" * 10)
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_weights(tiny_weights)


def test_card_that_does_not_match_the_tensors(tiny_weights: Path) -> None:
    cpath = card_path(tiny_weights)
    card = json.loads(cpath.read_text())
    card["channels"] = [1, 8, 16, 32]
    cpath.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="does not match its card"):
        load_weights(tiny_weights)
    card["channels"] = [1, 4, 8, 16, 32]
    cpath.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="missing tensors"):
        load_weights(tiny_weights)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("channels"), "invalid"),
        (lambda c: c.update(channels=[1]), "invalid"),
        (lambda c: c.update(class_names=["a", "b"]), "class_names"),
        (lambda c: c.update(normalization={"mean": [0.5], "std": [0.0]}), "invalid"),
    ],
)
def test_invalid_card(tiny_weights: Path, edit, message: str) -> None:
    cpath = card_path(tiny_weights)
    card = json.loads(cpath.read_text())
    edit(card)
    cpath.write_text(json.dumps(card))
    with pytest.raises(WeightsError, match=message):
        load_card(tiny_weights)


def test_card_that_is_not_json(tiny_weights: Path) -> None:
    card_path(tiny_weights).write_text("{channels: [1, 4")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_weights(tiny_weights)


def test_save_refuses_a_card_for_another_model(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="do not match"):
        save_weights(tiny_unet(), ModelCard(channels=[1, 8, 16, 32]), tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_saved_files_follow_the_umask_not_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = save_weights(
            tiny_unet(), ModelCard(channels=[1, 4, 8, 16]), tmp_path / "w.safetensors"
        )
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert card_path(path).stat().st_mode & 0o777 == 0o644


def test_save_overwrites_atomically(tiny_weights: Path) -> None:
    model, card = load_weights(tiny_weights)
    card.threshold = 0.3
    save_weights(model, card, tiny_weights)
    assert load_card(tiny_weights).threshold == 0.3
    assert sorted(p.name for p in tiny_weights.parent.iterdir()) == [
        "tiny.json",
        "tiny.safetensors",
    ]
