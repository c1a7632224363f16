"""OME-Zarr jobs on a real Dask cluster (`dask scheduler` and two `dask worker --nthreads 1`
processes) with the tiny real UNet: a server pointed at it by UNET_DASK_SCHEDULER gives the
single-process whole-image result at any block size (a block smaller than the network's
context, odd volume sizes), cell ids equal to the embedded block-wise run's, and the same
result when a worker is killed in the middle of a job."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from app_helpers import running as running_app
from app_helpers import save_tiny
from dask_cluster import Cluster
from test_jobs_api import wait_state
from test_zarr_restart import written
from zarr_helpers import em_volume, level, whole_image, write_ome_zarr

from unet_service.core.engine import Segmenter

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SHAPE = (2, 75, 61)  # odd sizes; chunks of 8 cut tiles anywhere
CONTEXT = 20  # the tiny UNet's, each side


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("zarr-cluster"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    started = Cluster(2, tmp_path_factory.mktemp("dask-logs"))
    yield started
    started.close()


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return em_volume(*SHAPE)


@pytest.fixture(scope="module")
def reference(weights: Path, volume: np.ndarray):
    return whole_image(Segmenter.from_weights(weights, device="cpu", backend="torch"), volume)


def app_for(weights: Path, tmp_path: Path, side: int, scheduler: str | None, **more: object):
    from app_helpers import make_app

    return make_app(
        weights,
        jobs_dir=tmp_path / "jobs",
        job_progress_s=0.02,
        data_roots=str(tmp_path / "data"),
        zarr_block=side,
        dask_scheduler=scheduler or "",
        **more,
    )


async def run_job(app, source: str, output: str) -> dict:
    async with running_app(app) as client:
        answer = await client.post("/v1/jobs", params={"output": output}, json={"input": source})
        assert answer.status_code == 202, answer.text
        job = await wait_state(client, answer.json()["id"])
    assert job["state"] == "done", job
    assert job["progress"]["tiles_done"] == job["progress"]["tiles_total"] > 0
    return job


# How many jobs a worker computed blocks of (its model plugin keeps them open); a lambda, so
# that it is sent by value to workers that cannot import this test module.
jobs_opened = lambda dask_worker: sum(  # noqa: E731
    len(plugin.jobs)
    for name, plugin in dask_worker.plugins.items()
    if name.startswith("unet-model-")
)


# Each worker's loaded models (their ids: the same objects while they are not reloaded).
models_loaded = lambda dask_worker: sorted(  # noqa: E731
    (name, id(plugin.segmenter))
    for name, plugin in dask_worker.plugins.items()
    if name.startswith("unet-model-")
)
# The scheduler's (key, from state, to state) transitions; a lambda, sent by value.
transitions = lambda dask_scheduler: [tuple(t)[:3] for t in dask_scheduler.transition_log]  # noqa: E731
# Tasks the scheduler still holds.
tasks_held = lambda dask_scheduler: len(dask_scheduler.tasks)  # noqa: E731


def processing_counts(log: list[tuple[str, str, str]], prefix: str) -> dict[str, int]:
    """How often each task whose key starts with `prefix` was given to a worker."""
    counts: dict[str, int] = {}
    for key, _, state in log:
        if str(key).startswith(prefix) and state == "processing":
            counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("side", [16, 40, 72])
async def test_blocks_on_the_cluster_equal_the_whole_image(
    weights: Path, cluster: Cluster, volume: np.ndarray, reference, tmp_path: Path, side: int
) -> None:
    source = write_ome_zarr(tmp_path / "data" / "v.zarr", volume, version="0.5", chunks=(1, 8, 8))
    app = app_for(weights, tmp_path, side, cluster.address)
    mask_job = await run_job(app, source, "mask")
    loaded = cluster.run(models_loaded)
    probs_job = await run_job(app, source, "probabilities")
    assert cluster.run(models_loaded) == loaded  # each worker loaded the model once
    blocks = mask_job["result"]["store"]
    layout = np.asarray(written(Path(blocks)))
    assert layout.size == 2 * -(-75 // min(side, 80)) * -(-61 // min(side, 64))
    if side == 16:
        assert side < CONTEXT and layout.size == 2 * 5 * 4
    # Masks byte-equal; probabilities within docs/inference.md's fp32 bound.
    assert np.array_equal(level(blocks), np.stack([r.mask for r in reference]))
    probs = level(probs_job["result"]["store"])
    assert np.abs(probs - np.stack([r.probabilities[0] for r in reference])).max() <= 1e-5
    if layout.size > 2:  # more blocks than workers: both took some
        assert all(n > 0 for n in cluster.run(jobs_opened).values())


async def test_cell_ids_on_the_cluster_equal_the_embedded_run(
    weights: Path, cluster: Cluster, volume: np.ndarray, tmp_path: Path
) -> None:
    source = write_ome_zarr(tmp_path / "data" / "v.zarr", volume, version="0.4", chunks=(1, 16, 16))
    on_cluster = await run_job(app_for(weights, tmp_path, 32, cluster.address), source, "instances")
    embedded = await run_job(app_for(weights, tmp_path, 32, None), source, "instances")
    ids = level(on_cluster["result"]["store"])
    assert ids.max() > 1 and np.array_equal(ids, level(embedded["result"]["store"]))


async def test_a_worker_killed_mid_job_leaves_the_result_unchanged(
    weights: Path, tmp_path: Path
) -> None:
    volume = em_volume(2, 181, 157)
    source = write_ome_zarr(tmp_path / "data" / "v.zarr", volume, version="0.5", chunks=(1, 32, 32))
    own = Cluster(2, tmp_path / "logs")  # one of its workers dies here
    try:
        app = app_for(weights, tmp_path, 32, own.address, tile_size=16)
        async with running_app(app) as client:
            answer = await client.post("/v1/jobs", json={"input": source})
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["id"]
            store = tmp_path / "jobs" / job_id / "result.zarr"
            total = 2 * 6 * 5
            loop = asyncio.get_running_loop()
            end = loop.time() + 120
            while np.count_nonzero(written(store)) < 4:  # the gate: some blocks recorded
                assert loop.time() < end, "no block was written"
                await asyncio.sleep(0.02)
            own.kill_worker(1)
            before = int(np.count_nonzero(written(store)))
            job = await wait_state(client, job_id, timeout=300)
        scheduler_log = own.run_on_scheduler(transitions)
        assert job["state"] == "done", (job, own.output()[-3000:])
        assert job["progress"]["tiles_done"] == job["progress"]["tiles_total"]
    finally:
        own.close()
    assert before < total and np.count_nonzero(written(store)) == total
    # Blocks the scheduler gave to a worker again after the kill (those the dead worker was
    # computing, or had queued).
    again = sum(n > 1 for n in processing_counts(scheduler_log, f"unet-block-{job_id}-").values())
    assert 1 <= again < total - before
    print(f"blocks: {total}, written when the worker was killed: {before}, run again: {again}")
    segmenter = Segmenter.from_weights(weights, device="cpu", backend="torch")
    expected = np.stack([r.mask for r in whole_image(segmenter, volume, 16)])
    assert np.array_equal(level(str(store)), expected)


def test_unet_predict_segments_a_volume_on_the_cluster_and_alone(
    weights: Path, cluster: Cluster, volume: np.ndarray, reference, tmp_path: Path
) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from unet_service.cli.predict import main

    source = write_ome_zarr(tmp_path / "v.zarr", volume, version="0.4", chunks=(1, 16, 16))
    common = ["--weights", str(weights), "--tile-size", "60", "--batch-size", "1"]
    common += ["--device", "cpu", "--block", "32", "--probabilities"]
    assert main([source, "-o", str(tmp_path / "alone"), *common]) == 0
    assert (
        main([source, "-o", str(tmp_path / "dask"), "--scheduler", cluster.address, *common]) == 0
    )
    for folder in ("alone", "dask"):
        node = next(Reader(parse_url(str(tmp_path / folder / "v.zarr")))())
        assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]
        assert np.array_equal(np.asarray(node.data[0]), np.stack([r.mask for r in reference]))
        probs = level(str(tmp_path / folder / "v.probabilities.zarr"))
        assert np.abs(probs - np.stack([r.probabilities[0] for r in reference])).max() <= 1e-5
    # A finished result is never overwritten.
    assert main([source, "-o", str(tmp_path / "alone"), *common]) == 1


async def test_deleting_a_job_on_the_cluster_stops_its_blocks_and_removes_its_store(
    weights: Path, cluster: Cluster, tmp_path: Path
) -> None:
    volume = em_volume(2, 181, 157)
    source = write_ome_zarr(tmp_path / "data" / "v.zarr", volume, version="0.5", chunks=(1, 32, 32))
    app = app_for(weights, tmp_path, 32, cluster.address, tile_size=16)
    async with running_app(app) as client:
        answer = await client.post("/v1/jobs", json={"input": source})
        job_id = answer.json()["id"]
        store = tmp_path / "jobs" / job_id / "result.zarr"
        loop = asyncio.get_running_loop()
        end = loop.time() + 120
        while np.count_nonzero(written(store)) < 2:  # the gate: the job is under way
            assert loop.time() < end, "no block was written"
            await asyncio.sleep(0.02)
        deleted = await client.delete(f"/v1/jobs/{job_id}")
        # The runner takes one job at a time: once the next is done, the deleted one stopped.
        nxt = await client.post("/v1/jobs", json={"input": source})
        assert (await wait_state(client, nxt.json()["id"], timeout=300))["state"] == "done"
    assert deleted.json()["deleted"] is True
    # Its blocks left the cluster, and those running at the deletion wrote nothing.
    while cluster.run_on_scheduler(tasks_held):
        assert loop.time() < end + 300, "tasks stayed on the scheduler"
        await asyncio.sleep(0.05)
    assert not (tmp_path / "jobs" / job_id).exists()
