"""The real `unet-serve` process over a socket: start, ready, segment; a client that hangs
up has its tiles dropped; SIGTERM lets the request in flight finish, then exits 0. And a
bad weights file stops startup with one line."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from app_helpers import em_crop, metric_total, png_bytes, save_tiny
from PIL import Image

pytestmark = pytest.mark.slow

BIG = (0, 0, 0, 500, 500)  # at tile 16 and one tile per pass: 32 x 32 = 1024 passes


def command() -> list[str]:
    script = shutil.which("unet-serve", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "unet_service.cli.serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(base: str, name: str, **labels: str) -> float:
    return metric_total(httpx.get(f"{base}/metrics", timeout=5).text, name, **labels)


def wait_for(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "unet-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_unet_serve_process(tmp_path: Path) -> None:
    weights = save_tiny(tmp_path)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "UNET_WEIGHTS": str(weights),
        "UNET_HOST": "127.0.0.1",
        "UNET_PORT": str(port),
        # Small tiles, one per pass: the big image keeps the worker busy for seconds.
        "UNET_TILE_SIZE": "16",
        "UNET_MAX_BATCH_TILES": "1",
        "UNET_DRAIN_TIMEOUT_S": "60",
    }
    proc = subprocess.Popen(
        command(), env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    try:

        def ready() -> bool:
            assert proc.poll() is None, b"".join(log).decode()
            try:
                return httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 120, "readiness")

        small = em_crop(1, 0, 0, 40, 40)
        r = httpx.post(f"{base}/v1/segment", files={"file": ("s.png", png_bytes(small))})
        assert r.status_code == 200, r.text
        assert np.asarray(Image.open(io.BytesIO(r.content))).shape == (40, 40)

        # A client that hangs up: its queued tiles are dropped, the worker moves on.
        body, content_type = multipart(png_bytes(em_crop(*BIG)))
        with socket.create_connection(("127.0.0.1", port)) as sock:
            head = (
                f"POST /v1/segment HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body)
            wait_for(lambda: metric(base, "unet_queue_tiles") > 500, 30, "queued tiles")
        wait_for(lambda: metric(base, "unet_queue_tiles") == 0, 10, "the queue to empty")
        assert metric(base, "unet_tiles_total") < 1 + 1024 - 100  # most tiles never ran
        gone = {"endpoint": "/v1/segment", "method": "POST", "status": "499"}
        assert metric(base, "unet_requests_total", **gone) == 1

        # SIGTERM while a request is in flight: it completes, then the process exits 0.
        result: dict[str, httpx.Response] = {}

        def in_flight() -> None:
            result["r"] = httpx.post(
                f"{base}/v1/segment",
                files={"file": ("big.png", png_bytes(em_crop(*BIG)))},
                timeout=120,
            )

        client = threading.Thread(target=in_flight)
        client.start()
        wait_for(lambda: metric(base, "unet_queue_tiles") > 500, 30, "queued tiles")
        proc.send_signal(signal.SIGTERM)
        client.join(timeout=120)
        assert proc.wait(timeout=60) == 0
        r = result["r"]
        assert r.status_code == 200, r.text
        assert r.headers["x-tiles"] == "1024"
        assert np.asarray(Image.open(io.BytesIO(r.content))).shape == (500, 500)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    output = b"".join(log).decode()
    assert "draining" in output and "Traceback" not in output


def test_bad_weights_stop_startup_with_one_line(tmp_path: Path) -> None:
    weights = save_tiny(tmp_path)
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    env = {**os.environ, "UNET_WEIGHTS": str(weights), "UNET_PORT": str(free_port())}
    done = subprocess.run(command(), env=env, cwd=tmp_path, capture_output=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "cannot start" in lines[0] and "safetensors" in lines[0], lines

    env["UNET_TILE_SIZE"] = "abc"
    done = subprocess.run(command(), env=env, cwd=tmp_path, capture_output=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.decode().startswith("unet-serve: error: invalid settings: UNET_TILE_SIZE")


def test_a_tile_narrower_than_the_stride_stops_startup_naming_the_smallest(
    tmp_path: Path,
) -> None:
    """Tile 4 is a legal output of the shipped depth-4 model, but its tiles would sit 16
    apart with gaps between them: refused at start-up, naming the smallest legal tile."""
    env = {**os.environ, "UNET_PORT": str(free_port()), "UNET_TILE_SIZE": "4"}
    done = subprocess.run(command(), env=env, cwd=tmp_path, capture_output=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "cannot start" in lines[0], lines
    assert "UNET_TILE_SIZE=4" in lines[0] and "smallest legal tile: 20" in lines[0], lines


def outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_unet_serve_listens_on_loopback_unless_told(tmp_path: Path) -> None:
    """Outside a container the API (open unless a key is set) is not offered to the network:
    without UNET_HOST the server binds 127.0.0.1 only."""
    weights = save_tiny(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "UNET_HOST"}
    env |= {"UNET_WEIGHTS": str(weights), "UNET_PORT": str(port)}
    proc = subprocess.Popen(
        command(), env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    log: list[bytes] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    try:

        def ready() -> bool:
            assert proc.poll() is None, b"".join(log).decode()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
            except httpx.TransportError:
                return False
            return r.status_code == 200

        wait_for(ready, 120, "readiness")
        assert f"Uvicorn running on http://127.0.0.1:{port}".encode() in b"".join(log)
        address = outward_address()
        if address is not None:  # a machine with a network interface besides loopback
            with pytest.raises(OSError), socket.create_connection((address, port), timeout=5):
                pass
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    reader.join(timeout=5)
