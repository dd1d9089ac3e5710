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
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from cluster.config import DEPLOYMENT_NAMES, ImagineConfig, render_serve_config_yaml

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
        return cls(ImagineConfig.load(path).resolve_paths(base), base)

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

    def env(self) -> dict:
        return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


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


# Ray puts Unix sockets under <temp>/session_<date>_<time>_<pid>/sockets/, the longest being
# "dash_MetricsHead"; Linux caps a socket path at 107 bytes, beyond which the dashboard dies with
# "Module MetricsHead failed to start". The session part takes about 72 bytes (76 where Ray adds
# "/ray" to a RAY_TMPDIR).
_RAY_SOCKET_SUFFIX = len("/ray/session_2026-11-25_17-51-20_770971_1234567/sockets/dash_MetricsHead")
_UNIX_PATH_MAX = 107


def ray_temp_dir(path: str | os.PathLike) -> Path:
    """A temp dir for Ray that keeps its data at `path` (in the work area) but whose socket paths
    fit the Unix limit: a deep `path` is reached through a short symlink in the system temp dir."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    if len(str(path)) + _RAY_SOCKET_SUFFIX <= _UNIX_PATH_MAX:
        return path
    import hashlib
    import tempfile
    link = Path(tempfile.gettempdir()) / f"imagine-ray-{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if link.is_symlink() and Path(os.readlink(link)) != path:
        link.unlink()
    if not link.is_symlink():
        link.symlink_to(path, target_is_directory=True)
    if len(str(link)) + _RAY_SOCKET_SUFFIX > _UNIX_PATH_MAX:
        raise SystemExit(f"cannot place Ray's sockets for temp dir {path}: set TMPDIR to a short path")
    return link


def start_ray(c: Cluster) -> None:
    """A Ray head with token auth off and its temp dir in the work area (idempotent)."""
    if _ray_running(c):
        return
    asked = sum(c.cfg.stage(n).ray_actor_options.num_cpus for n in DEPLOYMENT_NAMES)
    cpus = max(os.cpu_count() or 1, int(asked + 1))
    temp = ray_temp_dir(c.cfg.cluster.temp_dir)
    cmd = [_bin("ray"), "start", "--head", "--port", "0", "--temp-dir", str(temp),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(c.cfg.cluster.dashboard_port), "--num-cpus", str(cpus),
           "--metrics-export-port", str(c.cfg.monitoring.metrics_export_port), "--disable-usage-stats"]
    out = subprocess.run(cmd, env=c.env(), capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"ray start failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    _wait(lambda: _ray_running(c), 120, "Ray dashboard")


def _ray_running(c: Cluster) -> bool:
    try:
        return requests.get(f"{c.dashboard}/api/version", timeout=2).ok
    except requests.RequestException:
        return False


def apply(c: Cluster, wait_s: float = 600) -> dict:
    """Deploy the config's Serve application (in place when it already runs) and wait for it."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    serve_config = c.cfg.serve_config()
    (c.state_dir).mkdir(parents=True, exist_ok=True)
    (c.state_dir / "serve-config.yaml").write_text(render_serve_config_yaml(c.cfg))
    ServeSubmissionClient(c.dashboard).deploy_applications(serve_config)
    _wait(lambda: app_status(c) in ("RUNNING",), wait_s, "the application", fail=lambda: app_status(c) in (
        "DEPLOY_FAILED", "UNHEALTHY"))
    _wait(lambda: _healthy(c), 120, "/healthz")
    return status(c)


def app_status(c: Cluster) -> str | None:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    try:
        apps = ServeSubmissionClient(c.dashboard).get_serve_details().get("applications", {})
    except Exception:
        return None
    app = apps.get(c.cfg.cluster.app_name)
    return app.get("status") if app else None


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
            "IMAGINE_REDIS_URL": c.cfg.queue.redis_url}
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
    from cluster.prometheus import LocalPrometheus
    from cluster.redis_server import LocalRedis
    from cluster.seaweed import LocalS3Server
    if _ray_running(c):
        try:
            from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
            ServeSubmissionClient(c.dashboard).delete_applications()
        except Exception as e:
            logger.warning("could not delete the Serve application: %s", e)
    subprocess.run([_bin("ray"), "stop", "--force"], env=c.env(), capture_output=True, timeout=120)
    if c.cfg.storage.local.enabled:
        LocalS3Server.stop_from_pidfile(Path(c.cfg.storage.local.data_dir))
    if c.cfg.queue.local.enabled:
        LocalRedis.stop_from_pidfile(Path(c.cfg.queue.local.data_dir))
    LocalPrometheus.stop_from_pidfile(prometheus_dir(c))
