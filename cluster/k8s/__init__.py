"""Kubernetes manifests rendered from the one config: a KubeRay `RayService` and its monitoring.

    imagine k8s render k8s/imagine-prod.yaml --k8s k8s/cluster.yaml --out k8s/examples/production
    imagine k8s render k8s/imagine-small.yaml --k8s k8s/cluster-small.yaml \\
        --overlay-of k8s/examples/production --out k8s/overlays/small     # a kustomize overlay (JSON patches)
    imagine k8s validate k8s/examples/production                         # strict, offline schema check

(`python -m cluster.k8s ...` takes the same arguments.) Two inputs: the service's `ImagineConfig`, whose
`serve_config()` becomes the RayService's `serveConfigV2` unchanged (the same dict `imagine apply` deploys
locally), and a `K8sConfig` (`k8s/cluster.yaml`) for what only Kubernetes needs: image, head and worker groups,
Secret names and where each model folder comes from (a volume, S3 at pod start, or the image).
`check()` rejects a pair that cannot work (a GPU stage with no GPU group, min > max, stages that do not fit the
cluster at its maximum size, paths that only exist on the operator's machine, a queue that would not reach the
cluster's Redis) before anything is rendered. The job queue's Redis is a StatefulSet rendered beside the
RayService (or an external one), and the RayService keeps its GCS there (GCS fault tolerance). NetworkPolicies
leave only the Serve port open to the rest of the cluster.

The modules, each importable on its own:

    config.py    K8sConfig (k8s/cluster.yaml) and its parts
    checks.py    check(): the config pair against the cluster's node types, before rendering
    redis.py     the queue's Redis: check_queue, redis_objects (StatefulSet, Service), gcs_fault_tolerance
    network.py   network_policies: from outside the RayService's pods only the Serve port (NetworkPolicies)
    manifests.py render(): the RayService, Redis, NetworkPolicies, PodMonitor, dashboards ConfigMap and
                 PrometheusRule as YAML
    overlay.py   the kustomize overlay: json_patch, apply_json_patch, build, render_overlay
    schemas.py   the vendored CRDs (k8s/schemas/): where each comes from (SOURCES), fetch_schemas
    validate.py  validate_manifests / validate_dir: offline, strict, against the CRDs and Kubernetes' schemas
    weights.py   fetch_weights: an S3 model folder into the pod (run by the init containers)
    cli.py       `imagine k8s ...` and `python -m cluster.k8s ...`
    errors.py    ManifestError, FetchError

This package re-exports their public names (`from cluster import k8s; k8s.render(...)`).
Importing it pulls in neither torch nor Ray.
"""
from __future__ import annotations

from cluster.k8s.checks import (
    CLIENT_PORT,
    GCS_PORT,
    MODEL_READS,
    NodeType,
    check,
    demand,
    model_source,
    node_types,
)
from cluster.k8s.cli import add_k8s_commands, cmd_k8s, main
from cluster.k8s.config import (
    Autoscaler,
    HeadGroup,
    ImageSource,
    K8sConfig,
    K8sMonitoring,
    K8sNetworkPolicy,
    K8sRedis,
    ModelSource,
    S3Secret,
    S3Source,
    SecretKey,
    Secrets,
    Toleration,
    VolumeSource,
    WorkerGroup,
    parse_quantity,
)
from cluster.k8s.errors import FetchError, ManifestError
from cluster.k8s.manifests import (
    GENERATED,
    dashboards_configmap,
    dump_yaml,
    podmonitor,
    prometheus_rule,
    rayservice,
    render,
)
from cluster.k8s.network import app_labels, network_policies
from cluster.k8s.overlay import apply_json_patch, build, json_patch, render_overlay
from cluster.k8s.redis import (
    KUBERAY_REDIS_ENV,
    REDIS_PORT,
    check_queue,
    gcs_fault_tolerance,
    redis_objects,
    redis_selector,
    service_name,
    service_url,
)
from cluster.k8s.schemas import REPO, SOURCES, VENDORED, Source, fetch_schemas, schemas_dir
from cluster.k8s.validate import (
    CRD_FILES,
    KUBERNETES_VERSION,
    crd_schema,
    manifest_errors,
    validate_dir,
    validate_manifests,
)
from cluster.k8s.weights import fetch_weights, parse_s3_uri

__all__ = [
    # config.py
    "Autoscaler", "HeadGroup", "ImageSource", "K8sConfig", "K8sMonitoring", "K8sNetworkPolicy", "K8sRedis",
    "ModelSource", "S3Secret",
    "S3Source", "SecretKey", "Secrets", "Toleration", "VolumeSource", "WorkerGroup", "parse_quantity",
    # checks.py
    "CLIENT_PORT", "GCS_PORT", "MODEL_READS", "NodeType", "check", "demand", "model_source", "node_types",
    # redis.py
    "KUBERAY_REDIS_ENV", "REDIS_PORT", "check_queue", "gcs_fault_tolerance", "redis_objects", "redis_selector",
    "service_name", "service_url",
    # network.py
    "app_labels", "network_policies",
    # manifests.py
    "GENERATED", "dashboards_configmap", "dump_yaml", "podmonitor", "prometheus_rule", "rayservice",
    "render",
    # overlay.py
    "apply_json_patch", "build", "json_patch", "render_overlay",
    # schemas.py
    "REPO", "SOURCES", "VENDORED", "Source", "fetch_schemas", "schemas_dir",
    # validate.py
    "CRD_FILES", "KUBERNETES_VERSION", "crd_schema", "manifest_errors", "validate_dir", "validate_manifests",
    # weights.py
    "fetch_weights", "parse_s3_uri",
    # cli.py
    "add_k8s_commands", "cmd_k8s", "main",
    # errors.py
    "FetchError", "ManifestError",
]
