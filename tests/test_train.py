"""A real two-step training run on tiny data: it writes a checkpoint that loads, with a card
that records how it was made, and is reproducible from the seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_CHANNELS, isbi_pairs
from unet_service.core.engine import Segmenter
from unet_service.core.weights import load_weights, save_weights
from unet_service.pipeline.instances import InstanceParams
from unet_service.training.train import main


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """Three real 64x64 ISBI crops with their labels."""
    return isbi_pairs(tmp_path / "data", [0, 1, 2], (100, 100, 164, 164))


def run(data: Path, out: Path, *extra: str) -> None:
    args = [
        "--data",
        str(data),
        "--out",
        str(out),
        "--channels",
        ",".join(map(str, TINY_CHANNELS)),
        "--steps",
        "2",
        "--val-every",
        "1",
        "--output-size",
        "20",
        "--val-slices",
        "2",
        "--threads",
        "1",
        "--no-progress",
        *extra,
    ]
    assert main(args) == 0


def test_two_step_training_writes_a_loadable_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run" / "tiny.safetensors"
    run(tiny_data, out, "--border-weight", "10", "--class-balance", "--seed", "3")
    model, card = load_weights(out)
    assert card.channels == TINY_CHANNELS and card.class_names == ["cell_interior"]
    assert card.training["seed"] == 3
    assert card.training["validation_slices"] == ["02"]
    assert card.training["train_slices"] == ["00", "01"]
    assert card.training["steps_run"] == 2
    assert card.training["command"].startswith("unet-train --data ")
    assert "border weight w0=10.0" in card.training["loss"]
    assert 0 < card.threshold < 1
    assert card.normalization.std[0] > 0
    # The validation error recorded is the one this checkpoint gets on the held-out slice.
    image = np.asarray(Image.open(tiny_data / "image" / "02.png"))[:, :, None]
    label = np.asarray(Image.open(tiny_data / "label" / "02.png")) > 127
    mask = Segmenter(model, card, device="cpu").segment(image, tile_size=64).mask
    error = np.mean(mask.astype(bool) != label)
    assert error == pytest.approx(card.training["validation_mismatch_at_best"], abs=1e-5)
    assert not list(out.parent.glob(".*"))  # no temporary files left behind


def test_training_is_deterministic_on_cpu(tiny_data: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run(tiny_data, a)
    run(tiny_data, b)
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for name in ta:
        assert np.array_equal(ta[name].numpy(), tb[name].numpy()), name
    c = tmp_path / "c.safetensors"
    run(tiny_data, c, "--seed", "1")
    tc = load_file(str(c))
    assert any(not np.array_equal(ta[n].numpy(), tc[n].numpy()) for n in ta)


def test_skeleton_loss_changes_the_training(tiny_data: Path, tmp_path: Path) -> None:
    """--skeleton-weight adds the membranes' clDice term: the same seed trains different
    weights with it, and the card's loss says so."""
    plain, skeleton = tmp_path / "plain.safetensors", tmp_path / "skeleton.safetensors"
    run(tiny_data, plain, "--val-every", "2")
    run(tiny_data, skeleton, "--val-every", "2", "--skeleton-weight", "0.5")
    _, card = load_weights(skeleton)
    assert "0.5 x membrane clDice" in card.training["loss"]
    tp, ts = load_file(str(plain)), load_file(str(skeleton))
    assert not np.array_equal(tp["head.weight"].numpy(), ts["head.weight"].numpy())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--output-size", "21"], "output size 21 is not legal"),
        (["--channels", "1,a"], "not a comma-separated list"),
        (["--val-slices", "0-2"], "nothing left to train on"),
        (["--val-slices", "7"], "out of range"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--skeleton-weight", "-1"], "--skeleton-weight must be >= 0"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    tiny_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    with pytest.raises(SystemExit) as exc:
        run(tiny_data, tmp_path / "x.safetensors", *extra)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unet-train: error: " in err and message in err


def test_missing_data_folder_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x.safetensors")])
    assert exc.value.code == 2
    assert "not found" in capsys.readouterr().err


def test_fine_tuning_keeps_channels_and_normalisation(tiny_data: Path, tmp_path: Path) -> None:
    first = tmp_path / "first.safetensors"
    run(tiny_data, first, "--seed", "4")
    _, first_card = load_weights(first)
    tuned = tmp_path / "tuned.safetensors"
    # --channels is ignored in favour of the initial weights' architecture.
    run(tiny_data, tuned, "--init", str(first), "--channels", "1,8,8", "--lr", "1e-4")
    _, card = load_weights(tuned)
    assert card.channels == TINY_CHANNELS
    assert card.normalization == first_card.normalization
    assert card.training["init"]["weights"] == "first.safetensors"
    assert card.training["init"]["training"]["seed"] == 4
    assert card.training["init"]["training"]["command"] == first_card.training["command"]
    assert not np.array_equal(
        load_file(str(first))["head.weight"].numpy(), load_file(str(tuned))["head.weight"].numpy()
    )


def test_bf16_autocast_and_weight_average(tiny_data: Path, tmp_path: Path) -> None:
    """--ema saves the running average of the weights, not the last step's weights: after two
    steps with decay 0.5 the saved tensors are (w1 + w2) / 2, which neither run without it
    produces; bf16 autocast is recorded and still trains (the checkpoint differs from init)."""
    plain, averaged = tmp_path / "plain.safetensors", tmp_path / "ema.safetensors"
    run(tiny_data, plain, "--precision", "bf16", "--val-every", "2")
    run(tiny_data, averaged, "--precision", "bf16", "--val-every", "2", "--ema", "0.5")
    _, card = load_weights(averaged)
    assert card.training["ema_decay"] == 0.5
    assert card.training["precision"] == "bf16"
    tp, ta = load_file(str(plain)), load_file(str(averaged))
    assert not np.array_equal(tp["head.weight"].numpy(), ta["head.weight"].numpy())
    # A decay near 1 keeps the first step's weights w1 (the average starts as a copy of them),
    # so decay 0.5 must give the midpoint of w1 and the last step's weights w2.
    first = tmp_path / "first.safetensors"
    run(tiny_data, first, "--precision", "bf16", "--val-every", "2", "--ema", "0.999999")
    w1, w2, avg = (load_file(str(f))["head.weight"].numpy() for f in (first, plain, averaged))
    assert not np.allclose(w1, w2)
    np.testing.assert_allclose(avg, (w1 + w2) / 2, rtol=1e-4, atol=1e-6)


def test_selection_by_instance_rand_error(tiny_data: Path, tmp_path: Path) -> None:
    """--select instances keeps the step whose instances score the lowest Rand error, records
    it beside the mismatch of every validation, and cuts instances with the --init card's
    parameters (which the checkpoint keeps)."""
    first = tmp_path / "first.safetensors"
    run(tiny_data, first)
    _, first_card = load_weights(first)
    first_card.instances = InstanceParams(seed_threshold=0.6, smoothing=1.0, min_size=0)
    save_weights(load_weights(first)[0], first_card, first)
    out = tmp_path / "tuned.safetensors"
    args = ("--init", str(first), "--select", "instances", "--steps", "3", "--snapshots")
    run(tiny_data, out, *args)
    _, card = load_weights(out)
    history = card.training["validation_history"]
    assert len(history) == 3 and all(len(entry) == 5 for entry in history)
    best = min(history, key=lambda entry: entry[3])
    assert card.training["best_step"] == best[0]
    assert card.training["validation_instance_rand_error_at_best"] == best[3]
    assert card.training["selected_by"] == "instance Rand error"
    # The card keeps the instance parameters, with the seed threshold that scored best.
    assert card.instances == first_card.instances.model_copy(update={"seed_threshold": best[4]})
    # Every validated state is kept beside the best, with its own validation.
    for step, _, threshold, rand, _ in history:
        _, snap = load_weights(tmp_path / f"tuned.step{step:05d}.safetensors")
        assert snap.training["best_step"] == step and snap.threshold == threshold
        assert snap.training["validation_instance_rand_error_at_best"] == rand
