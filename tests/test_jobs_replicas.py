"""Two replicas (two apps with their own job workers) sharing one jobs folder and one
PostgreSQL job table, as the Kubernetes manifests deploy them: a job submitted to one is
found, followed and downloaded through the other, and exactly one of them computes it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from app_helpers import em_crop, make_app, running, save_tiny, tiff_bytes
from postgres_server import PostgresServer
from test_jobs_api import pages_of, wait_state

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("replicas"))


async def test_replicas_share_jobs_through_postgresql(
    weights: Path, tmp_path: Path, pg_server: PostgresServer
) -> None:
    db = pg_server.new_database()
    shared = {"jobs_dir": tmp_path / "shared-jobs", "jobs_db": db, "job_progress_s": 0.02}
    replica_a = make_app(weights, replica_id="replica-a", **shared)
    replica_b = make_app(weights, replica_id="replica-b", **shared)
    pages = [em_crop(i, 0, 0, 120, 140) for i in range(4)]
    async with running(replica_a) as a, running(replica_b) as b:
        created = [
            (await a.post("/v1/jobs", files={"file": tiff_bytes(page)})).json() for page in pages
        ]
        finished = await asyncio.gather(*(wait_state(b, job["id"]) for job in created))
        assert [job["state"] for job in finished] == ["done"] * 4
        # Each job ran once, on one replica (the table says which), and the two replicas
        # shared the work between them only through the table.
        assert all(job["attempts"] == 1 for job in finished)
        listed_a = {job["id"] for job in (await a.get("/v1/jobs")).json()["jobs"]}
        listed_b = {job["id"] for job in (await b.get("/v1/jobs")).json()["jobs"]}
        assert listed_a == listed_b == {job["id"] for job in created}
        for job, page in zip(created, pages, strict=True):
            from_a = (await a.get(f"/v1/jobs/{job['id']}/result")).content
            from_b = (await b.get(f"/v1/jobs/{job['id']}/result")).content
            assert from_a == from_b
            assert pages_of(from_a)[0].shape == page.shape
            assert np.isin(pages_of(from_a)[0], (0, 255)).all()
        # Deleted through one replica: gone for both.
        assert (await b.delete(f"/v1/jobs/{created[0]['id']}")).status_code == 200
        assert (await a.get(f"/v1/jobs/{created[0]['id']}")).status_code == 404
