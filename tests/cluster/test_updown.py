"""`imagine up` / `apply` / `down` as a user runs them (the real CLI in subprocesses, its own ports and state in
a temp folder): nothing listens beyond loopback, a config that cannot work is refused with the service left
answering, a rollout that fails is rolled back, and `down` stops its own Ray and nothing else."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from cluster.raynode import local_env, node_processes, ray_temp_dir, stop_node
from cluster.seaweed import find_free_port, pick_s3_port

IMAGINE = str(Path(sys.executable).parent / "imagine")
REPO = Path(__file__).resolve().parents[2]
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def imagine(*args, cwd: Path, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("IMAGINE_", "RAY_"))}, **env}
    return subprocess.run([IMAGINE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def site(tiny_model_dir, tmp_path_factory):
    """A folder with an imagine.yaml on free ports and the tiny model, brought up with `imagine up`."""
    home = tmp_path_factory.mktemp("site")
    cfg = {"model": str(tiny_model_dir),
           "cluster": {"http_port": find_free_port(), "dashboard_port": find_free_port(), "temp_dir": "state/ray"},
           "storage": {"endpoint_url": None, "credentials_file": "state/s3.json",
                       "local": {"data_dir": "state/s3", "port": pick_s3_port()}},
           "queue": {"password_file": "state/redis-password",
                     "local": {"data_dir": "state/redis", "port": find_free_port()}},
           "api": {"api_keys_file": "state/api_keys"},
           "monitoring": {"metrics_export_port": find_free_port(), "prometheus_port": find_free_port()},
           "stages": {s: {"ray_actor_options": {"num_cpus": 0.25}} for s in
                      ("ingress", "job_runner", "text_encoder", "upscaler", "publisher")}}
    cfg["storage"]["endpoint_url"] = f"http://127.0.0.1:{cfg['storage']['local']['port']}"
    cfg["queue"]["redis_url"] = f"redis://127.0.0.1:{cfg['queue']['local']['port']}/0"
    (home / "imagine.yaml").write_text(yaml.safe_dump(cfg))
    up = imagine("up", cwd=home)
    if up.returncode != 0:
        imagine("down", cwd=home)  # what the failed start left running (Ray, S3, Redis) must not outlive the test
        pytest.fail(f"imagine up failed:\n{up.stdout}{up.stderr}")
    url = f"http://127.0.0.1:{cfg['cluster']['http_port']}"
    key = (home / "state" / "api_keys").read_text().split()[0]
    yield home, url, key
    imagine("down", cwd=home)


def listeners() -> list[tuple[str, int, int]]:
    """(address, pid, port) of every TCP listener on the machine, from `ss -ltnpH`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        address, port = line.split()[3].rsplit(":", 1)
        found += [(address.strip("[]"), int(pid), int(port)) for pid in re.findall(r"pid=(\d+)", line)]
    return found


def machine_address() -> str:
    """This machine's address on its default route (what another machine would connect to)."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.254", 9))  # no packet is sent: it only picks the route
        return s.getsockname()[0]


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def own_pids(home: Path) -> set[int]:
    """Every process `imagine up` started for this site: its Ray node and its S3, Redis and Prometheus."""
    pids = set(node_processes(ray_temp_dir(home / "state" / "ray")))
    for pid_file in ("state/s3/weed.pid", "state/redis/redis.pid", ".imagine/prometheus/prometheus.pid"):
        if (home / pid_file).is_file():
            pids.add(int((home / pid_file).read_text()))
    return pids


def test_up_listens_on_loopback_only_and_ray_wants_its_token(site):
    """Every listener of ours is on loopback, but Serve's inter-deployment gRPC servers, which Ray Serve 2.60
    opens on [::] whatever the node's address: reached from the machine's own outside address, each refuses
    a call without the cluster's token."""
    import grpc

    home, url, key = site
    ours = own_pids(home)
    assert len(ours) > 8  # gcs, raylet, dashboard, replicas, weed, redis, ...
    exposed = [(a, p, port) for a, p, port in listeners() if p in ours and a not in LOOPBACK]
    outside = machine_address()
    for address, pid, port in exposed:
        assert address in ("*", "::", "0.0.0.0") and _cmdline(pid).startswith("ray::"), (address, _cmdline(pid))
        with grpc.insecure_channel(f"{outside}:{port}") as channel:
            call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
            with pytest.raises(grpc.RpcError) as e:
                call(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (pid, port, e.value)
    assert (home / ".imagine" / "ray-token").stat().st_mode & 0o777 == 0o600
    job = requests.post(f"{url}/v1/jobs", json={"prompt": "a red circle", "steps": 2, "n": 1},
                        headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert job.status_code == 202, job.text


def test_apply_refuses_a_config_that_cannot_work_and_the_service_stays_up(site, tmp_path):
    """The issue's case: the example config copied to another folder and applied as it is."""
    home, url, _ = site
    shutil.copy(REPO / "imagine.example.yaml", tmp_path / "imagine.yaml")
    cfg = yaml.safe_load((tmp_path / "imagine.yaml").read_text())
    ours = yaml.safe_load((home / "imagine.yaml").read_text())
    cfg["cluster"]["dashboard_port"] = ours["cluster"]["dashboard_port"]  # the running cluster to apply to
    (tmp_path / "imagine.yaml").write_text(yaml.safe_dump(cfg))
    out = imagine("apply", "imagine.yaml", cwd=tmp_path)  # from another folder, without the cluster's token
    assert out.returncode != 0 and "wants its token" in out.stderr and "RAY_AUTH_TOKEN_PATH" in out.stderr
    out = imagine("apply", "imagine.yaml", cwd=tmp_path, RAY_AUTH_TOKEN_PATH=str(home / ".imagine" / "ray-token"))
    assert out.returncode != 0, out.stdout
    assert "was not applied" in out.stderr and str(tmp_path / ".imagine" / "s3-credentials.json") in out.stderr
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200


def test_a_failed_rollout_is_rolled_back(site, tiny_model_dir, tmp_path):
    """A model whose files are all there but whose weights are broken passes the preflight, fails to load in
    the replicas; the last good config comes back and serves."""
    home, url, key = site
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    for weights in (broken / "diffusion" / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    cfg = yaml.safe_load((home / "imagine.yaml").read_text())
    cfg["model"] = str(broken)
    (home / "broken.yaml").write_text(yaml.safe_dump(cfg))
    out = imagine("apply", "broken.yaml", cwd=home, timeout=900)
    assert out.returncode != 0 and "previous config was restored" in out.stderr, out.stdout + out.stderr
    r = requests.post(f"{url}/v1/jobs", json={"prompt": "a blue square", "steps": 2, "n": 1},
                      headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 202, r.text


def test_down_stops_its_own_ray_and_nothing_else(site, tmp_path):
    home, _, _ = site
    other = ray_temp_dir(tmp_path / "other-ray")
    start = subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", "--port", "0",
                            "--node-ip-address", "127.0.0.1", "--temp-dir", str(other), "--num-cpus", "1",
                            "--include-dashboard", "false", "--disable-usage-stats"],
                           env=local_env(), capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, start.stderr
    try:
        theirs = node_processes(other)
        assert theirs
        assert imagine("down", cwd=home).returncode == 0
        assert not node_processes(ray_temp_dir(home / "state" / "ray")), "our Ray is still running"
        assert not any((home / f).is_file() for f in ("state/s3/weed.pid", "state/redis/redis.pid"))
        alive = [p for p in theirs if Path(f"/proc/{p}").exists()]
        assert alive and set(node_processes(other)) == set(theirs), "imagine down touched another Ray"
    finally:
        stop_node(other)
