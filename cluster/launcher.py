"""The local launcher: `imagine up`, `down`, `status`, `apply` on this machine.

`up` starts a Ray head (token auth off, temp dir in the work area), the local S3 server
(SeaweedFS), the local Redis (the job queue's broker, with a password), a local Prometheus on Ray's
metrics (when installed) and the application, waits until /healthz answers, and returns, as `ray start` does.
`apply` deploys the config through Ray's dashboard API (the same as `serve deploy`): changing a
stage's replicas is applied in place, without restarting the other replicas.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from cluster.config import DEPLOYMENT_NAMES, ImagineConfig, render_serve_config_yaml
from cluster.raynode import ensure_token, local_env, ray_temp_dir, start_local_head, stop_node

logger = logging.getLogger(__name__)
DEFAULT_CONFIG = "imagine.yaml"


@dataclass
class Cluster:
    """The local cluster of one config: where its state lives and how to reach it."""
    cfg: ImagineConfig
    base: Path  # the config's folder: relative paths in the config are relative to it

    @classmethod
    def load(cls, path: str | Path | None) -> "Cluster":
        if path is None and Path(DEFAULT_CONFIG).is_file():
            path = DEFAULT_CONFIG
        base = Path(path).resolve().parent if path else Path.cwd()
        from cluster.multinode import attach  # this folder's `imagine up --nodes N` cluster, when one runs
        return attach(cls(ImagineConfig.load(path).resolve_paths(base), base))

    @property
    def state_dir(self) -> Path:
        return self.base / ".imagine"

    @property
    def endpoint(self) -> str:
        c = self.cfg.cluster
        return f"http://{c.http_host}:{c.http_port}{c.route_prefix.rstrip('/')}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.cfg.cluster.dashboard_port}"

    @property
    def ray_token(self) -> Path:
        """The local Ray cluster's token (cluster/raynode.py); `imagine up` writes it."""
        return self.state_dir / "ray-token"

    def talk_to_ray(self) -> None:
        """Let this process's Ray SDK calls (the dashboard's REST API) carry the cluster's token: this
        config's token file, or the one the environment names (`eval "$(imagine env)"` exports it).

        Raises:
            SystemExit: the dashboard wants a token and there is none to give, saying where to find it.
        """
        if self.cfg.cluster.ray_address is not None:
            return
        if os.environ.get("RAY_AUTH_TOKEN_PATH") or os.environ.get("RAY_AUTH_TOKEN"):
            os.environ.setdefault("RAY_AUTH_MODE", "token")
            return
        if self.ray_token.is_file():
            os.environ.update({k: v for k, v in local_env(self.ray_token).items()
                               if k.startswith("RAY_AUTH") or k == "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"})
            return
        try:
            wants_token = requests.get(f"{self.dashboard}/api/version", timeout=2).status_code == 401
        except requests.RequestException:
            return
        if wants_token:
            raise SystemExit(f"the Ray cluster at {self.dashboard} wants its token and there is none at "
                             f"{self.ray_token}: run imagine from the folder of the config that started it, or "
                             "export RAY_AUTH_TOKEN_PATH (`imagine env` there prints it)")



def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(text)


# ---- up -----------------------------------------------------------------------------------------
def ensure_credentials(c: Cluster) -> tuple[str, str]:
    """Local S3 credentials: from env or the credentials file; created on first start."""
    s = c.cfg.storage
    if not (os.environ.get(s.access_key_env) and os.environ.get(s.secret_key_env)) and s.credentials_file \
            and not Path(s.credentials_file).is_file():
        if not s.local.enabled:
            raise SystemExit(f"no S3 credentials: set {s.access_key_env}/{s.secret_key_env} or write "
                             f"{s.credentials_file}")
        _write_secret(Path(s.credentials_file), json.dumps(
            {"access_key": "imagine-" + secrets.token_hex(4), "secret_key": secrets.token_urlsafe(30)}))
    key, secret = s.credentials()
    return key, secret.get_secret_value()


def ensure_api_key(c: Cluster) -> str | None:
    """Create one API key on first start (when none is configured); return one to print."""
    api = c.cfg.api
    keys = api.load_api_keys()
    if not keys and api.auth != "disabled" and api.api_keys_file:
        key = "imk_" + secrets.token_urlsafe(24)
        _write_secret(Path(api.api_keys_file), key + "\n")
        return key
    return sorted(keys)[0] if keys else None


def ensure_redis_password(c: Cluster) -> str | None:
    """The broker password: from its env var or file; for the local Redis, a new file on first start."""
    q = c.cfg.queue
    password = q.password()
    if password is None and q.local.enabled and q.password_file:
        password = secrets.token_urlsafe(24)
        _write_secret(Path(q.password_file), password + "\n")
    return password


def ensure_webhook_secret(c: Cluster) -> None:
    """The server's webhook secret (jobs' webhooks are signed with keys derived from it): a new file on first
    start, unless the environment or an existing file has one."""
    w = c.cfg.webhooks
    if w.server_secret() is None and w.secret_file:
        _write_secret(Path(w.secret_file), secrets.token_urlsafe(32) + "\n")


def start_redis(c: Cluster, password: str | None) -> str:
    """The local Redis (cluster/redis_server.py) when `queue.local.enabled`; where the queue's Redis is."""
    from cluster.redis_server import LocalRedis, RedisError
    q = c.cfg.queue
    if not q.local.enabled:
        return q.redis_url
    if not password:
        raise SystemExit(f"the local Redis needs a password: set {q.password_env} or write {q.password_file}")
    data = Path(q.local.data_dir)
    try:
        if LocalRedis.from_pidfile(data) is None:
            LocalRedis(data, q.local.port, password).start()
    except RedisError as e:
        raise SystemExit(f"Redis: {e}") from e
    return q.redis_url


def start_s3(c: Cluster, key: str, secret: str) -> str:
    from cluster.seaweed import LocalS3Server
    s = c.cfg.storage
    if not s.local.enabled:
        return s.endpoint_url or "AWS S3"
    data = Path(s.local.data_dir)
    running = LocalS3Server.from_pidfile(data)
    if running is None:
        LocalS3Server(data, s.local.port, key, secret).start()
    return s.endpoint_url


def start_ray(c: Cluster) -> None:
    """A one-node Ray head on loopback with its temp dir in the work area (idempotent; cluster/raynode.py)."""
    if _ray_running(c):
        return
    asked = sum(c.cfg.stage(n).ray_actor_options.num_cpus for n in DEPLOYMENT_NAMES)
    cpus = max(os.cpu_count() or 1, int(asked + 1))
    start_local_head(_bin("ray"), ray_temp_dir(c.cfg.cluster.temp_dir), c.cfg.cluster.dashboard_port,
                     c.cfg.monitoring.metrics_export_port, cpus, ensure_token(c.ray_token))
    c.talk_to_ray()
    _wait(lambda: _ray_running(c), 120, "Ray dashboard")


def _ray_running(c: Cluster) -> bool:
    """True when a Ray dashboard answers on the config's port (a 401 is one that wants the token)."""
    try:
        return requests.get(f"{c.dashboard}/api/version", timeout=2).status_code in (200, 401)
    except requests.RequestException:
        return False


def apply(c: Cluster, wait_s: float = 600) -> dict:
    """Deploy the config's Serve application, in place when it already runs, after a preflight where the
    replicas run, rolling back if the rollout fails (cluster/rollout.py); wait until /healthz answers.

    Raises:
        RolloutRefused: the config was refused or rolled back (the message says why); the service runs on.
    """
    c.talk_to_ray()
    from cluster.rollout import apply_config
    serve_config = c.cfg.serve_config()
    (c.state_dir).mkdir(parents=True, exist_ok=True)
    (c.state_dir / "serve-config.yaml").write_text(render_serve_config_yaml(c.cfg))
    apply_config(c.dashboard, serve_config["applications"][0], serve_config["http_options"], wait_s,
                 preflight_config=c.cfg.model_dump(mode="json"))
    _wait(lambda: _healthy(c), 120, "/healthz")
    return status(c)


def _healthy(c: Cluster) -> bool:
    try:
        return requests.get(f"{c.endpoint}/healthz", timeout=10).status_code == 200
    except requests.RequestException:
        return False


def _wait(cond, timeout_s: float, what: str, fail=lambda: False) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if cond():
            return
        if fail():
            raise SystemExit(f"{what} failed to start; see `imagine status` and the Ray logs")
        time.sleep(1)
    raise SystemExit(f"{what} not ready after {timeout_s:.0f}s")


def up(c: Cluster) -> dict:
    t0 = time.monotonic()
    key, secret = ensure_credentials(c)
    s3 = start_s3(c, key, secret)
    prometheus = start_prometheus(c)
    redis = start_redis(c, ensure_redis_password(c))
    ensure_webhook_secret(c)
    api_key = ensure_api_key(c)
    start_ray(c)
    from cluster.storage import Storage
    Storage.from_config(c.cfg.storage).ensure_bucket()
    apply(c)
    return {"endpoint": c.endpoint, "api_key": api_key, "s3_endpoint": s3, "bucket": c.cfg.storage.bucket,
            "s3_credentials": credentials_source(c), "redis": redis,
            "images": f"s3://{c.cfg.storage.bucket}/images/<job_id>/<index>.png", "dashboard": c.dashboard,
            "prometheus": prometheus, "seconds": round(time.monotonic() - t0, 1)}


def credentials_source(c: Cluster) -> str:
    """Where the S3 credentials come from, for people: the environment variables or the file's path."""
    s = c.cfg.storage
    if os.environ.get(s.access_key_env) and os.environ.get(s.secret_key_env):
        return f"${s.access_key_env} / ${s.secret_key_env}"
    return str(s.credentials_file)


def environment(c: Cluster) -> dict[str, str]:
    """The variables a shell needs to reach this cluster: the API (endpoint, key, the openai SDK's names) and
    S3 (AWS CLI / boto3 names, and the config's own `access_key_env` / `secret_key_env`).

    Raises:
        ConfigError: the S3 credentials cannot be found (the message says where it looked).
    """
    s = c.cfg.storage
    access, secret = s.credentials()
    keys = sorted(c.cfg.api.load_api_keys())
    env = {"IMAGINE_ENDPOINT": c.endpoint, "OPENAI_BASE_URL": f"{c.endpoint}/v1"}
    if keys:
        env |= {"IMAGINE_API_KEY": keys[0], "OPENAI_API_KEY": keys[0]}
    if s.endpoint_url:
        env["AWS_ENDPOINT_URL"] = s.endpoint_url
    env |= {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret.get_secret_value(),
            "AWS_DEFAULT_REGION": s.region, "IMAGINE_S3_BUCKET": s.bucket,
            s.access_key_env: access, s.secret_key_env: secret.get_secret_value(),
            "IMAGINE_REDIS_URL": c.cfg.queue.redis_url, "RAY_ADDRESS": c.dashboard}
    if c.cfg.cluster.ray_address is None and c.ray_token.is_file():  # for `ray`, `serve` and other folders
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(c.ray_token)}
    if (password := c.cfg.queue.password()) is not None:
        env[c.cfg.queue.password_env] = password
    return env


# ---- Prometheus -------------------------------------------------------------------------------
def prometheus_dir(c: Cluster) -> Path:
    return c.state_dir / "prometheus"


def start_prometheus(c: Cluster) -> str | None:
    """The local Prometheus (cluster/prometheus.py) on the service discovery file Ray writes into its temp dir;
    its URL, or None when monitoring is disabled or Prometheus is not installed (`up` goes on without it)."""
    from cluster.prometheus import LocalPrometheus, PrometheusError, find_prometheus
    m = c.cfg.monitoring
    if not m.enabled or find_prometheus() is None:
        return None
    ray_temp = Path(c.cfg.cluster.temp_dir)
    try:
        running = LocalPrometheus.from_pidfile(prometheus_dir(c))
        if running is not None:  # from an earlier `up`: point it at this config's Ray temp dir again
            running.scrape(ray_temp)
            return running.url
        server = LocalPrometheus(prometheus_dir(c), m.prometheus_port, ray_temp_dir=ray_temp)
        server.start()
    except PrometheusError as e:
        raise SystemExit(f"Prometheus: {e}") from e
    return server.url


def prometheus_url(c: Cluster) -> str | None:
    """The URL of the local Prometheus when it runs."""
    from cluster.prometheus import LocalPrometheus
    running = LocalPrometheus.from_pidfile(prometheus_dir(c))
    return running.url if running is not None else None


# ---- status / down ----------------------------------------------------------------------------
def status(c: Cluster) -> dict:
    """Each deployment's status and replicas (from Serve), plus /healthz."""
    c.talk_to_ray()
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    if not _ray_running(c):
        return {"ray": "down"}
    details = ServeSubmissionClient(c.dashboard).get_serve_details()
    app = details.get("applications", {}).get(c.cfg.cluster.app_name, {})
    load = serve_load(c)
    deployments = {}
    for name, d in app.get("deployments", {}).items():
        replicas = d.get("replicas", [])
        deployments[name] = {"status": d.get("status"),
                             "replicas": sum(r.get("state") == "RUNNING" for r in replicas),
                             "target": d.get("target_num_replicas"), **load.get(name, {})}
    health = None
    try:
        health = requests.get(f"{c.endpoint}/healthz", timeout=10).json()
    except requests.RequestException:
        pass
    return {"ray": "up", "app": app.get("status"), "deployments": deployments, "health": health,
            "queue": queue_status(c), "prometheus": prometheus_url(c)}


def queue_status(c: Cluster) -> dict | str:
    """The job queue: waiting jobs per tier, the oldest one's age, running, redelivered and dead jobs."""
    try:
        return c.cfg.queue.job_queue(socket_timeout=3).stats()
    except Exception as e:
        return f"unavailable ({type(e).__name__}: {e})"


def serve_load(c: Cluster) -> dict[str, dict]:
    """Ongoing and queued requests per deployment, from Serve's own metrics on Ray's metrics port."""
    from prometheus_client.parser import text_string_to_metric_families
    try:
        text = requests.get(f"http://127.0.0.1:{c.cfg.monitoring.metrics_export_port}/metrics", timeout=5).text
    except requests.RequestException:
        return {}
    wanted = {"ray_serve_replica_processing_queries": "ongoing", "ray_serve_deployment_queued_queries": "queued"}
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = wanted.get(sample.name)
            name = sample.labels.get("deployment")
            if key and name and sample.labels.get("application", c.cfg.cluster.app_name) == c.cfg.cluster.app_name:
                out.setdefault(name, {"ongoing": 0, "queued": 0})[key] += int(sample.value)
    return out


def down(c: Cluster) -> None:
    """Stop what `up` started, and only that: this config's application, its own Ray node (found by its temp
    dir; any other Ray on the machine survives), its SeaweedFS, Redis and Prometheus (by pid file and argv)."""
    c.talk_to_ray()
    from cluster.prometheus import LocalPrometheus
    from cluster.redis_server import LocalRedis
    from cluster.seaweed import LocalS3Server
    if _ray_running(c):
        try:
            from cluster.rollout import delete_application
            delete_application(c.dashboard, c.cfg.cluster.app_name)
        except Exception as e:
            logger.warning("could not delete the Serve application: %s", e)
    if c.cfg.cluster.ray_address is None:  # our own head, not a cluster we joined
        stop_node(ray_temp_dir(c.cfg.cluster.temp_dir))
    if c.cfg.storage.local.enabled:
        LocalS3Server.stop_from_pidfile(Path(c.cfg.storage.local.data_dir))
    if c.cfg.queue.local.enabled:
        LocalRedis.stop_from_pidfile(Path(c.cfg.queue.local.data_dir))
    LocalPrometheus.stop_from_pidfile(prometheus_dir(c))
