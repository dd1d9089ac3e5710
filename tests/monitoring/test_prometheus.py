"""cluster/prometheus.py with a real Prometheus: lifecycle and pid file, and scraping exporters found through
a service discovery file in Ray's layout, with the ray_imagine_* -> imagine_* rename and the cluster label."""
import json
import os

import pytest
import requests
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cluster.prometheus import (
    SD_FILE,
    LocalPrometheus,
    PrometheusError,
    find_prometheus,
)
from cluster.seaweed import find_free_port

SESSION = "session_2026-11-25_17-42-48_489916_29231"


@pytest.fixture(scope="module")
def prometheus_server(tmp_path_factory):
    """This module's own Prometheus: the session's one may still hold a Ray cluster's series
    (tests/deployments/test_monitoring.py points it at the test cluster), and these tests count series."""
    from cluster.prometheus import LocalPrometheus
    server = LocalPrometheus(tmp_path_factory.mktemp("prometheus-own"), find_free_port(), scrape_interval="1s")
    server.start()
    yield server
    server.stop()


def test_prometheus_is_installed():
    assert find_prometheus(), "Prometheus is not installed: run `make prometheus`"


# ---- lifecycle ----------------------------------------------------------------------------------

def test_start_stop_and_pidfile(tmp_path):
    data = tmp_path / "prom"
    server = LocalPrometheus(data, find_free_port(), ray_temp_dir=tmp_path / "ray")
    server.start()
    try:
        assert server.is_running()
        assert requests.get(f"{server.url}/-/ready", timeout=5).status_code == 200
        assert server.pid_file.read_text().strip() == str(server.pid)
        assert str(tmp_path / "ray" / SD_FILE) in server.config_file.read_text()
        with pytest.raises(PrometheusError, match="already runs"):
            LocalPrometheus(data, find_free_port()).start()
        other = LocalPrometheus(tmp_path / "other", server.port)
        with pytest.raises(PrometheusError, match=f"port {server.port} is in use"):
            other.start()
        found = LocalPrometheus.from_pidfile(data)
        assert found is not None and found.port == server.port and found.pid == server.pid
        assert found.query("vector(2)")[0]["value"][1] == "2"  # the API of the server found
    finally:
        stopped = LocalPrometheus.stop_from_pidfile(data)  # as `imagine down` does, from the pid file
    assert stopped and not server.is_running() and not server.pid_file.exists()
    assert LocalPrometheus.from_pidfile(data) is None
    assert LocalPrometheus.stop_from_pidfile(data) is False


def test_stale_pidfile_is_ignored(tmp_path):
    data = tmp_path / "prom"
    data.mkdir()
    (data / "prometheus.pid").write_text(f"{os.getpid()}\n")  # a live process, but not a Prometheus
    assert LocalPrometheus.from_pidfile(data) is None
    assert not (data / "prometheus.pid").exists()


def test_query_errors_raise(prometheus_server):
    assert prometheus_server.query("vector(2)")[0]["value"][1] == "2"
    with pytest.raises(PrometheusError, match="bad_data"):
        prometheus_server.query("sum(")


def test_rejected_config_raises_on_reload(tmp_path):
    server = LocalPrometheus(tmp_path / "prom", find_free_port())
    server.start()
    try:
        server.config_file.write_text("scrape_configs: [{job_name: 1, nonsense: true}]\n")
        with pytest.raises(PrometheusError, match="rejected its config"):
            server.reload()
        assert server.is_running()  # a rejected config leaves the running one in place
    finally:
        server.stop()


# ---- scraping through Ray's service discovery file ------------------------------------------------

@pytest.fixture
def exporters():
    """Two metric endpoints on loopback, as two Ray nodes' metrics agents export: names with Ray's `ray_` prefix."""
    servers = []
    for replica in ("d1", "d2"):
        registry = CollectorRegistry()
        labels = ["deployment", "replica", "application"]
        Counter("ray_imagine_stage_requests", "calls", labels, registry=registry) \
            .labels("Diffuser", replica, "imagine").inc(3)
        Histogram("ray_imagine_stage_latency_seconds", "latency", labels, buckets=[0.5, 30.0], registry=registry) \
            .labels("Diffuser", replica, "imagine").observe(2.0)
        Gauge("ray_serve_deployment_replica_healthy", "healthy", labels, registry=registry) \
            .labels("Diffuser", replica, "imagine").set(1)
        httpd, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
        servers.append((httpd, thread))
    yield [f"127.0.0.1:{httpd.server_port}" for httpd, _ in servers]
    for httpd, thread in servers:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def write_ray_service_discovery(ray_dir, targets):
    """What Ray's dashboard writes: the session's file, and a symlink to it in the temp dir."""
    session = ray_dir / SESSION
    session.mkdir(parents=True, exist_ok=True)
    (session / SD_FILE).write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))
    (ray_dir / SD_FILE).symlink_to(session / SD_FILE)
    (ray_dir / "session_latest").symlink_to(session, target_is_directory=True)


def test_scrapes_every_node_renames_and_labels(prometheus_server, exporters, tmp_path):
    ray_dir = tmp_path / "ray"
    write_ray_service_discovery(ray_dir, exporters)
    prometheus_server.scrape(ray_dir)

    up = prometheus_server.wait_for('count(up{job="ray"} == 1) == 2', timeout_s=30)
    assert up[0]["value"][1] == "2"  # every node in the file is scraped
    series = prometheus_server.wait_for('imagine_stage_requests_total{deployment="Diffuser"}')
    assert sorted(s["metric"]["replica"] for s in series) == ["d1", "d2"]
    assert sorted(s["metric"]["instance"] for s in series) == sorted(exporters)
    for s in series:
        m = s["metric"]
        assert m["__name__"] == "imagine_stage_requests_total"
        assert m["cluster"] == "local" and m["job"] == "ray" and m["application"] == "imagine"
        assert s["value"][1] == "3"
    # nothing keeps Ray's prefix for imagine's metrics; Serve's own keep theirs, with the cluster label
    assert prometheus_server.query('{__name__=~"ray_imagine_.*"}') == []
    healthy = prometheus_server.query("ray_serve_deployment_replica_healthy")
    assert len(healthy) == 2 and {s["metric"]["cluster"] for s in healthy} == {"local"}
    # every series of the job carries the cluster label, `up` included
    assert prometheus_server.query('count({job="ray", cluster!="local"})') == []
    # histograms keep their _bucket/_sum/_count suffixes after the rename
    p50 = prometheus_server.query("histogram_quantile(0.5, sum by (le) (imagine_stage_latency_seconds_bucket))")
    assert 0.5 < float(p50[0]["value"][1]) <= 30
    assert prometheus_server.query("imagine_stage_latency_seconds_count")[0]["value"][1] == "1"


def test_alert_rules_are_loaded(prometheus_server):
    r = requests.get(f"{prometheus_server.url}/api/v1/rules", timeout=10).json()
    assert r["status"] == "success"
    alerts = {rule["name"] for g in r["data"]["groups"] if g["name"] == "imagine" for rule in g["rules"]}
    assert {"ImagineHighErrorRatio", "ImagineStageLatencyHigh", "ImagineQueueGrowingAtMaxReplicas",
            "ImagineNoImagesPublished", "ImagineStorageWriteFailures", "ImagineStageNoHealthyReplicas",
            "ImagineJobFailureRatio"} <= alerts


# ---- `imagine up` / `status` / `down` ----------------------------------------------------------------

def test_launcher_starts_one_prometheus_per_cluster_state_dir(tmp_path):
    # The launcher's Prometheus part only (no Ray): `up` starts it, a second `up` finds it, `down` stops it.
    from cluster.config import ImagineConfig
    from cluster.launcher import Cluster, prometheus_dir, prometheus_url, start_prometheus
    port = find_free_port()
    cfg = ImagineConfig.from_dict({"monitoring": {"prometheus_port": port}}).resolve_paths(tmp_path)
    c = Cluster(cfg, tmp_path)
    assert prometheus_url(c) is None
    try:
        url = start_prometheus(c)
        assert url == f"http://127.0.0.1:{port}" and prometheus_url(c) == url
        assert prometheus_dir(c) == tmp_path / ".imagine" / "prometheus"
        # it reads the service discovery file in the config's Ray temp dir (.imagine/ray by default)
        rendered = (prometheus_dir(c) / "prometheus.yml").read_text()
        assert str(tmp_path / ".imagine" / "ray" / SD_FILE) in rendered
        assert start_prometheus(c) == url  # idempotent: the running one is reused
    finally:
        assert LocalPrometheus.stop_from_pidfile(prometheus_dir(c))  # what `imagine down` does after `ray stop`
    assert prometheus_url(c) is None
    off = Cluster(ImagineConfig.from_dict({"monitoring": {"enabled": False}}).resolve_paths(tmp_path), tmp_path)
    assert start_prometheus(off) is None and not prometheus_dir(off).joinpath("prometheus.pid").exists()
