"""The PyTorch tutorial's U-Net ("How to Implement UNet in PyTorch for Image Segmentation from
Scratch": `DoubleConvBlock`, `Encoder`, `Decoder`, `UNet(channels, out_channels)`) read into
our `UNet`. Both are the paper's network with valid 3x3 convolutions and batch normalisation;
they differ in parameter names and in three details this module bridges exactly:

- the tutorial's 3x3 convolutions have a bias, ours none (a BatchNorm follows each): a bias b
  before BatchNorm is the same as running_mean - b, so it is folded into the running mean
  (and it cancels in training mode, where the batch mean is subtracted);
- its decoder concatenates [up-sampled, skip], ours [skip, up-sampled]: the input channels of
  each decoder block's first convolution are swapped to match;
- its modules sit in flat lists (`encoder.encoder_blocks`: conv blocks with max-pools between;
  `decoder.decoder_blocks`: a transposed conv then a conv block, per level).

Only the tutorial's default `padding=0` (valid convolutions) is our network: a model trained
with `padding=1` has the same tensors but computes something else, which no checkpoint says.
Checkpoints are read with `torch.load(weights_only=True)`: tensors and plain containers only,
never code."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from unet_service.core.unet import UNet

# Common wrappers of a state_dict in training checkpoints, and prefixes that
# torch.nn.DataParallel / DistributedDataParallel and torch.compile put before every key.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
KEY_PREFIXES = ("module.", "_orig_mod.")
BATCHNORM_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, holds code, or is not the tutorial's UNet with the
    given channels; the message is one sentence naming the offending key."""


@dataclass(frozen=True)
class Rule:
    """Where one of the tutorial's tensors goes in ours, and how it is changed on the way."""

    ours: str
    # (the tutorial's tensor, the value already at `ours`) -> the new value at `ours`
    convert: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _copy(theirs: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return theirs


def _fold_bias(bias: torch.Tensor, running_mean: torch.Tensor) -> torch.Tensor:
    # BN(conv + b) = (conv + b - mean) * s + beta = BN with mean - b; in float64, then cast back.
    return (running_mean.double() - bias.double()).to(running_mean.dtype)


def _skip_first(weight: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """A decoder block's first convolution: its input channels [up-sampled, skip] (two equal
    halves) -> [skip, up-sampled]."""
    half = weight.shape[1] // 2
    return torch.cat([weight[:, half:], weight[:, :half]], dim=1)


def _double_conv(theirs: str, ours: str, decoder: bool = False) -> dict[str, Rule]:
    """A `DoubleConvBlock` (conv, BN, ReLU, conv, BN, ReLU in `.conv`) onto our `DoubleConv`
    (the same sequence, without the convolutions' biases)."""
    first = _skip_first if decoder else _copy
    rules = {
        f"{theirs}.conv.0.weight": Rule(f"{ours}.0.weight", first),
        f"{theirs}.conv.0.bias": Rule(f"{ours}.1.running_mean", _fold_bias),
        f"{theirs}.conv.3.weight": Rule(f"{ours}.3.weight", _copy),
        f"{theirs}.conv.3.bias": Rule(f"{ours}.4.running_mean", _fold_bias),
    }
    for index in (1, 4):
        for name in BATCHNORM_TENSORS:
            rules[f"{theirs}.conv.{index}.{name}"] = Rule(f"{ours}.{index}.{name}", _copy)
    return rules


def tutorial_rules(depth: int) -> dict[str, Rule]:
    """Every key of the tutorial's `UNet(channels, ...).state_dict()` for `len(channels) - 2
    == depth`, and where it goes in ours. The folded biases come last, after the running
    means they change have been copied."""
    rules: dict[str, Rule] = {}
    # Encoder: a conv block at every even index, max-pools (no tensors) between.
    for level in range(depth + 1):
        ours = "inc" if level == 0 else f"downs.{level - 1}.1"
        rules |= _double_conv(f"encoder.encoder_blocks.{2 * level}", ours)
    # Decoder: per level up from the bottleneck, the transposed conv then the conv block; our
    # ups.k is the same level.
    for k in range(depth):
        for name in ("weight", "bias"):
            rules[f"decoder.decoder_blocks.{2 * k}.{name}"] = Rule(f"ups.{k}.up.{name}", _copy)
        rules |= _double_conv(f"decoder.decoder_blocks.{2 * k + 1}", f"ups.{k}.conv", decoder=True)
    rules["output.weight"] = Rule("head.weight", _copy)
    rules["output.bias"] = Rule("head.bias", _copy)
    return dict(sorted(rules.items(), key=lambda item: item[1].convert is _fold_bias))


def _unwrap(loaded: object) -> dict[str, torch.Tensor]:
    """The state_dict in a checkpoint: bare, or under a usual key; prefixes removed."""
    state = loaded
    if isinstance(state, dict):
        for key in WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state:
        raise CheckpointError(
            "it holds no state_dict (expected a dict of tensors, bare or under "
            f"{', '.join(repr(k) for k in WRAPPER_KEYS)})"
        )
    for prefix in KEY_PREFIXES:
        if all(isinstance(k, str) and k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"its state_dict's entry {key!r} is a {type(value).__name__}, not a tensor"
            )
    return state


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's state_dict, read with weights_only=True (no code is ever unpickled)."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError("no such file") from None
    except IsADirectoryError:
        raise CheckpointError("a folder, not a file") from None
    except pickle.UnpicklingError as e:
        # torch names the first class or function the file would have had to import.
        needed = re.search(r"GLOBAL ([\w.]+)", str(e))
        if needed:
            raise CheckpointError(
                f"it needs code unpickled to load ({needed[1]}; weights_only=True refuses "
                "that): a whole pickled model? Save model.state_dict() instead"
            ) from None
        raise CheckpointError(f"not a readable PyTorch checkpoint ({_detail(e)})") from None
    except Exception as e:  # torch.load's failures on other files have no common class
        raise CheckpointError(f"not a readable PyTorch checkpoint ({_detail(e)})") from None
    return _unwrap(loaded)


def _detail(error: Exception) -> str:
    """The telling line of torch.load's error, after its boilerplate."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return f"{type(error).__name__}: {lines[0].split('. ')[0].rstrip('.')}"


def encoder_channels(state: dict[str, torch.Tensor]) -> list[int] | None:
    """The channels the tutorial's encoder in `state` was built with, where they can be read
    (for hints in errors)."""
    channels: list[int] = []
    for level in range(len(state)):
        weight = state.get(f"encoder.encoder_blocks.{2 * level}.conv.0.weight")
        if weight is None or weight.dim() != 4:
            break
        if not channels:
            channels.append(int(weight.shape[1]))
        channels.append(int(weight.shape[0]))
    return channels or None


def to_unet(state: dict[str, torch.Tensor], channels: list[int]) -> UNet:
    """Our UNet (eval mode, float32) with the tutorial's weights in `state`: every key of
    the tutorial's network with these channels present, with its shape, and nothing else."""
    if len(channels) < 3 or min(channels) < 1:
        raise CheckpointError("channels needs the input channels and at least two levels")
    head = state.get("output.weight")
    if head is None or head.dim() != 4:
        raise CheckpointError(_mismatch("has no output.weight (the final 1x1 conv)", state))
    model = UNet(channels, int(head.shape[0]))
    ours = model.state_dict()
    rules = tutorial_rules(model.depth)
    for key, rule in rules.items():
        if key not in state:
            raise CheckpointError(_mismatch(f"has no {key}", state, channels))
        # A folded conv bias has the shape of the running mean it goes into, the rest their own.
        want = ours[rule.ours].shape
        if state[key].shape != want:
            raise CheckpointError(
                _mismatch(
                    f"has {key} of shape {tuple(state[key].shape)} where the tutorial's UNet "
                    f"with channels {','.join(map(str, channels))} has {tuple(want)}",
                    state,
                    channels,
                )
            )
    for key in state:
        if key not in rules:
            raise CheckpointError(
                _mismatch(f"has {key}, which the tutorial's UNet does not", state, channels)
            )
    converted = {name: tensor.clone() for name, tensor in ours.items()}
    for key, rule in rules.items():
        target = converted[rule.ours]
        value = rule.convert(state[key].detach().cpu(), target)
        converted[rule.ours] = value.to(target.dtype)
    model.load_state_dict(converted)
    return model.eval()


def _mismatch(problem: str, state: dict, channels: list[int] | None = None) -> str:
    found = encoder_channels(state)
    hint = ""
    if found and found != channels:
        hint = f" (its encoder has channels {','.join(map(str, found))})"
    elif found is None:
        hint = " (nor encoder.encoder_blocks.0.conv.0.weight: not the tutorial's UNet)"
    return f"the checkpoint {problem}{hint}"
