"""The job queue's Redis on Kubernetes (cluster/k8s/redis.py): the in-cluster StatefulSet and Service, strictly
valid; the queue and the GCS (fault tolerance) on that one Redis; the password only ever a `secretKeyRef`; the
external mode, which renders no Redis; and the Redis container's start script, run here on a real redis-server."""
import copy
import os
import secrets
import subprocess
import time

import pytest
import redis
import yaml

from cluster import k8s
from cluster.seaweed import find_free_port
from tests.k8s.conftest import CONFIGS, PROD, docs_of, rendered, variant

SECRET_REF = {"secretKeyRef": {"name": "imagine-redis", "key": "password"}}


def _mutated(doc: dict, mutate, schemas) -> list[str]:
    doc = copy.deepcopy(doc)
    mutate(doc)
    return k8s.manifest_errors(doc, schemas)


def test_redis_objects_validate_strictly(schemas):
    docs = {d["kind"]: d for d in k8s.build(PROD)}
    sts, svc, rs = docs["StatefulSet"], docs["Service"], docs["RayService"]
    assert [k8s.manifest_errors(d, schemas) for d in (sts, svc, rs)] == [[], [], []]
    # built-in kinds with kubernetes-validate --strict: misspelled or mistyped fields anywhere are errors
    [e] = _mutated(sts, lambda d: d["spec"].__setitem__("volumeClaimTemplate", d["spec"].pop("volumeClaimTemplates")),
                   schemas)
    assert "'volumeClaimTemplate' was unexpected" in e
    [e] = _mutated(sts, lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]
                   ["secretKeyRef"].__setitem__("nmae", "imagine-redis"), schemas)
    assert "'nmae' was unexpected" in e
    [e] = _mutated(svc, lambda d: d["spec"]["ports"][0].__setitem__("port", "6379"), schemas)
    assert "'6379' is not of type 'integer'" in e
    # gcsFaultToleranceOptions against KubeRay's CRD
    [e] = _mutated(rs, lambda d: d["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"].__setitem__(
        "redisAdress", "x:6379"), schemas)
    assert e == ("spec.rayClusterConfig.gcsFaultToleranceOptions: Additional properties are not allowed "
                 "('redisAdress' was unexpected)")
    [e] = _mutated(rs, lambda d: d["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisPassword"]
                   ["valueFrom"]["secretKeyRef"].pop("key"), schemas)
    assert "'key' is a required property" in e


def test_queue_and_gcs_use_the_in_cluster_redis():
    docs = rendered("production")
    svc, sts, rs = docs["Service"], docs["StatefulSet"], docs["RayService"]
    host, port = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc", svc["spec"]["ports"][0]["port"]
    assert (host, port) == ("imagine-redis.imagine.svc", 6379)
    app = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]
    assert app["args"]["config"]["queue"]["redis_url"] == f"redis://{host}:{port}/0"
    [runner] = [d for d in app["deployments"] if d["name"] == "JobRunner"]
    policy = runner["autoscaling_config"]["policy"]  # runs in the Serve controller, on the head
    assert policy["policy_function"] == "deployments.queue:QueueAutoscalingPolicy"
    assert {k: policy["policy_kwargs"][k] for k in ("redis_url", "password_env", "password_file")} == {
        "redis_url": f"redis://{host}:{port}/0", "password_env": "IMAGINE_REDIS_PASSWORD", "password_file": None}
    rc = rs["spec"]["rayClusterConfig"]
    assert rc["gcsFaultToleranceOptions"] == {"redisAddress": f"{host}:{port}",
                                              "redisPassword": {"valueFrom": SECRET_REF}}
    # what KubeRay refuses beside gcsFaultToleranceOptions (ray-operator's validation.go), and no storage
    # namespace: KubeRay then keys each RayCluster of an upgrade by its own uid
    head = rc["headGroupSpec"]
    assert "redis-password" not in head["rayStartParams"] and "annotations" not in rs["metadata"]
    assert not {e["name"] for e in head["template"]["spec"]["containers"][0]["env"]} & set(k8s.KUBERAY_REDIS_ENV)
    # the Service selects the StatefulSet's pod on its named port; the PodMonitor (Ray's metrics) does not
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] and svc["spec"]["type"] == "ClusterIP"
    [c] = sts["spec"]["template"]["spec"]["containers"]
    assert svc["spec"]["ports"][0]["targetPort"] in [p["name"] for p in c["ports"]]
    assert not docs["PodMonitor"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # persistence: append-only on a claim that outlives the StatefulSet; no eviction of jobs or GCS tables
    start = c["command"][2]
    for part in ("--appendonly yes", "--appendfsync everysec", "--dir /data", "--maxmemory-policy noeviction",
                 f"--maxmemory {int(0.7 * 2**30)}"):
        assert part in start
    [claim] = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}


def test_redis_password_is_only_ever_a_secret_key_ref(tmp_path, monkeypatch):
    sentinel = "redis-SENTINEL-" + secrets.token_hex(4)
    for var in ("IMAGINE_REDIS_PASSWORD", "REDISCLI_AUTH", "REDIS_PASSWORD"):
        monkeypatch.setenv(var, sentinel)
    password_file = tmp_path / "redis-password"
    password_file.write_text(sentinel)
    found: list[tuple[str, object]] = []

    def walk(node, path: str) -> None:
        """Every place that carries the Redis password: env entries by name, and GCS FT's redisPassword."""
        if isinstance(node, dict):
            if node.get("name") in ("IMAGINE_REDIS_PASSWORD", "REDISCLI_AUTH"):
                found.append((path, {k: v for k, v in node.items() if k != "name"}))
            for k, v in node.items():
                if k == "redisPassword":
                    found.append((f"{path}.{k}", v))
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}.{i}")

    for name, (cfg_path, k8s_path) in CONFIGS.items():
        out = tmp_path / name
        assert k8s.main(["render", str(cfg_path), "--k8s", str(k8s_path), "--out", str(out)]) == 0
        text = "".join(p.read_text() for p in out.iterdir())
        assert sentinel not in text and "kind: Secret" not in text
        found.clear()
        for p in sorted(out.glob("*.yaml")):
            for doc in yaml.safe_load_all(p.read_text()):
                walk(doc, f"{p.name}:{doc['kind']}")
        # head and worker Ray containers, the Redis container, the GCS: four references, all to the Secret
        assert len(found) == 4, found
        assert all(v == {"valueFrom": SECRET_REF} for _, v in found), found
        # the Redis container gets it into a config file, not onto a command line
        [sts] = [d for d in yaml.safe_load_all((out / "redis.yaml").read_text()) if d["kind"] == "StatefulSet"]
        assert "--requirepass" not in sts["spec"]["template"]["spec"]["containers"][0]["command"][2]


def test_external_redis_renders_no_redis(schemas):
    url = "redis://redis.example.internal:6380/2"
    cfg, cluster = variant("production", {"queue": {"redis_url": url}}, {"redis": {"mode": "external"}})
    files = k8s.render(cfg, cluster)
    assert "redis.yaml" not in files and "redis.yaml" not in yaml.safe_load(files["kustomization.yaml"])["resources"]
    docs = docs_of(files)
    assert not {"StatefulSet", "Service"} & set(docs)
    k8s.validate_manifests(list(docs.values()), schemas)
    rc = docs["RayService"]["spec"]["rayClusterConfig"]
    assert rc["gcsFaultToleranceOptions"] == {"redisAddress": "redis.example.internal:6380",
                                              "redisPassword": {"valueFrom": SECRET_REF}}
    assert yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])["applications"][0]["args"]["config"][
        "queue"]["redis_url"] == url  # used as it is
    for spec in [rc["headGroupSpec"]] + rc["workerGroupSpecs"]:
        env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0]["env"]}
        assert env["IMAGINE_REDIS_PASSWORD"]["valueFrom"] == SECRET_REF
    # TLS: Ray's own form for the GCS; and GCS fault tolerance can be turned off
    cfg, cluster = variant("production", {"queue": {"redis_url": "rediss://redis.example.internal/0"}},
                           {"redis": {"mode": "external", "gcs_fault_tolerance": False}})
    assert "gcsFaultToleranceOptions" not in docs_of(k8s.render(cfg, cluster))["RayService"]["spec"]["rayClusterConfig"]
    assert k8s.gcs_fault_tolerance(cfg, cluster.model_copy(update={"redis": cluster.redis.model_copy(
        update={"gcs_fault_tolerance": True})}))["redisAddress"] == "rediss://redis.example.internal:6379"


def test_redis_settings_from_the_cluster_config(schemas):
    cfg, cluster = variant("production", {}, {"redis": {"storage_class": "premium-rwo", "storage_size": "20Gi",
                                                        "memory": "4Gi", "image": "redis:7.2.5",
                                                        "node_selector": {"pool": "system"}}})
    docs = docs_of(k8s.render(cfg, cluster))
    k8s.validate_manifests([docs["StatefulSet"], docs["Service"]], schemas)
    spec = docs["StatefulSet"]["spec"]
    assert spec["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "premium-rwo"
    assert spec["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "system"} and pod["containers"][0]["image"] == "redis:7.2.5"
    assert f"--maxmemory {int(0.7 * 4 * 2**30)} " in pod["containers"][0]["command"][2]


def test_the_redis_start_script_runs_a_password_protected_append_only_redis(tmp_path):
    """The rendered container command and readiness probe, run on this machine's redis-server (paths and port
    moved into tmp_path), with a password that needs quoting in redis.conf."""
    [c] = rendered("production")["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    port, conf, data = find_free_port(), tmp_path / "conf", tmp_path / "data"
    conf.mkdir()
    data.mkdir()

    def local(cmd: str) -> str:
        return (cmd.replace("/run/redis", str(conf)).replace("--dir /data", f"--dir {data}")
                .replace("--port 6379", f"--port {port}").replace("-p 6379", f"-p {port}"))
    password = 'p "w\\ d$x' + secrets.token_hex(4)
    env = {**os.environ, "REDISCLI_AUTH": password}
    probe = c["readinessProbe"]["exec"]["command"]

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([*c["command"][:2], local(c["command"][2])], env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run([*probe[:2], local(probe[2])], env=env, stderr=subprocess.DEVNULL).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not become ready (exit code {proc.wait()})")
            time.sleep(0.05)
        return proc

    proc = start()
    try:
        assert password not in open(f"/proc/{proc.pid}/cmdline").read()
        assert (conf / "redis.conf").stat().st_mode & 0o077 == 0
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password="wrong").ping()
        client = redis.Redis(port=port, password=password)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.rpush("imagine-jobs", "job-1")
    finally:
        proc.terminate()  # SIGTERM, as the kubelet stops the pod: Redis flushes its append-only file
        proc.wait(10)
    proc = start()  # a restarted pod on the same volume has the queue back
    try:
        assert redis.Redis(port=port, password=password).lrange("imagine-jobs", 0, -1) == [b"job-1"]
    finally:
        proc.terminate()
        proc.wait(10)
