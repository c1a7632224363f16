"""Closed-loop HTTP load: C clients, each sending its next upload as soon as the last one
returned, all aimed at one server on this machine (loopback only)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.workload import Upload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A server process started for one measurement and stopped after it."""

    argv: list[str]
    env: dict[str, str]
    port: int
    ready_path: str
    proc: subprocess.Popen | None = None
    stop_argv: list[str] | None = None  # for servers that detach (TorchServe's JVM)
    cwd: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(
            self.argv,
            env={**os.environ, **self.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.cwd,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"server exited during start-up:\n{err}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server did not become ready in 300 s")

    def __exit__(self, *exc: object) -> None:
        if self.stop_argv is not None:
            subprocess.run(self.stop_argv, capture_output=True, timeout=120, check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def rss_bytes(self, field_name: str = "VmRSS") -> int:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"{field_name}:\s+(\d+) kB", text).group(1)) * 1024

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def reset_peak_rss(self) -> None:
        # Writing 5 resets the peak resident set size (VmHWM) to the current one.
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")


def unet_server(weights: Path, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    exe = Path(sys.executable).parent / "unet-serve"
    settings = {
        "UNET_WEIGHTS": str(weights),
        "UNET_PORT": str(port),
        "UNET_HOST": "127.0.0.1",
        "UNET_LOG_LEVEL": "warning",
        **(env or {}),
    }
    return Server([str(exe)], settings, port, "/v2/health/ready")


def naive_server(weights: Path) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "bench.naive_server", str(weights), str(port)]
    return Server(argv, {}, port, "/ready")


TORCHSERVE_CONFIG = """\
inference_address=http://127.0.0.1:{port}
management_address=http://127.0.0.1:{management}
metrics_address=http://127.0.0.1:{metrics}
disable_token_authorization=true
install_py_dep_per_model=false
models={{"unet": {{"1.0": {{"marName": "unet.mar", "minWorkers": 1, "maxWorkers": 1, \
"batchSize": 8, "maxBatchDelay": 10, "responseTimeout": 600}}}}}}
load_models=unet.mar
model_store={store}
"""


def torchserve_available() -> str | None:
    """None when TorchServe can run here, else why not."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "torchserve").exists() or not (bin_dir / "torch-model-archiver").exists():
        return "the torchserve and torch-model-archiver packages are not installed"
    if shutil.which("java") is None:
        return "TorchServe needs Java 17, and there is no java on PATH"
    return None


def torchserve_server(weights: Path, workdir: Path) -> Server:
    """TorchServe 0.12 with bench/torchserve_handler.py: one worker, batches of up to 8
    requests, 10 ms batch delay (the same limits as unet-serve's defaults)."""
    bin_dir = Path(sys.executable).parent
    store = workdir / "store"
    store.mkdir(parents=True, exist_ok=True)
    card = weights.with_suffix(".json")
    subprocess.run(
        [
            str(bin_dir / "torch-model-archiver"),
            "--model-name=unet",
            "--version=1.0",
            f"--handler={Path(__file__).parent / 'torchserve_handler.py'}",
            f"--extra-files={weights},{card}",
            f"--export-path={store}",
            "--force",
        ],
        check=True,
        capture_output=True,
    )
    port, management, metrics = free_port(), free_port(), free_port()
    config = workdir / "config.properties"
    config.write_text(
        TORCHSERVE_CONFIG.format(port=port, management=management, metrics=metrics, store=store)
    )
    torchserve = str(bin_dir / "torchserve")
    argv = [torchserve, "--start", "--foreground", "--ncs", f"--ts-config={config}"]
    argv += [f"--model-store={store}", "--disable-token-auth"]
    # The handler imports this project's `model` package; TorchServe writes logs/ in its cwd.
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "LOG_LOCATION": str(workdir)}
    stop = [torchserve, "--stop"]
    return Server(argv, env, port, "/ping", stop_argv=stop, cwd=workdir)


@dataclass
class LoadResult:
    clients: int
    wall_s: float
    latencies_s: list[float] = field(default_factory=list)
    pixels: int = 0
    computed_pixels: int = 0
    errors: int = 0

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    @property
    def mpix_s(self) -> float:
        return self.pixels / self.wall_s / 1e6

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) if self.latencies_s else float("nan")


async def _run_load(
    url: str, uploads: Sequence[Upload], clients: int, total: int, path: str, query: str
) -> LoadResult:
    result = LoadResult(clients, 0.0)
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            for i in counter:
                upload = uploads[i % len(uploads)]
                files = {"file": (f"{upload.name}.png", upload.png, "image/png")}
                start = time.perf_counter()
                try:
                    r = await client.post(f"{path}?{query}" if query else path, files=files)
                except httpx.HTTPError:
                    result.errors += 1
                    continue
                if r.status_code != 200:
                    result.errors += 1
                    continue
                result.latencies_s.append(time.perf_counter() - start)
                result.pixels += upload.pixels
                tiles, size = r.headers.get("X-Tiles"), r.headers.get("X-Tile-Size")
                if tiles and size:
                    result.computed_pixels += int(tiles) * int(size) ** 2

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        result.wall_s = time.perf_counter() - start
    return result


def run_load(
    url: str,
    uploads: Sequence[Upload],
    clients: int,
    total: int,
    path: str = "/v1/segment",
    query: str = "",
) -> LoadResult:
    return asyncio.run(_run_load(url, uploads, clients, total, path, query))


def scrape(url: str) -> dict[str, float]:
    """The server's metrics: {series: value}, labels kept in the key as Prometheus writes
    them (`unet_batch_tiles_bucket{le="4.0"}`)."""
    out = {}
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out
