"""Scaling via config with requests in flight, a killed Diffuser replica, S3 going away."""
import time

import ray
from ray import serve

from cluster.launcher import Cluster, apply
from tests.deployments.test_api import wait_job


def replicas(name: str) -> list:
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"#{name}#" in a["name"]]


def test_scale_diffuser_1_to_2_without_dropping_requests(app, http):
    cluster, _, _ = app
    ingress_before = {a["name"] for a in replicas("Ingress")}
    jobs = [http.post(f"{http.base}/v1/jobs", json={"prompt": f"a red circle --seed {i}", "steps": 25,
                                                     "n": 1}).json() for i in range(4)]
    cfg2 = cluster.cfg.model_copy(update={"stages": cluster.cfg.stages.model_copy(update={
        "diffuser": cluster.cfg.stages.diffuser.model_copy(update={"num_replicas": 2})})})
    apply(Cluster(cfg2, cluster.base))
    assert [wait_job(http, j["id"])["state"] for j in jobs] == ["succeeded"] * 4
    assert len(replicas("Diffuser")) == 2
    assert {a["name"] for a in replicas("Ingress")} == ingress_before  # applied in place
    apply(cluster)  # back to one replica
    assert len(replicas("Diffuser")) == 1 or serve.status() is not None


def test_killed_diffuser_replica_fails_or_finishes_the_job(http):
    job = http.post(f"{http.base}/v1/jobs", json={"prompt": "a red circle", "steps": 120, "n": 1}).json()
    time.sleep(1.5)
    for actor in replicas("Diffuser"):
        ray.kill(ray.get_actor(actor["name"], namespace="serve"), no_restart=True)
    final = wait_job(http, job["id"], timeout_s=120)
    assert final["state"] in ("succeeded", "failed")
    if final["state"] == "failed":
        assert final["error"] and final["error_type"] in ("replica_failure", "generation_error")
    # Serve replaces the replica; new work completes
    t0 = time.monotonic()
    while time.monotonic() - t0 < 90:
        again = http.post(f"{http.base}/v1/jobs", json={"prompt": "a red circle", "steps": 2, "n": 1}).json()
        if wait_job(http, again["id"])["state"] == "succeeded":
            return
        time.sleep(2)
    raise AssertionError("no job succeeded after the Diffuser replica was replaced")


def test_s3_outage_fails_the_job_with_a_storage_error(http, s3_server, make_storage):
    job = http.post(f"{http.base}/v1/jobs", json={"prompt": "a blue circle", "steps": 60, "n": 2}).json()
    time.sleep(1.0)
    s3_server.stop()
    try:
        final = wait_job(http, job["id"], timeout_s=120)
        assert final["state"] == "failed" and final["error_type"] == "storage_error", final
        assert "storage" in final["error"]
        r = http.post(f"{http.base}/v1/jobs", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "storage_error"
    finally:
        s3_server.start()
    storage = make_storage("imagine-test")
    assert storage.list_keys(f"images/{job['id']}/") == []  # nothing half-written
    assert storage.get_json(f"jobs/{job['id']}.json")["state"] != "succeeded"
