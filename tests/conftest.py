"""Shared fixtures: small random-init models written by the tests in the real formats."""
import json
import logging
import os
import secrets
from pathlib import Path

import pytest
import torch

from cluster.seaweed import LocalS3Server, find_weed, pick_s3_port
from cluster.storage import Storage

torch.set_flush_denormal(True)
logging.getLogger("diffusers").setLevel(logging.ERROR)

WORDS = "a red green blue circle square triangle on black white background".split()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A complete tiny model folder: open_clip folder, diffusers folder, upscaler, pipeline.json."""
    from pipeline.builtin.configs import write_model
    return write_model(tmp_path_factory.mktemp("tiny-model"), "tiny", words=WORDS, seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    from pipeline import Pipeline
    return Pipeline.load(tiny_model_dir)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One `weed mini` for the whole session, on free ports, with a random access key and secret."""
    find_weed()  # a missing `weed` binary is an install error, not a reason to skip
    server = LocalS3Server(tmp_path_factory.mktemp("seaweed"), pick_s3_port(),
                           access_key="test-" + secrets.token_hex(4), secret_key=secrets.token_urlsafe(24))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def make_storage(s3_server):
    """make_storage(bucket=None, **Storage kwargs): a Storage on the test server (bucket not created)."""
    def make(bucket: str | None = None, **kwargs) -> Storage:
        kwargs.setdefault("secret_key", s3_server.secret_key)
        return Storage(s3_server.endpoint_url, bucket or "test-" + secrets.token_hex(6),
                       access_key=s3_server.access_key, **kwargs)
    return make


@pytest.fixture(scope="session")
def prometheus_server(tmp_path_factory):
    """One Prometheus for the session on a free port (1 s scrapes, monitoring/alerts.yml loaded), scraping
    nothing yet: point it at a Ray cluster with `prometheus_server.scrape(ray_temp_dir)`, then `.query(promql)`
    or `.wait_for(promql)`. Needs no Ray."""
    from cluster.prometheus import INSTALL_HINT, LocalPrometheus, find_prometheus
    from cluster.seaweed import find_free_port
    if find_prometheus() is None:  # an install error, not a reason to skip
        pytest.fail(f"Prometheus is not installed: {INSTALL_HINT}")
    server = LocalPrometheus(tmp_path_factory.mktemp("prometheus"), find_free_port(), scrape_interval="1s")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One local Redis for the session (the job queue's broker) on a free port, with a random password."""
    from cluster.redis_server import INSTALL_HINT, LocalRedis, find_redis_server
    from cluster.seaweed import find_free_port
    if find_redis_server() is None:  # an install error, not a reason to skip
        pytest.fail(f"redis-server is not installed: {INSTALL_HINT}")
    server = LocalRedis(tmp_path_factory.mktemp("redis"), find_free_port(), password=secrets.token_urlsafe(16))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def reliability():
    """reliability(scenario, **figures): the figures of a fault or load scenario (jobs submitted, succeeded,
    failed, lost, recovery times ...), printed as `RELIABILITY <scenario>: {...}` and appended as JSON to
    $IMAGINE_RELIABILITY_REPORT when it is set (the README's Reliability table comes from such a file)."""
    def record(scenario: str, **figures) -> None:
        print(f"\nRELIABILITY {scenario}: {figures}")
        if path := os.environ.get("IMAGINE_RELIABILITY_REPORT"):
            path = Path(path)
            rows = json.loads(path.read_text()) if path.is_file() and path.stat().st_size else []
            path.write_text(json.dumps([*rows, {"scenario": scenario, **figures}], indent=1) + "\n")
    return record
