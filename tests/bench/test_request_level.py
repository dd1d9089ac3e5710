"""The bench's request-level batching baseline (bench/request_level.py): whole requests batched together, the
batch running until its longest request is done; deployed in our graph in place of the Diffuser, it serves the
same images as the in-process pipeline."""
import asyncio
import base64
import importlib
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.config import ImagineConfig
from pipeline.sampler import SampleRequest


def sample_request(sampler, steps, seed, scheduler="ddim"):
    cfg = sampler.unet.config
    g = torch.Generator().manual_seed(seed)
    dim, pooled = cfg.cross_attention_dim, cfg.projection_class_embeddings_input_dim or 1
    return SampleRequest(torch.randn(8, dim, generator=g), torch.zeros(8, dim), torch.randn(pooled, generator=g),
                         torch.zeros(pooled), 32, 32, steps, 3.0, scheduler, seed)


@pytest.fixture
def request_level_class(monkeypatch):
    """RequestLevelDiffuser for use in this process, outside Serve. Its @serve.batch queue is made at first use,
    bound to this event loop, on the class: a copy of the class (the module reloaded) keeps it out of the one
    that `imagine bench` deploys (Ray could not pickle that one any more)."""
    from ray.serve.batching import _BatchQueue

    import bench.request_level
    # Serve's batch queue checks max_ongoing_requests in the replica's context (a warning only); there is none
    monkeypatch.setattr(_BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)
    yield importlib.reload(bench.request_level).RequestLevelDiffuser
    importlib.reload(bench.request_level)


def test_whole_requests_share_a_batch_until_the_longest_is_done(tiny_model_dir, request_level_class):
    """The deployment class itself, without Serve: one batch of both requests, progress after every step of
    the batch, each image as sampled alone (within 1/255)."""
    config = ImagineConfig.from_dict({"model": str(tiny_model_dir)})
    d = request_level_class.func_or_class(config.model_dump(mode="json"))
    d.reconfigure({**config.stages.diffuser.user_config(), "max_batch_size": 4, "batch_wait_timeout_s": 0.2})
    sizes, step = [], d.sampler.step
    d.sampler.step = lambda states: (sizes.append(len(states)), step(states))[1]
    reqs = [sample_request(d.sampler, 5, 1), sample_request(d.sampler, 2, 2, scheduler="euler_a")]

    async def collect(req, log, name):
        events = []
        async for e in d.sample(req):
            events.append(e)
            log.append((name, "image" if "image" in e else e["progress"]))
        return events

    async def run():
        log = []
        return await asyncio.gather(collect(reqs[0], log, "long"), collect(reqs[1], log, "short")), log

    (long, short), log = asyncio.run(run())
    assert sizes == [2, 2, 1, 1, 1]  # one batch; the short request's slot stays idle until the batch ends
    for events in (long, short):
        progress = [e["progress"] for e in events[:-1]]
        assert len(progress) == 5 and progress == sorted(progress) and progress[-1] == 1.0 and "image" in events[-1]
    images = [name for name, e in log if e == "image"]
    assert sorted(images) == ["long", "short"] and log.index(("short", "image")) > log.index(("long", 1.0))

    for req, events in zip(reqs, (long, short)):
        [state] = d.sampler.start([req])
        while not state.done:
            d.sampler.step([state])
        [alone] = d.sampler.finish([state])
        assert (events[-1]["image"] - alone).abs().max().item() <= 1 / 255


BODIES = [  # different step counts, schedulers, sizes and seeds, batched together
    {"prompt": "a red circle on a black background", "steps": 9, "seed": 1, "guidance_scale": 6.0},
    {"prompt": "a blue square", "steps": 3, "seed": 2, "scheduler": "euler_a", "size": "128x64"},
]


@pytest.mark.slow
def test_request_level_graph_serves_the_pipelines_images(tiny_model_dir, tiny_pipeline, tmp_path):
    """The bench's request_level mode as `imagine bench` deploys it (local S3 and Ray, the graph with
    RequestLevelDiffuser as its Diffuser), over HTTP: each image within 1/255 of the in-process pipeline's."""
    import ray
    import requests

    from bench.serving import deploy, local_cluster

    assert not ray.is_initialized(), "run the bench tests before (or apart from) those that start Ray"
    environ = dict(os.environ)  # local_cluster sets Ray's environment variables for the run
    try:
        with local_cluster(tmp_path / "work", str(tiny_model_dir)) as cfg:
            url = deploy(cfg, "request_level")

            def generate(body):
                r = requests.post(f"{url}/v1/images/generations", json={**body, "n": 1, "response_format": "b64_json"},
                                  timeout=300)
                assert r.status_code == 200, r.text
                return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))).astype(int)

            with ThreadPoolExecutor(len(BODIES)) as pool:
                served = list(pool.map(generate, BODIES))
    finally:
        os.environ.clear()
        os.environ.update(environ)
    for body, img in zip(BODIES, served):
        fields = {k: v for k, v in body.items() if k != "size"}
        if "size" in body:
            fields["width"], fields["height"] = map(int, body["size"].split("x"))
        [result] = tiny_pipeline.generate([{**fields, "n": 1}])
        local = np.asarray(result.images[0]).astype(int)
        assert img.shape == local.shape, body
        assert np.abs(img - local).max() <= 1, body
