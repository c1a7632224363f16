"""A bioimage.io package (normalised by statistics of the whole image) as the model of an
OME-Zarr job computed in blocks, in the server and on a real Dask cluster: each block
normalises with its whole page's statistics, so the result is bioimageio.core's prediction
of the whole image within the package's tolerance, whatever the blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
from app_helpers import em_crop, make_app
from app_helpers import running as running_app
from dask_cluster import Cluster
from test_jobs_api import wait_state
from zarr_helpers import level, write_ome_zarr

pytest.importorskip("bioimageio.core")

from test_zoo_packages import assert_within_package_tolerance, repository, whole_image  # noqa: F401

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.mark.parametrize("on_cluster", [False, True], ids=["embedded", "dask"])
async def test_a_package_volume_in_blocks_equals_its_whole_image_prediction(
    repository: Path,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    on_cluster: bool,
) -> None:
    pixels = em_crop(2, 0, 0, 90, 110)
    expected, descr = whole_image(repository / "pkg.zip", pixels)
    source = write_ome_zarr(
        tmp_path / "data" / "p.zarr",
        pixels,
        axes="yx",
        version="0.5",
        scale=[0.004, 0.004],
        chunks=(16, 16),
    )
    cluster = Cluster(2, tmp_path / "logs") if on_cluster else None
    try:
        app = make_app(
            repository / "a.safetensors",
            models=repository,
            jobs_dir=tmp_path / "jobs",
            job_progress_s=0.05,
            data_roots=str(tmp_path / "data"),
            zarr_block=32,
            dask_scheduler=cluster.address if cluster else "",
        )
        async with running_app(app) as client:
            answer = await client.post(
                "/v1/jobs",
                params={"model": "pkg", "output": "probabilities"},
                json={"input": source},
            )
            assert answer.status_code == 202, answer.text
            job = await wait_state(client, answer.json()["id"], timeout=300)
    finally:
        if cluster is not None:
            cluster.close()
    assert job["state"] == "done", job
    store = job["result"]["store"]
    assert level(store).shape == pixels.shape
    assert_within_package_tolerance(level(store)[None], expected, descr)
