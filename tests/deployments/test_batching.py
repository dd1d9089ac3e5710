"""Step-level continuous batching in the served Diffuser: mixed requests, and a cancel freeing a slot."""
import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from tests.deployments.test_api import wait_job

MIXED = [  # different step counts, guidance, schedulers, sizes and seeds, sampled together
    {"prompt": "a red circle on a black background", "steps": 9, "seed": 1, "guidance_scale": 6.0},
    {"prompt": "a blue square", "steps": 3, "seed": 2, "scheduler": "euler_a", "size": "128x64"},
    {"prompt": "a green triangle on a white background", "steps": 5, "seed": 3, "guidance_scale": 1.0,
     "scheduler": "ddim"},
    {"prompt": "a white circle", "steps": 7, "seed": 4, "negative_prompt": "red", "scheduler": "euler"},
    {"prompt": "a blue square on a white background", "steps": 6, "seed": 5, "chaos": 60,  # the guidance
     "guidance_interval": [0.2, 0.8]},  # changes from step to step: its unconditional rows come and go
]


def _generate(http, body):
    r = http.post(f"{http.base}/v1/images/generations", json={**body, "n": 1, "response_format": "b64_json"},
                  timeout=120)
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))).astype(int)


def _local(tiny_pipeline, body):
    fields = {k: v for k, v in body.items() if k != "size"}
    if "size" in body:
        fields["width"], fields["height"] = map(int, body["size"].split("x"))
    [result] = tiny_pipeline.generate([{**fields, "n": 1}])
    return np.asarray(result.images[0]).astype(int)


def test_mixed_requests_in_one_step_batch_equal_each_alone(http, tiny_pipeline):
    with ThreadPoolExecutor(len(MIXED)) as pool:
        served = list(pool.map(lambda b: _generate(http, b), MIXED))
    for body, img in zip(MIXED, served):
        local = _local(tiny_pipeline, body)
        assert img.shape == local.shape, body
        assert np.abs(img - local).max() <= 1, body  # within 1/255 of the request sampled alone


def test_cancel_frees_the_slot_at_the_next_step(app, http):
    """A full batch (max_batch_size 8 in the test config) holds a short request back until one leaves."""
    cluster, _, _ = app
    assert cluster.cfg.stages.diffuser.max_batch_size == 8
    long = http.post(f"{http.base}/v1/jobs", json={"prompt": "a red circle", "steps": 200, "n": 8}).json()
    t0 = time.monotonic()
    while http.get(f"{http.base}/v1/jobs/{long['id']}").json()["progress"] <= 0.06:  # denoising has begun
        assert time.monotonic() - t0 < 60
        time.sleep(0.1)
    short = http.post(f"{http.base}/v1/jobs", json={"prompt": "a blue square", "steps": 2, "n": 1}).json()
    time.sleep(1.5)
    held = http.get(f"{http.base}/v1/jobs/{short['id']}").json()
    assert held["state"] == "running" and held["stage"] == "diffuser" and held["progress"] <= 0.05, held
    t_cancel = time.monotonic()
    assert http.delete(f"{http.base}/v1/jobs/{long['id']}").json()["state"] == "cancelled"
    assert wait_job(http, short["id"], timeout_s=60)["state"] == "succeeded"
    freed_in = time.monotonic() - t_cancel
    long_final = wait_job(http, long["id"])
    # stopped while sampling (how far it got in those ~2 s depends on the machine's speed)
    assert long_final["state"] == "cancelled" and long_final["progress"] < 0.85 and not long_final["images"]
    assert freed_in < 10, f"the short job needed {freed_in:.1f}s after the cancel"
