"""The cluster config (k8s/cluster.yaml): what only Kubernetes needs to know, `K8sConfig`."""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.config import ConfigError
from cluster.k8s.weights import parse_s3_uri

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_UNITS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_quantity(q: str) -> float:
    """A Kubernetes quantity ("500m", "32Gi") as a number (cores or bytes)."""
    m = _QUANTITY.match(str(q))
    if m is None:
        raise ValueError(f"{q!r} is not a Kubernetes quantity such as 4, 500m, 16Gi")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _checked(parse) -> type:
    """A str type whose values `parse` accepts (its ValueError becomes the field's error)."""
    def check(v: str) -> str:
        parse(v)
        return v
    return Annotated[str, AfterValidator(check)]


Quantity = _checked(parse_quantity)   # "4", "500m", "16Gi"
S3Uri = _checked(parse_s3_uri)        # "s3://bucket/prefix/"


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    def to_k8s(self) -> dict:
        d = {"key": self.key, "operator": self.operator, "value": self.value, "effect": self.effect,
             "tolerationSeconds": self.toleration_seconds}
        return {k: v for k, v in d.items() if v is not None}


class _Group(_Model):
    memory: Quantity = "32Gi"  # the pod's memory (request = limit)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


class HeadGroup(_Group):
    """The Ray head: GCS, dashboard, Serve controller, the autoscaler beside it; a CPU pod."""
    cpu: Quantity = "4"  # the pod's CPU (request = limit)
    memory: Quantity = "16Gi"
    num_cpus: int = Field(0, ge=0)  # Ray CPUs for replicas on the head; 0 = none (KubeRay's advice for production)
    # Ray's client port (10001) as a container port of the head and a port of its Service; off: Serve needs none,
    # and whoever reaches the client server runs code in the cluster. Either way only the RayService's own pods
    # (and `kubectl port-forward`) get through the NetworkPolicy to it.
    ray_client: bool = False

    @model_validator(mode="after")
    def _room(self) -> "HeadGroup":
        if self.num_cpus > parse_quantity(self.cpu):
            raise ValueError(f"num_cpus ({self.num_cpus}) must be <= the pod's cpu ({self.cpu})")
        return self


class WorkerGroup(_Group):
    """One KubeRay worker group: identical nodes that the Ray autoscaler adds and removes."""
    name: str
    replicas: int = Field(1, ge=0)  # nodes at start
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(1, ge=0)
    cpus: int = Field(8, ge=1)  # per node: Ray's num-cpus and the pod's CPU
    gpus: int = Field(0, ge=0)  # per node: Ray's num-gpus and the pod's `gpu_resource` limit
    gpu_resource: str = "nvidia.com/gpu"
    resources: dict[str, int] = Field(default_factory=dict)  # custom Ray resources per node (the autoscaler wants ints)

    @field_validator("name")
    @classmethod
    def _dns(cls, v: str) -> str:
        if not _DNS_LABEL.match(v) or len(v) > 40:
            raise ValueError(f"name {v!r} must be lowercase letters, digits and '-', at most 40 characters")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> "WorkerGroup":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"worker group {self.name!r}: min_replicas ({self.min_replicas}) must be <= "
                             f"max_replicas ({self.max_replicas})")
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(f"worker group {self.name!r}: replicas ({self.replicas}) must be within min_replicas "
                             f"({self.min_replicas}) and max_replicas ({self.max_replicas})")
        return self


class VolumeSource(_Model):
    claim_name: str  # a PersistentVolumeClaim (ReadOnlyMany when several nodes mount it)
    sub_path: str | None = None


class S3Source(_Model):
    uri: S3Uri  # s3://bucket/prefix/ with pipeline.json at its top; fetched with the storage section's keys


class ImageSource(_Model):
    """The folder is in the container image (a derived image, see the Dockerfile)."""


class ModelSource(_Model):
    """Where a model folder in the pods comes from: exactly one of `volume`, `s3`, `image`."""
    path: str  # absolute folder in the pods; the config's stage `model` paths lie in or under it
    volume: VolumeSource | None = None
    s3: S3Source | None = None
    image: ImageSource | None = None

    @model_validator(mode="after")
    def _one(self) -> "ModelSource":
        given = [k for k in ("volume", "s3", "image") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"models entry {self.path!r}: set exactly one of volume, s3, image "
                             f"(got {given or 'none'})")
        if not PurePosixPath(self.path).is_absolute():
            raise ValueError(f"models entry path {self.path!r} must be absolute")
        return self


class S3Secret(_Model):
    name: str = "imagine-s3"  # a Secret in the namespace, created by the operator (k8s/README.md)
    access_key_key: str = "access-key"
    secret_key_key: str = "secret-key"


class SecretKey(_Model):
    name: str
    key: str


class Secrets(_Model):
    s3: S3Secret = Field(default_factory=S3Secret)
    api_keys: SecretKey | None = None  # into the env var `api.api_keys_env` (comma-separated keys)
    # the queue's Redis password: into the env var `queue.password_env` of every Ray pod, Redis' `requirepass`
    # (redis.mode statefulset) and the GCS fault tolerance's `redisPassword`
    redis: SecretKey = Field(default_factory=lambda: SecretKey(name="imagine-redis", key="password"))
    webhooks: SecretKey | None = None  # into the env var `webhooks.secret_env` (jobs' webhooks are signed with it)


class K8sRedis(_Model):
    """The job queue's Redis (and the GCS fault tolerance's): `statefulset` renders one in the cluster (a
    StatefulSet with a PersistentVolumeClaim, append-only, and a ClusterIP Service `<name>-redis`) that the
    config's `queue.redis_url` must name; `external` renders nothing and uses `queue.redis_url` as it is."""
    mode: Literal["statefulset", "external"] = "statefulset"
    image: str = "redis:7.2"  # any Redis >= 6 whose image has `sh` and `sed` (the official ones do)
    cpu: Quantity = "500m"  # the pod's CPU (request = limit)
    memory: Quantity = "1Gi"  # the pod's memory (request = limit); Redis' maxmemory is 70 % of it
    storage_size: Quantity = "10Gi"  # the PersistentVolumeClaim of its append-only file
    storage_class: str | None = None  # None = the cluster's default StorageClass
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    gcs_fault_tolerance: bool = True  # KubeRay keeps the GCS in this Redis: a head restart keeps Serve running


class Autoscaler(_Model):
    idle_timeout_s: int = Field(60, ge=0)  # an idle worker node is removed after this long
    upscaling_mode: Literal["Default", "Conservative", "Aggressive"] = "Default"


class K8sMonitoring(_Model):
    namespace: str | None = None  # of the PodMonitor, PrometheusRule and dashboards; None = the app's
    labels: dict[str, str] = Field(default_factory=dict)  # matched by Prometheus' podMonitorSelector/ruleSelector
    dashboard_labels: dict[str, str] = Field(default_factory=lambda: {"grafana_dashboard": "1"})  # Grafana's sidecar
    scrape_interval_s: int = Field(15, ge=1)
    # the Prometheus that scrapes the pods: the NetworkPolicy admits it to the metrics port
    prometheus_namespace: str = "monitoring"
    prometheus_pod_labels: dict[str, str] = Field(  # prometheus-operator's Prometheus pods carry this label
        default_factory=lambda: {"app.kubernetes.io/name": "prometheus"})

    @field_validator("prometheus_namespace")
    @classmethod
    def _namespace_name(cls, v: str) -> str:
        return _namespace(v)


class K8sNetworkPolicy(_Model):
    """The NetworkPolicies (cluster/k8s/network.py): from outside the RayService's pods, only the Serve port, plus
    the dashboard port for the KubeRay operator and the metrics port for Prometheus; Redis only from the Ray pods."""
    enabled: bool = True
    kuberay_namespace: str = "default"  # where the KubeRay operator runs (`helm install ... -n <it>`)
    kuberay_pod_labels: dict[str, str] = Field(  # the kuberay-operator Helm chart's pod label
        default_factory=lambda: {"app.kubernetes.io/name": "kuberay-operator"})

    @field_validator("kuberay_namespace")
    @classmethod
    def _namespace_name(cls, v: str) -> str:
        return _namespace(v)


def _namespace(v: str) -> str:
    if not _DNS_LABEL.match(v):
        raise ValueError(f"{v!r} is not a namespace name (lowercase letters, digits and '-', at most 63 characters)")
    return v


def _default_groups() -> list[WorkerGroup]:
    return [WorkerGroup(name="gpu", gpus=1, replicas=1, min_replicas=1, max_replicas=1,
                        tolerations=[Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")])]


class K8sConfig(_Model):
    """What only Kubernetes needs to know (k8s/cluster.yaml); the service itself is the ImagineConfig."""
    name: str = "imagine"  # the RayService; also prefixes the other objects
    namespace: str = "default"
    image: str = "imagine:0.1.0"  # built from the Dockerfile
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    ray_version: str = "2.60.0"  # must match the image's Ray
    head: HeadGroup = Field(default_factory=HeadGroup)
    worker_groups: list[WorkerGroup] = Field(default_factory=_default_groups)
    autoscaler: Autoscaler = Field(default_factory=Autoscaler)
    secrets: Secrets = Field(default_factory=Secrets)
    redis: K8sRedis = Field(default_factory=K8sRedis)
    models: list[ModelSource] = Field(default_factory=list)
    monitoring: K8sMonitoring = Field(default_factory=K8sMonitoring)
    network_policy: K8sNetworkPolicy = Field(default_factory=K8sNetworkPolicy)

    @field_validator("name", "namespace")
    @classmethod
    def _dns(cls, v: str) -> str:  # KubeRay wants a DNS-1035 RayService name (a letter first), <= 47 characters
        if not _DNS_LABEL.match(v) or not v[0].isalpha() or len(v) > 40:
            raise ValueError(f"{v!r} must start with a letter and be lowercase letters, digits and '-', "
                             "at most 40 characters")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> "K8sConfig":
        names = [g.name for g in self.worker_groups]
        if len(set(names)) != len(names) or "head" in names:
            raise ValueError(f"worker group names {names} must be distinct and not 'head'")
        paths = [PurePosixPath(m.path) for m in self.models]
        for i, a in enumerate(paths):
            for b in paths[i + 1:]:
                if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                    raise ValueError(f"models paths {str(a)!r} and {str(b)!r} overlap; each must be its own folder")
        return self

    @classmethod
    def load(cls, path: str | Path | None = None) -> "K8sConfig":
        """Read k8s/cluster.yaml; None = the defaults (one 1-GPU worker)."""
        if path is None:
            return cls()
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            lines = [f"invalid cluster config in {path} ({e.error_count()} error(s)):"]
            for err in e.errors():
                msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
                lines.append(f"  {'.'.join(map(str, err['loc'])) or '(top level)'}: {msg}")
            raise ConfigError("\n".join(lines)) from None
