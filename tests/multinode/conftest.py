"""A real 3-node Ray cluster on this machine, each node `ray start` in its own network namespace (cluster/netns.py,
cluster/multinode.py) with token authentication, the host's S3 (SeaweedFS) and Redis on the lab's bridge address,
the tiny test model, and the application deployed by `launcher.apply`. No mocks.

Needs root (network namespaces; CI runs as root). The lab uses its own prefix and 10.213.128.0/18 (RFC 1918),
apart from the product's default lab and tests/cluster/test_netns.py's. Everything is removed at the end, also
after a failure: the nodes (every process in the namespaces), S3, Redis, then the namespaces and the bridge.
"""
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from cluster.config import ImagineConfig
from cluster.multinode import LabCluster, RayNodes, deploy, lab_config
from cluster.netns import NetworkLab, pick_subnet
from cluster.raynode import ensure_token
from cluster.redis_server import INSTALL_HINT, LocalRedis, find_redis_server
from cluster.seaweed import LocalS3Server, find_free_port, pick_s3_port
from cluster.storage import Storage

PREFIX = "imnode"
POOL = ipaddress.ip_network("10.213.128.0/18")
BUCKET = "imagine-multinode"


@dataclass
class MultiNode:
    lab: NetworkLab
    nodes: RayNodes
    cluster: LabCluster
    key: str
    storage: Storage

    @property
    def url(self) -> str:
        return self.cluster.endpoint

    @property
    def app(self) -> str:
        return self.cluster.cfg.cluster.app_name

    def address(self, i: int) -> str:
        return self.nodes.addresses[i]

    def http(self) -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.headers["Authorization"] = f"Bearer {self.key}"
        return s


@pytest.fixture(scope="module")
def lab():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    NetworkLab.cleanup_stale(PREFIX)
    lab = NetworkLab(PREFIX, nodes=3, subnet=str(pick_subnet(POOL))).create()
    yield lab
    lab.delete()


@pytest.fixture(scope="module")
def lab_services(lab, tmp_path_factory):
    """S3 and Redis on the lab's bridge address (the host side), where the nodes reach them."""
    if find_redis_server() is None:  # an install error, not a reason to skip
        pytest.fail(f"redis-server is not installed: {INSTALL_HINT}")
    host = lab.host_address
    s3 = LocalS3Server(tmp_path_factory.mktemp("lab-s3"), pick_s3_port(), access_key="test-" + secrets.token_hex(4),
                       secret_key=secrets.token_urlsafe(24), host=host)
    redis = LocalRedis(tmp_path_factory.mktemp("lab-redis"), find_free_port(host), secrets.token_urlsafe(16),
                       host=host)
    try:
        s3.start()
        redis.start()
        yield s3, redis
    finally:
        redis.stop()
        s3.stop()


@pytest.fixture(scope="module")
def multinode(lab, lab_services, tiny_model_dir, tmp_path_factory):
    """The application on the 3 nodes: Ingress, JobRunner, Publisher on the head; Diffuser on worker 1;
    TextEncoder and Upscaler on worker 2."""
    s3, redis = lab_services
    base = tmp_path_factory.mktemp("multinode")
    state = base / ".imagine"
    state.mkdir()
    key = "imk_test_" + secrets.token_hex(8)
    (state / "api_keys").write_text(key + "\n")
    (state / "redis-password").write_text(redis.password)
    (state / "s3.json").write_text(json.dumps({"access_key": s3.access_key, "secret_key": s3.secret_key}))
    cfg = ImagineConfig.from_dict({
        "model": str(tiny_model_dir),
        # namespaces have their own ports: the same numbers on every node, and none taken on the host
        "cluster": {"http_port": 8000, "dashboard_port": 8265},
        "monitoring": {"metrics_export_port": 8080, "prometheus_port": 9090},
        "storage": {"endpoint_url": s3.url, "bucket": BUCKET, "credentials_file": str(state / "s3.json"),
                    "local": {"enabled": False}, "connect_timeout_s": 2, "read_timeout_s": 10},
        "api": {"api_keys_file": str(state / "api_keys"), "request_timeout_s": 120},
        "queue": {"redis_url": redis.url, "password_file": str(state / "redis-password"), "local": {"enabled": False},
                  "max_queued_image_steps": 100000, "max_queued_image_steps_per_key": 100000},
        "jobs": {"lease_s": 3.0, "stall_timeout_s": 10.0, "deadline_s": 240.0},
        "stages": {"diffuser": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
                   "text_encoder": {"ray_actor_options": {"num_cpus": 0.5}},
                   "upscaler": {"ray_actor_options": {"num_cpus": 0.5}}},
    })
    nodes = RayNodes(lab, state / "nodes", ensure_token(state / "ray-token"),
                     dashboard_port=cfg.cluster.dashboard_port, metrics_export_port=cfg.monitoring.metrics_export_port)
    try:
        nodes.start()
        cluster = LabCluster(lab_config(cfg, nodes.head, s3.url, redis.url), base)
        storage = Storage.from_config(cluster.cfg.storage)
        storage.ensure_bucket()
        deploy(cluster, nodes)
        yield MultiNode(lab, nodes, cluster, key, storage)
    except BaseException:
        _print_ray_errors(state / "nodes")
        raise
    finally:
        nodes.stop()


def _print_ray_errors(nodes_dir: Path) -> None:
    """The ends of the nodes' Ray logs, to see why a start or deploy failed."""
    for log in sorted(nodes_dir.glob("*/session_latest/logs/*")):
        if log.suffix in (".err", ".log") and log.stat().st_size and any(
                w in log.name for w in ("raylet", "gcs_server", "dashboard", "serve", "controller")):
            print(f"---- {log}\n{log.read_text(errors='replace')[-1500:]}")
