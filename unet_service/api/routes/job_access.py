"""The routes that follow, fetch and delete section jobs (`POST /v1/jobs` is in jobs.py):
the caller's jobs page by page, one job's state, its result (GET, or HEAD for its headers
alone), and deletion, which cancels a running job."""

from __future__ import annotations

import asyncio
import math
from urllib.parse import urlencode

from fastapi import Path, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse

from unet_service.api.auth import Caller
from unet_service.api.errors import ERROR_RESPONSE, ApiError
from unet_service.api.job_views import content_disposition, download_name, job_json
from unet_service.api.routes.jobs import get_runner, job_router
from unet_service.api.zip_stream import zipped_store
from unet_service.imaging.location import location_exists
from unet_service.jobs.files import JOB_ID
from unet_service.jobs.table.records import JOB_STATES, JobRecord, JobState

router = job_router()
JobId = Path(description="The job's id, as POST /v1/jobs returned it.")
DEFAULT_LIST = 100
MAX_LIST = 1000
NOT_FOUND = {404: {"description": "No such job (for this key).", **ERROR_RESPONSE}}


async def find_job(request: Request, job_id: str, caller: str | None) -> JobRecord:
    """The caller's job, or 404 (also for another key's job: its existence is not told)."""
    record = await asyncio.to_thread(get_runner(request).table.get, job_id)
    if record is None or record.owner != caller:
        raise ApiError(404, f"no job {job_id}")
    return record


def parse_states(values: list[str]) -> list[JobState]:
    """`state` parameters, each one state or several separated by commas."""
    states: list[JobState] = []
    for value in values:
        for name in filter(None, (part.strip() for part in value.split(","))):
            if name not in JOB_STATES:
                raise ApiError(422, f"unknown job state {name!r}: one of {', '.join(JOB_STATES)}")
            if name not in states:
                states.append(name)  # type: ignore[arg-type]  # checked just above
    return states


def cursor_of(record: JobRecord) -> str:
    """Where the next page starts: after this job, in the list's order. repr() keeps the
    float exactly, so no job at the page boundary is skipped or repeated."""
    return f"{record.created_at!r},{record.id}"


def parse_cursor(before: str | None) -> tuple[float, str] | None:
    if before is None:
        return None
    created, _, job_id = before.rpartition(",")
    try:
        created_at = float(created)
    except ValueError:
        created_at = math.nan
    if not math.isfinite(created_at) or not JOB_ID.fullmatch(job_id):
        raise ApiError(422, "before must be a cursor from the `next` link of a previous page")
    return created_at, job_id


@router.get(
    "/v1/jobs",
    summary="List your section jobs",
    description="Your jobs, newest first, a page at a time: `next` is the link to the next "
    "page (null on the last one).",
    responses={422: {"description": "A bad `limit`, `state` or `before`.", **ERROR_RESPONSE}},
)
async def list_jobs(
    request: Request,
    caller: Caller,
    limit: int = Query(DEFAULT_LIST, ge=1, le=MAX_LIST, description="Most jobs in a page."),
    state: list[str] = Query(  # noqa: B008
        [],
        description="Only jobs in these states (queued, running, done, failed, cancelled): "
        "repeat the parameter or separate the states by commas.",
    ),
    before: str | None = Query(
        None, description="Only jobs after this point of the list: from a page's `next` link."
    ),
) -> dict:
    states = parse_states(state)
    records = await asyncio.to_thread(
        get_runner(request).table.list,
        caller,
        limit=limit + 1,  # one more tells whether there is a next page
        states=states,
        before=parse_cursor(before),
    )
    page = records[:limit]
    link = None
    if len(records) > limit:
        query = {"limit": limit, "state": ",".join(states), "before": cursor_of(page[-1])}
        link = "/v1/jobs?" + urlencode({k: v for k, v in query.items() if v})
    return {"jobs": [job_json(r) for r in page], "next": link}


@router.get("/v1/jobs/{job_id}", summary="A section job's state and progress", responses=NOT_FOUND)
async def get_job(request: Request, caller: Caller, job_id: str = JobId) -> dict:
    return job_json(await find_job(request, job_id, caller))


RESULT_RESPONSES = {
    200: {
        "description": "The result TIFF, or an OME-Zarr result's store as a zip archive.",
        "content": {"image/tiff": {}, "application/zip": {}},
    },
    **NOT_FOUND,
    409: {
        "description": "The job is not done (yet, or it failed or was cancelled).",
        **ERROR_RESPONSE,
    },
}


async def _result(request: Request, caller: str | None, job_id: str) -> Response:
    record = await find_job(request, job_id, caller)
    if record.state != "done":
        detail = f": {record.error}" if record.error else ""
        raise ApiError(409, f"job {job_id} is {record.state}, it has no result{detail}")
    headers = {"Content-Disposition": content_disposition(record)}
    if record.params.get("format") == "zarr":
        store = record.params["store"]
        if not await asyncio.to_thread(location_exists, store):
            raise ApiError(404, f"the result of job {job_id} is gone (expired or deleted)")
        if request.method == "HEAD":
            return Response(media_type="application/zip", headers=headers)
        archive = zipped_store(store, download_name(record).removesuffix(".zip"))
        return StreamingResponse(archive, media_type="application/zip", headers=headers)
    path = get_runner(request).files.result_path(job_id)
    if not path.exists():
        raise ApiError(404, f"the result of job {job_id} is gone (expired or deleted)")
    # FileResponse answers a HEAD with the headers alone.
    return FileResponse(path, media_type=record.result_type or "image/tiff", headers=headers)


@router.get(
    "/v1/jobs/{job_id}/result",
    summary="Download a finished job's result",
    description="The result TIFF, named after the upload: `<upload name>_<output>.tif`; an "
    "OME-Zarr result as a zip of its store, `<input name>_<output>.zarr.zip`.",
    response_class=Response,
    responses=RESULT_RESPONSES,
)
async def get_result(request: Request, caller: Caller, job_id: str = JobId) -> Response:
    return await _result(request, caller, job_id)


@router.head(
    "/v1/jobs/{job_id}/result",
    summary="A finished job's result: its headers alone",
    description="As GET, without the body: whether the result is ready (200, with its "
    "Content-Length and name), or not (409, 404).",
    response_class=Response,
    responses=RESULT_RESPONSES,
)
async def head_result(request: Request, caller: Caller, job_id: str = JobId) -> Response:
    return await _result(request, caller, job_id)


@router.delete("/v1/jobs/{job_id}", summary="Cancel and delete a section job", responses=NOT_FOUND)
async def delete_job(request: Request, caller: Caller, job_id: str = JobId) -> dict:
    runner = get_runner(request)
    record = await find_job(request, job_id, caller)
    cancelled = await asyncio.to_thread(runner.table.cancel, job_id)
    await asyncio.to_thread(runner.table.delete, job_id)
    # A replica working on it sees the job gone at its next progress report and stops;
    # the files go now (its temporary result goes when it stops).
    await asyncio.to_thread(runner.files.remove, job_id)
    await runner.refresh_metrics()
    final = cancelled or record
    return {"id": job_id, "deleted": True, "state": final.state}
