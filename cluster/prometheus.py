"""A local Prometheus on Ray's metrics: the Debian `prometheus` binary, listening on 127.0.0.1 only.

`imagine up` starts one when Prometheus is installed (`make prometheus`, or `apt-get install -y prometheus`)
and `monitoring.enabled` is set; the tests start one on a free port.

    server = LocalPrometheus(Path(".imagine/prometheus"), port=9090, ray_temp_dir=Path(".imagine/ray"))
    server.start()                         # returns once /-/ready answers (~0.1 s)
    server.url                             # "http://127.0.0.1:9090"
    server.query("sum by (deployment) (rate(imagine_stage_requests_total[1m]))")
    server.scrape(Path("/other/ray/temp")) # point it at another Ray cluster (rewrites the config, /-/reload)
    LocalPrometheus.stop_from_pidfile(Path(".imagine/prometheus"))   # from any process: `imagine down`

What it runs is `monitoring/prometheus.yml`, rendered by `render_local_config` with absolute paths: Ray's
service discovery file in the given Ray temp dir (Ray rewrites it every 5 s with the metrics export port of
every live node, so it follows nodes that join or leave), the alert rules `monitoring/alerts.yml`, and the
scrape interval (5 s; the tests use 1 s). The scrape config renames `ray_imagine_*` to `imagine_*` and adds
`cluster="local"` to every series.

Files in data_dir: prometheus.yml (the rendered config), prometheus.log (appended), prometheus.pid (the pid,
one line) and data/ (the TSDB; it survives a restart on the same dir). Finding a server from its pid file
reads /proc, so that part is Linux-only.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import requests
import yaml

from cluster.localproc import LocalProcess
from cluster.seaweed import port_is_free

logger = logging.getLogger(__name__)

# monitoring/ is a sibling of cluster/ both in the work tree and in site-packages (package data)
MONITORING_DIR = Path(__file__).resolve().parent.parent / "monitoring"
CONFIG_TEMPLATE = MONITORING_DIR / "prometheus.yml"
ALERT_RULES = MONITORING_DIR / "alerts.yml"
SD_FILE = "prom_metrics_service_discovery.json"  # Ray's name (ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE)
PID_FILE, LOG_FILE, CONFIG_FILE, TSDB_DIR = "prometheus.pid", "prometheus.log", "prometheus.yml", "data"
INSTALL_HINT = "install it with `make prometheus` (or `sudo apt-get install -y prometheus`)"


class PrometheusError(RuntimeError):
    """The local Prometheus could not be started, reloaded or queried; the message says why."""


def find_prometheus() -> str | None:
    """The `prometheus` binary on PATH, or None when it is not installed."""
    return shutil.which("prometheus")


def find_promtool() -> str | None:
    """The `promtool` binary on PATH (it comes with the same package), or None."""
    return shutil.which("promtool")


def render_local_config(cfg_path_out: str | os.PathLike, ray_temp_dir: str | os.PathLike,
                        rules_path: str | os.PathLike | None = ALERT_RULES, scrape_interval: str = "5s",
                        cluster: str = "local") -> Path:
    """Write monitoring/prometheus.yml to `cfg_path_out` with absolute paths and return that path.

    Args:
        cfg_path_out: the config file to write (its folder is created).
        ray_temp_dir: Ray's temp dir; Prometheus reads `<ray_temp_dir>/prom_metrics_service_discovery.json`
            (it need not exist yet: Prometheus picks it up when Ray writes it).
        rules_path: the alert rules file; None for none.
        scrape_interval: the scrape and rule evaluation interval, a Prometheus duration ("5s", "1s").
        cluster: the value of the `cluster` label added to every series.
    """
    doc = yaml.safe_load(CONFIG_TEMPLATE.read_text())
    doc["global"]["scrape_interval"] = doc["global"]["evaluation_interval"] = scrape_interval
    doc["rule_files"] = [str(Path(rules_path).absolute())] if rules_path is not None else []
    [job] = [j for j in doc["scrape_configs"] if j["job_name"] == "ray"]
    job["file_sd_configs"][0]["files"] = [str(Path(ray_temp_dir).absolute() / SD_FILE)]
    for rule in job["relabel_configs"]:
        if rule.get("target_label") == "cluster":
            rule["replacement"] = cluster
    out = Path(cfg_path_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Rendered from {CONFIG_TEMPLATE} by cluster/prometheus.py (render_local_config); "
              "edit that file, not this one.\n")
    out.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return out


class LocalPrometheus(LocalProcess):
    """One Prometheus on 127.0.0.1:port, scraping the Ray cluster whose temp dir is `ray_temp_dir`.

    Args:
        data_dir: where its config, log, pid file and TSDB live (created if missing).
        port: the HTTP port (UI, API, /-/ready, /-/reload).
        ray_temp_dir: Ray's temp dir (service discovery file); None scrapes nothing until `scrape()`.
        rules_path: the alert rules (default monitoring/alerts.yml); None for none.
        scrape_interval: scrape and rule evaluation interval ("5s"; the tests use "1s").
        prometheus_bin: the binary (default: `prometheus` on PATH).
    """

    name = "Prometheus"
    a_name = "a Prometheus"
    program = "prometheus"
    error = PrometheusError
    pid_file_name = PID_FILE
    log_file_name = LOG_FILE
    config_file_name = CONFIG_FILE
    ready_poll_s = 0.1
    log = logger

    def __init__(self, data_dir: Path, port: int, ray_temp_dir: Path | None = None,
                 rules_path: Path | None = ALERT_RULES, scrape_interval: str = "5s",
                 prometheus_bin: str | None = None):
        super().__init__(data_dir)
        self.port = port
        self.ray_temp_dir = Path(ray_temp_dir).absolute() if ray_temp_dir is not None else None
        self.rules_path = rules_path
        self.scrape_interval = scrape_interval
        self._bin = prometheus_bin

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30) -> None:
        """Render the config, start Prometheus in its own session (it outlives this process), wait for /-/ready.

        Raises:
            PrometheusError: the binary is missing, a server already runs on data_dir, the port is taken,
                or /-/ready does not answer within timeout_s (the message ends with the log's tail).
        """
        binary = self._bin or find_prometheus()
        if binary is None:
            raise PrometheusError(f"Prometheus is not installed; {INSTALL_HINT}")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._refuse_if_running()
        if not port_is_free(self.port):
            raise PrometheusError(f"port {self.port} is in use; choose another monitoring.prometheus_port "
                                  "(or set monitoring.enabled: false)")
        self._render()
        argv = [binary, f"--config.file={self.config_file}", f"--storage.tsdb.path={self.data_dir / TSDB_DIR}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"]
        self._launch(argv, timeout_s)

    def scrape(self, ray_temp_dir: Path, timeout_s: float = 10) -> None:
        """Scrape the Ray cluster whose temp dir is `ray_temp_dir`: rewrite the config and reload it."""
        self.ray_temp_dir = Path(ray_temp_dir).absolute()
        self._render()
        self.reload(timeout_s)

    def reload(self, timeout_s: float = 10) -> None:
        """Make the running server re-read its config file (POST /-/reload); raise if it rejects it."""
        try:
            r = requests.post(f"{self.url}/-/reload", timeout=timeout_s)
        except requests.RequestException as e:
            raise PrometheusError(f"cannot reach Prometheus at {self.url} to reload its config: {e}") from e
        if r.status_code != 200:
            raise PrometheusError(f"Prometheus rejected its config {self.config_file}: {r.text.strip()}")

    def query(self, promql: str, at: float | None = None, timeout_s: float = 10) -> list[dict]:
        """Evaluate an instant PromQL query; the `result` list of the answer (vector: [{metric, value}]).

        Raises:
            PrometheusError: Prometheus cannot be reached or answers with an error (bad PromQL, say).
        """
        params = {"query": promql}
        if at is not None:
            params["time"] = str(at)
        try:
            r = requests.get(f"{self.url}/api/v1/query", params=params, timeout=timeout_s)
            body = r.json()
        except (requests.RequestException, ValueError) as e:
            raise PrometheusError(f"query {promql!r} to {self.url} failed: {e}") from e
        if body.get("status") != "success":
            raise PrometheusError(f"query {promql!r} failed: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def wait_for(self, promql: str, timeout_s: float = 30) -> list[dict]:
        """Poll `query(promql)` until it returns a non-empty result; raise PrometheusError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(promql)
            if result:
                return result
            if time.monotonic() > deadline:
                raise PrometheusError(f"{promql!r} still empty after {timeout_s} s; targets: {self.targets()}")
            time.sleep(0.2)

    def targets(self) -> list[dict]:
        """The active scrape targets (/api/v1/targets): their labels, health and last error."""
        r = requests.get(f"{self.url}/api/v1/targets", params={"state": "active"}, timeout=10)
        return [{"scrapeUrl": t["scrapeUrl"], "health": t["health"], "lastError": t["lastError"],
                 "labels": t["labels"]} for t in r.json()["data"]["activeTargets"]]

    # -- LocalProcess hooks --

    @classmethod
    def _is_server_argv(cls, argv: list[str], data_dir: Path) -> bool:
        # a Prometheus whose TSDB is in data_dir
        return Path(argv[0]).name.startswith("prometheus") and f"--storage.tsdb.path={data_dir / TSDB_DIR}" in argv

    @classmethod
    def _from_argv(cls, data_dir: Path, pid: int, argv: list[str]) -> LocalPrometheus:
        address = next((a.split("=", 1)[1] for a in argv if a.startswith("--web.listen-address=")), None)
        if address is None:
            raise PrometheusError(f"Prometheus (pid {pid}) on {data_dir} has no --web.listen-address flag; "
                                  f"stop it by hand: kill {pid}")
        return cls(data_dir, int(address.rsplit(":", 1)[1]), prometheus_bin=argv[0])

    def _ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    # -- helpers --

    def _render(self) -> None:
        # Without a Ray cluster yet, point at a file that does not exist: Prometheus scrapes nothing until then.
        sd_dir = self.ray_temp_dir if self.ray_temp_dir is not None else self.data_dir / "no-ray-cluster"
        render_local_config(self.config_file, sd_dir, self.rules_path, self.scrape_interval)
