"""Prometheus metrics. Each app gets its own registry, so several apps (tests, or two
models in one process) never collide on metric names."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: from a few milliseconds (one small tile on a GPU) to minutes (huge images on a CPU).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Seconds: section jobs take from seconds (a small stack on a GPU) to hours (a whole section
# on a CPU).
JOB_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "unet_requests",
            "HTTP requests by route and status code.",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "unet_request_latency_seconds",
            "End-to-end latency of HTTP requests, from arrival to the last byte sent.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "unet_queue_wait_seconds",
            "Time an accepted image waits before its first tile enters a forward pass.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        by_model = ["model"]
        self.batch_tiles = Histogram(
            "unet_batch_tiles",
            "Tiles per forward pass.",
            by_model,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "unet_forward_seconds",
            "Duration of one batched forward pass, tile preparation included.",
            by_model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.forward_passes = Counter(
            "unet_forward_passes",
            "Forward passes run by the inference worker.",
            by_model,
            registry=r,
        )
        self.tiles = Counter(
            "unet_tiles", "Tiles computed by the inference worker.", by_model, registry=r
        )
        self.oom_splits = Counter(
            "unet_oom_splits",
            "Batches halved and retried after a CUDA out-of-memory error.",
            by_model,
            registry=r,
        )
        self.model_loaded = Gauge(
            "unet_model_loaded",
            "1 for a model on the device and warm, 0 for one of the repository not loaded.",
            by_model,
            registry=r,
        )
        self.worker_errors = Counter(
            "unet_worker_errors",
            "Batches that failed in the worker (their requests got 500; a section job's page "
            "that cannot be read is not counted here, see unet_job_failures_total).",
            registry=r,
        )
        self.queue_tiles = Gauge(
            "unet_queue_tiles", "Tiles accepted and not yet computed (queue depth).", registry=r
        )
        self.queue_images = Gauge(
            "unet_queue_images", "Images accepted and not yet finished.", registry=r
        )
        self.job_tiles_queued = Gauge(
            "unet_job_tiles_queued",
            "Tiles of section jobs' pages in the tile queue, not yet computed (they run when "
            "no request's tiles wait).",
            registry=r,
        )
        self.jobs = Gauge(
            "unet_jobs",
            "Section jobs in the job table by state (all replicas' jobs).",
            ["state"],
            registry=r,
        )
        self.job_duration = Histogram(
            "unet_job_duration_seconds",
            "Duration of section jobs on this replica, from start (or resumption) to the end, "
            "by final state.",
            ["state"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.job_failures = Counter(
            "unet_job_failures",
            "Section jobs failed on this replica, by reason: input (the upload could not be "
            "read: a corrupt strip or tile, NaN pixels), inference (a batch failed, also "
            "counted in unet_worker_errors_total), error (anything else, in the log).",
            ["reason"],
            registry=r,
        )
        self.ready = Gauge("unet_ready", "1 when the default model is loaded and warm.", registry=r)
        self._device_gauges = False

    def observe_batch(self, model: str, tiles: int, seconds: float) -> None:
        """One forward pass of the inference worker: `tiles` tiles of `model` in `seconds`."""
        self.forward_passes.labels(model).inc()
        self.tiles.labels(model).inc(tiles)
        self.batch_tiles.labels(model).observe(tiles)
        self.forward_seconds.labels(model).observe(seconds)

    def set_queue(self, tiles: int, images: int, background_tiles: int) -> None:
        """The tile queue's depth: requests' tiles and images, and section jobs' tiles."""
        self.queue_tiles.set(tiles)
        self.queue_images.set(images)
        self.job_tiles_queued.set(background_tiles)

    def add_device_memory(self, stats: Callable[[], dict[str, int] | None]) -> None:
        """Memory gauges for the inference device, read from `stats()` at each scrape (the
        engine's `memory_stats`: allocated, reserved and peak bytes, or None on a CPU)."""
        if self._device_gauges or stats() is None:
            return
        self._device_gauges = True
        helps = {
            "allocated": "CUDA memory held by tensors on the inference device.",
            "reserved": "CUDA memory reserved by PyTorch's caching allocator on the device.",
            "peak": "Peak CUDA memory held by tensors since the service started.",
        }
        for key, text in helps.items():
            gauge = Gauge(f"unet_cuda_memory_{key}_bytes", text, registry=self.registry)
            gauge.set_function(lambda key=key: (stats() or {}).get(key, 0))
