"""Liveness under the largest requests: how long `GET /v2/health/live` takes while KServe v2
requests at the JSON body limit, and binary requests at the upload limit, are parsed,
computed and answered. A Kubernetes liveness probe restarts a pod that does not answer in
time, so a big request must never hold the event loop.

`python -m bench.liveness` prints a Markdown table; `bench.run` includes it as a section.
The network is a small randomly initialised UNet: the event loop's work (reading, parsing,
serialising) does not depend on the weights, and a small network keeps the huge images quick.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.load import unet_server
from unet_service.core.unet import UNet
from unet_service.core.weights import ModelCard, save_weights
from unet_service.settings import Settings

PROBE_INTERVAL_S = 0.02
TARGET_P99_MS = 100.0


def random_weights(folder: Path, name: str, channels: list[int], std: float = 0.25) -> Path:
    """A randomly initialised UNet saved with its card, for benchmarks whose measure does
    not depend on the weights' values."""
    torch.manual_seed(0)
    card = ModelCard(
        name=name,
        channels=channels,
        normalization={"mean": [0.5], "std": [std]},
        description="Randomly initialised, for benchmarks only.",
    )
    return save_weights(UNet(channels, 1).eval(), card, folder / f"{name}.safetensors")


def probe_loop(base: str, stop, results) -> None:
    """In its own process (so the load clients' work in this one cannot delay it): probes
    one after another until `stop` is set, then sends back (sent at, seconds) pairs, with
    times on the system-wide monotonic clock."""
    samples = []
    with httpx.Client(base_url=base, timeout=60) as client:
        while not stop.is_set():
            sent = time.monotonic()
            r = client.get("/v2/health/live")
            samples.append((sent, time.monotonic() - sent))
            if r.status_code != 200:
                raise RuntimeError(f"liveness answered {r.status_code}")
            stop.wait(PROBE_INTERVAL_S)
    results.put(samples)


@dataclass
class Probe:
    """The probe process, and the phases: each probe is filed under the phase that was
    running when it was sent."""

    base: str
    phases: list[tuple[str, float]] = field(default_factory=list)  # (name, start)
    latencies: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._results = context.Queue()
        self._process = context.Process(
            target=probe_loop, args=(self.base, self._stop, self._results)
        )

    def start(self) -> None:
        self._process.start()
        self.phase("idle")

    def phase(self, name: str) -> None:
        self.phases.append((name, time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        samples = self._results.get(timeout=120)
        self._process.join(timeout=30)
        for sent, latency in samples:
            name = [n for n, start in self.phases if start <= sent][-1:] or ["idle"]
            self.latencies.setdefault(name[0], []).append(latency)


def json_request(side: int) -> bytes:
    """A UINT8 [side, side] tensor as JSON, written as Python's json module (and so
    tritonclient with binary_data=False) writes it, asking for both outputs as JSON."""
    pixels = np.random.default_rng(side).integers(0, 256, side * side, dtype=np.uint8)
    request = {
        "inputs": [
            {"name": "image", "shape": [side, side], "datatype": "UINT8", "data": pixels.tolist()}
        ],
        "outputs": [{"name": "mask"}, {"name": "probabilities"}],
    }
    return json.dumps(request).encode()


def largest_json_request(limit_bytes: int, reply_limit_bytes: int) -> tuple[int, bytes]:
    """The largest square image whose JSON request fits the body limit and whose JSON
    reply (mask and probabilities) fits the reply limit."""
    side = 64
    while True:
        bigger = int(side * 1.1)
        # Reply: mask values "0, " (3 B) + float32 probabilities (about 12 B) per pixel.
        if bigger * bigger * 15 > reply_limit_bytes:
            break
        if len(json_request(bigger)) > limit_bytes:
            break
        side = bigger
    return side, json_request(side)


def binary_request(limit_bytes: int, max_pixels: int) -> tuple[int, bytes, str]:
    """The largest square UINT16 image that fits the upload limit and the pixel limit, with
    the binary tensor extension; both outputs come back binary."""
    side = int(min(((limit_bytes - 4096) / 2) ** 0.5, max_pixels**0.5))
    raw = np.random.default_rng(0).integers(0, 65536, side * side, dtype="<u2").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [side, side],
                    "datatype": "UINT16",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [
                {"name": "mask", "parameters": {"binary_data": True}},
                {"name": "probabilities", "parameters": {"binary_data": True}},
            ],
        }
    ).encode()
    return side, header + raw, str(len(header))


def send(base: str, body: bytes, headers: dict[str, str], check: Callable[[httpx.Response], None]):
    with httpx.Client(base_url=base, timeout=600) as client:
        r = client.post("/v2/models/probe/infer", content=body, headers=headers)
    if r.status_code != 200:
        raise RuntimeError(f"infer answered {r.status_code}: {r.text[:300]}")
    check(r)


def load_phase(base: str, clients: int, requests: int, body: bytes, headers: dict[str, str]):
    def check(r: httpx.Response) -> None:
        if not r.content:
            raise RuntimeError("empty reply")

    def client_loop() -> None:
        for _ in range(requests):
            send(base, body, headers, check)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def measure(quick: bool = False) -> list[list[object]]:
    """Rows of (phase, request, probes, p50 ms, p99 ms, max ms)."""
    settings = Settings()
    with tempfile.TemporaryDirectory() as tmp:
        weights = random_weights(Path(tmp), "probe", [1, 4, 8, 16])
        with unet_server(weights) as server:
            probe = Probe(server.url)
            probe.start()
            try:
                time.sleep(1 if quick else 3)
                side, body = largest_json_request(
                    settings.max_json_bytes, settings.max_json_reply_bytes
                )
                probe.phase("json")
                load_phase(
                    server.url, 2, 1 if quick else 3, body, {"Content-Type": "application/json"}
                )
                json_row = f"JSON {side}x{side} UINT8, {len(body) / 2**20:.1f} MiB, 2 clients"
                bside, bbody, head = binary_request(settings.max_upload_bytes, settings.max_pixels)
                probe.phase("binary")
                load_phase(
                    server.url,
                    1,
                    1 if quick else 2,
                    bbody,
                    {"Inference-Header-Content-Length": head},
                )
                binary_row = f"binary {bside}x{bside} UINT16, {len(bbody) / 2**20:.0f} MiB"
            finally:
                probe.stop()
    rows = []
    for phase, what in (("idle", "none"), ("json", json_row), ("binary", binary_row)):
        values = probe.latencies.get(phase, [])
        rows.append(
            [
                phase,
                what,
                len(values),
                percentile(values, 50),
                percentile(values, 99),
                max(values) * 1000,
            ]
        )
    return rows


HEADER = ["phase", "requests in flight", "probes", "p50 ms", "p99 ms", "max ms"]


def markdown(rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows:
        cells = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    worst = max(float(row[4]) for row in rows)
    verdict = "met" if worst < TARGET_P99_MS else "missed"
    lines += ["", f"Worst p99: {worst:.1f} ms (target < {TARGET_P99_MS:.0f} ms: {verdict})."]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.liveness", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer requests per phase")
    args = p.parse_args(argv)
    rows = measure(args.quick)
    print("\n".join(markdown(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
