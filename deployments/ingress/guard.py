"""The ASGI layers in front of every route: authentication before a byte of the body is read, the body size
limit, and the count of HTTP requests by route template.

Authentication compares the raw header bytes with each key in constant time (`hmac.compare_digest`), so any
header, including one that is not ASCII, gets 401 JSON, never a 500. `/healthz`, `/readyz` and the gallery's
page (`/`, `/static/*`: the page sends the key itself) never need a key; `/docs` and `/openapi.json` need one
unless `api.public_docs` opens them. With authentication on and no key
configured, every protected request is refused with a message saying what to do (fail closed).
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from .. import metrics as m

OPEN_PATHS = ("/healthz", "/readyz", "/")  # and the gallery's files under /static/
DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


def key_id(token: bytes) -> str:
    """A stable, non-reversible id of an API key (for fairness and a key's history; the key is never stored)."""
    return hashlib.sha256(token).hexdigest()[:16]


@dataclass
class GuardSettings:
    """What the guard enforces; the Ingress fills it in from the config when it starts."""
    auth: bool = True
    keys: list[bytes] = field(default_factory=list)
    keys_hint: str = "the API keys file"
    public_docs: bool = False
    max_body_bytes: int = 1 << 20


SETTINGS = GuardSettings()


class _TooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: 401 without a valid key, 413 for a body over the limit; the caller's key id goes to
    `request.state.key_id`."""

    def __init__(self, asgi_app, settings: GuardSettings = SETTINGS):
        self.app, self.settings = asgi_app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s, path = self.settings, scope["path"]
        headers = dict(scope["headers"])
        if path not in OPEN_PATHS and not path.startswith("/static/") and not (s.public_docs and path in DOC_PATHS):
            problem = self._authenticate(scope, headers.get(b"authorization"))
            if problem is not None:
                return await problem(scope, receive, send)
        else:
            scope.setdefault("state", {})["key_id"] = "anonymous"
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > s.max_body_bytes):
            return await self._too_large(scope, receive, send)
        counted = [0]

        async def limited_receive():
            message = await receive()
            counted[0] += len(message.get("body", b""))
            if counted[0] > s.max_body_bytes:
                raise _TooLarge
            return message
        started = [False]

        async def noting_send(message):
            started[0] = started[0] or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, limited_receive, noting_send)
        except _TooLarge:
            if not started[0]:
                await self._too_large(scope, receive, send)

    def _authenticate(self, scope, header: bytes | None):
        s = self.settings
        if not s.auth:
            scope.setdefault("state", {})["key_id"] = "anonymous"
            return None
        if not s.keys:
            return error_response(401, f"this server has no API keys configured: add one to {s.keys_hint}, or set "
                                       "api.auth to disabled to serve without keys", "authentication_error",
                                  code="no_api_keys")
        scheme, _, token = (header or b"").partition(b" ")
        token = token.strip()
        matched = False
        for key in s.keys:  # every key, whatever matched: the time does not tell which
            matched |= hmac.compare_digest(token, key)
        if scheme.lower() != b"bearer" or not token or not matched:
            return error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                  "authentication_error", code="invalid_api_key")
        scope.setdefault("state", {})["key_id"] = key_id(token)
        return None

    async def _too_large(self, scope, receive, send):
        limit = self.settings.max_body_bytes
        response = error_response(413, f"the request body is over this server's limit of {limit} bytes",
                                  "invalid_request_error", code="body_too_large")
        await response(scope, receive, send)


def _handler(scope) -> str:
    """The route template the router matched (bounded label values: never the job id itself)."""
    return getattr(scope.get("route"), "path", None) or "unmatched"


class CountRequests:
    """ASGI middleware: imagine_http_requests_total by route template, method and status (SSE-safe)."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            m.inc("imagine_http_requests_total", handler=_handler(scope), method=scope["method"], code=str(status[0]))
