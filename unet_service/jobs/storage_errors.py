"""Why an upload or a job's result does not fit: over the per-job upload limit, or over the
jobs folder's quota or its disk (`jobs.files` raises them)."""

from __future__ import annotations

from unet_service.errors import LimitError, StorageFullError


class UploadTooLarge(LimitError):
    """The upload is over the per-job size limit."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(
            f"the upload is larger than the limit of {limit_bytes / 2**20:g} MiB for a job "
            "(UNET_MAX_JOB_UPLOAD_MB)",
        )
        self.limit_bytes = limit_bytes


def size_text(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


class JobStorageFull(StorageFullError):
    """The upload, and the result its job will write, would not fit: under the jobs
    folder's quota, or on its disk. `used_bytes` is what everything else takes there, the
    results that unfinished jobs have yet to write included."""

    def __init__(
        self,
        upload_bytes: int,
        used_bytes: int,
        limit_bytes: int,
        *,
        result_bytes: int | None = None,
        on_disk: bool = False,
        so_far: bool = False,
    ) -> None:
        what = f"this upload ({size_text(upload_bytes)}{' so far' if so_far else ''})"
        if result_bytes is not None:
            what += f" and its result ({size_text(result_bytes)})"
        where = (
            "on the disk of the jobs folder"
            if on_disk
            else "in the job storage (UNET_JOBS_QUOTA_GB)"
        )
        super().__init__(
            f"{what} would not fit {where}: {size_text(used_bytes)} of "
            f"{size_text(limit_bytes)} used, with the results of unfinished jobs; delete "
            "finished jobs or wait for them to expire",
        )
        self.used_bytes = used_bytes
        self.limit_bytes = limit_bytes
