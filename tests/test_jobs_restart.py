"""A real `unet-serve` process killed in the middle of a section job and started again over
the same jobs folder: the finished job's result is still there, the interrupted job is
resumed and its result is right, nothing is lost."""

from __future__ import annotations

import io
import os
import subprocess
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from app_helpers import em_crop, save_tiny, tiff_bytes
from test_app_serve import command, free_port, wait_for

from unet_service.core.engine import Segmenter
from unet_service.jobs.table.connect import open_job_table

pytestmark = pytest.mark.slow

TILE = 16  # one small tile per pass: the big job keeps the worker busy for seconds


class Server:
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            command(), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.log: list[bytes] = []
        self.reader = threading.Thread(target=lambda: self.log.extend(self.proc.stdout))
        self.reader.start()
        self.base = f"http://127.0.0.1:{env['UNET_PORT']}"

        def ready() -> bool:
            assert self.proc.poll() is None, self.output()
            try:
                return httpx.get(f"{self.base}/v2/health/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 120, "readiness")

    def output(self) -> str:
        return b"".join(self.log).decode(errors="replace")

    def job(self, job_id: str) -> dict:
        return httpx.get(f"{self.base}/v1/jobs/{job_id}", timeout=10).json()

    def stop(self, kill: bool) -> None:
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(timeout=60)
        self.reader.join(timeout=5)


def test_killed_server_resumes_its_jobs(tmp_path: Path) -> None:
    weights = save_tiny(tmp_path)
    jobs = tmp_path / "jobs"
    env = {
        **os.environ,
        "UNET_WEIGHTS": str(weights),
        "UNET_HOST": "127.0.0.1",
        "UNET_PORT": str(free_port()),
        "UNET_TILE_SIZE": str(TILE),
        "UNET_DEVICE": "cpu",
        "UNET_BACKEND": "torch",
        "UNET_JOBS_DIR": str(jobs),
        "UNET_JOB_PROGRESS_S": "0.05",
        "UNET_REPLICA_ID": "replica-a",
    }
    small = em_crop(0, 0, 0, 40, 48)
    big = em_crop(1, 0, 0, 400, 400)  # 625 tiles, one per pass
    server = Server(env, tmp_path)
    try:
        first = httpx.post(f"{server.base}/v1/jobs", files={"file": tiff_bytes(small)}).json()
        wait_for(lambda: server.job(first["id"])["state"] == "done", 60, "the small job")
        second = httpx.post(f"{server.base}/v1/jobs", files={"file": tiff_bytes(big)}).json()
        wait_for(lambda: server.job(second["id"])["progress"]["tiles_done"] > 0, 60, "progress")
    finally:
        server.stop(kill=True)  # SIGKILL: no drain, no hand-back, the lease stays
    table = open_job_table(f"sqlite:///{jobs / 'jobs.sqlite3'}")
    try:
        interrupted = table.get(second["id"])
    finally:
        table.close()
    assert interrupted is not None and interrupted.state == "running"
    assert 0 < interrupted.tiles_done < interrupted.tiles_total

    server = Server(env, tmp_path)  # same replica name: it takes its job back at once
    try:
        kept = httpx.get(f"{server.base}/v1/jobs/{first['id']}/result", timeout=10)
        assert kept.status_code == 200
        wait_for(lambda: server.job(second["id"])["state"] in ("done", "failed"), 120, "resume")
        resumed = server.job(second["id"])
        assert resumed["state"] == "done", resumed
        assert resumed["attempts"] == 2
        result = httpx.get(f"{server.base}/v1/jobs/{second['id']}/result", timeout=30)
        assert result.status_code == 200
    finally:
        server.stop(kill=False)
    assert "Traceback" not in server.output(), server.output()

    segmenter = Segmenter.from_weights(weights, device="cpu", backend="torch")
    for job, pixels, body in ((first, small, kept.content), (second, big, result.content)):
        expected = segmenter.segment(pixels[:, :, None], TILE, probabilities=True)
        assert expected.probabilities is not None
        # The guarantee of docs/inference.md: masks agree wherever the probability is not within
        # 1e-5 of the threshold (batches of other sizes may round differently).
        clear = np.abs(expected.probabilities[0] - segmenter.card.threshold) > 1e-5
        with tifffile.TiffFile(io.BytesIO(body)) as tif:
            assert len(tif.pages) == 1
            got = tif.pages[0].asarray()
        assert np.array_equal(got[clear], expected.mask[clear] * np.uint8(255)), job["id"]
