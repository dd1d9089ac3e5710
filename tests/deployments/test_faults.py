"""Faults on the real cluster: a JobRunner, Ingress or Diffuser replica killed mid-job, Redis stopped for 10 s,
S3 restarted mid-publish. Every accepted job ends with its images (or, for S3 lost mid-publish, a true
storage_error), and the job records agree with what the API says."""
import os
import signal
import time

import pytest
import ray
import requests

from tests.deployments.test_api import wait_job
from tests.deployments.test_queue import TERMINAL, wait_all
from tests.deployments.test_resilience import replicas


def replica_pids(name: str) -> list[int]:
    from ray.util.state import list_actors
    return [a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
            if a.name and f"#{name}#" in a.name]


def kill_replicas(name: str, how: str) -> None:
    """ray.kill of every replica of a deployment (Serve starts new ones), or SIGKILL of their processes."""
    if how == "ray.kill":
        for actor in replicas(name):
            ray.kill(ray.get_actor(actor["name"], namespace="serve"), no_restart=True)
    else:
        for pid in replica_pids(name):
            os.kill(pid, signal.SIGKILL)


def wait_until(http, job_id, cond, timeout_s=120) -> dict:
    t0 = time.monotonic()
    while True:
        try:
            job = http.get(f"{http.base}/v1/jobs/{job_id}", timeout=10).json()
            if cond(job):
                return job
        except (requests.RequestException, ValueError):
            pass  # the Ingress may be restarting
        assert time.monotonic() - t0 < timeout_s, f"job {job_id}: condition not met in {timeout_s}s"
        time.sleep(0.1)


def pngs(storage, job: dict) -> list[bytes]:
    return [storage.get_bytes(im["key"]) for im in job["images"]]


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_a_killed_job_runner_leaves_its_job_to_another_run(http, make_storage, reliability, how):
    body = {"prompt": "a green circle on a white background", "steps": 80, "n": 2, "seed": 77}
    calm = wait_job(http, http.post(f"{http.base}/v1/jobs", json=body).json()["id"])  # undisturbed, same seed
    job = http.post(f"{http.base}/v1/jobs", json=body).json()
    wait_until(http, job["id"], lambda j: j["stage"] == "diffuser" and j["progress"] > 0.1)
    t_kill = time.monotonic()
    kill_replicas("JobRunner", how)
    again = wait_until(http, job["id"], lambda j: j["attempts"] >= 2 and j["state"] == "running")
    resumed_s = time.monotonic() - t_kill
    final = wait_job(http, job["id"], timeout_s=180)
    storage = make_storage("imagine-test")
    reliability(f"JobRunner replica killed mid-job ({how})", submitted=1,
                succeeded=int(final["state"] == "succeeded"), failed=int(final["state"] == "failed"), lost=0,
                attempts=final["attempts"], resumed_after_s=round(resumed_s, 1))
    assert final["state"] == "succeeded" and final["attempts"] == 2, final
    assert again["attempts"] == 2 and resumed_s < 30, f"resumed after {resumed_s:.1f}s"
    assert pngs(storage, final) == pngs(storage, calm)  # byte-identical to the undisturbed run
    assert storage.get_json(f"jobs/{job['id']}.json")["state"] == "succeeded"


def test_a_killed_ingress_loses_no_job(http, reliability):
    body = {"prompt": "a yellow square on a blue background", "steps": 40, "n": 4}
    ids = [http.post(f"{http.base}/v1/jobs", json={**body, "seed": i}).json()["id"] for i in range(8)]
    wait_until(http, ids[0], lambda j: j["state"] == "running")  # some run, the others wait in the queue
    kill_replicas("Ingress", "ray.kill")
    final = wait_all_tolerant(http, ids)
    states = [j["state"] for j in final.values()]
    reliability("Ingress replica killed with jobs queued and running", submitted=8,
                succeeded=states.count("succeeded"), failed=states.count("failed"), lost=8 - len(final))
    assert states == ["succeeded"] * 8


def wait_all_tolerant(http, ids, timeout_s=300) -> dict:
    """wait_all, riding out an Ingress restart."""
    t0 = time.monotonic()
    while True:
        try:
            return wait_all(http, ids, timeout_s=timeout_s)
        except requests.RequestException:
            assert time.monotonic() - t0 < timeout_s
            time.sleep(0.5)


def test_a_killed_diffuser_mid_step_is_retried_inside_the_job(http, reliability):
    job = http.post(f"{http.base}/v1/jobs", json={"prompt": "a red circle", "steps": 150, "n": 2}).json()
    wait_until(http, job["id"], lambda j: j["stage"] == "diffuser" and j["progress"] > 0.1)
    kill_replicas("Diffuser", "ray.kill")
    final = wait_job(http, job["id"], timeout_s=240)
    reliability("Diffuser replica killed mid-step", submitted=1, succeeded=int(final["state"] == "succeeded"),
                failed=int(final["state"] == "failed"), lost=0, attempts=final["attempts"])
    assert final["state"] == "succeeded" and final["attempts"] == 1, final  # a stage retry, not a rerun


def test_redis_away_for_10s_answers_503_and_loses_nothing(http, redis_server, reliability):
    body = {"prompt": "a purple triangle", "steps": 40, "n": 2}
    ids = [http.post(f"{http.base}/v1/jobs", json={**body, "seed": i}).json()["id"] for i in range(6)]
    redis_server.stop()
    refused = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10:
            r = http.post(f"{http.base}/v1/jobs", json=body, timeout=30)
            refused.append(r)
            time.sleep(1.0)
    finally:
        redis_server.start()
    assert refused and all(r.status_code == 503 for r in refused), [r.status_code for r in refused]
    assert all(int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["type"] == "queue_unavailable"
               for r in refused)
    final = wait_all(http, ids, timeout_s=300)
    states = [j["state"] for j in final.values()]
    reliability("Redis stopped for 10 s under load", submitted=6 + len(refused), accepted=6,
                refused_503=len(refused), succeeded=states.count("succeeded"), failed=states.count("failed"),
                lost=6 - len(final))
    assert states == ["succeeded"] * 6
    after = http.post(f"{http.base}/v1/jobs", json=body)
    assert after.status_code == 202 and wait_job(http, after.json()["id"])["state"] == "succeeded"


def test_a_stopped_queue_consumer_gets_its_replica_replaced(app, http, reliability):
    """The JobRunner's Celery worker thread ends while the replica lives (celery 5.7 ends it on an unrecoverable
    error when Redis goes away with messages unacknowledged; here Celery's own remote-control `shutdown` ends
    it, at a moment the test chooses): the replica fails its health check, Serve replaces it, and a job
    submitted meanwhile succeeds. Without the check that job would wait forever."""
    from deployments.queue import producer
    cluster, _, _ = app
    control = producer(cluster.cfg)._app.control
    before = {r["name"] for r in replicas("JobRunner")}
    workers = [name for reply in control.ping(timeout=5.0) for name in reply]
    assert workers, "no queue consumer answered a ping"
    control.broadcast("shutdown", destination=workers)
    t0 = time.monotonic()
    job = http.post(f"{http.base}/v1/jobs", json={"prompt": "a blue square", "steps": 8, "n": 2}).json()
    done = wait_job(http, job["id"], timeout_s=120)
    recovered_s = time.monotonic() - t0
    after = {r["name"] for r in replicas("JobRunner")}
    reliability("the JobRunner's queue consumer stopped", submitted=1, succeeded=int(done["state"] == "succeeded"),
                lost=0, recovery_s=round(recovered_s, 1))
    assert done["state"] == "succeeded", done
    assert after and not after & before, (before, after)  # a new replica took the job


def test_redis_restarts_with_jobs_in_flight_never_stall_the_queue(http, redis_server, reliability):
    """Redis stopped and started while every consumer thread runs a job (their messages unacknowledged), twice:
    every job, and one submitted after each restart, succeeds."""
    body = {"prompt": "a green circle", "steps": 60, "n": 2}
    ids, rounds = [], []
    for round_ in range(2):
        batch = [http.post(f"{http.base}/v1/jobs", json={**body, "seed": 10 * round_ + i}).json()["id"]
                 for i in range(4)]
        for job_id in batch:
            wait_until(http, job_id, lambda j: j["state"] != "queued")
        redis_server.stop()
        time.sleep(5)
        redis_server.start()
        t0 = time.monotonic()
        while requests.get(f"{http.base}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() - t0 < 30, "Redis did not come back"
            time.sleep(0.5)
        probe = http.post(f"{http.base}/v1/jobs", json={**body, "steps": 8, "seed": 99}).json()["id"]
        final = wait_all(http, [*batch, probe], timeout_s=240)
        rounds.append(round(time.monotonic() - t0, 1))
        ids += [*batch, probe]
        assert [j["state"] for j in final.values()] == ["succeeded"] * 5, final
    reliability("Redis restarted twice with every consumer thread busy", submitted=len(ids), succeeded=len(ids),
                failed=0, lost=0, seconds_to_drain_after_restart=rounds)


def test_s3_restarted_mid_publish_never_reports_a_false_success(http, s3_server, make_storage, reliability):
    job = http.post(f"{http.base}/v1/jobs", json={"prompt": "a white circle", "steps": 30, "n": 4}).json()
    wait_until(http, job["id"], lambda j: j["stage"] in ("upscaler", "publisher") or j["state"] in TERMINAL)
    os.kill(s3_server.pid, signal.SIGSTOP)  # S3 stops answering at this instant
    try:
        s3_server.stop(timeout_s=0)  # SIGKILL of the frozen server
    finally:
        s3_server.start()
    final = wait_job(http, job["id"], timeout_s=180)
    storage = make_storage("imagine-test")
    t0 = time.monotonic()
    while (stored := storage.get_json(f"jobs/{job['id']}.json"))["state"] not in TERMINAL:
        assert time.monotonic() - t0 < 120, "the outcome never reached S3"
        time.sleep(1.0)  # a storage error at the end: Celery's retry of the message writes the outcome
    reliability("S3 restarted mid-publish", submitted=1, succeeded=int(final["state"] == "succeeded"),
                failed=int(final["state"] == "failed"), lost=0, outcome=final.get("error_type") or final["state"])
    assert stored["state"] == final["state"]
    if final["state"] == "succeeded":
        assert len(pngs(storage, final)) == 4  # every image is there
    else:
        assert final["error_type"] == "storage_error", final
        assert storage.list_keys(f"images/{job['id']}/") == []  # nothing half-written
