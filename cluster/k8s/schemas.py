"""The CRD schemas that validation reads: where they come from, and `imagine k8s fetch-schemas`.

The five CRDs are vendored in `k8s/schemas/` (KubeRay v1.7.0, prometheus-operator v0.93.0; Apache-2.0, see
`k8s/schemas/README.md`). `SOURCES` pins each file to its upstream repository, commit and sha256, so a
refresh is reproducible and the vendored copies are checked byte for byte by the tests.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cluster.k8s.errors import FetchError

REPO = Path(__file__).resolve().parents[2]
VENDORED = REPO / "k8s" / "schemas"
UPSTREAM_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"

KUBERAY, KUBERAY_COMMIT = "ray-project/kuberay", "59d663aeec13760646da3db9c1cf8cfe883e30b7"  # tag v1.7.0
PROM_OP = "prometheus-operator/prometheus-operator"
PROM_OP_COMMIT = "f8fafd475f3d132e239432ae6172de60a6cb6516"  # tag v0.93.0


@dataclass(frozen=True)
class Source:
    """Where one vendored CRD file comes from."""
    repo: str
    tag: str
    commit: str
    path: str
    sha256: str

    def url(self, template: str = UPSTREAM_URL) -> str:
        return template.format(repo=self.repo, commit=self.commit, path=self.path, tag=self.tag)


SOURCES: dict[str, Source] = {
    "ray.io_rayservices.yaml": Source(
        KUBERAY, "v1.7.0", KUBERAY_COMMIT, "helm-chart/kuberay-operator/crds/ray.io_rayservices.yaml",
        "0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab"),
    "ray.io_rayclusters.yaml": Source(
        KUBERAY, "v1.7.0", KUBERAY_COMMIT, "helm-chart/kuberay-operator/crds/ray.io_rayclusters.yaml",
        "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1"),
    "monitoring.coreos.com_podmonitors.yaml": Source(
        PROM_OP, "v0.93.0", PROM_OP_COMMIT, "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml",
        "45a93443daa687d3654f7e9631909ff7edcdf3ec09c5e60251b74aa2722aee5d"),
    "monitoring.coreos.com_servicemonitors.yaml": Source(
        PROM_OP, "v0.93.0", PROM_OP_COMMIT,
        "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
        "a99047972c9dd7679ce2050b9968e8a08773492e671b3e17abd476d42aa78a32"),
    "monitoring.coreos.com_prometheusrules.yaml": Source(
        PROM_OP, "v0.93.0", PROM_OP_COMMIT,
        "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml",
        "78be98554b9c8506ab2b4f4feb91c5f3a56e536a0a510f3a8e876a459970d56d"),
}


def schemas_dir(path: str | Path | None = None) -> Path:
    """The CRD folder: `path`, else $IMAGINE_K8S_SCHEMAS, else the vendored `k8s/schemas/`.

    Raises:
        FileNotFoundError: the folder lacks the CRDs, saying where it looked and how to refresh it.
    """
    d = Path(path or os.environ.get("IMAGINE_K8S_SCHEMAS") or VENDORED)
    missing = [f for f in SOURCES if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"CRD schemas not found in {d} (missing {', '.join(missing)}); run "
                                f"`imagine k8s fetch-schemas --out {d}`, or set IMAGINE_K8S_SCHEMAS to the folder "
                                "holding the KubeRay v1.7.0 and prometheus-operator v0.93.0 CRDs")
    return d


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_schemas(out: str | Path = VENDORED, url_template: str = UPSTREAM_URL, timeout_s: float = 60) -> list[Path]:
    """Download every file of `SOURCES` into `out`, checking each sha256 before anything is written.

    Raises:
        FetchError: a download failed or a file's sha256 is not the pinned one (nothing is written then).
    """
    import requests
    fetched: dict[str, bytes] = {}
    for name, src in SOURCES.items():
        url = src.url(url_template)
        try:
            r = requests.get(url, timeout=timeout_s)
        except requests.RequestException as e:
            raise FetchError(f"{name}: cannot download {url}: {e}") from None
        if r.status_code != 200:
            raise FetchError(f"{name}: {url} answered HTTP {r.status_code}")
        if (got := sha256(r.content)) != src.sha256:
            raise FetchError(f"{name}: {url} has sha256 {got}, not the pinned {src.sha256} ({src.repo} {src.tag}); "
                             "update SOURCES in cluster/k8s/schemas.py only for a deliberate upgrade")
        fetched[name] = r.content
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in fetched.items():
        (out / name).write_bytes(data)
    return [out / name for name in fetched]
