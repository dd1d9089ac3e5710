"""The Ray processes of one node that `imagine up` starts, and how `imagine down` finds and stops exactly those.

Local mode (one node) binds the Ray ports to 127.0.0.1: `ray start --node-ip-address 127.0.0.1` alone is not
enough, since `ray start` swaps a loopback node address for the machine's routable one; with Ray's own
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (the switch Ray uses for single-machine clusters) it keeps 127.0.0.1,
and then the GCS, raylet, workers, dashboard, its agent, the metrics export and the client server all listen on
loopback only. One kind of port cannot be bound there: each Serve replica's inter-deployment gRPC server, which
Ray Serve 2.60 opens on `[::]:0` (ray/serve/_private/replica.py, `_on_initialized`, no setting changes it).
So `imagine up` also turns Ray's token authentication on (`RAY_AUTH_MODE=token`, the token in a 0600 file in the
work area): those servers, like every Ray port, refuse a caller without the token.

A node is known by its temp dir: `<temp>/ray_current_cluster` holds the GCS address, and every Ray process of
the node names the temp dir, or the GCS address, on its command line (its workers are the raylet's children).
`stop_node(temp_dir)` stops those processes and their descendants, and nothing else: another Ray on this
machine, another user's or a test suite's, survives `imagine down` (`ray stop --force` would kill them all).
Reading command lines and parents from /proc is Linux-only.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
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
    link = Path(tempfile.gettempdir()) / f"imagine-ray-{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if link.is_symlink() and Path(os.readlink(link)) != path:
        link.unlink()
    if not link.is_symlink():
        link.symlink_to(path, target_is_directory=True)
    if len(str(link)) + _RAY_SOCKET_SUFFIX > _UNIX_PATH_MAX:
        raise SystemExit(f"cannot place Ray's sockets for temp dir {path}: set TMPDIR to a short path")
    return link


# Serve kills a proxy that is not ready within 5 s, and the deploy that started it fails with ActorDiedError: on
# a loaded 2-core machine a proxy's start can take longer (an explicit setting in the environment wins)
SERVE_TIMEOUTS = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


def local_env(token_file: Path | None = None, base: dict | None = None) -> dict:
    """The environment of a local (one-node, loopback) Ray and of the programs that talk to it: token
    authentication with the token in `token_file` (Ray's SDK clients send it too), or off without one (only
    for a Ray that nobody else can reach, as the tests' own)."""
    env = {**SERVE_TIMEOUTS, **(os.environ if base is None else base), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if token_file is None:
        return {**env, "RAY_AUTH_MODE": "disabled"}
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}


def ensure_token(path: Path) -> Path:
    """A Ray cluster token in `path` (mode 0600), created on first use."""
    path = Path(path)
    if not path.is_file():
        import secrets
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def head_command(ray_bin: str, temp_dir: Path, node_ip: str, dashboard_port: int, metrics_export_port: int,
                 num_cpus: int, resources: dict | None = None, agent_port: int | None = None) -> list[str]:
    """`ray start --head` bound to `node_ip` (its dashboard and agent too). `agent_port`: the dashboard agent's
    HTTP port (Ray's default, 52365, is taken when another Ray runs on the same address: that agent never
    starts and every job submission, the preflight's too, answers "No available agent")."""
    import json
    cmd = [ray_bin, "start", "--head", "--port", "0", "--node-ip-address", node_ip, "--temp-dir", str(temp_dir),
           "--include-dashboard", "true", "--dashboard-host", node_ip, "--dashboard-port", str(dashboard_port),
           "--num-cpus", str(num_cpus), "--metrics-export-port", str(metrics_export_port), "--disable-usage-stats"]
    if agent_port:
        cmd += ["--dashboard-agent-listen-port", str(agent_port)]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    return cmd


def start_local_head(ray_bin: str, temp_dir: Path, dashboard_port: int, metrics_export_port: int,
                     num_cpus: int, token_file: Path) -> None:
    """A one-node Ray on loopback with token authentication (see the module docstring).

    Raises:
        SystemExit: `ray start` failed (with its output).
    """
    from cluster.seaweed import find_free_port
    cmd = head_command(ray_bin, temp_dir, LOOPBACK, dashboard_port, metrics_export_port, num_cpus,
                       agent_port=find_free_port())
    out = subprocess.run(cmd, env=local_env(token_file), capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"ray start failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


# ---- finding and stopping one node's processes ----------------------------------------------------------

def gcs_address(temp_dir: Path) -> str | None:
    try:
        return (Path(temp_dir) / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def node_processes(temp_dir: Path) -> list[int]:
    """The pids of the Ray node whose temp dir is `temp_dir` (its daemons and all their descendants)."""
    temp_dir = Path(temp_dir)
    marks = {str(temp_dir.absolute()), str(temp_dir.resolve())}
    gcs = gcs_address(temp_dir)
    if gcs:
        marks |= {f"--address={gcs}", f"--gcs-address={gcs}", f"--gcs_address={gcs}"}
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != os.getpid()]
    roots = {pid for pid in pids if any(m in _cmdline(pid) for m in marks)}
    parents = {pid: _parent(pid) for pid in pids}
    found, grew = set(roots), True
    while grew:  # add the descendants (workers are the raylet's children, agents too)
        more = {pid for pid, ppid in parents.items() if ppid in found and pid not in found}
        found |= more
        grew = bool(more)
    return sorted(found)


def stop_node(temp_dir: Path, timeout_s: float = 15) -> int:
    """SIGTERM the node's processes, SIGKILL what is left after timeout_s; returns how many there were."""
    pids = node_processes(temp_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (timeout_s if sig == signal.SIGTERM else 5)
        while time.monotonic() < deadline and any(_running(pid) for pid in pids):
            time.sleep(0.2)
        if not any(_running(pid) for pid in pids):
            break
        logger.warning("Ray processes of %s still running after SIGTERM; sending SIGKILL", temp_dir)
    return len(pids)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
