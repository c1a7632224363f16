"""The package's documentation page (README.md inside the package, Markdown): what the model
does, what goes in and comes out, the card's validation figures and how it was trained."""

from __future__ import annotations

import re
from typing import Any

from unet_service.core.geometry import Geometry
from unet_service.core.weights import ModelCard

# The Model Zoo warns above 512 characters of `description`; the page holds the rest.
MAX_DESCRIPTION = 512


def short_description(card: ModelCard) -> str:
    """The card's description cut at the last sentence end within MAX_DESCRIPTION."""
    text = " ".join(card.description.split())
    if not text:
        return f"A U-Net with valid convolutions segmenting {', '.join(card.class_names)}."
    if len(text) <= MAX_DESCRIPTION:
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", text[: MAX_DESCRIPTION + 1])]
    return text[: ends[-1]] if ends else text[: MAX_DESCRIPTION - 3].rstrip() + "..."


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def validation_section(card: ModelCard) -> list[str]:
    """The card's headline figures (core.card_metrics), each with its definition and where
    and how it was measured."""
    summary = card.metrics_summary()
    if not summary:
        return ["The model card records no validation figures."]
    lines = ["| figure | value | measured on | definition |", "| --- | --- | --- | --- |"]
    for figure in summary.values():
        lines.append(
            f"| {figure['label']} | {_value(figure['value'])} | {figure['measured_on']} | "
            f"{figure['definition']} |"
        )
    commands = sorted({f["command"] for f in summary.values() if f.get("command")})
    if commands:
        lines += ["", "Measured by " + ", ".join(f"`{c}`" for c in commands) + "."]
    return lines


def training_section(card: ModelCard) -> list[str]:
    training = card.training
    if not training:
        return ["The model card records no training."]
    rows = [
        ("command", training.get("command")),
        ("data", training.get("data")),
        ("training slices", ", ".join(map(str, training.get("train_slices", []))) or None),
        ("validation slices", ", ".join(map(str, training.get("validation_slices", []))) or None),
        ("loss", training.get("loss")),
        ("optimizer", training.get("optimizer")),
        ("steps run", training.get("steps_run")),
        ("minutes", training.get("elapsed_min")),
        ("device", training.get("device")),
    ]
    lines = ["| | |", "| --- | --- |"]
    lines += [f"| {name} | {_value(value)} |" for name, value in rows if value is not None]
    init = training.get("init")
    if isinstance(init, dict) and isinstance(init.get("training"), dict):
        command = init["training"].get("command")
        lines += ["", f"Started from weights trained by `{command}`."]
    return lines


def documentation(card: ModelCard, input_dtype: str, scale: float, sample: str) -> str:
    """The page, for a model whose package takes `input_dtype` pixels scaled by `scale`, its
    test input cut from the image file named `sample`."""
    geometry = Geometry(card.depth)
    norm = card.normalization
    minimum = geometry.input_for_output(geometry.min_tile)
    if card.out_channels == 1:
        activation, mask = "sigmoid", f"the probability above {card.threshold:g}"
    else:
        activation, mask = "softmax over the classes", "the most probable class"
    lines = [
        f"# {card.name} U-Net",
        "",
        " ".join(card.description.split()) or short_description(card),
        "",
        "## Input and output",
        "",
        f"- **Input** `input`: {plural(card.in_channels, 'channel')} of {input_dtype} "
        f"pixels, axes batch, channel, y, x. Height and width are {minimum} + n * "
        f"{geometry.step} (n = 0, 1, 2, ...): the inputs of this depth-{card.depth} U-Net's "
        "legal tiles.",
        f"- **Preprocessing**: pixels times {scale:g} (to [0, 1]), then (x - mean) / std with "
        f"mean {norm.mean} and std {norm.std}, as the model card says and the service does.",
        f"- **Output** `output`: the probability of each class ({', '.join(card.class_names)}), "
        f"{plural(card.out_channels, 'channel')}. The network ends with its activation "
        f"({activation}) in every weight format, so no postprocessing is needed. The "
        f"service's mask is {mask}.",
        f"- **Size**: the network uses valid convolutions, so the output is {geometry.shrink} "
        f"pixels smaller than the input in y and x ({geometry.margin} on each side), and each "
        "output pixel saw its whole receptive field. To segment a whole image as the service "
        f"does, mirror it out by {geometry.margin} pixels on each side (numpy's `reflect`, "
        "the padding the package declares), and further at the bottom and right up to a "
        "legal size; the output's top-left part of the image's size is the segmentation.",
        "",
        "## Validation",
        "",
        *validation_section(card),
        "",
        "## Training",
        "",
        *training_section(card),
        "",
        "## Weights",
        "",
        "All three formats hold the same weights: `pytorch_state_dict` (architecture "
        "`unet.py`, the service's own U-Net source, callable `UNetProbabilities`), and "
        "`torchscript` and `onnx` exported from it. The test input is the centre of "
        f"`{sample}`, and the test output the service's probabilities for it; the cover shows "
        "the output's area beside its mask. Exported by `unet-export bioimageio`.",
        "",
    ]
    return "\n".join(lines)
