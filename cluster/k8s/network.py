"""The NetworkPolicies (networkpolicy.yaml): who may open a connection to the RayService's pods and to its Redis.

The Ray pods (head and workers: `app.kubernetes.io/name: imagine`, `app.kubernetes.io/instance: <name>`, labels
KubeRay copies from the templates onto every pod it makes of them, the GCS Redis cleanup Job's included) accept:

    the Serve port (`cluster.http_port`)   from anywhere: the one port meant for clients
    every port                             from the Ray pods of this RayService: the GCS (6379), raylets, object
                                           transfers, dashboard, Ray client (10001), ... (Ray picks many at random)
    the dashboard port                     from the KubeRay operator (`network_policy.kuberay_namespace` and
                                           `kuberay_pod_labels`): it deploys serveConfigV2 and reads Serve's status
                                           there, through the head Service
    the metrics port                       from Prometheus (`monitoring.prometheus_namespace` and
                                           `prometheus_pod_labels`), which scrapes it through the PodMonitor;
                                           only with `monitoring.enabled`

The in-cluster Redis (`redis.mode: statefulset`) accepts port 6379 from the Ray pods of this RayService only.
Anything else is dropped: other namespaces, and the other pods of this one, reach the Serve port and nothing
more. Only ingress is restricted. Kubernetes always admits the node's own traffic (the kubelet's probes), and
`kubectl port-forward` enters the pod from the node, so the dashboard stays reachable that way. The policies take
effect where the cluster's network plugin enforces NetworkPolicies (Calico, Cilium, GKE Dataplane V2, ...).
"""
from __future__ import annotations

from cluster.config import ImagineConfig
from cluster.k8s.config import K8sConfig
from cluster.k8s.redis import REDIS_PORT, redis_selector

NAMESPACE_LABEL = "kubernetes.io/metadata.name"  # set by Kubernetes on every namespace (1.22+)


def app_labels(k8s: K8sConfig) -> dict[str, str]:
    """The labels of every object we render and of every Ray pod: what the policies and the PodMonitor select."""
    return {"app.kubernetes.io/name": "imagine", "app.kubernetes.io/instance": k8s.name}


def network_policies(cfg: ImagineConfig, k8s: K8sConfig) -> list[dict]:
    """`<name>-ray` for the Ray pods and, with an in-cluster Redis, `<name>-redis`; none when turned off."""
    np, mon = k8s.network_policy, k8s.monitoring
    if not np.enabled:
        return []
    ray = {"podSelector": {"matchLabels": app_labels(k8s)}}  # same namespace: a peer without namespaceSelector
    rules = [{"ports": _tcp(cfg.cluster.http_port)},
             {"from": [ray]},
             {"from": [_peer(np.kuberay_namespace, np.kuberay_pod_labels)], "ports": _tcp(cfg.cluster.dashboard_port)}]
    if cfg.monitoring.enabled:
        rules.append({"from": [_peer(mon.prometheus_namespace, mon.prometheus_pod_labels)],
                      "ports": _tcp(cfg.monitoring.metrics_export_port)})
    policies = [_policy(k8s, f"{k8s.name}-ray", app_labels(k8s), rules)]
    if k8s.redis.mode == "statefulset":
        policies.append(_policy(k8s, f"{k8s.name}-redis", redis_selector(k8s),
                                [{"from": [ray], "ports": _tcp(REDIS_PORT)}]))
    return policies


def _policy(k8s: K8sConfig, name: str, selector: dict[str, str], rules: list[dict]) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": k8s.namespace, "labels": app_labels(k8s)},
            "spec": {"podSelector": {"matchLabels": dict(selector)}, "policyTypes": ["Ingress"], "ingress": rules}}


def _peer(namespace: str, labels: dict[str, str]) -> dict:
    """The pods with `labels` in `namespace` (both selectors in one peer: and, not or)."""
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: namespace}},
            "podSelector": {"matchLabels": dict(labels)}}


def _tcp(*ports: int) -> list[dict]:
    return [{"protocol": "TCP", "port": p} for p in ports]
