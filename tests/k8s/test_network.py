"""The NetworkPolicies (cluster/k8s/network.py) and the Ray client port: from outside the RayService's own pods only
the Serve port is open; the dashboard to the KubeRay operator, the metrics port to Prometheus, Redis to Ray."""
import copy

import pytest
from pydantic import ValidationError

from cluster import k8s
from tests.k8s.conftest import PROD, SMALL, by_kind, docs_of, rendered, variant

RAY_PORTS = (6379, 8265, 10001, 8080, 8000, 52365, 10002, 23456)  # GCS, dashboard, client, metrics, Serve, agent, ...
OUTSIDER = ("other", {"app": "anything"})


def admits(policy: dict, namespace: str, labels: dict, port: int, own_namespace: str = "imagine") -> bool:
    """Whether `policy` lets a pod (namespace, labels) connect to `port` of the pods it selects (ingress, TCP)."""
    def matches(selector: dict, have: dict) -> bool:
        assert set(selector) <= {"matchLabels"}, selector  # all we render: matchLabels only
        return selector.get("matchLabels", {}).items() <= have.items()

    def peer_admits(peer: dict) -> bool:
        ns_ok = (matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
                 if "namespaceSelector" in peer else namespace == own_namespace)
        return ns_ok and matches(peer.get("podSelector", {}), labels)

    for rule in policy["spec"]["ingress"]:
        from_ok = "from" not in rule or any(peer_admits(p) for p in rule["from"])
        port_ok = "ports" not in rule or any(p["port"] == port and p["protocol"] == "TCP" for p in rule["ports"])
        if from_ok and port_ok:
            return True
    return False


def open_ports(policy: dict, namespace: str, labels: dict, ports=RAY_PORTS) -> set[int]:
    return {p for p in ports if admits(policy, namespace, labels, p)}


def pod_labels(docs: dict) -> dict[str, dict]:
    rc = docs["RayService"]["spec"]["rayClusterConfig"]
    return {"head": rc["headGroupSpec"]["template"]["metadata"]["labels"],
            **{g["groupName"]: g["template"]["metadata"]["labels"] for g in rc["workerGroupSpecs"]},
            "redis": docs["StatefulSet"]["spec"]["template"]["metadata"]["labels"]}


def test_the_committed_policies_validate_strictly(schemas):
    for folder in (PROD, SMALL):
        policies = [d for d in k8s.build(folder) if d["kind"] == "NetworkPolicy"]
        assert [p["metadata"]["name"] for p in policies] == ["imagine-ray", "imagine-redis"]
        for p in policies:
            assert p["metadata"]["namespace"] == "imagine" and k8s.manifest_errors(p, schemas) == []
    bad = copy.deepcopy(policies[0])
    bad["spec"]["ingress"][1]["form"] = bad["spec"]["ingress"][1].pop("from")
    assert any("'form' was unexpected" in e for e in k8s.manifest_errors(bad, schemas))
    bad = copy.deepcopy(policies[0])
    bad["spec"]["policyTypes"] = "Ingress"
    assert any("'Ingress' is not of type 'array'" in e for e in k8s.manifest_errors(bad, schemas))


def test_policies_select_the_right_pods():
    docs = rendered("production")
    ray, redis, pods = docs["NetworkPolicy/imagine-ray"], docs["NetworkPolicy/imagine-redis"], pod_labels(docs)
    assert ray["spec"]["policyTypes"] == redis["spec"]["policyTypes"] == ["Ingress"]
    selects = lambda policy, labels: policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()  # noqa: E731
    assert selects(ray, pods["head"]) and selects(ray, pods["gpu-l4"]) and not selects(ray, pods["redis"])
    assert selects(redis, pods["redis"]) and not selects(redis, pods["head"]) and not selects(redis, pods["gpu-l4"])
    # the PodMonitor scrapes the same pods the Ray policy guards
    assert docs["PodMonitor"]["spec"]["selector"]["matchLabels"] == ray["spec"]["podSelector"]["matchLabels"]


def test_only_the_serve_port_is_reachable_from_outside():
    docs = rendered("production")
    ray, redis, pods = docs["NetworkPolicy/imagine-ray"], docs["NetworkPolicy/imagine-redis"], pod_labels(docs)
    operator, prometheus = {"app.kubernetes.io/name": "kuberay-operator"}, {"app.kubernetes.io/name": "prometheus"}
    assert open_ports(ray, *OUTSIDER) == {8000}
    assert open_ports(ray, "imagine", {"app": "a-neighbour"}) == {8000}  # other pods of the namespace too
    assert open_ports(ray, "imagine", pods["redis"]) == {8000}
    for group in ("head", "gpu-l4"):  # the RayService's own pods: everything (GCS, client, object transfers...)
        assert open_ports(ray, "imagine", pods[group]) == set(RAY_PORTS)
    assert open_ports(ray, "default", operator) == {8000, 8265}  # KubeRay deploys Serve through the dashboard
    assert open_ports(ray, "other", operator) == open_ports(ray, "default", {"app": "x"}) == {8000}
    assert open_ports(ray, "monitoring", prometheus) == {8000, 8080}  # the PodMonitor's scrapes
    assert open_ports(ray, "monitoring", {"app.kubernetes.io/name": "grafana"}) == {8000}
    assert open_ports(ray, "imagine", prometheus) == {8000}
    # Redis: its port, from the Ray pods only
    assert open_ports(redis, "imagine", pods["head"]) == open_ports(redis, "imagine", pods["gpu-l4"]) == {6379}
    for ns, labels in (OUTSIDER, ("imagine", {"app": "a-neighbour"}), ("default", operator)):
        assert open_ports(redis, ns, labels) == set()


def test_ports_and_peers_follow_the_configs(schemas):
    cfg, cluster = variant("production", {"cluster": {"http_port": 8100, "dashboard_port": 8266}},
                           {"network_policy": {"kuberay_namespace": "ray-system"},
                            "monitoring": {"prometheus_namespace": "observability",
                                           "prometheus_pod_labels": {"prometheus": "main"}}})
    docs = docs_of(k8s.render(cfg, cluster))
    ray = docs["NetworkPolicy/imagine-ray"]
    assert k8s.manifest_errors(ray, schemas) == []
    ports = (8000, 8100, 8265, 8266, 8080)
    assert open_ports(ray, *OUTSIDER, ports) == {8100}
    assert open_ports(ray, "ray-system", {"app.kubernetes.io/name": "kuberay-operator"}, ports) == {8100, 8266}
    assert open_ports(ray, "observability", {"prometheus": "main"}, ports) == {8100, 8080}
    assert open_ports(ray, "monitoring", {"app.kubernetes.io/name": "prometheus"}, ports) == {8100}
    # without monitoring, no PodMonitor and no way in for Prometheus
    docs = docs_of(k8s.render(*variant("production", {"monitoring": {"enabled": False}})))
    assert "PodMonitor" not in docs
    assert open_ports(docs["NetworkPolicy/imagine-ray"], "monitoring", {"app.kubernetes.io/name": "prometheus"}) == {
        8000}


def test_policies_can_be_turned_off_and_follow_the_redis_mode():
    files = k8s.render(*variant("production", {}, {"network_policy": {"enabled": False}}))
    assert "networkpolicy.yaml" not in files and "networkpolicy.yaml" not in files["kustomization.yaml"]
    external = variant("production", {"queue": {"redis_url": "redis://redis.example.internal:6379/0"}},
                       {"redis": {"mode": "external"}})
    docs = docs_of(k8s.render(*external))
    assert [k for k in docs if k.startswith("NetworkPolicy")] == ["NetworkPolicy/imagine-ray"]


@pytest.mark.parametrize("section, value", [("network_policy", {"kuberay_namespace": "Ray_System"}),
                                            ("monitoring", {"prometheus_namespace": "-monitoring"})])
def test_namespaces_must_be_names(section, value):
    with pytest.raises(ValidationError, match="is not a namespace name"):
        variant("production", {}, {section: value})


def test_the_ray_client_port_is_rendered_only_when_asked_for(schemas):
    for folder in (PROD, SMALL):  # KubeRay's head Service takes the head container's ports: no 10001 there
        [rs] = [d for d in k8s.build(folder) if d["kind"] == "RayService"]
        head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert {p["name"]: p["containerPort"] for p in head["ports"]} == {
            "gcs-server": 6379, "dashboard": 8265, "serve": 8000, "metrics": 8080}
    assert "10001" not in (PROD / "rayservice.yaml").read_text()
    docs = docs_of(k8s.render(*variant("production", {}, {"head": {"ray_client": True}})))
    rc = docs["RayService"]["spec"]["rayClusterConfig"]
    head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "client", "containerPort": 10001} in head["ports"]
    assert all(p["name"] != "client" for g in rc["workerGroupSpecs"] for p in g["template"]["spec"]["containers"][0]
               ["ports"])
    k8s.validate_manifests([docs["RayService"]], schemas)
    # enabled, it is still closed to everyone but the RayService's pods (and `kubectl port-forward`)
    assert 10001 not in open_ports(docs["NetworkPolicy/imagine-ray"], *OUTSIDER)


def test_by_kind_keeps_both_policies():
    built = by_kind(k8s.build(PROD))
    assert {"NetworkPolicy/imagine-ray", "NetworkPolicy/imagine-redis", "RayService", "StatefulSet"} <= set(built)
