"""Optional bearer-token check for the inference routes (health and metrics stay open).

With several keys (UNET_API_KEYS), each key is its own caller: section jobs are visible
only with the key that created them. A caller is named by a digest of its key, never the
key itself, so the job table holds nothing that would let a reader authenticate."""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from unet_service.api.errors import ApiError

# auto_error=False: a missing header gets our JSON 401, not FastAPI's 403.
_bearer = HTTPBearer(
    auto_error=False,
    description="Needed only when the server sets UNET_API_KEY or UNET_API_KEYS: "
    "`Authorization: Bearer <key>`.",
)


def owner_of(key: str) -> str:
    """The caller's name in the job table: a digest of its key."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


async def require_api_key(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
) -> str | None:
    """None when the server has no keys (every caller is the same anonymous one), else the
    owner name of the key supplied; 401 without a valid key."""
    keys = request.app.state.settings.accepted_keys()
    if not keys:
        return None
    supplied = credentials.credentials if credentials is not None else ""
    # Constant time for each key, and every key is compared, so response timing does not
    # leak how much of a guess was right or which key it resembled.
    matched = False
    for key in keys:
        matched |= secrets.compare_digest(supplied.encode(), key.encode())
    if not matched:
        raise ApiError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            {"WWW-Authenticate": 'Bearer realm="unet-service"'},
        )
    return owner_of(supplied)


Caller = Annotated[str | None, Depends(require_api_key)]
