"""The service's `UNET_*` settings, one pydantic-settings object (and a `.env` file, if any)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from unet_service.core.geometry import TileGeometry
from unet_service.locations import LocationSettings
from unet_service.options import DEFAULT_TILE_SIZE, DEFAULT_WEIGHTS, BackendChoice, PrecisionChoice
from unet_service.pipeline.outputs import TTA_VIEWS as VARIANTS

# Per-tile cost on a 2-core AMX CPU rose with the batch (bf16: 5.5 output MP/s at 1 tile,
# 5.2 at 2, 3.1 at 8; fp32 on ONNX Runtime: 2.09 at 1, 1.97 at 8): a CPU gains nothing from
# big batches, while a GPU needs them to fill its cores.
CPU_BATCH_TILES = 2
CUDA_BATCH_TILES = 8

LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


class Settings(LocationSettings):
    """Every `UNET_*` setting (those of named locations and volumes: `locations.py`)."""

    model_config = SettingsConfigDict(
        env_prefix="UNET_", env_file=".env", extra="ignore", validate_default=True
    )

    weights: Path = Field(
        DEFAULT_WEIGHTS,
        description="Path to NAME.safetensors (its model card NAME.json must sit beside it), "
        "or to a bioimage.io package NAME.zip.",
    )
    models: Path | None = Field(
        None,
        description="A model repository: a folder where each model is NAME.safetensors with "
        "its card NAME.json beside it, or a bioimage.io package NAME.zip or NAME/, served under "
        "NAME; unset = the one model UNET_WEIGHTS names.",
    )
    default_model: str = Field(
        "",
        description="The model /v1/segment and jobs use when a request names none; empty = "
        "the first of the repository that can be served (with one model, that one). It is "
        "loaded at start and stays loaded.",
    )
    max_loaded_models: int = Field(
        4,
        ge=1,
        description="Most models on the device at once; loading one more unloads the least "
        "recently used one that no request or job holds.",
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
        description="Largest output tile; must be legal for the model (4 + 2^depth * j); a "
        "bioimage.io package takes its largest legal tile not above it.",
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
        100_000_000,
        ge=1,
        description="Largest image (height x width; for a stack, all its pages together); "
        "beyond this, 413.",
    )
    max_pages: int = Field(
        1000,
        ge=1,
        description="Most pages of a stack (multi-page TIFF, or [D, H, W] v2 tensor); the "
        "pages of a TIFF are counted from its headers, so a file claiming more is refused "
        "before any is read; beyond this, 413.",
    )
    max_instance_pixels: int = Field(
        50_000_000,
        ge=1,
        description="Largest image whose cell instances are computed: they peak at about 6 "
        "bytes per pixel beside the probabilities (0.3 GB at this default, measured on EM "
        "maps by bench.instances), up to 30-60 where one region holding several seed "
        "cores spans most of the image (3 GB here, within a pod's 8 GiB); beyond this, 413.",
    )
    api_key: SecretStr | None = Field(
        None, description="Bearer token required on inference routes; unset = open."
    )
    api_keys: SecretStr | None = Field(
        None,
        description="Several bearer tokens, comma-separated (with or instead of api_key); "
        "each sees only the section jobs it created.",
    )
    max_job_pixels: int = Field(
        40_000_000_000,
        ge=1,
        description="Largest section job, pixels over all its pages (a 100,000 x 100,000 "
        "section is 10^10); beyond this, 413.",
    )
    max_job_pages: int = Field(
        100_000, ge=1, description="Most pages in one job's stack; beyond this, 413."
    )
    job_batch_tiles: int = Field(
        0,
        ge=0,
        description="Most tiles of a section job in one forward pass (jobs run only when no "
        "request's tiles wait, and a request then waits for at most this batch; on a CPU a "
        "batch of 2 tiles also holds about 300 MB more than one of 1); 0 = by device: 1 on "
        "a CPU, half the batch limit on CUDA.",
    )
    job_progress_s: float = Field(
        1.0,
        gt=0,
        description="How often a running job records its progress (and learns that it was "
        "cancelled); its lease on the job is 10 times this.",
    )
    job_max_attempts: int = Field(
        3,
        ge=1,
        description="A job interrupted this many times (its replica killed while working on "
        "it) is failed with the reason instead of being tried again.",
    )
    replica_id: str = Field(
        "",
        description="This replica's name in the job table; empty = the host name (a pod's "
        "name on Kubernetes). A replica restarted under the same name resumes its own "
        "interrupted jobs at once; others wait for the job's lease to expire.",
    )
    host: str = Field(
        "127.0.0.1",
        description="Bind address. Loopback by default, because the API is open unless "
        "api_key is set; the container images set 0.0.0.0 (their port is published on the "
        "host's loopback by compose, or reached through a Service on Kubernetes).",
    )
    port: int = Field(8000, ge=0, le=65535)
    log_level: LogLevel = "info"
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long accepted work may still take."
    )
    jobs_dir: Path = Field(
        Path("jobs"),
        description="Folder for the job API's uploads and results, one folder per job "
        "(relative to the working directory). With several replicas: a volume they all mount.",
    )
    jobs_db: SecretStr = Field(
        SecretStr(""),
        description="The job table: empty = SQLite at JOBS_DIR/jobs.sqlite3 (one host); "
        "postgresql://user:password@host:port/db for several replicas.",
    )
    jobs_quota_gb: float = Field(
        50.0, gt=0, description="Most GiB the jobs folder may hold; an upload past it gets 507."
    )
    jobs_ttl_h: float = Field(
        24.0, gt=0, description="Hours a finished job (done, failed, cancelled) is kept."
    )
    max_job_upload_mb: float = Field(
        20000.0, gt=0, description="Largest job upload, MiB; beyond this, 413."
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

    @field_validator("models", mode="before")
    @classmethod
    def _empty_models_is_unset(cls, v: object) -> object:
        # `UNET_MODELS=` in a compose file means "no repository", not the working directory.
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("api_key", "api_keys")
    @classmethod
    def _empty_key_is_unset(cls, v: SecretStr | None) -> SecretStr | None:
        # `UNET_API_KEY=` in a compose file means "no key", not "the empty key".
        return v if v is not None and v.get_secret_value() else None

    @field_validator("jobs_db")
    @classmethod
    def _jobs_db_url(cls, v: SecretStr) -> SecretStr:
        url = v.get_secret_value()
        # The message shows the scheme only: the rest may hold a password.
        if url and not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError(
                "must be empty (SQLite in UNET_JOBS_DIR), sqlite:///ABSOLUTE/PATH or "
                f"postgresql://user:password@host:port/db, not {url.split(':')[0]}:..."
            )
        return v

    def accepted_keys(self) -> list[str]:
        """Every bearer token the server accepts (empty: the inference routes are open)."""
        keys = [self.api_key.get_secret_value()] if self.api_key is not None else []
        if self.api_keys is not None:
            keys += [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]
        return keys

    def batch_tiles_for(self, device_type: str) -> int:
        """Tiles per batch on a device of this type ("cuda", "cpu")."""
        if self.max_batch_tiles:
            return self.max_batch_tiles
        return CUDA_BATCH_TILES if device_type == "cuda" else CPU_BATCH_TILES

    def job_batch_tiles_for(self, device_type: str) -> int:
        """Tiles per section-job batch on a device of this type."""
        if self.job_batch_tiles:
            return self.job_batch_tiles
        return max(1, self.batch_tiles_for(device_type) // 2) if device_type == "cuda" else 1

    def worker_name(self) -> str:
        return self.replica_id or socket.gethostname()

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def jobs_db_url(self) -> str:
        """The job table's URL (for jobs.table.open_job_table), the default resolved."""
        url = self.jobs_db.get_secret_value()
        return url or f"sqlite:///{(self.jobs_dir / 'jobs.sqlite3').resolve()}"

    @property
    def jobs_quota_bytes(self) -> int:
        return int(self.jobs_quota_gb * 2**30)

    @property
    def jobs_ttl_s(self) -> float:
        return self.jobs_ttl_h * 3600

    @property
    def max_job_upload_bytes(self) -> int:
        return int(self.max_job_upload_mb * 2**20)

    @property
    def max_json_bytes(self) -> int:
        return int(self.max_json_mb * 1024 * 1024)

    @property
    def max_json_reply_bytes(self) -> int:
        return int(self.max_json_reply_mb * 1024 * 1024)

    def check_tile_size(self, geometry: TileGeometry) -> None:
        """Raise ValueError naming the nearest legal sizes when TILE_SIZE does not fit (our
        U-Net's; a bioimage.io package takes its largest legal tile not above it)."""
        try:
            geometry.tile_for(self.tile_size)
        except ValueError as e:
            raise ValueError(
                f"UNET_TILE_SIZE={self.tile_size} does not fit the model: {e}"
            ) from None
