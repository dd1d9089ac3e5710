"""The served API's edges on the real cluster: raw bad headers, docs behind the key, body limits, health that
answers at once while every stage is saturated, readiness that follows the queue's Redis."""
import http.client
import json
import statistics
import time
from urllib.parse import urlparse

import requests


def raw_post(url: str, path: str, headers: dict[bytes, bytes], body: bytes) -> tuple[int, dict]:
    """A request with header bytes exactly as given (requests and httpx refuse non-ASCII header values)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", path, skip_accept_encoding=True)
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.putheader(b"Content-Length", str(len(body)).encode())
    conn.endheaders(body)
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def test_malformed_authorization_headers_get_401_json(app):
    _, url, _ = app
    for value in (b"Bearer \xff\xfe", b"\xff\xfe", b"Bearer", b"Basic dXNlcjpwYXNz", b"Bearer " + b"k" * 5000):
        status, body = raw_post(url, "/v1/jobs", {b"Authorization": value, b"Content-Type": b"application/json"},
                                b'{"prompt": "x"}')
        assert status == 401 and body["error"]["type"] == "authentication_error", (value[:20], status, body)


def test_docs_and_openapi_need_the_key(app, http):
    _, url, _ = app
    for path in ("/docs", "/openapi.json"):
        r = requests.get(url + path, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.get(url + path).status_code == 200
    assert requests.get(url + "/healthz", timeout=10).status_code == 200  # never needs a key


def test_an_oversized_body_is_413(http):
    r = http.post(f"{http.base}/v1/jobs", data=b"{" + b" " * (2 << 20) + b"}",
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_health_answers_at_once_while_every_stage_is_saturated(http, reliability):
    body = {"prompt": "a red circle", "steps": 200, "n": 4}
    ids = [http.post(f"{http.base}/v1/jobs", json={**body, "seed": i}).json()["id"] for i in range(12)]
    try:
        t0 = time.monotonic()
        while http.get(f"{http.base}/v1/jobs/{ids[0]}").json()["stage"] != "diffuser":
            assert time.monotonic() - t0 < 60
            time.sleep(0.2)
        times, codes = [], []
        for _ in range(20):
            t = time.perf_counter()
            r = requests.get(f"{http.base}/healthz", timeout=10)
            times.append(time.perf_counter() - t)
            codes.append(r.status_code)
            time.sleep(0.05)
        reliability("/healthz while the Diffuser is saturated (12 jobs x 200 steps x 4)", requests=20,
                    median_ms=round(statistics.median(times) * 1000, 1), max_ms=round(max(times) * 1000, 1))
        assert set(codes) == {200}, codes  # busy is not down
        assert statistics.median(times) < 0.1, times
    finally:
        for job_id in ids:
            http.delete(f"{http.base}/v1/jobs/{job_id}")


def test_readiness_follows_the_queue_broker(http, redis_server):
    assert requests.get(f"{http.base}/readyz", timeout=10).json()["ready"] is True
    redis_server.stop()
    try:
        t0 = time.monotonic()
        while (r := requests.get(f"{http.base}/readyz", timeout=10)).status_code != 503:
            assert time.monotonic() - t0 < 15, "readiness did not notice Redis going away"
            time.sleep(0.5)
        assert r.headers["Retry-After"] and r.json()["dependencies"]["queue"].startswith("unavailable")
        assert requests.get(f"{http.base}/healthz", timeout=10).status_code == 200  # the stages are fine
    finally:
        redis_server.start()
    t0 = time.monotonic()
    while requests.get(f"{http.base}/readyz", timeout=10).status_code != 200:
        assert time.monotonic() - t0 < 15
        time.sleep(0.5)
