"""Fuzzing the served API (real cluster, real HTTP): schemathesis over every operation of its OpenAPI document,
with the key, valid and invalid inputs; and the headers that a body parser or an auth check might trip on.
No answer may be a 5xx, and every error must be the JSON error shape."""
import json
import random

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from deployments.ingress.api import app as fastapi_app

EXAMPLES = 25  # per operation and generation mode: bounded, a few minutes in all


def check(r: requests.Response, problems: list, what: str) -> None:
    if r.status_code >= 500:
        problems.append(f"{what}: {r.status_code} {r.text[:200]}")
    elif r.status_code >= 400:
        try:
            error = r.json()["error"]
            assert isinstance(error["message"], str) and "type" in error
        except (ValueError, KeyError, TypeError, AssertionError):
            problems.append(f"{what}: {r.status_code} without the JSON error shape: {r.text[:200]!r}")


def differences(a, b, path="") -> list[str]:
    """Where two JSON documents differ (the first 10 places)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: {k in a} vs {k in b}" for k in sorted(set(a) ^ set(b))]
        return (out + [d for k in sorted(set(a) & set(b)) for d in differences(a[k], b[k], f"{path}/{k}")])[:10]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}/{i}")][:10]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def test_schemathesis_finds_no_5xx_and_only_json_errors(app, reliability):
    import schemathesis
    from schemathesis import GenerationMode
    _, url, key = app
    auth = {"Authorization": f"Bearer {key}"}
    doc = json.loads(json.dumps(fastapi_app.openapi()))  # (a copy: schemathesis annotates the dict it is given)
    served = requests.get(f"{url}/openapi.json", headers=auth, timeout=10).json()
    assert served == doc, differences(served, doc)  # what the server serves
    schema = schemathesis.openapi.from_dict(json.loads(json.dumps(doc)))
    problems, calls = [], [0]
    session = requests.Session()

    def fuzz(op, mode) -> None:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            r = case.call(base_url=url, session=session, headers=auth, timeout=60)
            calls[0] += 1
            check(r, problems, f"{op.method.upper()} {op.path} {mode.value} {case.body!r:.120}")
            if op.path == "/v1/jobs" and r.status_code == 202:  # cancel what a valid body started
                session.delete(f"{url}/v1/jobs/{r.json()['id']}", headers=auth, timeout=30)
        try:
            run()
        except Unsatisfiable:  # no invalid input exists (an operation without parameters)
            assert mode == GenerationMode.NEGATIVE, op.path

    import torch
    torch.set_flush_denormal(False)  # (tests/conftest.py flushes denormals; Hypothesis needs subnormal floats)
    try:
        for result in schema.get_all_operations():
            op = result.ok()
            # the OpenAI endpoint waits for its images: only inputs it must refuse, so nothing long runs
            for mode in [GenerationMode.NEGATIVE] if op.path == "/v1/images/generations" else list(GenerationMode):
                fuzz(op, mode)
    finally:
        torch.set_flush_denormal(True)
    reliability("schemathesis over the OpenAPI document, with the key", calls=calls[0], problems=len(problems))
    assert not problems, "\n".join(problems[:20])


def valid_http(headers: dict[bytes, bytes], body_length: int) -> bool:
    """RFC 9110/9112: field values without control bytes; a Content-Length that is one decimal number and the
    length of the body that follows. Requests that break these are refused by the HTTP server's parser (Serve's
    proxy: a plain-text 400 "Invalid HTTP request received.") before they reach the API."""
    if any(b < 0x20 and b != 0x09 or b == 0x7F for v in headers.values() for b in v):
        return False
    length = headers.get(b"Content-Length")
    return length is None or (length.isdigit() and int(length) == body_length)


def test_header_fuzzing_gets_no_5xx(app, reliability):
    """Authorization, Content-Type and Content-Length, mangled, on the job endpoint (raw HTTP): no 5xx, and
    every answer to a valid HTTP request in the JSON error shape."""
    import http.client
    from urllib.parse import urlparse
    _, url, key = app
    u = urlparse(url)
    rng = random.Random(7)
    body = b'{"prompt": "a red circle", "steps": 2, "n": 1}'
    junk = [b"", b" ", b"\x00", b"\xff\xfe", b"\r", "é".encode(), b"Bearer", b"Bearer  " + key.encode(),
            b"bearer " + key.encode()[:-1], b"Basic " + key.encode(), b"x" * 8000, b"-1", b"99999999999999999999",
            b"application/json; charset=utf-8", b"text/plain", b"multipart/form-data; boundary=x", b"0", b"1.5"]
    problems, calls = [], 0
    for _ in range(120):
        headers = {b"Authorization": b"Bearer " + key.encode(), b"Content-Type": b"application/json"}
        for name in rng.sample([b"Authorization", b"Content-Type", b"Content-Length"], k=rng.randint(1, 3)):
            headers[name] = rng.choice(junk)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        try:
            conn.putrequest("POST", "/v1/jobs", skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            if b"Content-Length" not in headers:
                conn.putheader(b"Content-Length", str(len(body)).encode())
            conn.endheaders(body)
            r = conn.getresponse()
            status, text = r.status, r.read()
        except ValueError:
            continue  # a value http.client itself will not send (a bare CR)
        except (http.client.HTTPException, OSError):
            continue  # the server may close a connection it cannot parse: that is not a 5xx
        finally:
            conn.close()
        calls += 1
        if not valid_http(headers, len(body)):  # the HTTP server's parser answers those before any route: a bare 400
            if status >= 500 or status < 400:
                problems.append(f"invalid HTTP got {status}: {headers!r:.160}")
            continue
        fake = requests.Response()
        fake.status_code, fake._content = status, text
        check(fake, problems, f"headers {headers!r:.160}")
        if status == 202:
            requests.delete(f"{url}/v1/jobs/{json.loads(text)['id']}", headers={"Authorization": f"Bearer {key}"},
                            timeout=30)
    reliability("header fuzzing (Authorization, Content-Type, Content-Length)", calls=calls, problems=len(problems))
    assert not problems, "\n".join(problems[:20])
