"""One real Ray cluster (with its dashboard, for declarative deploys), a real SeaweedFS and the
real application deployed as `imagine apply` does it. No mocks of the system under test."""
import os
import secrets
from pathlib import Path

import pytest

from cluster.config import ImagineConfig
from cluster.launcher import Cluster, apply
from cluster.raynode import local_env, ray_temp_dir
from cluster.seaweed import find_free_port
from pipeline.spec import BUILTIN_DIR

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_temp():
    """Ray's temp dir for the test cluster (where it writes the Prometheus service-discovery file)."""
    return ray_temp_dir(REPO / ".imagine" / f"ray-tests-{os.getpid()}")


@pytest.fixture(scope="session")
def ray_cluster(ray_temp):
    import ray
    os.environ.update(local_env())  # one node on loopback (cluster/raynode.py); a tests-only Ray: no token
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # metrics reach Prometheus within ~2 s
    dashboard_port = find_free_port()
    temp = ray_temp
    ray.init(num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
             _temp_dir=str(temp), logging_level="WARNING", log_to_driver=False)
    yield dashboard_port
    from ray import serve
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def app_config(tiny_model_dir, s3_server, redis_server, ray_cluster, tmp_path_factory):
    """The config of the test application: tiny model, test S3, test Redis (the job queue), one API key."""
    state = tmp_path_factory.mktemp("imagine-state")
    key = "imk_test_" + secrets.token_hex(8)
    (state / "api_keys").write_text(f"{key}\nimk_other_{secrets.token_hex(8)}\n")
    (state / "redis-password").write_text(redis_server.password)
    (state / "webhook-secret").write_text(secrets.token_urlsafe(24))
    (state / "s3.json").write_text(
        f'{{"access_key": "{s3_server.access_key}", "secret_key": "{s3_server.secret_key}"}}')
    # IMAGINE_TEST_MODEL=builtin: the shipped model instead of the tiny random one, for real pictures in the
    # gallery's screenshots (tests/deployments/test_gallery.py); the other tests expect the tiny model
    model = str(BUILTIN_DIR) if os.environ.get("IMAGINE_TEST_MODEL") == "builtin" else str(tiny_model_dir)
    cfg = ImagineConfig.from_dict({
        "model": model,
        "cluster": {"http_port": find_free_port(), "dashboard_port": ray_cluster},
        "storage": {"endpoint_url": s3_server.endpoint_url, "bucket": "imagine-test", "credentials_file":
                    str(state / "s3.json"), "local": {"enabled": False}, "max_attempts": 1,
                    "connect_timeout_s": 2, "read_timeout_s": 10},
        "api": {"api_keys_file": str(state / "api_keys"), "request_timeout_s": 120},
        "queue": {"redis_url": redis_server.url, "password_file": str(state / "redis-password"),
                  "local": {"enabled": False}, "max_queued_image_steps": 100000,
                  "max_queued_image_steps_per_key": 100000},
        "webhooks": {"secret_file": str(state / "webhook-secret"), "backoff_s": 0.2, "progress_every_s": 0.5},
        "jobs": {"lease_s": 3.0, "stall_timeout_s": 10.0, "deadline_s": 240.0},
        "monitoring": {"metrics_export_port": find_free_port(), "prometheus_port": find_free_port()},
        "stages": {"diffuser": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
                   "text_encoder": {"ray_actor_options": {"num_cpus": 0.5}},
                   "upscaler": {"ray_actor_options": {"num_cpus": 0.5}}},
    })
    return cfg, key


@pytest.fixture(scope="session")
def app(app_config, make_storage, tmp_path_factory):
    """The deployed application: (cluster, base url, api key)."""
    cfg, key = app_config
    make_storage("imagine-test").ensure_bucket()
    cluster = Cluster(cfg, tmp_path_factory.mktemp("imagine-base"))  # (its .imagine/: the rendered serve config)
    apply(cluster)
    return cluster, cluster.endpoint, key


@pytest.fixture(scope="session")
def other_key(app_config):
    """A second API key of the test application (fairness between keys)."""
    cfg, key = app_config
    [other] = cfg.api.load_api_keys() - {key}
    return other


@pytest.fixture
def http(app):
    import requests
    _, url, key = app
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {key}"
    s.base = url
    return s
