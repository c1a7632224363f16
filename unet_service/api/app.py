"""The FastAPI app (`create_app`): the service and its job worker in its lifespan, the routes,
the error handlers and the request metrics. `unet-serve` (cli.serve) runs it on uvicorn."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from unet_service.api.errors import install_error_handlers
from unet_service.api.routes import (
    health_metrics,
    job_access,
    jobs,
    models,
    preview,
    segment,
    v2,
    v2_infer,
    web,
)
from unet_service.api.uploads import ARRIVED
from unet_service.core.engine import TiledModel
from unet_service.jobs.files import JobFiles
from unet_service.jobs.runner import JobRunner
from unet_service.jobs.table.connect import open_job_table
from unet_service.serving.metrics import Metrics
from unet_service.serving.service import InferenceService
from unet_service.settings import Settings

log = logging.getLogger("app")

DESCRIPTION = """
Segment 2D images with a valid-convolution U-Net. Large images are cut into overlap tiles
whose stitched result equals one pass over the whole image; tiles from all concurrent
requests share forward passes.

* `POST /v1/segment`: upload an image (multipart field `file`), get a mask PNG,
  probabilities (`.npy`) or an overlay PNG.
* `POST /v1/preview`: an image (one page of a stack) as a PNG for display, as the web page
  shows it; or a mask or instances answer in the overlay's colours.
* `POST /v1/jobs`: a section job for stacks and images of any size (up to
  `UNET_MAX_JOB_PIXELS`), computed in the background; poll `GET /v1/jobs/{id}`, download
  `GET /v1/jobs/{id}/result`.
* `GET /v1/models`: the models served (`?model=NAME` picks one), their states and the
  default one.
* `/v2/...`: the Open Inference Protocol (KServe v2) with JSON tensors.
* `GET /metrics`: Prometheus metrics.

When the server sets `UNET_API_KEY`, use **Authorize** with that key first.
"""


class RequestMetricsMiddleware:
    """Counts requests by route and status, times them to the last byte, stamps their
    arrival (deadlines count from there) and echoes or assigns an X-Request-ID."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        scope[ARRIVED] = start
        request_id = _header(scope, b"x-request-id") or uuid.uuid4().hex
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - start)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            text = value.decode("latin-1")[:128]
            return text if text.isprintable() else None
    return None


def job_files(settings: Settings) -> JobFiles:
    return JobFiles(settings.jobs_dir, settings.jobs_quota_bytes)


def create_app(settings: Settings | None = None, segmenter: TiledModel | None = None) -> FastAPI:
    """The service. With `segmenter`, that already-loaded engine is the default model;
    otherwise the lifespan loads it. Readiness turns true after its warm-up."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await asyncio.to_thread(InferenceService, settings, metrics, segmenter)
        table = await asyncio.to_thread(open_job_table, settings.jobs_db_url)
        try:
            await service.start()
            runner = JobRunner(service, table, job_files(settings), settings, metrics)
            await runner.start()
            app.state.service = service
            app.state.jobs = runner
            try:
                yield
            finally:
                # The job in progress goes back to the queue first (its tiles leave the tile
                # queue), so that draining waits only for the requests' work.
                await runner.stop()
                await service.shutdown(settings.drain_timeout_s)
                log.info("inference worker stopped")
        finally:
            await asyncio.to_thread(table.close)

    # /docs and /redoc with Swagger UI's and ReDoc's assets served from this process (the
    # fastapi-offline package ships them): the pages work in air-gapped labs. No validator
    # badge either, which Swagger UI would fetch from swagger.io.
    app = FastAPIOffline(
        title="UNet segmentation service",
        version=v2.SERVER_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        static_url="/docs-assets",
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = None
    app.state.jobs = None
    install_error_handlers(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.include_router(segment.router)
    app.include_router(preview.router)
    app.include_router(models.router)
    app.include_router(jobs.router)
    app.include_router(job_access.router)
    app.include_router(v2.router)
    app.include_router(v2_infer.router)
    app.include_router(health_metrics.router)
    app.include_router(web.router)
    return app
