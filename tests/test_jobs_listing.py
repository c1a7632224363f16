"""Reading jobs back: `GET /v1/jobs` a page at a time (limit, state filter, a `next` link),
HEAD on a result, results named after their uploads, every job route's 401 in the OpenAPI
document, and an ETA that counts from the current attempt."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from app_helpers import em_crop, png_bytes, save_tiny, tiff_bytes
from app_helpers import running as running_app
from test_jobs_api import jobs_app, submit, wait_state

from unet_service.api.job_views import content_disposition, download_name, eta_s
from unet_service.jobs.table.records import JobRecord

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("listing"))


async def test_jobs_are_listed_a_page_at_a_time_by_state(weights: Path, tmp_path: Path) -> None:
    data = tiff_bytes(em_crop(0, 0, 0, 40, 40))
    async with running_app(jobs_app(weights, tmp_path)) as client:
        ids = [(await submit(client, data, name=f"s{i}.tif")).json()["id"] for i in range(5)]
        for job_id in ids:
            assert (await wait_state(client, job_id))["state"] == "done"
        everything = (await client.get("/v1/jobs")).json()
        assert [j["id"] for j in everything["jobs"]] == ids[::-1]
        assert everything["next"] is None
        seen: list[str] = []
        url: str | None = "/v1/jobs?limit=2&state=done"
        pages = 0
        while url is not None:
            body = (await client.get(url)).json()
            assert len(body["jobs"]) <= 2
            seen += [j["id"] for j in body["jobs"]]
            url = body["next"]
            pages += 1
            if url is not None:
                query = parse_qs(urlsplit(url).query)
                assert query["limit"] == ["2"] and query["state"] == ["done"]
        assert seen == ids[::-1] and pages == 3
        for states in ("state=failed", "state=queued,running", "state=queued&state=running"):
            assert (await client.get(f"/v1/jobs?{states}")).json() == {"jobs": [], "next": None}
        both = (await client.get("/v1/jobs?state=failed&state=done&limit=1")).json()
        assert [j["id"] for j in both["jobs"]] == [ids[-1]]
        for bad, words in (
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=many", "limit"),
            ("state=finished", "unknown job state 'finished'"),
            ("state=done,nope", "unknown job state 'nope'"),
            ("before=yesterday", "cursor"),
            ("before=1.5,../etc", "cursor"),
            ("before=nan,abc", "cursor"),
        ):
            r = await client.get(f"/v1/jobs?{bad}")
            assert r.status_code == 422, (bad, r.text)
            assert set(r.json()) == {"error"} and words in r.json()["error"], (bad, r.json())


async def test_results_are_named_after_the_upload_and_answer_head(
    weights: Path, tmp_path: Path
) -> None:
    async with running_app(jobs_app(weights, tmp_path)) as client:
        named = await submit(client, png_bytes(em_crop(0, 0, 0, 40, 40)), name="section.png")
        raw = await client.post(
            "/v1/jobs",
            params={"output": "probabilities"},
            content=tiff_bytes(em_crop(1, 0, 0, 40, 40)),
            headers={"content-type": "image/tiff"},
        )
        unicode = await submit(client, tiff_bytes(em_crop(2, 0, 0, 40, 40)), name="coupe é.tif")
        expected = {
            named.json()["id"]: ('attachment; filename="section_mask.tif"', "section_mask.tif"),
            raw.json()["id"]: (
                f'attachment; filename="{raw.json()["id"]}_probabilities.tif"',
                f"{raw.json()['id']}_probabilities.tif",
            ),
            unicode.json()["id"]: (
                'attachment; filename="coupe_e_mask.tif"; '
                "filename*=UTF-8''coupe%20%C3%A9_mask.tif",
                "coupe é_mask.tif",
            ),
        }
        for job_id, (header, name) in expected.items():
            done = await wait_state(client, job_id)
            assert done["state"] == "done" and done["result"]["name"] == name
            got = await client.get(f"/v1/jobs/{job_id}/result")
            assert got.status_code == 200
            assert got.headers["content-disposition"] == header
            head = await client.head(f"/v1/jobs/{job_id}/result")
            assert head.status_code == 200 and head.content == b""
            for key in ("content-type", "content-length", "content-disposition"):
                assert head.headers[key] == got.headers[key]
            assert int(head.headers["content-length"]) == len(got.content)
        missing = await client.head("/v1/jobs/0123456789abcdef0123456789abcdef/result")
        assert missing.status_code == 404


async def test_every_job_route_documents_its_401(weights: Path, tmp_path: Path) -> None:
    async with running_app(jobs_app(weights, tmp_path)) as client:
        spec = (await client.get("/openapi.json")).json()
    operations = {
        (path, method): op
        for path, methods in spec["paths"].items()
        if path.startswith("/v1/jobs")
        for method, op in methods.items()
    }
    assert set(operations) == {
        ("/v1/jobs", "post"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/{job_id}", "get"),
        ("/v1/jobs/{job_id}", "delete"),
        ("/v1/jobs/{job_id}/result", "get"),
        ("/v1/jobs/{job_id}/result", "head"),
    }
    for key, op in operations.items():
        assert "401" in op["responses"], key
    assert "401" in spec["paths"]["/v1/segment"]["post"]["responses"]
    assert {p["name"] for p in operations[("/v1/jobs", "get")]["parameters"]} == {
        "limit",
        "state",
        "before",
    }


def record(**changes: object) -> JobRecord:
    values: dict = {
        "id": "3f2c",
        "owner": None,
        "state": "running",
        "params": {"output": "mask"},
        "input_name": "section.tif",
        "input_bytes": 1,
        "input_type": "image/tiff",
        "created_at": 1000.0,
        "started_at": 1000.0,
        "finished_at": None,
        "updated_at": 1000.0,
        "tiles_total": 1000,
    }
    return JobRecord(**(values | changes))


def test_the_eta_counts_from_the_current_attempt() -> None:
    # First started at 1000, restarted at 4000 (its progress back to 0): 100 tiles done in
    # the 10 s since, so 900 more take 90 s, not the 30,000 s the first start would say.
    resumed = record(attempt_started_at=4000.0, attempts=2, tiles_done=100)
    assert eta_s(resumed, now=4010.0) == 90.0
    assert eta_s(record(attempt_started_at=1000.0, tiles_done=100), now=1010.0) == 90.0
    # A row from before attempts were timed: its first start.
    assert eta_s(record(tiles_done=500), now=1050.0) == 50.0
    assert eta_s(record(attempt_started_at=4000.0, tiles_done=0), now=4010.0) is None
    assert eta_s(record(state="queued"), now=4010.0) is None
    assert eta_s(record(state="done"), now=4010.0) == 0.0


@pytest.mark.parametrize(
    ("input_name", "name", "header"),
    [
        ("section.tif", "section_mask.tif", 'attachment; filename="section_mask.tif"'),
        ("", "3f2c_mask.tif", 'attachment; filename="3f2c_mask.tif"'),
        (".tif", "3f2c_mask.tif", 'attachment; filename="3f2c_mask.tif"'),
        ("../../etc/passwd", "passwd_mask.tif", 'attachment; filename="passwd_mask.tif"'),
        (r"C:\data\s1.ome.tif", "s1.ome_mask.tif", 'attachment; filename="s1.ome_mask.tif"'),
        ('a"b\r\n.tif', "ab_mask.tif", 'attachment; filename="ab_mask.tif"'),
        (
            "切片.tif",
            "切片_mask.tif",
            "attachment; filename=\"3f2c_mask.tif\"; filename*=UTF-8''%E5%88%87%E7%89%87_mask.tif",
        ),
        (
            "x;y=z.tif",
            "x;y=z_mask.tif",
            "attachment; filename=\"x_y_z_mask.tif\"; filename*=UTF-8''x%3By%3Dz_mask.tif",
        ),
    ],
)
def test_download_names_are_safe_in_a_header(input_name: str, name: str, header: str) -> None:
    job = record(state="done", input_name=input_name)
    assert download_name(job) == name
    assert content_disposition(job) == header
    assert content_disposition(job).isascii()
