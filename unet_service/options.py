"""The closed choices and defaults of the inference core, importable without torch (the
service's settings validate against them)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

Precision = Literal["fp32", "bf16", "fp16"]
PrecisionChoice = Literal["fp32", "bf16", "fp16", "auto"]
PRECISIONS: tuple[str, ...] = get_args(PrecisionChoice)

BackendChoice = Literal["auto", "torch", "onnxruntime"]
BACKENDS: tuple[str, ...] = get_args(BackendChoice)

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "isbi2012.safetensors"
# 516 = 4 + 16 * 32: one tile holds a 512x512 slice, and its margins cost less per output
# pixel than 388's (measured ~17% more output megapixels/s on the shipped model).
DEFAULT_TILE_SIZE = 516
