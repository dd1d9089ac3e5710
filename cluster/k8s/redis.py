"""The job queue's Redis on Kubernetes: the checks of the config's `queue` section against the cluster config's
`redis`, the in-cluster Redis (a StatefulSet and its Service) and the RayService's GCS fault tolerance on it.

One Redis holds the queue (Celery's messages and cluster/jobqueue.py's bookkeeping, in the database that
`queue.redis_url` names) and, with `redis.gcs_fault_tolerance`, the GCS' tables (database 0, keys
`RAY<RayCluster uid>@...`, which KubeRay deletes when it deletes a RayCluster). `queue.redis_url` is the one
place that says where it is: with `redis.mode: statefulset` it must name the Service rendered here (`check_queue`
says what to write), with `external` it is used as it is. The password is never rendered: it comes from the
Secret `secrets.redis`, as a `secretKeyRef` wherever it is needed.
"""
from __future__ import annotations

from urllib.parse import urlparse

from cluster.config import ImagineConfig
from cluster.k8s.config import K8sConfig, parse_quantity

REDIS_PORT = 6379
MAXMEMORY_FRACTION = 0.7  # of the pod's memory; the rest is room for the fork that rewrites the append-only file
# env vars that KubeRay sets itself in the head (GCS fault tolerance) and rejects in a head template
KUBERAY_REDIS_ENV = ("REDIS_PASSWORD", "REDIS_USERNAME", "RAY_REDIS_ADDRESS")
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
_CONF = "/run/redis/redis.conf"  # written at start into a memory volume (mode 0600): the password is in no argv

# The Redis container's start: the password (from the Secret, in REDISCLI_AUTH, which redis-cli also reads for
# the readiness probe) goes into a config file as a quoted string ('\' and '"' escaped), never onto a command line.
_START = r"""set -eu
umask 077
password=$(printf '%s' "$REDISCLI_AUTH" | sed 's/[\\"]/\\&/g')
printf 'requirepass "%s"\n' "$password" > CONF
exec redis-server CONF ARGS
""".replace("CONF", _CONF)


def service_name(k8s: K8sConfig) -> str:
    return f"{k8s.name}-redis"


def service_url(k8s: K8sConfig, db: str = "0") -> str:
    """The in-cluster Redis as `queue.redis_url` should name it."""
    return f"redis://{service_name(k8s)}.{k8s.namespace}.svc:{REDIS_PORT}/{db}"


def redis_selector(k8s: K8sConfig) -> dict[str, str]:
    """The labels that select the in-cluster Redis' pod (its Service and its NetworkPolicy)."""
    return {"app.kubernetes.io/name": "redis", "app.kubernetes.io/instance": k8s.name}


def _service_hosts(k8s: K8sConfig) -> set[str]:
    svc, ns = service_name(k8s), k8s.namespace
    return {svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local"}


def check_queue(cfg: ImagineConfig, k8s: K8sConfig) -> list[str]:
    """The queue settings that cannot work in the cluster, each with what to set instead."""
    q, out = cfg.queue, []
    if q.local.enabled:
        out.append("queue.local.enabled is true, but nothing starts a local Redis in Kubernetes; set it to false "
                   "(the cluster config's redis.mode says where the queue's Redis runs)")
    url = urlparse(q.redis_url)
    try:
        port = url.port or REDIS_PORT
    except ValueError:
        port = None
    if k8s.redis.mode == "statefulset":
        if url.scheme != "redis" or url.hostname not in _service_hosts(k8s) or port != REDIS_PORT:
            out.append(f"queue.redis_url ({q.redis_url}) is not the Redis that redis.mode 'statefulset' runs in the "
                       f"cluster; set it to {service_url(k8s, url.path.strip('/') or '0')}, or set redis.mode: "
                       "external in the cluster config to use a Redis of your own")
    elif not url.hostname or url.hostname in _LOOPBACK or port is None:
        out.append(f"queue.redis_url ({q.redis_url}) points at the pod itself or has no valid port; with redis.mode "
                   "'external', give an address the pods can reach, e.g. redis://redis.example.internal:6379/0")
    env = q.password_env
    if env in KUBERAY_REDIS_ENV:
        out.append(f"queue.password_env is {env!r}, a variable KubeRay sets itself in the head pod (and rejects in "
                   "its template); use another name, e.g. IMAGINE_REDIS_PASSWORD")
    st = cfg.storage
    others = {"storage.access_key_env": st.access_key_env, "storage.secret_key_env": st.secret_key_env,
              "api.api_keys_env": cfg.api.api_keys_env}
    same = [k for k, v in others.items() if v == env]
    if same:
        out.append(f"queue.password_env ({env}) is also {', '.join(same)}; each Secret needs its own variable")
    return out


def gcs_fault_tolerance(cfg: ImagineConfig, k8s: K8sConfig) -> dict | None:
    """The RayCluster's `gcsFaultToleranceOptions` on the queue's Redis (None when turned off).

    No `externalStorageNamespace`: KubeRay then uses each RayCluster's uid, so the old and the new cluster of a
    RayService upgrade keep apart, and it deletes a cluster's keys when it deletes the cluster.
    """
    if not k8s.redis.gcs_fault_tolerance:
        return None
    url = urlparse(cfg.queue.redis_url)
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    address = f"{host}:{url.port or REDIS_PORT}"  # Ray's form: host:port, or rediss://host:port for TLS
    secret = k8s.secrets.redis
    return {"redisAddress": address if url.scheme == "redis" else f"rediss://{address}",
            "redisPassword": {"valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}}}


def redis_objects(k8s: K8sConfig) -> list[dict]:
    """The in-cluster Redis: a one-replica StatefulSet (append-only file on a PersistentVolumeClaim that outlives
    it, `requirepass` from the Secret, no eviction) and the ClusterIP Service `<name>-redis`."""
    r, secret, name = k8s.redis, k8s.secrets.redis, service_name(k8s)
    select = redis_selector(k8s)
    labels = {**select, "app.kubernetes.io/component": "queue", "app.kubernetes.io/part-of": "imagine"}
    args = ["--port", str(REDIS_PORT), "--dir", "/data", "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "''", "--maxmemory", str(int(parse_quantity(r.memory) * MAXMEMORY_FRACTION)),
            "--maxmemory-policy", "noeviction"]  # a full Redis refuses writes instead of dropping jobs or GCS state
    container = {
        "name": "redis", "image": r.image, "imagePullPolicy": k8s.image_pull_policy,
        "command": ["sh", "-c", _START.replace("ARGS", " ".join(args))],
        "env": [{"name": "REDISCLI_AUTH", "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}}],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "resources": {"limits": {"cpu": r.cpu, "memory": r.memory}, "requests": {"cpu": r.cpu, "memory": r.memory}},
        "readinessProbe": {"exec": {"command": ["sh", "-c", "redis-cli -p 6379 ping | grep -q PONG"]},
                           "periodSeconds": 5, "timeoutSeconds": 3},
        "livenessProbe": {"tcpSocket": {"port": "redis"}, "initialDelaySeconds": 30, "periodSeconds": 10,
                          "failureThreshold": 6},  # a long append-only file replay is not a hang
        "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "conf", "mountPath": "/run/redis"}],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    pod = {"enableServiceLinks": False, "terminationGracePeriodSeconds": 30,  # Redis flushes its file on SIGTERM
           "securityContext": {"runAsNonRoot": True, "runAsUser": 999, "runAsGroup": 999, "fsGroup": 999,
                               "seccompProfile": {"type": "RuntimeDefault"}},  # uid 999: `redis` in the images
           "containers": [container],
           "volumes": [{"name": "conf", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}]}
    if r.node_selector:
        pod["nodeSelector"] = dict(r.node_selector)
    if r.tolerations:
        pod["tolerations"] = [t.to_k8s() for t in r.tolerations]
    claim = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": r.storage_size}}}
    if r.storage_class is not None:
        claim["storageClassName"] = r.storage_class
    statefulset = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(k8s, labels), "spec": {
        "serviceName": name, "replicas": 1, "selector": {"matchLabels": select},
        "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
        "template": {"metadata": {"labels": labels}, "spec": pod},
        "volumeClaimTemplates": [{"metadata": {"name": "data", "labels": labels}, "spec": claim}]}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(k8s, labels), "spec": {
        "type": "ClusterIP", "selector": select,
        "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}]}}
    return [service, statefulset]


def _meta(k8s: K8sConfig, labels: dict[str, str]) -> dict:
    return {"name": service_name(k8s), "namespace": k8s.namespace, "labels": dict(labels)}
