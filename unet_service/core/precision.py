"""Which floating-point precision runs the network (`fp32`, `bf16`, `fp16`, or `auto`)."""

from __future__ import annotations

import contextlib

import torch

from unet_service.options import PRECISIONS, Precision

__all__ = ["PRECISIONS", "Precision", "autocast", "cpu_has_fast_bf16", "resolve_precision"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16(flags: set[str] | None = None) -> bool:
    """AMX-BF16 or AVX-512 BF16: the CPUs on which bf16 matmuls beat fp32."""
    flags = cpu_flags() if flags is None else flags
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def resolve_precision(
    requested: str,
    device: torch.device,
    pinned: str | None = None,
    cpu_flag_set: set[str] | None = None,
) -> Precision:
    """`auto` honours a precision pinned by the model card, else takes bf16 where the hardware
    runs it fast (CUDA with bf16 support; CPUs with AMX or AVX-512 BF16), else fp32.
    fp16 on a CPU is refused: PyTorch's CPU fp16 kernels are slow and not what users want."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "auto":
        if pinned is not None:
            requested = pinned
        elif device.type == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            requested = "bf16" if cpu_has_fast_bf16(cpu_flag_set) else "fp32"
    if requested == "fp16" and device.type == "cpu":
        raise ValueError("fp16 is supported on CUDA devices only; use bf16 or fp32 on a CPU")
    return requested  # type: ignore[return-value]


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])
