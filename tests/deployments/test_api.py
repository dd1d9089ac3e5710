"""End to end through HTTP: OpenAI endpoint, jobs with SSE, cancel, auth, validation, S3 objects."""
import base64
import io
import json
import os
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from cluster.storage import image_key


def wait_job(http, job_id, timeout_s=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        job = http.get(f"{http.base}/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout_s}s")


def test_openai_sdk_generates_urls_and_b64(app):
    from openai import OpenAI
    _, url, key = app
    client = OpenAI(base_url=f"{url}/v1", api_key=key)
    res = client.images.generate(prompt="a red circle on a black background", n=2, size="64x64",
                                 extra_body={"seed": 5, "steps": 3})
    assert len(res.data) == 2
    png = urllib.request.urlopen(res.data[0].url, timeout=10).read()  # a presigned S3 URL
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    res = client.images.generate(prompt="blue square", n=1, response_format="b64_json", extra_body={"steps": 2})
    assert Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))).size == (64, 64)


def test_served_images_equal_in_process_pipeline(http, app_config, tiny_pipeline):
    """The served graph gives the in-process pipeline's images for the same request and seeds, within 1/255:
    the tiny model here, the built-in one at its served defaults with IMAGINE_TEST_MODEL=builtin."""
    from pipeline import Pipeline
    builtin = os.environ.get("IMAGINE_TEST_MODEL") == "builtin"
    pipe = Pipeline.load(app_config[0].model) if builtin else tiny_pipeline
    body = {"prompt": "a green triangle on a white background", "n": 4 if builtin else 2, "seed": 42,
            "response_format": "b64_json", **({} if builtin else {"steps": 4, "negative_prompt": "red"})}
    r = http.post(f"{http.base}/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    served = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))).astype(int) for d in r.json()["data"]]
    [local] = pipe.generate([{k: v for k, v in body.items() if k != "response_format"}])
    assert len(served) == len(local.images) == body["n"]
    for s, img in zip(served, local.images):
        assert np.abs(s - np.asarray(img).astype(int)).max() <= 1  # within 1/255


def test_job_lifecycle_with_sse_and_s3_objects(http, make_storage):
    r = http.post(f"{http.base}/v1/jobs", json={"prompt": "a blue square on a yellow background --seed 9",
                                                 "steps": 6})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and job["request"]["n"] == 4 and job["request"]["seed"] == 9
    events = []
    with http.get(f"{http.base}/v1/jobs/{job['id']}/events", stream=True, timeout=120) as stream:
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    progress = [e["progress"] for e in events]
    assert progress == sorted(progress) and events[-1]["state"] == "succeeded" and progress[-1] == 1.0
    final = http.get(f"{http.base}/v1/jobs/{job['id']}").json()
    assert final["state"] == "succeeded" and len(final["images"]) == 4
    assert [im["seed"] for im in final["images"]] == [9, 10, 11, 12]
    storage = make_storage("imagine-test")
    head = storage.head(image_key(job["id"], 0))
    assert head["ContentType"] == "image/png"
    assert head["Metadata"]["seed"] == "9" and "prompt" not in head["Metadata"]  # prompts stay in the job record
    record = storage.get_json(f"jobs/{job['id']}.json")  # the source of truth
    assert record["state"] == "succeeded" and "url" not in json.dumps(record["images"])
    assert "secret" not in json.dumps(record).lower()


def test_cancel_frees_the_job(http):
    job = http.post(f"{http.base}/v1/jobs", json={"prompt": "a red circle", "steps": 150, "n": 2}).json()
    time.sleep(1.0)
    r = http.delete(f"{http.base}/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    time.sleep(1.0)
    final = wait_job(http, job["id"])
    assert final["state"] == "cancelled" and final["images"] == []
    # the server still answers and completes new work
    ok = http.post(f"{http.base}/v1/jobs", json={"prompt": "a red circle", "steps": 2, "n": 1}).json()
    assert wait_job(http, ok["id"])["state"] == "succeeded"


def test_prompt_flags_and_best_of(http):
    job = http.post(f"{http.base}/v1/jobs", json={"prompt": "a white circle --ar 2:1 --n 2 --cfg 6 --steps 3 "
                                                  "--no red, blue", "best_of": 2}).json()
    req = job["request"]
    assert req["prompt"] == "a white circle" and req["negative_prompt"] == "red, blue"
    assert req["n"] == 2 and req["guidance_scale"] == 6 and req["steps"] == 3 and req["width"] == 2 * req["height"]
    final = wait_job(http, job["id"])
    assert final["state"] == "succeeded" and len(final["images"]) == 2
    scores = [im["score"] for im in final["images"]]
    assert scores[0] >= scores[1]


def test_auth(app):
    import requests
    _, url, _ = app
    assert requests.get(f"{url}/healthz").status_code == 200  # no auth for health
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = requests.post(f"{url}/v1/jobs", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("body, param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "ok", "n": 99}, "n"),
    ({"prompt": "ok", "size": "big"}, "size"),
    ({"prompt": "ok", "size": "100x100"}, "size"),  # the field the client sent, not the pipeline's width
    ({"prompt": "ok", "size": "9" * 5000 + "x64"}, "size"),
    ({"prompt": "ok", "colour": "red"}, "colour"),
    ({"prompt": "ok --ar 0:1"}, "prompt"),
    ({"prompt": "ok --steps 999"}, "prompt"),  # a flag's value is part of the prompt
    ({"prompt": "ok --bogus 1"}, "prompt"),
    ({"prompt": "--n 2"}, "prompt"),
    ({"prompt": "ok", "upscale": 3}, "upscale"),
    ({"prompt": "ok --chaos 101"}, "prompt"),
    ({"prompt": "ok", "chaos": -1}, "chaos"),
    ({"prompt": "ok", "guidance_interval": [0.8, 0.2]}, "guidance_interval"),
])
def test_invalid_bodies_are_422_naming_the_field(http, body, param):
    r = http.post(f"{http.base}/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_job_is_404(http):
    assert http.get(f"{http.base}/v1/jobs/img_000000000000000000000000").status_code == 404
    assert http.get(f"{http.base}/v1/jobs/../etc/passwd").status_code == 404
