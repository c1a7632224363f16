"""`unet-serve`: the service on uvicorn, with the settings of the environment (and a few
command-line overrides); a drained, clean stop on SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from unet_service.api.app import create_app
from unet_service.core.weights import WeightsError
from unet_service.serving.catalog import default_model, discover
from unet_service.serving.service import InferenceService, State, load_segmenter
from unet_service.settings import Settings

log = logging.getLogger("app")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unet-serve",
        description="Serve a UNet over HTTP (docs at http://HOST:PORT/docs). Every setting "
        "is read from UNET_* environment variables (see docs/settings.md); the options below "
        "override them.",
    )
    p.add_argument("--host", help="bind address (UNET_HOST, default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port (UNET_PORT, default 8000)")
    p.add_argument("--weights", help="weights file (UNET_WEIGHTS)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (UNET_DEVICE)")
    return p


def _load_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as e:
        problems = "; ".join(
            f"UNET_{'.'.join(map(str, err['loc'])).upper()}: {err['msg']}" for err in e.errors()
        )
        parser.exit(2, f"{parser.prog}: error: invalid settings: {problems}\n")


class _Server(uvicorn.Server):
    """Flags the service as draining the moment SIGTERM/SIGINT arrives, so readiness drops
    and new work gets 503 while uvicorn finishes the requests in flight."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        service: InferenceService | None = getattr(self._app.state, "service", None)
        if service is not None and service.state is State.ready:
            log.info("signal %d: draining, no new work accepted", sig)
            service.begin_drain()
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = _load_settings(parser, args)
    logging.basicConfig(
        level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
        format="%(levelname)s:     %(name)s: %(message)s",
    )
    # Load before the server starts, so a bad weights file ends in one line, not in the
    # traceback uvicorn prints for a failed lifespan.
    try:
        models = discover(settings)
        segmenter = load_segmenter(settings, models[default_model(settings, models)])
    except (WeightsError, ValueError, OSError) as e:
        log.error("cannot start: %s", e)
        return 1
    app = create_app(settings, segmenter=segmenter)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
        lifespan="on",
    )
    server = _Server(config, app)
    # uvicorn re-raises the signal it stopped for once it is done, under the handler that
    # was installed before it ran; a no-op handler turns a drained shutdown into exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
