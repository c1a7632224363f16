"""A real `unet-serve` process killed in the middle of an OME-Zarr job and started again: the
job resumes at block granularity (the blocks written before the kill, recorded in the result
store, are not computed again) and its result is still the single-process whole-image one."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from app_helpers import save_tiny
from dask_cluster import Cluster
from test_app_serve import free_port, wait_for
from test_jobs_restart import Server
from zarr_helpers import em_volume, level, whole_image, write_ome_zarr

from unet_service.core.engine import Segmenter
from unet_service.imaging.zarr_result import ZarrResult

pytestmark = pytest.mark.slow

TILE = 16  # one small tile per pass: the job keeps the worker busy for seconds


def written(store: Path) -> np.ndarray:
    """Per block, the attempt that wrote it (0: not yet), from the store's own record."""
    try:
        return ZarrResult.open(str(store), read_only=True).block_tags()
    except Exception:  # not created yet
        return np.zeros(0, np.int64)


@pytest.mark.parametrize("on_cluster", [False, True], ids=["embedded", "dask"])
def test_a_killed_server_recomputes_only_the_unwritten_blocks(
    tmp_path: Path, on_cluster: bool
) -> None:
    weights = save_tiny(tmp_path)
    data = tmp_path / "data"
    volume = em_volume(2, 301, 253)
    source = write_ome_zarr(data / "volume.zarr", volume, version="0.5", chunks=(1, 32, 32))
    env = {
        **os.environ,
        "UNET_WEIGHTS": str(weights),
        "UNET_HOST": "127.0.0.1",
        "UNET_PORT": str(free_port()),
        "UNET_TILE_SIZE": str(TILE),
        "UNET_DEVICE": "cpu",
        "UNET_BACKEND": "torch",
        "UNET_JOBS_DIR": str(tmp_path / "jobs"),
        "UNET_JOB_PROGRESS_S": "0.05",
        "UNET_REPLICA_ID": "replica-a",
        "UNET_DATA_ROOTS": str(data),
        "UNET_ZARR_BLOCK": "64",
    }
    cluster = Cluster(2, tmp_path / "dask-logs") if on_cluster else None
    if cluster is not None:
        env["UNET_DASK_SCHEDULER"] = cluster.address
    try:
        run_and_resume(env, tmp_path, source, weights, volume, on_cluster)
    finally:
        if cluster is not None:
            cluster.close()


def run_and_resume(
    env: dict[str, str],
    tmp_path: Path,
    source: str,
    weights: Path,
    volume: np.ndarray,
    on_cluster: bool,
) -> None:
    server = Server(env, tmp_path)
    try:
        answer = httpx.post(f"{server.base}/v1/jobs", json={"input": source}, timeout=30)
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        store = tmp_path / "jobs" / job_id / "result.zarr"
        # Killed once a few blocks are in the store: 2 x 5 x 4 blocks in all.
        wait_for(lambda: np.count_nonzero(written(store)) >= 4, 120, "some written blocks")
    finally:
        server.stop(kill=True)  # SIGKILL: no drain, no hand-back
    before = np.count_nonzero(written(store))
    total = 2 * 5 * 4
    assert 4 <= before < total

    server = Server(env, tmp_path)  # same replica name: it takes its job back at once
    try:
        wait_for(lambda: server.job(job_id)["state"] in ("done", "failed"), 180, "the resume")
        job = server.job(job_id)
        assert job["state"] == "done", job
        assert job["attempts"] == 2
        assert job["progress"]["tiles_done"] == job["progress"]["tiles_total"]
    finally:
        server.stop(kill=False)
    log = server.output()
    assert "Traceback" not in log, log
    tags = written(store)
    resumed = re.search(r"job \w+: (\d+) of (\d+) blocks were written before this attempt", log)
    assert resumed and int(resumed[2]) == total, log
    kept = int(resumed[1])  # blocks the second attempt found written
    recomputed = int(np.count_nonzero(tags == 2))
    # Every block written before the kill was kept; only the others were computed again.
    assert before <= kept and np.count_nonzero(tags) == total
    if on_cluster:
        # A task running on a worker when the server died still finished its block (one
        # per worker thread), possibly after the second attempt had looked.
        assert total - kept - 2 <= recomputed <= total - kept
    else:
        assert kept == before and recomputed == total - before
    print(f"blocks: {total}, written before the kill: {before}, recomputed: {recomputed}")

    segmenter = Segmenter.from_weights(weights, device="cpu", backend="torch")
    expected = whole_image(segmenter, volume, TILE)
    assert np.array_equal(level(str(store)), np.stack([e.mask for e in expected]))
