"""The ASGI guard in front of the HTTP API (deployments/ingress/guard.py), on a real FastAPI app in process:
authentication before the body is read, malformed headers, failing closed without keys, the body limit."""
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from deployments.ingress.guard import CountRequests, Guard, GuardSettings

KEY = b"imk_guard_test"


def client(**settings) -> tuple[TestClient, list]:
    seen = []  # bodies the route actually read
    app = FastAPI()

    @app.post("/v1/jobs")
    async def create(request: Request):
        body = await request.body()
        seen.append(len(body))
        return {"key_id": request.state.key_id, "bytes": len(body)}

    @app.get("/healthz")
    async def health():
        return {"ok": True}

    app.add_middleware(Guard, settings=GuardSettings(**{"keys": [KEY], "max_body_bytes": 1024, **settings}))
    app.add_middleware(CountRequests)
    return TestClient(app), seen


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic " + KEY.decode(), "bearer wrong",
                                    "Bearer \xff\xfe", "Bearer " + KEY.decode() + "x", "Token " + KEY.decode()])
def test_every_bad_authorization_is_401_json_before_the_body_is_read(header):
    c, seen = client()
    headers = {} if header is None else {"Authorization": header.encode("latin-1")}  # raw bytes on the wire
    r = c.post("/v1/jobs", content=b"x" * 100, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
    assert seen == []  # the route never ran, the body was never read


def test_a_valid_key_passes_with_its_id_and_health_needs_none():
    c, seen = client()
    r = c.post("/v1/jobs", content=b"{}", headers={"Authorization": "Bearer " + KEY.decode()})
    assert r.status_code == 200 and len(r.json()["key_id"]) == 16 and KEY.decode() not in r.text
    assert c.get("/healthz").status_code == 200
    assert c.post("/v1/jobs", content=b"{}", headers={"Authorization": "BEARER " + KEY.decode()}).status_code == 200


def test_auth_without_any_key_fails_closed_with_a_message():
    c, _ = client(keys=[], keys_hint="/srv/imagine/api_keys")
    r = c.post("/v1/jobs", content=b"{}", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "no_api_keys"
    assert "/srv/imagine/api_keys" in r.json()["error"]["message"]
    open_c, _ = client(keys=[], auth=False)
    assert open_c.post("/v1/jobs", content=b"{}").json()["key_id"] == "anonymous"


def test_bodies_over_the_limit_get_413_with_or_without_a_length():
    c, seen = client()
    auth = {"Authorization": "Bearer " + KEY.decode()}
    r = c.post("/v1/jobs", content=b"x" * 2048, headers=auth)  # Content-Length says so: refused up front
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large" and seen == []

    def chunks():  # no Content-Length: counted while read
        for _ in range(8):
            yield b"x" * 512
    r = c.post("/v1/jobs", content=chunks(), headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert c.post("/v1/jobs", content=b"x" * 1000, headers=auth).json()["bytes"] == 1000
