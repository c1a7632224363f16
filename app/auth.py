"""Optional bearer-token check for the inference routes (health and metrics stay open)."""

from __future__ import annotations

import secrets

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import ApiError

# auto_error=False: a missing header gets our JSON 401, not FastAPI's 403.
_bearer = HTTPBearer(
    auto_error=False,
    description="Needed only when the server sets UNET_API_KEY: `Authorization: Bearer <key>`.",
)


async def require_api_key(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
) -> None:
    key = request.app.state.settings.api_key
    if key is None:
        return
    supplied = credentials.credentials if credentials is not None else ""
    # Constant time, so response timing does not leak how much of a guess was right.
    if not secrets.compare_digest(supplied.encode(), key.get_secret_value().encode()):
        raise ApiError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <UNET_API_KEY>'",
            {"WWW-Authenticate": 'Bearer realm="unet-service"'},
        )
