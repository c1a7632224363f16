"""A real Dask distributed cluster for the tests, started as a user starts one: `dask
scheduler` and `dask worker ADDRESS --nthreads 1` processes from this environment, on free
ports; ready once a client sees every worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from distributed import Client
from test_app_serve import free_port

DASK = str(Path(sys.executable).with_name("dask"))


class Cluster:
    def __init__(self, workers: int, logs: Path) -> None:
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self._logs: list = []
        port = self.address.rsplit(":", 1)[1]
        self.scheduler = self._start(
            "scheduler",
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"],
        )
        self.workers = [self._start(f"worker-{i}", self._worker(i)) for i in range(workers)]
        self.wait_for_workers(workers)

    def _worker(self, i: int) -> list[str]:
        return [
            DASK,
            "worker",
            self.address,
            "--nthreads",
            "1",
            "--no-dashboard",
            "--name",
            f"w{i}",
        ]

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed by close()
        self._logs.append(log)
        # A session of its own: a worker and its nanny are killed together.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def wait_for_workers(self, n: int) -> None:
        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(n, timeout=120)

    def run(self, function) -> dict[str, object]:
        """`function(dask_worker)` on every worker: {worker address: its result}."""
        with Client(self.address, timeout=60) as client:
            return client.run(function)

    def run_on_scheduler(self, function) -> object:
        """`function(dask_scheduler)` on the scheduler."""
        with Client(self.address, timeout=60) as client:
            return client.run_on_scheduler(function)

    def kill_worker(self, i: int) -> None:
        """SIGKILL the worker and its nanny: gone without a word to the scheduler."""
        os.killpg(self.workers[i].pid, signal.SIGKILL)
        self.workers[i].wait(timeout=30)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        for log in self._logs:
            log.close()

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))
