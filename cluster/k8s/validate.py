"""Offline, strict validation of rendered manifests.

Validation (`validate_manifests`) follows k8s/schemas/README.md: custom resources against the CRDs'
`openAPIV3Schema` (KubeRay v1.7.0, prometheus-operator v0.93.0) with jsonschema's Draft 4 in strict mode
(`additionalProperties: false` wherever the schema lists properties), built-in kinds, the pod templates and
every `metadata` with `kubernetes-validate --strict`, and `serveConfigV2` with Serve's `ServeDeploySchema`.
The CRDs are the vendored copies in `k8s/schemas/` (`IMAGINE_K8S_SCHEMAS` or `--schemas` point elsewhere).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from cluster.config import ConfigError, validate_serve_config
from cluster.k8s.errors import ManifestError
from cluster.k8s.overlay import build
from cluster.k8s.schemas import schemas_dir

KUBERNETES_VERSION = "1.33"  # built-in kinds are validated against this release's schemas
CRD_FILES = {("ray.io/v1", "RayService"): "ray.io_rayservices.yaml",  # each a file of SOURCES
             ("ray.io/v1", "RayCluster"): "ray.io_rayclusters.yaml",
             ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
             ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
             ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml"}
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml reads the 1 MB CRDs ~10x faster


@lru_cache(maxsize=None)
def crd_schema(directory: Path, api_version: str, kind: str) -> dict:
    """The CRD's openAPIV3Schema for `api_version`, made strict and Draft-4-ready (see k8s/schemas/README.md)."""
    crd = yaml.load((directory / CRD_FILES[api_version, kind]).read_text(), Loader=_Loader)
    version = api_version.rpartition("/")[2]
    assert crd["spec"]["names"]["kind"] == kind, f"{CRD_FILES[api_version, kind]}: {crd['spec']['names']['kind']}"
    [v] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return _strict(v["schema"]["openAPIV3Schema"])


def _strict(s: dict) -> dict:
    """nullable -> type [T, null]; required-with-default -> optional; no properties beyond those listed."""
    out = {k: v for k, v in s.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if "properties" in s:
        out["properties"] = {k: _strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        required = [r for r in s.get("required", []) if "default" not in s["properties"].get(r, {})]
        out.pop("required", None)
        if required:
            out["required"] = required
    for k in ("items", "additionalProperties", "not"):
        if isinstance(s.get(k), dict):
            out[k] = _strict(s[k])
    for k in ("anyOf", "allOf", "oneOf"):
        if k in s:
            out[k] = [_strict(x) for x in s[k]]
    if s.get("nullable") and "type" in s:
        out["type"] = [s["type"], "null"]
    return out


def _drop_nulls(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_nulls(v) for k, v in d.items() if v is not None}
    return [_drop_nulls(x) for x in d] if isinstance(d, list) else d


def validate_manifests(docs: list[dict], schemas: Path | None = None, where: str = "") -> None:
    """Check each object against the real schemas, strictly (an unknown field is an error).

    Raises:
        ManifestError: listing every error as `<where> <Kind>/<name>: <path>: <message>`.
    """
    errors = []
    for doc in docs:
        name = f"{where}{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        errors += [f"{name}: {e}" for e in manifest_errors(doc, schemas)]
    if errors:
        raise ManifestError("invalid manifests:\n" + "\n".join(f"  {e}" for e in errors))


def manifest_errors(doc: dict, schemas: Path | None = None) -> list[str]:
    import jsonschema
    doc = _drop_nulls(doc)
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in CRD_FILES:
        return _builtin_errors(doc, "")
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
              for e in jsonschema.Draft4Validator(crd_schema(schemas_dir(schemas), *key)).iter_errors(doc)]
    # the CRDs leave metadata open: check it as ObjectMeta
    errors += _builtin_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})}, "")
    if doc["kind"] == "RayService" and not errors:
        errors += _rayservice_errors(doc)
    return errors


def _builtin_errors(doc: dict, prefix: str) -> list[str]:
    import kubernetes_validate
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{prefix}{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{prefix}no schema for {e.kind} {e.api_version} in Kubernetes {e.version} (nor a CRD here)"]
    return []


def _rayservice_errors(doc: dict) -> list[str]:
    """The pod templates as core/v1 Pods, and serveConfigV2 through Serve's own ServeDeploySchema."""
    cluster = doc["spec"]["rayClusterConfig"]
    groups = [("spec.rayClusterConfig.headGroupSpec", cluster["headGroupSpec"])]
    groups += [(f"spec.rayClusterConfig.workerGroupSpecs.{i}", g)
               for i, g in enumerate(cluster.get("workerGroupSpecs", []))]
    errors = []
    for where, g in groups:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": g["template"].get("metadata", {}),
               "spec": g["template"].get("spec", {})}
        errors += _builtin_errors(pod, f"{where}.template (as a Pod) ")
    if "serveConfigV2" in doc["spec"]:
        try:
            serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
            validate_serve_config(serve)
            errors += [f"spec.serveConfigV2: {k}: unknown key (Serve would ignore it)"
                       for k in _serve_unknown_keys(serve)]
        except (ConfigError, yaml.YAMLError) as e:
            errors.append(f"spec.serveConfigV2: {e}")
    return errors


def _serve_unknown_keys(d: dict) -> list[str]:
    """Keys that Serve's schema models would silently drop (they allow extra fields): the strict part."""
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema  # imported by now

    def names(model: type[BaseModel]) -> set[str]:
        return set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    out = [k for k in d if k not in names(ServeDeploySchema)]
    for i, app in enumerate(d.get("applications") or []):
        out += [f"applications.{i}.{k}" for k in app if k not in names(ServeApplicationSchema)]
        for j, dep in enumerate(app.get("deployments") or []):
            out += [f"applications.{i}.deployments.{j}.{k}" for k in dep if k not in names(DeploymentSchema)]
    return out


def validate_dir(directory: str | Path, schemas: Path | None = None) -> int:
    """Build a rendered folder (or overlay) and validate every object; returns how many passed."""
    docs = build(directory)
    validate_manifests(docs, schemas, where=f"{directory}: ")
    return len(docs)
