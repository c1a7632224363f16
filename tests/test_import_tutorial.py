"""`unet-import tutorial`: a checkpoint of the PyTorch tutorial's U-Net (tests/tutorial_unet.py,
written from the tutorial) becomes our weights and card, and our engine computes what the
tutorial's network computes, within docs/inference.md's float32 tolerance (1e-5), whole and
tiled, on a real ISBI crop; the service serves it. Bad checkpoints get one-line errors."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from app_helpers import em_crop, png_bytes, running
from safetensors.torch import load_file
from tutorial_unet import TutorialUNet, tutorial_unet

from unet_service.api.app import create_app
from unet_service.cli.import_tutorial import main
from unet_service.core.engine import Segmenter
from unet_service.core.tutorial import CheckpointError, to_unet, tutorial_rules
from unet_service.core.unet import UNet
from unet_service.core.weights import load_weights
from unet_service.settings import Settings

CHANNELS = [1, 4, 8, 16]  # depth 2: legal outputs 4 + 4j, shrink 40
PAPER = [1, 64, 128, 256, 512, 1024]
TOLERANCE = 1e-5  # float32, docs/inference.md
TILE = 36


def save_checkpoint(tmp_path: Path, wrap=lambda state: state, **kwargs) -> Path:
    path = tmp_path / "tutorial.pth"
    torch.save(wrap(tutorial_unet(**kwargs).state_dict()), path)
    return path


def run_import(checkpoint: Path, out: Path, *extra: str, channels=CHANNELS) -> Path:
    argv = ["tutorial", str(checkpoint), "--channels", ",".join(map(str, channels))]
    assert main([*argv, "--name", "tut", "-o", str(out), *extra]) == 0
    return out / "tut.safetensors"


def probabilities(logits: torch.Tensor) -> np.ndarray:
    probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, 1)
    return probs[0].numpy()


@pytest.mark.parametrize("out_channels", [1, 3])
def test_imported_model_computes_the_tutorials_network_whole_and_tiled(
    tmp_path: Path, out_channels: int
) -> None:
    checkpoint = save_checkpoint(tmp_path, out_channels=out_channels)
    seg = Segmenter(*load_weights(run_import(checkpoint, tmp_path)), device="cpu")
    image = em_crop(2, 100, 60, 90, 130)[:, :, None]
    plan = seg.plan(90, 130, TILE)
    # The tutorial's own preprocessing: pixels / 255, nothing else. The canvas is the whole
    # image, mirror-padded as the engine pads it.
    canvas = torch.from_numpy(plan.padded_image(image).transpose(2, 0, 1)[None] / 255.0).float()
    with torch.inference_mode():
        theirs = tutorial_unet(out_channels=out_channels)(canvas)
        ours = seg.model(canvas)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() <= TOLERANCE * max(1.0, theirs.abs().max().item())
    reference = probabilities(theirs)[:, :90, :130]
    assert np.abs(probabilities(ours)[:, :90, :130] - reference).max() <= TOLERANCE
    tiled = seg.segment(image, tile_size=TILE, batch_size=3, probabilities=True)
    assert len(list(plan)) > 4  # tiled indeed
    assert np.abs(tiled.probabilities - reference).max() <= TOLERANCE
    # The outputs vary over the image far more than the tolerance: the comparisons say something.
    assert theirs.std() > 100 * TOLERANCE


def test_swapping_the_decoders_halves_and_folding_the_biases_matter() -> None:
    """Undo either conversion and the outputs differ far beyond the tolerance: the test
    above has teeth."""
    state = tutorial_unet().state_dict()
    x = torch.rand(1, 1, 76, 76)
    with torch.inference_mode():
        reference = tutorial_unet()(x)
        assert (to_unet(state, CHANNELS)(x) - reference).abs().max() <= TOLERANCE
        unswapped = to_unet(state, CHANNELS)
        weight = unswapped.ups[-1].conv[0].weight
        half = weight.shape[1] // 2
        weight.copy_(torch.cat([weight[:, half:], weight[:, :half]], dim=1))
        assert (unswapped(x) - reference).abs().max() > 10 * TOLERANCE
        unfolded = to_unet(state, CHANNELS)
        unfolded.inc[1].running_mean += state["encoder.encoder_blocks.0.conv.0.bias"]
        assert (unfolded(x) - reference).abs().max() > 10 * TOLERANCE


def test_the_papers_channels_map_every_key_and_shape() -> None:
    """The tutorial's [1, 64, ..., 1024] network: every key goes to one of ours, shapes as
    they will be checked, and all of ours are filled (no forward pass: 31M parameters)."""
    with torch.device("meta"):
        theirs = TutorialUNet(PAPER, 2).state_dict()
        ours = UNet(PAPER, 2).state_dict()
    rules = tutorial_rules(len(PAPER) - 2)
    assert set(rules) == set(theirs)
    for key, rule in rules.items():
        assert theirs[key].shape == ours[rule.ours].shape, key
    assert {rule.ours for rule in rules.values()} == set(ours)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda state: {"state_dict": state, "epoch": 7},
        lambda state: {"model_state_dict": state, "optimizer_state_dict": {"lr": 0.1}},
        lambda state: {f"module.{key}": value for key, value in state.items()},
        lambda state: {"state_dict": {f"module.{key}": value for key, value in state.items()}},
    ],
    ids=["state_dict", "model_state_dict", "DataParallel", "both"],
)
def test_wrapped_checkpoints_import_the_same_tensors(tmp_path: Path, wrap) -> None:
    bare = load_file(run_import(save_checkpoint(tmp_path), tmp_path / "bare"))
    wrapped = load_file(run_import(save_checkpoint(tmp_path, wrap), tmp_path / "wrapped"))
    assert bare.keys() == wrapped.keys()
    assert all(torch.equal(bare[key], wrapped[key]) for key in bare)


def test_the_card_loads_and_says_where_the_model_came_from(tmp_path: Path) -> None:
    checkpoint = save_checkpoint(tmp_path, out_channels=2)
    extra = ["--mean", "0.4", "--std", "0.2", "--classes", "membrane,cell", "--threshold", "0.7"]
    _, card = load_weights(run_import(checkpoint, tmp_path / "models", *extra))
    assert card.name == "tut" and card.channels == CHANNELS and card.out_channels == 2
    assert card.class_names == ["membrane", "cell"] and card.threshold == 0.7
    assert card.normalization.mean == [0.4] and card.normalization.std == [0.2]
    assert "tutorial.pth" in card.description and card.metrics == {}
    assert card.model_extra["imported_from"]["checkpoint"] == "tutorial.pth"
    # The defaults: pixels scaled to [0, 1] and nothing else; one class, "foreground".
    _, plain = load_weights(run_import(save_checkpoint(tmp_path), tmp_path / "plain"))
    assert plain.normalization.mean == [0.0] and plain.normalization.std == [1.0]
    assert plain.class_names == ["foreground"] and plain.threshold == 0.5


def test_the_console_script_imports(tmp_path: Path) -> None:
    exe = shutil.which("unet-import", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("unet-import is not installed in this environment")
    args = [str(save_checkpoint(tmp_path)), "--channels", "1,4,8,16", "--name", "tut"]
    proc = subprocess.run(
        [exe, "tutorial", *args, "-o", str(tmp_path / "models")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tut.safetensors" in proc.stdout
    assert json.loads((tmp_path / "models" / "tut.json").read_text())["channels"] == CHANNELS


class PickledModel(nn.Module):
    """A whole model saved with torch.save(model): loading it would run this module's code."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)


@pytest.mark.parametrize(
    ("case", "extra", "message"),
    [
        ("other channels", ["--channels", "1,4,8,32"], "encoder.encoder_blocks.4.conv.0.weight"),
        ("deeper", ["--channels", "1,4,8,16,32"], "has no encoder.encoder_blocks.6"),
        ("missing key", [], "has no decoder.decoder_blocks.1.conv.4.running_var"),
        ("extra key", [], "has extra.weight, which the tutorial's UNet does not"),
        ("pickled model", [], "needs code unpickled"),
        ("not a checkpoint", [], "not a readable PyTorch checkpoint"),
        ("no file", [], "no such file"),
        ("another network", [], "not the tutorial's UNet"),
        ("bad name", ["--name", "../up"], "--name '../up'"),
        ("std", ["--std", "0.5,1"], "--std has 2 values; give 1"),
        ("negative std", ["--std", "-1"], "std values must be positive"),
        ("classes", ["--classes", "a,b"], "--classes has 2 names; the checkpoint has 1"),
    ],
)
def test_bad_input_gets_a_one_line_error(
    tmp_path: Path, capsys, case: str, extra: list[str], message: str
) -> None:
    checkpoint = tmp_path / "checkpoint.pth"
    state = tutorial_unet().state_dict()
    if case == "missing key":
        del state["decoder.decoder_blocks.1.conv.4.running_var"]
    elif case == "extra key":
        state["extra.weight"] = torch.zeros(1)
    if case == "pickled model":
        torch.save(PickledModel(), checkpoint)
    elif case == "not a checkpoint":
        checkpoint.write_bytes(png_bytes(em_crop(0, 0, 0, 8, 8)))
    elif case == "another network":
        torch.save(UNet(CHANNELS).state_dict(), checkpoint)
    elif case != "no file":
        torch.save(state, checkpoint)
    argv = ["tutorial", str(checkpoint), "--channels", "1,4,8,16", "--name", "tut"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "-o", str(tmp_path / "models"), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unet-import: error:") and "\n" not in err
    assert message in err
    assert not (tmp_path / "models").exists()  # nothing written


def test_an_existing_model_is_replaced_only_with_force(tmp_path: Path, capsys) -> None:
    checkpoint = save_checkpoint(tmp_path)
    weights = run_import(checkpoint, tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_import(checkpoint, tmp_path)
    assert exc.value.code == 2 and "--force" in capsys.readouterr().err
    run_import(checkpoint, tmp_path, "--force")
    assert weights.is_file()


def test_to_unet_refuses_too_few_channels() -> None:
    with pytest.raises(CheckpointError, match="at least two levels"):
        to_unet(tutorial_unet().state_dict(), [1, 4])


@pytest.mark.anyio
async def test_the_service_serves_an_imported_model(tmp_path: Path, monkeypatch) -> None:
    weights = run_import(save_checkpoint(tmp_path), tmp_path / "models")
    monkeypatch.setenv("UNET_WEIGHTS", str(weights))
    settings = Settings(tile_size=TILE, backend="torch", device="cpu", max_wait_ms=5)
    pixels = em_crop(3, 40, 200, 70, 90)
    async with running(create_app(settings)) as client:
        files = {"file": ("crop.png", png_bytes(pixels), "image/png")}
        answer = await client.post("/v1/segment?output=probabilities", files=files)
        index = await client.post("/v2/repository/index")
    assert answer.status_code == 200, answer.text
    served = np.load(io.BytesIO(answer.content))
    plan = Segmenter(*load_weights(weights), device="cpu").plan(70, 90, TILE)
    canvas = plan.padded_image(pixels[:, :, None]).transpose(2, 0, 1)[None] / 255.0
    with torch.inference_mode():
        reference = probabilities(tutorial_unet()(torch.from_numpy(canvas).float()))
    assert np.abs(served - reference[0, :70, :90]).max() <= TOLERANCE
    assert index.json()[0]["name"] == "tut"
