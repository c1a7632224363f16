"""A volume's blocks on a Dask distributed cluster (UNET_DASK_SCHEDULER, or `unet-predict
--scheduler`): each block is one task running the same `pipeline.blocks.compute_block` as the
embedded path, on a worker that loaded the model once (`ModelPlugin`, registered by the
client). A task opens the job's input and result stores from their locations (`BlockTask`:
the workers share the data with the server), computes the block's tiles with a batch runner
and writes its chunk-aligned region straight into the stores, recording the block as written;
it returns the block's tiles, which the client counts as progress as the tasks complete.

A worker that dies has its tasks given to another by the scheduler; a block written twice is
written the same. Cancelling the job cancels the tasks not yet run (a task already running
finishes its block).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distributed import WorkerPlugin

from unet_service.core.engine import TiledModel
from unet_service.core.runner import BatchRunner, run_tiles
from unet_service.errors import InferenceError
from unet_service.imaging.location import location_exists
from unet_service.imaging.sources import open_source, open_zarr
from unet_service.imaging.zarr_result import ZarrResult
from unet_service.pipeline.blocks import BlockJob, compute_block
from unet_service.pipeline.to_file import Progress
from unet_service.pipeline.volume import Volume
from unet_service.serving.catalog import open_model

log = logging.getLogger("app.jobs")

# Limits for a worker's reading of an input the server already checked against its own.
_NO_LIMIT_PIXELS, _NO_LIMIT_PAGES = 10**13, 10**7
# How long a stopped job waits for its blocks still running on workers, and how often it looks.
STOP_WAIT_S, STOP_POLL_S = 600.0, 0.1
# Jobs a worker keeps open (input and stores) between their blocks.
_OPEN_JOBS = 2


@dataclass(frozen=True)
class ModelSpec:
    """Which model a worker loads (our weights or a bioimage.io package, at a path the
    workers share), and how: the server's settings for it."""

    weights: str
    device: str = "auto"
    precision: str = "fp32"
    backend: str = "auto"
    max_pixels: int = 100_000_000  # a package measuring whole pages measures this many
    batch_cpu: int = 1  # tiles a forward pass on a worker's CPU
    batch_cuda: int = 4  # on its GPU

    @property
    def plugin_name(self) -> str:
        # The same in every process (hash() of a string is not).
        return f"unet-model-{hashlib.sha256(repr(self).encode()).hexdigest()[:16]}"

    def load(self) -> TiledModel:
        """The model, opened as the service opens it (`serving.catalog.open_model`)."""
        return open_model(
            Path(self.weights), self.device, self.precision, self.backend, False, self.max_pixels
        )


@dataclass(frozen=True)
class BlockTask:
    """What a worker needs to compute any block of one result: where its input is (an
    OME-Zarr location, or a file the workers can read), where each result store is, the
    model, whether to label cells, and the tag recorded for each block (the job's attempt)."""

    key: str
    input: str
    zarr_input: bool
    results: dict[str, str]
    model: ModelSpec
    instances: bool = False
    tag: int = 1

    def open(self, segmenter: TiledModel) -> BlockJob:
        """The job as `compute_block` takes it (blocking: opens the input and the stores)."""
        limits = {"max_pixels": _NO_LIMIT_PIXELS, "max_pages": _NO_LIMIT_PAGES}
        source = (open_zarr if self.zarr_input else open_source)(self.input, **limits)
        results = {output: ZarrResult.open(where) for output, where in self.results.items()}
        volume = Volume.from_json(next(iter(results.values())).info["layout"])
        locations = list(self.results.values())
        return BlockJob(
            volume,
            source,
            segmenter.recipe(volume.tile_size),
            results,
            segmenter.instances if self.instances else None,
            tag=self.tag,
            wanted=lambda: all(location_exists(where) for where in locations),
        )


class ModelPlugin(WorkerPlugin):
    """Loads the model once per worker (at registration, and on every worker that joins
    later) and keeps the jobs it computes blocks of open between their blocks."""

    def __init__(self, model: ModelSpec) -> None:
        self.model = model
        self.segmenter: TiledModel | None = None
        self.jobs: dict[str, BlockJob] = {}
        self.lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"model": self.model}  # the client sends the spec; each worker loads it

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"])

    def setup(self, worker) -> None:
        self.segmenter = self.model.load()

    def teardown(self, worker) -> None:
        with self.lock:
            for job in self.jobs.values():
                job.source.close()
            self.jobs.clear()

    def job(self, task: BlockTask) -> BlockJob:
        """Task's job, opened on this worker once."""
        assert self.segmenter is not None, "the plugin was not set up"
        with self.lock:
            key = f"{task.key}-{task.tag}"
            job = self.jobs.get(key)
            if job is None:
                job = task.open(self.segmenter)
                while len(self.jobs) >= _OPEN_JOBS:
                    self.jobs.pop(next(iter(self.jobs))).source.close()
                self.jobs[key] = job
            return job


def run_block(task: BlockTask, index: int) -> int:
    """A Dask task: block `index` computed on this worker and written; returns its tiles."""
    from distributed import get_worker

    plugin: ModelPlugin = get_worker().plugins[task.model.plugin_name]
    job = plugin.job(task)
    segmenter = plugin.segmenter
    assert segmenter is not None
    model = task.model
    runner = BatchRunner(
        segmenter, model.batch_cuda if segmenter.device.type == "cuda" else model.batch_cpu
    )

    async def compute(entry):
        def tiles():
            run_tiles(entry, runner)
            return entry.result()

        return await asyncio.to_thread(tiles)

    return asyncio.run(compute_block(job, index, compute))


BlockFinished = Callable[[int], None]


def on_cluster(address: str, task: BlockTask, *, connect_s: float = 30.0):
    """A block runner for `segment_to_store`: the blocks as tasks of the cluster whose
    scheduler is at `address`, each one's tiles counted in the progress as it completes."""

    async def run(
        job: BlockJob, indices: list[int], progress: Progress, finished: BlockFinished
    ) -> None:
        from distributed import Client, KilledWorker, as_completed

        try:
            client = await Client(address, asynchronous=True, timeout=connect_s)
        except OSError as e:
            raise ClusterError(f"the Dask scheduler at {address} cannot be reached ({e})") from None
        try:
            await _ensure_plugin(client, task.model)
            keys = [f"unet-block-{task.key}-{task.tag}-{i}" for i in indices]
            futures = client.map(run_block, [task] * len(indices), indices, key=keys, pure=False)
            index_of = {f.key: i for f, i in zip(futures, indices, strict=True)}
            done = 0
            try:
                async for future in as_completed(futures):
                    try:
                        progress.finished_tiles += await future
                    except KilledWorker as e:
                        raise ClusterError(
                            f"block {index_of[future.key]} was lost with every worker that "
                            f"computed it ({e})"
                        ) from None
                    finished(index_of[future.key])
                    done += 1
            finally:
                await client.cancel(futures)
                if done < len(futures):  # stopped: let no block be written after this returns
                    await _until_stopped(client, f"unet-block-{task.key}-{task.tag}-")
        finally:
            await client.close()

    return run


async def _ensure_plugin(client, model: ModelSpec) -> None:
    """The model's plugin on the cluster: registered by the first job that uses the model, so
    that each worker loads it once (registering it again would load it again on every
    worker); workers that join later get it from the scheduler."""
    name = model.plugin_name
    # A lambda goes to the scheduler by value: the scheduler need not import this package.
    registered = await client.run_on_scheduler(
        lambda dask_scheduler, name: name in dask_scheduler.worker_plugins, name=name
    )
    if not registered:
        await client.register_plugin(ModelPlugin(model), name=name)


def executing_keys(dask_worker, prefix: str) -> list[str]:
    """The keys starting with `prefix` of the tasks this worker is running (a cancelled task
    runs to its end: a thread cannot be stopped)."""
    return [
        str(ts.key) for ts in dask_worker.state.all_running_tasks if str(ts.key).startswith(prefix)
    ]


async def _until_stopped(client, prefix: str) -> None:
    """Wait until no worker runs a task of `prefix` (each finishes its block, which then
    finds its stores gone or writes its block before the caller removes them), for at most
    STOP_WAIT_S."""
    loop = asyncio.get_running_loop()
    end = loop.time() + STOP_WAIT_S
    while loop.time() < end:
        try:
            running = await client.run(executing_keys, prefix=prefix)
        except Exception:  # the cluster went away: nothing of ours runs there any more
            return
        if not any(running.values()):
            return
        await asyncio.sleep(STOP_POLL_S)
    log.warning("tasks %s* still running %.0f s after they were cancelled", prefix, STOP_WAIT_S)


class ClusterError(InferenceError):
    """The cluster could not compute the job: its scheduler unreachable, or a block's task
    lost with every worker that tried it."""
