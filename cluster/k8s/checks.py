"""Checks before rendering: `check()` rejects an ImagineConfig / K8sConfig pair that cannot run on the cluster."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import urlparse

from cluster.config import DEPLOYMENT_NAMES, ConfigError, ImagineConfig
from cluster.k8s.config import K8sConfig, ModelSource, parse_quantity
from cluster.k8s.redis import check_queue

GCS_PORT, CLIENT_PORT = 6379, 10001  # the head's fixed Ray ports
# The model folders each deployment reads (deployments/*.py): the ingress checks requests against the diffuser's;
# the job runner, like the publisher, reads none.
MODEL_READS = {"ingress": ("diffuser",), "job_runner": (), "text_encoder": ("text_encoder",),
               "diffuser": ("diffuser",), "upscaler": ("upscaler",), "publisher": ()}


@dataclass(frozen=True)
class NodeType:
    """One kind of Ray node: the head or a worker group, with its Ray resources per node."""
    name: str
    max_nodes: int
    capacity: dict[str, float]


def node_types(k8s: K8sConfig) -> list[NodeType]:
    head = NodeType("head", 1, {"CPU": k8s.head.num_cpus, "memory": parse_quantity(k8s.head.memory)})
    return [head] + [NodeType(g.name, g.max_replicas, {"CPU": g.cpus, "GPU": g.gpus, "memory": parse_quantity(g.memory),
                                                        **g.resources}) for g in k8s.worker_groups]


def demand(cfg: ImagineConfig, stage: str) -> dict[str, float]:
    """The Ray resources one replica of `stage` asks for (memory_bytes counts against the pod's memory)."""
    o = cfg.stage(stage).ray_actor_options
    d = {"CPU": o.num_cpus, "GPU": o.num_gpus, "memory": o.memory_bytes or 0, **o.resources}
    return {k: v for k, v in d.items() if v > 0}


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0) >= v - 1e-9 for k, v in need.items())


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


def check(cfg: ImagineConfig, k8s: K8sConfig) -> dict[str, list[str]]:
    """Reject a config that cannot run on this cluster, naming every problem; returns, per stage, the node
    types (head / worker group names) where one replica fits.

    Raises:
        ConfigError: listing each problem with the offending values and how to fix it.
    """
    problems = _check_in_cluster(cfg, k8s) + check_queue(cfg, k8s) + _check_models(cfg, k8s)
    hosts = {s: [n.name for n in node_types(k8s) if _fits(demand(cfg, s), n.capacity)] for s in DEPLOYMENT_NAMES}
    problems += [_no_host(cfg, k8s, s) for s, names in hosts.items() if not names]
    if not problems:
        problems += _check_capacity(cfg, k8s)
    if problems:
        raise ConfigError("cannot render Kubernetes manifests:\n" + "\n".join(f"  - {p}" for p in problems))
    return hosts


def _check_in_cluster(cfg: ImagineConfig, k8s: K8sConfig) -> list[str]:
    """Settings that only make sense on the operator's machine."""
    out = []
    if cfg.cluster.http_host not in ("0.0.0.0", "::"):
        out.append(f"cluster.http_host is {cfg.cluster.http_host!r}; set 0.0.0.0 so the Serve proxy in each pod "
                   "accepts traffic from the Service")
    if cfg.storage.local.enabled:
        out.append("storage.local.enabled is true, but nothing starts a local S3 server in Kubernetes; set it to "
                   "false and storage.endpoint_url to your S3 (null = AWS)")
    host = urlparse(cfg.storage.endpoint_url).hostname if cfg.storage.endpoint_url else None
    if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        out.append(f"storage.endpoint_url ({cfg.storage.endpoint_url}) points at the pod itself; use an address "
                   "the pods can reach")
    paths = {"model": cfg.model, "cluster.temp_dir": cfg.cluster.temp_dir,
             "storage.credentials_file": cfg.storage.credentials_file,
             "storage.local.data_dir": cfg.storage.local.data_dir, "api.api_keys_file": cfg.api.api_keys_file,
             "queue.password_file": cfg.queue.password_file, "queue.local.data_dir": cfg.queue.local.data_dir,
             "webhooks.secret_file": cfg.webhooks.secret_file,
             **{f"stages.{s}.model": cfg.stage(s).model for s in DEPLOYMENT_NAMES}}
    relative = [f"{k} ({v})" for k, v in paths.items() if v is not None and not PurePosixPath(v).is_absolute()]
    if relative:
        out.append(f"relative paths mean nothing inside the pods (and `imagine apply` would resolve them on this "
                   f"machine): make them absolute or null: {', '.join(relative)}")
    ports = {"cluster.http_port": cfg.cluster.http_port, "cluster.dashboard_port": cfg.cluster.dashboard_port,
             "monitoring.metrics_export_port": cfg.monitoring.metrics_export_port}
    out += [f"{k} ({v}) collides with Ray's fixed head ports {GCS_PORT} (GCS) and {CLIENT_PORT} (client)"
            for k, v in ports.items() if v in (GCS_PORT, CLIENT_PORT)]
    if cfg.api.auth == "required" and cfg.api.api_keys_file is None and k8s.secrets.api_keys is None:
        out.append("api.auth is 'required' but no keys reach the pods: set secrets.api_keys in the cluster config "
                   "(a Secret with comma-separated keys) or api.api_keys_file to a file in the image")
    return out


def _check_models(cfg: ImagineConfig, k8s: K8sConfig) -> list[str]:
    out = []
    for s in sorted({r for stage in DEPLOYMENT_NAMES for r in MODEL_READS[stage]}, key=list(DEPLOYMENT_NAMES).index):
        path = cfg.model_for(s)
        if path is not None and PurePosixPath(path).is_absolute() and model_source(path, k8s) is None:
            out.append(f"stages.{s} loads the model folder {path}, which is under no models[].path of the cluster "
                       f"config ({', '.join(m.path for m in k8s.models) or 'none listed'}); add a volume, s3 or "
                       "image entry for it")
    return out


def model_source(path: str, k8s: K8sConfig) -> ModelSource | None:
    p = PurePosixPath(path)
    return next((m for m in k8s.models if p.is_relative_to(m.path)), None)


def _no_host(cfg: ImagineConfig, k8s: K8sConfig, stage: str) -> str:
    need, opts = demand(cfg, stage), cfg.stage(stage).ray_actor_options
    types = node_types(k8s)
    if need.get("GPU", 0) > 0 and not any(n.capacity.get("GPU", 0) > 0 for n in types):
        return (f"stages.{stage}.ray_actor_options.num_gpus is {opts.num_gpus:g}, but no worker group has GPUs "
                f"(worker groups: {', '.join(f'{g.name} (gpus {g.gpus})' for g in k8s.worker_groups) or 'none'}); "
                "add a group with gpus >= 1")
    missing = [k for k in opts.resources if not any(n.capacity.get(k, 0) > 0 for n in types)]
    if missing:
        needs = ", ".join(f"{k} ({opts.resources[k]:g})" for k in missing)
        offered = ", ".join(f"{g.name} {g.resources or {}}" for g in k8s.worker_groups) or "none"
        return (f"stages.{stage}.ray_actor_options.resources needs {needs}, but no group provides it (groups' "
                f"custom resources: {offered}); add it to a worker group's `resources`")
    return (f"stages.{stage}: one replica needs {_fmt(need)}, but no node is that large "
            f"({'; '.join(f'{n.name} {_fmt(n.capacity)}' for n in types)})")


def _check_capacity(cfg: ImagineConfig, k8s: K8sConfig) -> list[str]:
    """Every stage at its maximum replicas must fit the cluster at its maximum size (first-fit decreasing)."""
    replicas = []
    for s in DEPLOYMENT_NAMES:
        st = cfg.stage(s)
        n = st.autoscaling.max_replicas if st.autoscaling is not None else st.num_replicas
        replicas += [(s, i + 1, n) for i in range(n)]
    replicas.sort(key=lambda r: tuple(-demand(cfg, r[0]).get(k, 0) for k in ("GPU", "CPU", "memory")))
    nodes = [dict(n.capacity) for n in node_types(k8s) for _ in range(n.max_nodes)]
    for stage, i, n in replicas:
        need = demand(cfg, stage)
        free = next((f for f in nodes if _fits(need, f)), None)
        if free is None:
            sizes = ", ".join(f"{t.name} x{t.max_nodes} {_fmt(t.capacity)}" for t in node_types(k8s))
            return [f"at their maximum replicas the stages do not fit the cluster at its maximum size: no room for "
                    f"{stage} replica {i} of {n} {_fmt(need)} (nodes: {sizes}); raise a worker group's "
                    "max_replicas or lower the stages' replicas or resources"]
        for k, v in need.items():
            free[k] -= v
    return []
