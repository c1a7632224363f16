"""Service settings: one pydantic-settings object read from `UNET_*` environment variables
(and a `.env` file in the working directory, if there is one)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.geometry import Geometry
from model.options import DEFAULT_TILE_SIZE, DEFAULT_WEIGHTS, BackendChoice, PrecisionChoice
from model.tiled_image import VARIANTS

# Per-tile cost on a 2-core AMX CPU rose with the batch (bf16: 5.5 output MP/s at 1 tile,
# 5.2 at 2, 3.1 at 8; fp32 on ONNX Runtime: 2.09 at 1, 1.97 at 8): a CPU gains nothing from
# big batches, while a GPU needs them to fill its cores.
CPU_BATCH_TILES = 2
CUDA_BATCH_TILES = 8

LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="UNET_", env_file=".env", extra="ignore", validate_default=True
    )

    weights: Path = Field(
        DEFAULT_WEIGHTS,
        description="Path to NAME.safetensors; its model card NAME.json must sit beside it.",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (first CUDA device, else CPU), cpu, cuda or cuda:N.",
    )
    precision: PrecisionChoice = Field("fp32", description="fp32, bf16, fp16 (CUDA only) or auto.")
    backend: BackendChoice = Field(
        "auto", description="auto (measured fastest), torch or onnxruntime (CPU, fp32)."
    )
    compile: bool = Field(
        False,
        description="torch.compile the network (CUDA graphs on GPUs); slower start-up, "
        "faster passes. Uses the torch backend.",
    )
    tile_size: int = Field(
        DEFAULT_TILE_SIZE,
        description="Largest output tile; must be legal for the model (4 + 2^depth * j).",
    )
    tta: int = Field(
        1,
        description="Test-time augmentation for requests that do not choose: 8 averages the "
        "image's 8 rotations and mirrorings (8 times the computation), 1 is off.",
    )
    max_batch_tiles: int = Field(
        0,
        ge=0,
        description="Most tiles in one forward pass; 0 = by device: 8 on CUDA, 2 on a CPU "
        "(where larger batches were measured slower per tile).",
    )
    max_wait_ms: float = Field(
        10.0, ge=0, description="Longest wait for a batch to fill before running it anyway."
    )
    max_queue_tiles: int = Field(
        4096, ge=1, description="Tiles accepted but not yet computed; beyond this, 503."
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="A request not done after this long gets 504."
    )
    max_upload_mb: float = Field(128.0, gt=0, description="Largest request body, in MiB.")
    max_json_mb: float = Field(
        8.0,
        gt=0,
        description="Largest KServe v2 JSON body (or JSON header of a binary request), MiB: "
        "parsing JSON holds the interpreter, so this bounds how long one parse can take. "
        "Large tensors go with the binary tensor data extension, up to max_upload_mb.",
    )
    max_json_reply_mb: float = Field(
        64.0,
        gt=0,
        description="Largest KServe v2 reply with JSON tensor data, MiB (estimated before "
        "inference; larger replies must ask for binary outputs).",
    )
    max_pixels: int = Field(
        100_000_000, ge=1, description="Largest image (height x width); beyond this, 413."
    )
    max_instance_pixels: int = Field(
        100_000_000,
        ge=1,
        description="Largest image whose cell instances are computed: they peak at about 6 "
        "bytes per pixel beside the probabilities (0.6 GB at this default, measured on EM "
        "maps by bench.instances), up to 30-60 where one region holding several seed "
        "cores spans most of the image; beyond this, 413.",
    )
    api_key: SecretStr | None = Field(
        None, description="Bearer token required on inference routes; unset = open."
    )
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    log_level: LogLevel = "info"
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long accepted work may still take."
    )

    @field_validator("tta")
    @classmethod
    def _tta(cls, v: int) -> int:
        if v not in VARIANTS:
            raise ValueError("must be 1 (off) or 8 (the image's 8 rotations and mirrorings)")
        return v

    @field_validator("log_level", "precision", "backend", "device", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_unset(cls, v: SecretStr | None) -> SecretStr | None:
        # `UNET_API_KEY=` in a compose file means "no key", not "the empty key".
        return v if v is not None and v.get_secret_value() else None

    def batch_tiles_for(self, device_type: str) -> int:
        """Tiles per batch on a device of this type ("cuda", "cpu")."""
        if self.max_batch_tiles:
            return self.max_batch_tiles
        return CUDA_BATCH_TILES if device_type == "cuda" else CPU_BATCH_TILES

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_json_bytes(self) -> int:
        return int(self.max_json_mb * 1024 * 1024)

    @property
    def max_json_reply_bytes(self) -> int:
        return int(self.max_json_reply_mb * 1024 * 1024)

    def check_tile_size(self, geometry: Geometry) -> None:
        """Raise ValueError naming the nearest legal sizes when TILE_SIZE does not fit."""
        try:
            geometry.check_tile(self.tile_size)
        except ValueError as e:
            raise ValueError(
                f"UNET_TILE_SIZE={self.tile_size} does not fit the model: {e}"
            ) from None
