"""`imagine apply`: a config change that cannot take a healthy service down.

1. Preflight where the replicas run: when the replicas' arguments change (paths, credentials, model, the queue),
   `cluster/preflight.py` runs on the head node as a Ray job and every problem it finds refuses the change,
   with the running service left as it is. A change of scaling or batch settings only (applied in place)
   needs no preflight.
2. Deploy this application and only it: Serve's declarative API replaces all applications at once, so the
   others' deployed configs are sent along unchanged.
3. Wait for it to run; if the rollout fails (a replica that cannot start) or does not finish in time, the last
   good config of this application goes back, and the change is reported as refused with Serve's reason.
"""
from __future__ import annotations

import json
import logging
import shlex
import sys
import time

logger = logging.getLogger(__name__)
FAILED = ("DEPLOY_FAILED", "UNHEALTHY")


class RolloutRefused(SystemExit):
    """The change was not applied (or was rolled back); the message says why and what to fix."""


def apply_config(dashboard: str, app_config: dict, http_options: dict, wait_s: float = 600,
                 preflight_config: dict | None = None) -> None:
    """Deploy `app_config` (one application of Serve's config format) as described in the module docstring.

    `preflight_config` is the imagine config (JSON form) to check first; None skips the check.
    Raises:
        RolloutRefused: the preflight found problems, or the rollout failed and was rolled back.
    """
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    client = ServeSubmissionClient(dashboard)
    name = app_config["name"]
    apps = client.get_serve_details().get("applications", {})
    previous = (apps.get(name) or {}).get("deployed_app_config")
    if preflight_config is not None and (previous is None or previous.get("args") != app_config.get("args")):
        found = run_preflight(dashboard, preflight_config)
        if found:
            raise RolloutRefused("the new config was not applied (the service runs on as it was):\n"
                                 + "\n".join(f"  - {p}" for p in found))
    _deploy(client, apps, app_config, http_options)
    error = _wait_for(client, name, wait_s)
    if error is None:
        return
    if previous is None:
        raise RolloutRefused(f"application {name} failed to deploy: {error}")
    logger.warning("rollout of %s failed (%s); rolling back to the last good config", name, error)
    _deploy(client, client.get_serve_details().get("applications", {}), previous, http_options)
    back = _wait_for(client, name, wait_s)
    raise RolloutRefused(f"the new config failed to deploy ({error}); "
                         + ("the previous config was restored and serves again" if back is None
                            else f"restoring the previous config failed too: {back}"))


def delete_application(dashboard: str, name: str) -> None:
    """Remove one application and no other (the others' configs are redeployed as they are)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    client = ServeSubmissionClient(dashboard)
    apps = client.get_serve_details().get("applications", {})
    if name not in apps:
        return
    others = [a["deployed_app_config"] for n, a in apps.items() if n != name and a.get("deployed_app_config")]
    if others:
        client.deploy_applications({"applications": others})
    else:
        client.delete_applications()


def run_preflight(dashboard: str, config: dict, timeout_s: float = 180) -> list[str]:
    """cluster/preflight.py as a Ray job on the head node; the problems it found."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from cluster.preflight import MARK
    client = JobSubmissionClient(dashboard)
    deadline = time.monotonic() + timeout_s
    while True:  # a head that has just started may not have its job agent yet: "No available agent ..." (500)
        try:
            job = client.submit_job(entrypoint=f"{shlex.quote(sys.executable)} -m cluster.preflight "
                                               f"{shlex.quote(json.dumps(config))}")
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            client.stop_job(job)
            return [f"the preflight job {job} did not finish within {timeout_s:.0f}s"]
        time.sleep(0.5)
    logs = client.get_job_logs(job)
    lines = [line for line in logs.splitlines() if line.startswith(MARK)]
    if not lines:
        return [f"the preflight job {job} ended {status} without a result:\n{logs[-2000:]}"]
    return json.loads(lines[-1][len(MARK):])


def _deploy(client, apps: dict, app_config: dict, http_options: dict, attempts: int = 3) -> None:
    """Send the applications; retried when Serve's own start failed because an actor it was starting died
    (a proxy killed for a slow start on a loaded machine: the controller starts another)."""
    others = [a["deployed_app_config"] for n, a in apps.items()
              if n != app_config["name"] and a.get("deployed_app_config")]
    for attempt in range(1, attempts + 1):
        try:
            return client.deploy_applications({"proxy_location": "EveryNode", "http_options": http_options,
                                               "applications": [*others, app_config]})
        except RuntimeError as e:
            if "ActorDiedError" not in str(e) or attempt == attempts:
                raise
            died = next((line.strip() for line in str(e).splitlines() if "ActorDiedError" in line), "")
            logger.warning("Serve's start failed (%s); deploying again", died[:200])
            time.sleep(2.0 * attempt)


def _wait_for(client, name: str, wait_s: float) -> str | None:
    """None once the application runs; else why it does not (failed, or still not running after wait_s)."""
    deadline, app = time.monotonic() + wait_s, {}
    while time.monotonic() < deadline:
        app = client.get_serve_details().get("applications", {}).get(name) or {}
        if app.get("status") == "RUNNING":
            return None
        if app.get("status") in FAILED:
            return f"{app.get('status')}: {app.get('message') or _deployment_messages(app)}"
        time.sleep(1)
    return f"not running after {wait_s:.0f}s ({app.get('status')}: {_deployment_messages(app)})"


def _deployment_messages(app: dict) -> str:
    return "; ".join(f"{n}: {d.get('message')}" for n, d in (app.get("deployments") or {}).items()
                     if d.get("message"))[:1500]
