"""The web gallery: `GET /` (the page) and `GET /static/<name>` (its script and style), plain files from
`static/` beside this module; no build step, nothing loaded from another origin.

The page keeps the API key in the browser (localStorage) and sends it as `Authorization: Bearer` on each API
call it makes, so serving the page itself needs no key. Only the files that are in `static/` when the module
is imported can be served: the name in the URL is looked up in that fixed table, never joined to a path.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import Response

STATIC = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# the page's own origin for everything but the images, which are presigned S3 URLs (another origin)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data: http: "
       "https:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Content-Security-Policy": CSP}
FILES: dict[str, Path] = {p.name: p for p in sorted(STATIC.iterdir())
                          if p.is_file() and p.suffix in CONTENT_TYPES} if STATIC.is_dir() else {}


@lru_cache(maxsize=None)
def _read(name: str) -> bytes:
    return FILES[name].read_bytes()


def _file(name: str) -> Response:
    if name not in FILES:
        raise HTTPException(status_code=404, detail=f"no static file {name[:80]!r}")
    return Response(_read(name), media_type=CONTENT_TYPES[FILES[name].suffix], headers=HEADERS)


async def index() -> Response:
    """The gallery page."""
    return _file("index.html")


async def static_file(name: str) -> Response:
    """One of the page's files (app.js, style.css)."""
    return _file(name)


def mount(app: FastAPI) -> None:
    """Add `GET /` and `GET /static/{name}` to `app` (module-level handlers: Serve pickles them by reference)."""
    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/static/{name}", static_file, methods=["GET"], include_in_schema=False)
