"""Kubernetes manifests (cluster/k8s/): rendered from the config, committed, and valid against the real schemas.

Offline: KubeRay v1.7.0 and prometheus-operator v0.93.0 CRDs vendored in k8s/schemas/ (checked against their
pinned sha256; $IMAGINE_K8S_SCHEMAS overrides), built-in kinds with kubernetes-validate, the
Serve config with Ray's ServeDeploySchema, worker groups as Ray's own KubeRay autoscaler reads them.
test_checks.py: configs rejected before rendering; test_redis.py: the queue's Redis and GCS fault tolerance.
"""
import copy
import json
from importlib.metadata import version

import pytest
import yaml

from cluster import k8s
from cluster.config import ImagineConfig, validate_serve_config
from cluster.launcher import Cluster
from tests.k8s.conftest import CONFIGS, K8S, PROD, RENDER, ROOT, SMALL, by_kind, docs_of, load, rendered

# ---- the committed examples ---------------------------------------------------------------------------

def test_committed_examples_are_rendered_from_the_configs(tmp_path):
    out_prod, out_small = tmp_path / "examples" / "production", tmp_path / "overlays" / "small"
    assert k8s.main(["render", str(CONFIGS["production"][0]), "--k8s", str(CONFIGS["production"][1]),
                     "--out", str(out_prod), "--monitoring", str(ROOT / "monitoring")]) == 0
    assert k8s.main(["render", str(CONFIGS["small"][0]), "--k8s", str(CONFIGS["small"][1]), "--overlay-of",
                     str(out_prod), "--out", str(out_small), "--monitoring", str(ROOT / "monitoring")]) == 0
    for fresh, committed in ((out_prod, PROD), (out_small, SMALL)):
        names = sorted(p.name for p in fresh.iterdir())
        assert names == sorted(p.name for p in committed.iterdir()), f"{committed} has other files; re-render: {RENDER}"
        stale = [n for n in names if (fresh / n).read_bytes() != (committed / n).read_bytes()]
        assert not stale, f"{committed}: {stale} differ from a fresh render; re-render (k8s/README.md): {RENDER}"


def test_committed_examples_validate(schemas):
    for folder in (PROD, SMALL):
        docs = k8s.build(folder)
        assert k8s.validate_dir(folder, schemas) == len(docs)
        # + the dashboards ConfigMap and the PrometheusRule once monitoring/ has them
        assert {"RayService", "PodMonitor"} <= {d["kind"] for d in docs}


def test_strict_validation_catches_misspelled_fields(schemas):
    [rs] = [d for d in k8s.build(PROD) if d["kind"] == "RayService"]
    assert k8s.manifest_errors(rs, schemas) == []

    def errors(mutate) -> list[str]:
        doc = copy.deepcopy(rs)
        mutate(doc)
        return k8s.manifest_errors(doc, schemas)

    assert errors(lambda d: d["spec"].__setitem__("serveConfigv2", d["spec"].pop("serveConfigV2"))) == [
        "spec: Additional properties are not allowed ('serveConfigv2' was unexpected)"]
    [e] = errors(lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].__setitem__("maxReplica", 4))
    assert e == ("spec.rayClusterConfig.workerGroupSpecs.0: Additional properties are not allowed "
                 "('maxReplica' was unexpected)")
    [e] = errors(lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
                 .__setitem__("resource", {}))
    assert "'resource' was unexpected" in e
    [e] = errors(lambda d: d["metadata"].__setitem__("lables", {}))  # metadata is checked as ObjectMeta
    assert "'lables' was unexpected" in e
    [e] = errors(lambda d: d["spec"]["rayClusterConfig"].__setitem__("enableInTreeAutoscaling", "yes"))
    assert "'yes' is not of type 'boolean'" in e
    # Serve's own models ignore unknown keys; the validator does not
    serve_typo = errors(lambda d: d["spec"].__setitem__("serveConfigV2", d["spec"]["serveConfigV2"].replace(
        "max_ongoing_requests", "max_ongoing_request", 1)))
    assert serve_typo == ["spec.serveConfigV2: applications.0.deployments.0.max_ongoing_request: unknown key "
                          "(Serve would ignore it)"]
    [pm] = [d for d in k8s.build(PROD) if d["kind"] == "PodMonitor"]
    bad = copy.deepcopy(pm)
    bad["spec"]["podMetricsEndpoints"][0]["prot"] = "metrics"
    assert "'prot' was unexpected" in k8s.manifest_errors(bad, schemas)[0]
    with pytest.raises(k8s.ManifestError, match=r"RayService/imagine: spec: Additional properties"):
        doc = copy.deepcopy(rs)
        doc["spec"]["serveConfigv2"] = doc["spec"].pop("serveConfigV2")
        k8s.validate_manifests([doc], schemas)


@pytest.mark.parametrize("name", ["production", "small"])
def test_serve_config_v2_is_what_the_launcher_deploys(name):
    cfg_path, _ = CONFIGS[name]
    docs = rendered(name) if name == "production" else {d["kind"]: d for d in k8s.build(SMALL)}
    serve = yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])
    assert isinstance(docs["RayService"]["spec"]["serveConfigV2"], str)
    assert serve == ImagineConfig.load(cfg_path).serve_config() == Cluster.load(cfg_path).cfg.serve_config()
    validate_serve_config(serve)  # Ray's ServeDeploySchema


def test_production_shape():
    docs = rendered("production")
    rc = docs["RayService"]["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True and rc["rayVersion"] == version("ray")
    [g] = rc["workerGroupSpecs"]
    assert (g["groupName"], g["replicas"], g["minReplicas"], g["maxReplicas"]) == ("gpu-l4", 1, 1, 4)
    worker = g["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert worker["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # weights: the volume mounted, the S3 folder fetched by an init container into the pod's disk
    mounts = {m["mountPath"]: m for m in worker["containers"][0]["volumeMounts"]}
    assert set(mounts) == {"/models/sd15", "/models/sd15-x4"} and mounts["/models/sd15"]["subPath"] == "sd15"
    [init] = worker["initContainers"]
    assert init["command"][:6] == ["python", "-m", "cluster.k8s", "fetch-weights", "s3://imagine-models/sd15-x4/",
                                   "/models/sd15-x4"]
    assert {v["name"]: list(v)[1] for v in worker["volumes"]} == {"models-0": "persistentVolumeClaim",
                                                                 "models-1": "emptyDir"}
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and "volumes" not in head["template"]["spec"]  # no replicas there
    for spec in (head["template"]["spec"], worker):
        ports = {p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]}
        assert ports["metrics"] == 8080 and ports["serve"] == 8000
    pm = docs["PodMonitor"]["spec"]
    assert pm["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pm["selector"]["matchLabels"].items() <= head["template"]["metadata"]["labels"].items()
    assert pm["selector"]["matchLabels"].items() <= g["template"]["metadata"]["labels"].items()


def test_ray_autoscaler_reads_the_groups_as_configured():
    """Ray's KubeRay autoscaler, on our groups: the node shapes it plans GPU nodes with."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec
    cfg, cluster = load("production")
    data = cluster.model_dump()
    data["worker_groups"][0]["resources"] = {"accelerator_l4": 2}
    cfg = ImagineConfig.from_dict({**cfg.model_dump(), "stages": {
        **cfg.model_dump()["stages"], "diffuser": {**cfg.stages.diffuser.model_dump(),
                                                   "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.75,
                                                                         "resources": {"accelerator_l4": 1}}}}})
    rc = docs_of(k8s.render(cfg, k8s.K8sConfig.model_validate(data)))["RayService"]["spec"]["rayClusterConfig"]
    assert _get_ray_resources_from_group_spec(rc["workerGroupSpecs"][0], False) == {
        "CPU": 8, "GPU": 1, "memory": 32 * 2**30, "accelerator_l4": 2}
    assert _get_ray_resources_from_group_spec(rc["headGroupSpec"], True) == {"CPU": 0, "GPU": 0, "memory": 16 * 2**30}


# ---- the small overlay ------------------------------------------------------------------------------

def test_overlay_patches_the_production_set_into_the_small_one(schemas):
    kust = yaml.safe_load((SMALL / "kustomization.yaml").read_text())
    assert kust["resources"] == ["../../examples/production"]
    base = {(d["apiVersion"], d["kind"], d["metadata"]["name"]): d for d in k8s.build(PROD)}
    for patch in kust["patches"]:
        t = patch["target"]
        assert (f"{t['group']}/{t['version']}", t["kind"], t["name"]) in base, f"patch target {t} not in the base"
        ops = yaml.safe_load((SMALL / patch["path"]).read_text())
        assert ops and all(op["op"] in ("add", "replace", "remove") for op in ops)
    built = by_kind(k8s.build(SMALL))
    assert built == rendered("small", ROOT / "monitoring")  # patched production == small rendered directly
    k8s.validate_manifests(list(built.values()), schemas)
    rc = built["RayService"]["spec"]["rayClusterConfig"]
    [g] = rc["workerGroupSpecs"]
    assert (g["replicas"], g["minReplicas"], g["maxReplicas"]) == (1, 1, 1)
    assert g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    serve = yaml.safe_load(built["RayService"]["spec"]["serveConfigV2"])
    deps = {d["name"]: d for d in serve["applications"][0]["deployments"]}
    assert deps["Diffuser"]["autoscaling_config"]["min_replicas"] == 0
    assert sorted(deps[n]["ray_actor_options"]["num_gpus"] for n in ("TextEncoder", "Diffuser", "Upscaler")) == [
        0.25, 0.25, 0.5]
    # the head now hosts the ingress, which reads the diffuser's model folder, and nothing that needs sd15-x4
    head = rc["headGroupSpec"]["template"]["spec"]
    assert [m["mountPath"] for m in head["containers"][0]["volumeMounts"]] == ["/models/sd15"]
    assert "initContainers" not in head


def test_overlay_patch_targets_and_paths_must_exist(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "cm.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"x": "1"}}))
    (tmp_path / "base" / "kustomization.yaml").write_text(yaml.safe_dump({"resources": ["cm.yaml"]}))
    over = tmp_path / "over"
    over.mkdir()

    def build(target: dict, ops: list) -> list:
        (over / "p.yaml").write_text(yaml.safe_dump(ops))
        (over / "kustomization.yaml").write_text(yaml.safe_dump(
            {"resources": ["../base"], "patches": [{"path": "p.yaml", "target": target}]}))
        return k8s.build(over)

    good = {"group": "", "version": "v1", "kind": "ConfigMap", "name": "a"}
    assert build(good, [{"op": "replace", "path": "/data/x", "value": "2"}])[0]["data"] == {"x": "2"}
    with pytest.raises(k8s.ManifestError, match="matches 0 objects"):
        build({**good, "name": "b"}, [])
    with pytest.raises(k8s.ManifestError, match="replace /data/y: no such path"):
        build(good, [{"op": "replace", "path": "/data/y", "value": "2"}])


def test_json_patch_round_trips_and_escapes_slashes():
    old = {"limits": {"nvidia.com/gpu": "4", "a~b": 1, "gone": 1}, "l": [1, 2], "s": "x"}
    new = {"limits": {"nvidia.com/gpu": "1", "a~b": 2, "new": True}, "l": [1, 2, 3], "s": "x"}
    ops = k8s.json_patch(old, new)
    assert {"op": "replace", "path": "/limits/nvidia.com~1gpu", "value": "1"} in ops
    assert {"op": "replace", "path": "/limits/a~0b", "value": 2} in ops
    assert k8s.apply_json_patch(old, ops) == new
    assert k8s.json_patch({"n": 1}, {"n": 1.0}) == [{"op": "replace", "path": "/n", "value": 1.0}]


# ---- secrets, monitoring, schemas, image ----------------------------------------------------------------

def test_secrets_are_referenced_never_inlined(tmp_path, monkeypatch):
    sentinels = {"IMAGINE_S3_ACCESS_KEY": "AKIA-SENTINEL-7f3a", "IMAGINE_S3_SECRET_KEY": "secret-SENTINEL-91c2",
                 "IMAGINE_API_KEYS": "imk_SENTINEL_55e0", "IMAGINE_REDIS_PASSWORD": "redis-SENTINEL-c0de",
                 "REDISCLI_AUTH": "redis-SENTINEL-c0de"}
    for k, v in sentinels.items():
        monkeypatch.setenv(k, v)
    for name, (cfg_path, k8s_path) in CONFIGS.items():
        out = tmp_path / name
        assert k8s.main(["render", str(cfg_path), "--k8s", str(k8s_path), "--out", str(out)]) == 0
        text = "".join(p.read_text() for p in out.iterdir())
        assert not [v for v in sentinels.values() if v in text]
        assert "kind: Secret" not in text
    rc = rendered("production")["RayService"]["spec"]["rayClusterConfig"]
    pods = [rc["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["workerGroupSpecs"]]
    containers = [c for p in pods for c in p["containers"] + p.get("initContainers", [])]
    assert len(containers) == 3
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert all("value" not in e for e in env.values())
        for var, key in (("IMAGINE_S3_ACCESS_KEY", "access-key"), ("IMAGINE_S3_SECRET_KEY", "secret-key")):
            assert env[var]["valueFrom"] == {"secretKeyRef": {"name": "imagine-s3", "key": key}}
    for c in [c for p in pods for c in p["containers"]]:  # the Ray containers: replicas and the Serve controller
        env = {e["name"]: e for e in c["env"]}
        assert env["IMAGINE_REDIS_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": "imagine-redis",
                                                                               "key": "password"}}


def test_dashboards_and_alert_rules_render_when_monitoring_has_them(tmp_path, schemas):
    (tmp_path / "dashboards").mkdir()
    dash = json.dumps({"title": "imagine", "panels": [{"type": "timeseries", "targets": [
        {"expr": "sum(rate(imagine_requests_total[5m]))"}]}]}, indent=2)
    (tmp_path / "dashboards" / "imagine.json").write_text(dash)
    rules = {"groups": [{"name": "imagine", "rules": [{"alert": "ImagineDown", "expr": "up == 0", "for": "5m",
                                                       "labels": {"severity": "page"},
                                                       "annotations": {"summary": "a Ray node is down"}}]}]}
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    cfg, cluster = load("production")
    files = k8s.render(cfg, cluster, tmp_path)
    assert yaml.safe_load(files["kustomization.yaml"])["resources"] == [
        "rayservice.yaml", "redis.yaml", "networkpolicy.yaml", "podmonitor.yaml", "grafana-dashboards.yaml",
        "prometheusrule.yaml"]
    docs = docs_of(files)
    k8s.validate_manifests(list(docs.values()), schemas)  # ConfigMap by kubernetes-validate, rule by its CRD
    cm = docs["ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and cm["data"] == {"imagine.json": dash}
    assert docs["PrometheusRule"]["spec"] == rules
    assert docs["PrometheusRule"]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    bad = copy.deepcopy(docs["PrometheusRule"])
    bad["spec"]["groups"][0]["rules"][0]["exp"] = bad["spec"]["groups"][0]["rules"][0].pop("expr")
    assert any("'expr' is a required property" in e for e in k8s.manifest_errors(bad, schemas))
    bad_cm = copy.deepcopy(cm)
    bad_cm["dat"] = bad_cm.pop("data")
    assert any("'dat' was unexpected" in e for e in k8s.manifest_errors(bad_cm, schemas))
    assert "ConfigMap" not in rendered("production")  # without monitoring files: neither


def test_missing_schema_folder_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IMAGINE_K8S_SCHEMAS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"CRD schemas not found in {tmp_path}.*fetch-schemas"):
        k8s.schemas_dir()
    assert k8s.main(["validate", str(PROD)]) == 2
    assert "ray.io_rayservices.yaml" in capsys.readouterr().err


def test_vendored_schemas_are_the_pinned_upstream_files(monkeypatch):
    monkeypatch.delenv("IMAGINE_K8S_SCHEMAS", raising=False)
    assert k8s.schemas_dir() == K8S / "schemas"
    assert set(k8s.CRD_FILES.values()) == set(k8s.SOURCES)
    for name, src in k8s.SOURCES.items():
        assert k8s.schemas.sha256((K8S / "schemas" / name).read_bytes()) == src.sha256, name
        assert src.commit in (K8S / "schemas" / "README.md").read_text() and src.sha256 in (
            K8S / "schemas" / "README.md").read_text()  # the NOTICE table names what is vendored


@pytest.fixture
def mirror(tmp_path):
    """A real HTTP server on loopback laid out like raw.githubusercontent.com: <repo>/<commit>/<path>."""
    import functools
    import http.server
    import shutil
    import threading
    root = tmp_path / "mirror"
    for name, src in k8s.SOURCES.items():
        dest = root / src.repo / src.commit / src.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(K8S / "schemas" / name, dest)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/{{repo}}/{{commit}}/{{path}}"
    server.shutdown()


def test_fetch_schemas_downloads_checks_and_writes(mirror, tmp_path, monkeypatch, capsys):
    root, template = mirror
    out = tmp_path / "fetched"
    assert k8s.main(["fetch-schemas", "--out", str(out), "--url-template", template]) == 0
    assert "wrote 5 CRDs" in capsys.readouterr().out
    for name in k8s.SOURCES:
        assert (out / name).read_bytes() == (K8S / "schemas" / name).read_bytes()
    monkeypatch.setenv("IMAGINE_K8S_SCHEMAS", str(out))  # the override validates with the fetched copy
    assert k8s.main(["validate", str(PROD)]) == 0
    # a file that is not the pinned one: refused, and nothing is written
    src = k8s.SOURCES["ray.io_rayservices.yaml"]
    (root / src.repo / src.commit / src.path).write_bytes(b"tampered")
    out2 = tmp_path / "fetched2"
    assert k8s.main(["fetch-schemas", "--out", str(out2), "--url-template", template]) == 2
    err = capsys.readouterr().err
    assert "ray.io_rayservices.yaml" in err and src.sha256 in err and not out2.exists()
    (root / src.repo / src.commit / src.path).unlink()  # and a missing file: the HTTP status
    assert k8s.main(["fetch-schemas", "--out", str(out2), "--url-template", template]) == 2
    assert "HTTP 404" in capsys.readouterr().err


def test_dockerfile_and_cluster_config_use_the_installed_ray():
    ray_version = version("ray")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray_version}\n" in dockerfile
    assert "ARG RAY_IMAGE=rayproject/ray:${RAY_VERSION}-py311-gpu\n" in dockerfile
    assert "FROM ${RAY_IMAGE}\n" in dockerfile
    for name in CONFIGS:
        assert load(name)[1].ray_version == ray_version


def test_fetch_weights_downloads_one_model_folder(tmp_path, make_storage, s3_server, monkeypatch):
    store = make_storage()
    store.ensure_bucket()
    files = {"sd15-x4/pipeline.json": b'{"name": "x"}', "sd15-x4/upscaler/RealESRGAN_x4plus.pth": b"\x00" * 3000,
             "sd15-x4-old/pipeline.json": b"other model", "elsewhere.txt": b"no"}
    for key, data in files.items():
        store.put_bytes(key, data)
    monkeypatch.setenv("T_AK", s3_server.access_key)
    monkeypatch.setenv("T_SK", s3_server.secret_key)
    args = ["--endpoint-url", s3_server.endpoint_url, "--path-style", "--access-key-env", "T_AK",
            "--secret-key-env", "T_SK"]
    dest = tmp_path / "models" / "sd15-x4"
    assert k8s.main(["fetch-weights", f"s3://{store.bucket}/sd15-x4", str(dest), *args]) == 0
    got = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == {"pipeline.json": files["sd15-x4/pipeline.json"],
                   "upscaler/RealESRGAN_x4plus.pth": files["sd15-x4/upscaler/RealESRGAN_x4plus.pth"]}
    with pytest.raises(k8s.FetchError, match=f"no objects under s3://{store.bucket}/nothing/"):
        k8s.fetch_weights(f"s3://{store.bucket}/nothing/", tmp_path / "x", _storage(s3_server))
    with pytest.raises(k8s.FetchError, match="has no pipeline.json at its top"):
        k8s.fetch_weights(f"s3://{store.bucket}/sd15-x4/upscaler", tmp_path / "y", _storage(s3_server))
    monkeypatch.setenv("T_SK", "wrong")
    with pytest.raises(k8s.FetchError, match=f"fetching s3://{store.bucket}/sd15-x4 from {s3_server.endpoint_url} "
                                             "failed: .*SignatureDoesNotMatch"):
        k8s.fetch_weights(f"s3://{store.bucket}/sd15-x4", tmp_path / "z", _storage(s3_server))


def _storage(s3_server):
    from cluster.config import StorageConfig
    return StorageConfig(endpoint_url=s3_server.endpoint_url, access_key_env="T_AK", secret_key_env="T_SK",
                         credentials_file=None)


def test_imagine_cli_wiring(tmp_path):
    """What cluster/cli.py adds: `add_k8s_commands(sub)` and `"k8s": cmd_k8s` in its command table."""
    import argparse
    parser = argparse.ArgumentParser(prog="imagine")
    k8s.add_k8s_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["k8s", "render", str(CONFIGS["production"][0]), "--k8s", str(CONFIGS["production"][1]),
                              "--out", str(tmp_path)])
    assert args.command == "k8s" and k8s.cmd_k8s(args) == 0
    assert (tmp_path / "rayservice.yaml").read_bytes() == (PROD / "rayservice.yaml").read_bytes()


def test_import_pulls_in_no_ray_or_torch():
    import subprocess
    import sys
    heavy = ("ray", "torch", "boto3", "jsonschema", "kubernetes_validate")
    code = f"import sys, cluster.k8s; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
