"""Shared by tests/k8s: the example configs, their rendered objects, the vendored CRD folder."""
from pathlib import Path

import pytest
import yaml

from cluster import k8s
from cluster.config import ImagineConfig

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
PROD, SMALL = K8S / "examples" / "production", K8S / "overlays" / "small"
CONFIGS = {"production": (K8S / "imagine-prod.yaml", K8S / "cluster.yaml"),
           "small": (K8S / "imagine-small.yaml", K8S / "cluster-small.yaml")}
RENDER = "imagine k8s render k8s/imagine-prod.yaml --k8s k8s/cluster.yaml --out k8s/examples/production"


@pytest.fixture(scope="session")
def schemas() -> Path:
    return k8s.schemas_dir()  # the vendored k8s/schemas/ unless IMAGINE_K8S_SCHEMAS says otherwise


def load(name: str) -> tuple[ImagineConfig, k8s.K8sConfig]:
    cfg_path, k8s_path = CONFIGS[name]
    return ImagineConfig.load(cfg_path), k8s.K8sConfig.load(k8s_path)


def by_kind(docs: list[dict]) -> dict[str, dict]:
    """{kind: object}: each kind appears once in our sets, but for the NetworkPolicies ("NetworkPolicy/<name>")."""
    return {f"{d['kind']}/{d['metadata']['name']}" if d["kind"] == "NetworkPolicy" else d["kind"]: d for d in docs}


def docs_of(files: dict[str, str]) -> dict[str, dict]:
    """{kind: object} of rendered files (by_kind)."""
    return by_kind([d for name, text in files.items() if name != "kustomization.yaml"
                    for d in yaml.safe_load_all(text)])


def rendered(name: str, monitoring: Path | None = None) -> dict[str, dict]:
    cfg, cluster = load(name)
    return docs_of(k8s.render(cfg, cluster, monitoring))


def variant(name: str = "production", cfg: dict | None = None, cluster: dict | None = None):
    """The example configs with parts replaced (dicts are merged one level into each section)."""
    c, kc = load(name)
    cd, kd = c.model_dump(), kc.model_dump()
    for base, upd in ((cd, cfg or {}), (kd, cluster or {})):
        for key, value in upd.items():
            base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return ImagineConfig.from_dict(cd), k8s.K8sConfig.model_validate(kd)
