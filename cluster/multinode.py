"""A Ray cluster of N nodes on one machine, each node in its own network namespace: `imagine up --nodes N` for
local experiments, and the multi-node tests (tests/multinode).

    lab = NetworkLab("imnode", nodes=3).create()              # cluster/netns.py: bridge S.1, namespaces S.2, S.3, ...
    nodes = RayNodes(lab, state_dir / "nodes", ensure_token(state_dir / "ray-token"))
    nodes.start()                                             # the head in P-n0, workers in P-n1, P-n2
    c = LabCluster(lab_config(cfg, nodes.head, s3_url, redis_url), base)   # everything on lab addresses
    deploy(c, nodes)                                          # Serve's proxy on the head, then `launcher.apply`
    nodes.kill_node(1); nodes.start_node(1)                   # a node lost (all its processes), and back

Nodes. Each is `ray start` inside its namespace with `--node-ip-address` its lab address. A namespace has no
other address than that one and its own `lo`, and that is what keeps Ray off the host: with a node address that is
not loopback, Ray 2.60 binds its servers (GCS, raylet, object manager, every worker's gRPC server, metrics) to all
interfaces (ray/dashboard/agent.py: all interfaces unless the address is localhost), which inside a namespace are
the lab address and the namespace's loopback, never the host's addresses. The dashboard, its agent, the runtime
env agent, the client server and Serve's proxy bind the lab address itself. Every one of them wants the cluster's
token (`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN_PATH` naming a 0600 file, given to every node): gRPC answers
UNAUTHENTICATED, HTTP 401; only Ray's Prometheus endpoints (each node's metrics export port, the head's autoscaler
and dashboard metrics) answer without it, as Ray serves them, and only on the lab's bridge.
Each start of a node gets a new temp dir (`<state>/n<i>.<start>`). Namespaces have their own port spaces, so every
node uses the same port numbers (GCS_PORT, the config's dashboard and metrics ports). The GCS checks its nodes
every second (HEALTH_CHECKS; Ray's default is every 3 s) and marks a lost one dead after 5 failed checks.

Placement (custom resources standing for node groups, PLACEMENT): the head has `head` (Ingress, JobRunner,
Publisher), worker 1 `diffuser_node` (Diffuser), worker 2 `encoder_node` (TextEncoder, Upscaler); further workers
alternate, and a 2-node cluster's one worker has both. Serve's HTTP proxy runs on the head only, bound to the head's
lab address: `http_options.host` is one address for every proxy, and another node has no such address to bind.
`deploy` starts Serve that way first (`proxy_location: HeadOnly`); `launcher.apply` then deploys the application
(its EveryNode is ignored: Serve keeps the options it started with). The host's S3 and Redis, which the nodes use,
listen on the lab's bridge address (`LocalS3Server` / `LocalRedis` with `host=`).

`imagine up --nodes N` keeps the lab's facts in `.imagine/multinode.json`; `attach` (from `Cluster.load`) makes the
other commands (status, apply, env, generate, jobs) reach that cluster, and `imagine down` removes it all (`down`).
Needs root (network namespaces); Linux only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from cluster.config import ImagineConfig
from cluster.launcher import Cluster, apply
from cluster.netns import NetworkLab, NetworkLabError
from cluster.raynode import SERVE_TIMEOUTS, ensure_token, head_command, ray_temp_dir

logger = logging.getLogger(__name__)

GCS_PORT = 6379
OBJECT_STORE_BYTES = 256 * 1024 * 1024
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}
PLACEMENT = {"ingress": "head", "job_runner": "head", "publisher": "head", "diffuser": "diffuser_node",
             "text_encoder": "encoder_node", "upscaler": "encoder_node"}
STATE_FILE = "multinode.json"


class MultiNodeError(RuntimeError):
    """A node could not be started or did not join; the message says why (with `ray start`'s output)."""


def node_resources(n: int) -> list[dict[str, float]]:
    """The custom resources of each of n nodes, the head first (see the module docstring)."""
    if n == 1:
        return [{"head": 100, "diffuser_node": 100, "encoder_node": 100}]
    if n == 2:
        return [{"head": 100}, {"diffuser_node": 100, "encoder_node": 100}]
    return [{"head": 100}] + [{"diffuser_node" if i % 2 else "encoder_node": 100} for i in range(1, n)]


def _wait(cond, timeout_s: float, what: str, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if value := cond():
                return value
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(every_s)
    raise MultiNodeError(f"{what}: not within {timeout_s:.0f} s")


class RayNodes:
    """The Ray nodes of a lab: node i runs in namespace lab.namespaces[i] on lab address i (node 0 is the head)."""

    def __init__(self, lab: NetworkLab, state_dir: Path, token: Path, num_cpus: int = 2,
                 resources: list[dict] | None = None, dashboard_port: int = 8265, metrics_export_port: int = 8080,
                 ray_bin: str | None = None):
        self.lab, self.state_dir, self.token = lab, Path(state_dir), Path(token)
        self.resources = resources or node_resources(lab.nodes)
        self.num_cpus, self.dashboard_port, self.metrics_export_port = num_cpus, dashboard_port, metrics_export_port
        self.ray_bin = ray_bin or str(Path(sys.executable).parent / "ray")
        self.starts = [0] * lab.nodes
        self.http = requests.Session()
        self.http.trust_env = False  # the lab's addresses, never through a proxy

    @property
    def addresses(self) -> list[str]:
        return list(self.lab.addresses.values())

    @property
    def head(self) -> str:
        return self.addresses[0]

    @property
    def dashboard(self) -> str:
        return f"http://{self.head}:{self.dashboard_port}"

    @property
    def headers(self) -> dict[str, str]:
        """What Ray's HTTP APIs (dashboard, Serve's REST API) want from a caller: the token."""
        return {"Authorization": f"Bearer {self.token.read_text().strip()}"}

    def env(self) -> dict[str, str]:
        """The environment of the nodes and of the programs that talk to them: token auth, faster node checks."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        return {**SERVE_TIMEOUTS, **base, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token), **HEALTH_CHECKS}

    def temp_dir(self, i: int) -> Path:
        return ray_temp_dir(self.state_dir / f"n{i}.{self.starts[i]}")

    # ---- life cycle --------------------------------------------------------------------------------

    def start(self, timeout_s: float = 180) -> None:
        """The head, then every worker; returns once all of them are alive."""
        self.start_node(0)
        _wait(lambda: self.http.get(f"{self.dashboard}/api/version", headers=self.headers, timeout=3).ok,
              timeout_s, "the head's dashboard")
        for i in range(1, self.lab.nodes):
            self.start_node(i, wait_s=0)
        _wait(lambda: set(self.addresses) <= set(self.alive()), timeout_s, "all nodes alive")

    def start_node(self, i: int, wait_s: float = 120) -> str:
        """`ray start` in node i's namespace (again after a kill: a new temp dir, the same resources); the node's
        id once the GCS has it alive (wait_s=0: do not wait, return "")."""
        self.starts[i] += 1
        temp, address = self.temp_dir(i), self.addresses[i]
        if i == 0:
            cmd = head_command(self.ray_bin, temp, address, self.dashboard_port, self.metrics_export_port,
                               self.num_cpus, self.resources[0])
            cmd[cmd.index("--port") + 1] = str(GCS_PORT)
        else:
            cmd = [self.ray_bin, "start", "--address", f"{self.head}:{GCS_PORT}", "--node-ip-address", address,
                   "--temp-dir", str(temp), "--num-cpus", str(self.num_cpus), "--metrics-export-port",
                   str(self.metrics_export_port), "--resources", json.dumps(self.resources[i]),
                   "--disable-usage-stats"]
        cmd += ["--object-store-memory", str(OBJECT_STORE_BYTES)]
        out = self.lab.run(self.lab.namespaces[i], cmd, env=self.env(), capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise MultiNodeError(f"ray start of node {i} ({address}) failed:\n{out.stdout[-2000:]}\n"
                                 f"{out.stderr[-2000:]}")
        if not wait_s:
            return ""
        return _wait(lambda: self.alive().get(address), wait_s, f"node {i} ({address}) alive")

    def kill_node(self, i: int) -> list[int]:
        """SIGKILL every process of node i (the whole node: raylet, workers, replicas, agents); the pids."""
        return self.lab.kill(self.lab.namespaces[i])

    def stop(self) -> None:
        """Kill every node, the workers first."""
        for ns in reversed(self.lab.namespaces):
            try:
                self.lab.kill(ns)
            except NetworkLabError as e:
                logger.warning("stopping %s: %s", ns, e)

    # ---- what runs where ---------------------------------------------------------------------------

    def nodes(self) -> list[dict]:
        """Ray's node table (the state API): node_id, node_ip, state, resources_total, ..."""
        r = self.http.get(f"{self.dashboard}/api/v0/nodes", params={"limit": 1000, "detail": "true"},
                          headers=self.headers, timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]

    def alive(self) -> dict[str, str]:
        """node address -> node id of the alive nodes."""
        return {n["node_ip"]: n["node_id"] for n in self.nodes() if n["state"] == "ALIVE"}

    def serve_details(self) -> dict:
        """Serve's details (applications, deployments, their replicas with node_id / node_ip, proxies)."""
        r = self.http.get(f"{self.dashboard}/api/serve/applications/", headers=self.headers, timeout=10)
        r.raise_for_status()
        return r.json()

    def replicas(self, app: str) -> dict[str, list[dict]]:
        """deployment -> its replicas (replica_id, state, node_id, node_ip, pid, ...) from Serve's replica table."""
        deployments = self.serve_details()["applications"][app]["deployments"]
        return {name: d.get("replicas", []) for name, d in deployments.items()}

    def start_serve(self, http_port: int) -> None:
        """Start Serve with its HTTP proxy on the head only, on the head's address (see the module docstring)."""
        r = self.http.put(f"{self.dashboard}/api/serve/applications/", headers=self.headers, timeout=120,
                          json={"proxy_location": "HeadOnly", "http_options": {"host": self.head, "port": http_port},
                                "applications": []})
        if r.status_code != 200:
            raise MultiNodeError(f"starting Serve failed: HTTP {r.status_code} {r.text[:2000]}")


# ---- the application on the lab ------------------------------------------------------------------------

class LabCluster(Cluster):
    """A `Cluster` whose Ray head is node 0 of a lab: the dashboard is on the head's address (cluster.http_host)."""

    @property
    def dashboard(self) -> str:
        return f"http://{self.cfg.cluster.http_host}:{self.cfg.cluster.dashboard_port}"


def lab_config(cfg: ImagineConfig, head: str, s3_url: str | None = None, redis_url: str | None = None
               ) -> ImagineConfig:
    """cfg for a lab cluster: the HTTP endpoint on the head's address, S3 and Redis on the bridge (when given),
    and each stage placed by its custom resource (PLACEMENT, added to the stage's own)."""
    d = cfg.model_dump(mode="json")
    d["cluster"].update(http_host=head, ray_address=None)
    if s3_url:
        d["storage"]["endpoint_url"] = s3_url
    if redis_url:
        d["queue"]["redis_url"] = redis_url
    for stage, resource in PLACEMENT.items():
        options = d["stages"][stage]["ray_actor_options"]
        options["resources"] = {**(options.get("resources") or {}), resource: 1}
    return ImagineConfig.from_dict(d)


def deploy(c: LabCluster, nodes: RayNodes, wait_s: float = 600) -> dict:
    """Serve on the head (`start_serve`), then `launcher.apply` (preflight, rollout, /healthz) in a fresh process
    that talks to Ray with the token; returns its status. A process apart, since a process's Ray SDK keeps the
    authentication mode it first saw (the test process may also hold another, token-less, Ray)."""
    nodes.start_serve(c.cfg.cluster.http_port)
    c.state_dir.mkdir(parents=True, exist_ok=True)
    config = c.state_dir / "multinode-config.json"
    config.write_text(json.dumps(c.cfg.model_dump(mode="json")))
    out = subprocess.run([sys.executable, "-m", "cluster.multinode", "apply", str(config), str(c.base)],
                         env=nodes.env(), capture_output=True, text=True, timeout=wait_s + 300)
    if out.returncode != 0:
        raise MultiNodeError(f"deploying on the lab failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- `imagine up --nodes N` / `down` ---------------------------------------------------------------------

def _facts(c: Cluster) -> dict | None:
    path = c.state_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def attach(c: Cluster) -> Cluster:
    """The running `imagine up --nodes` cluster of c's folder as a LabCluster (c's config on the lab), else c."""
    facts = _facts(c)
    if facts is None or isinstance(c, LabCluster):
        return c
    return LabCluster(lab_config(c.cfg, facts["head"], facts["s3_url"], facts["redis_url"]), c.base)


def up(c: Cluster, n: int) -> dict:
    """A lab of n nodes for c's config: S3 and Redis on its bridge (when local), the Ray nodes, the application.
    On any failure everything started is removed again."""
    from cluster import launcher
    from cluster.netns import check_requirements
    if _facts(c) is not None:
        raise SystemExit(f"a multi-node cluster of this config runs already ({c.state_dir / STATE_FILE}): "
                         "`imagine down` first")
    try:
        check_requirements()
    except NetworkLabError as e:
        raise SystemExit(f"imagine up --nodes: {e}") from e
    _refuse_if_single_node_runs(c)
    t0 = time.monotonic()
    lab = NetworkLab("im" + hashlib.sha1(str(c.state_dir).encode()).hexdigest()[:6], nodes=n).create()
    facts = {"prefix": lab.prefix, "subnet": str(lab.subnet), "nodes": n, "head": lab.addresses[lab.namespaces[0]]}
    c.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        key, secret = launcher.ensure_credentials(c)
        password, api_key = launcher.ensure_redis_password(c), launcher.ensure_api_key(c)
        launcher.ensure_webhook_secret(c)
        facts["s3_url"] = _start_s3(c, lab.host_address, key, secret)
        facts["redis_url"] = _start_redis(c, lab.host_address, password)
        (c.state_dir / STATE_FILE).write_text(json.dumps(facts, indent=1) + "\n")
        lc = attach(c)
        nodes = RayNodes(lab, c.state_dir / "nodes", ensure_token(c.ray_token), dashboard_port=
                         c.cfg.cluster.dashboard_port, metrics_export_port=c.cfg.monitoring.metrics_export_port)
        nodes.start()
        prometheus = _start_prometheus(c, nodes.temp_dir(0))
        from cluster.storage import Storage
        Storage.from_config(lc.cfg.storage).ensure_bucket()
        deploy(lc, nodes)
    except BaseException:
        down(c, lab)
        raise
    return {"endpoint": lc.endpoint, "api_key": api_key, "s3_endpoint": facts["s3_url"],
            "bucket": lc.cfg.storage.bucket, "s3_credentials": launcher.credentials_source(c),
            "redis": facts["redis_url"], "images": f"s3://{lc.cfg.storage.bucket}/images/<job_id>/<index>.png",
            "dashboard": lc.dashboard, "prometheus": prometheus, "seconds": round(time.monotonic() - t0, 1),
            "nodes": {ns: {"address": a, "resources": r} for (ns, a), r in zip(lab.addresses.items(), nodes.resources)}}


def _refuse_if_single_node_runs(c: Cluster) -> None:
    """`imagine up` of this folder (one node on loopback) shares the S3 and Redis data dirs: one at a time."""
    from cluster.launcher import _ray_running
    from cluster.redis_server import LocalRedis
    from cluster.seaweed import LocalS3Server
    if _ray_running(c) or LocalS3Server.from_pidfile(Path(c.cfg.storage.local.data_dir)) is not None or \
            LocalRedis.from_pidfile(Path(c.cfg.queue.local.data_dir)) is not None:
        raise SystemExit("the one-node cluster of this config runs (`imagine up`): `imagine down` first")


def _start_prometheus(c: Cluster, head_temp_dir: Path) -> str | None:
    """Prometheus on the host's loopback (when installed), scraping every node through the head's discovery file."""
    from cluster.launcher import prometheus_dir
    from cluster.prometheus import LocalPrometheus, PrometheusError, find_prometheus
    m = c.cfg.monitoring
    if not m.enabled or find_prometheus() is None:
        return None
    try:
        server = LocalPrometheus(prometheus_dir(c), m.prometheus_port, ray_temp_dir=head_temp_dir)
        server.start()
    except PrometheusError as e:
        raise SystemExit(f"Prometheus: {e}") from e
    return server.url


def _start_s3(c: Cluster, host: str, key: str, secret: str) -> str | None:
    from cluster.seaweed import LocalS3Server, SeaweedError
    s = c.cfg.storage
    if not s.local.enabled:
        return None  # the config's own endpoint (the nodes must be able to reach it)
    try:
        server = LocalS3Server(Path(s.local.data_dir), s.local.port, key, secret, host=host)
        server.start()
    except SeaweedError as e:
        raise SystemExit(f"S3: {e}") from e
    return server.url


def _start_redis(c: Cluster, host: str, password: str | None) -> str | None:
    from cluster.redis_server import LocalRedis, RedisError
    q = c.cfg.queue
    if not q.local.enabled:
        return None
    if not password:
        raise SystemExit(f"the local Redis needs a password: set {q.password_env} or write {q.password_file}")
    try:
        server = LocalRedis(Path(q.local.data_dir), q.local.port, password, host=host)
        server.start()
    except RedisError as e:
        raise SystemExit(f"Redis: {e}") from e
    return server.url


def is_running(c: Cluster) -> bool:
    return _facts(c) is not None


def down(c: Cluster, lab: NetworkLab | None = None) -> None:
    """Remove what `up` started: the lab (every process in its namespaces: the Ray nodes), S3, Redis, Prometheus
    and the facts."""
    from cluster.launcher import prometheus_dir
    from cluster.prometheus import LocalPrometheus
    from cluster.redis_server import LocalRedis
    from cluster.seaweed import LocalS3Server
    facts = _facts(c)
    if lab is None and facts is not None:
        lab = NetworkLab(facts["prefix"], facts["nodes"], facts["subnet"])
    if lab is not None:
        lab.delete()
    if c.cfg.storage.local.enabled:
        LocalS3Server.stop_from_pidfile(Path(c.cfg.storage.local.data_dir))
    if c.cfg.queue.local.enabled:
        LocalRedis.stop_from_pidfile(Path(c.cfg.queue.local.data_dir))
    LocalPrometheus.stop_from_pidfile(prometheus_dir(c))
    (c.state_dir / STATE_FILE).unlink(missing_ok=True)


def _main(argv: list[str]) -> int:
    """`python -m cluster.multinode apply CONFIG.json BASE` (what `deploy` runs): prints the status as JSON."""
    if len(argv) != 3 or argv[0] != "apply":
        print(_main.__doc__, file=sys.stderr)
        return 2
    c = LabCluster(ImagineConfig.from_dict(json.loads(Path(argv[1]).read_text())), Path(argv[2]))
    print(json.dumps(apply(c), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
