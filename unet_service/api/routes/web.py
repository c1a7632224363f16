"""The web page at `/`: plain HTML, CSS and JavaScript modules shipped in the package
(unet_service/api/web/), served by the service itself. The page calls only the public API
(/v1/segment, /v1/preview, /v1/jobs, /v1/models, /v2, /metrics) with the same optional
bearer token, so it has no code path of its own; its Content-Security-Policy lets it reach
nothing but this server."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from unet_service.api.errors import ApiError

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
ASSETS = {
    path.name: path
    for path in sorted(WEB_DIR.iterdir())
    if path.suffix in MEDIA_TYPES and path.name != "index.html"
}
# blob: and data: images are the page's own canvases and downloads.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated (ETag), so an upgraded server is seen at once
}

router = APIRouter(include_in_schema=False)


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


@router.get("/")
async def page() -> FileResponse:
    return _file(WEB_DIR / "index.html")


@router.get("/web/{name}")
async def asset(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise ApiError(404, f"no such file: /web/{name}")
    return _file(path)
