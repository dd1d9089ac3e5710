"""The kustomize overlay: JSON 6902 patches from one rendered set to another, and `build` (as `kubectl apply -k`)."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from cluster.config import ConfigError
from cluster.k8s.errors import ManifestError
from cluster.k8s.manifests import GENERATED, dump_yaml


def json_patch(old: Any, new: Any, path: str = "") -> list[dict]:
    """RFC 6902 operations that turn `old` into `new` (lists of another length are replaced whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        ops = []
        for k in old:
            p = f"{path}/{_pointer(k)}"
            ops += [{"op": "remove", "path": p}] if k not in new else json_patch(old[k], new[k], p)
        return ops + [{"op": "add", "path": f"{path}/{_pointer(k)}", "value": new[k]} for k in new if k not in old]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [op for i, (a, b) in enumerate(zip(old, new)) for op in json_patch(a, b, f"{path}/{i}")]
    same = old == new and type(old) is type(new)
    return [] if same else [{"op": "replace", "path": path, "value": new}]


def _pointer(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")  # RFC 6901: nvidia.com/gpu -> nvidia.com~1gpu


def apply_json_patch(doc: Any, ops: list[dict]) -> Any:
    """`doc` with RFC 6902 add/replace/remove operations applied (a copy).

    Raises:
        ManifestError: an operation's path does not exist in `doc`.
    """
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        try:
            node = doc
            for p in parents:
                node = node[int(p)] if isinstance(node, list) else node[p]
            if isinstance(node, list):
                last = len(node) if last == "-" else int(last)
            if op["op"] == "add" and isinstance(node, list):
                node.insert(last, op["value"])
            elif op["op"] in ("add", "replace"):
                if op["op"] == "replace":
                    node[last]  # must exist
                node[last] = op["value"]
            elif op["op"] == "remove":
                del node[last]
            else:
                raise ManifestError(f"unsupported patch op {op['op']!r} at {op['path']}")
        except (KeyError, IndexError, ValueError, TypeError):
            raise ManifestError(f"patch {op['op']} {op['path']}: no such path in the base") from None
    return doc


def build(directory: str | Path) -> list[dict]:
    """The objects of a kustomization folder, as `kubectl apply -k` builds the ones we render: its `resources`
    (files or folders), then its `patches` (JSON 6902 files, each with a group/version/kind/name target).

    Raises:
        ManifestError: a field we do not render, a missing file, or a patch whose target or path is not in the base.
    """
    directory = Path(directory)
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    extra = set(k) - {"apiVersion", "kind", "resources", "patches"}
    if extra:
        raise ManifestError(f"{directory}/kustomization.yaml: {sorted(extra)} are beyond what `imagine k8s` renders")
    docs = []
    for r in k.get("resources", []):
        p = directory / r
        docs += build(p) if p.is_dir() else [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
    for patch in k.get("patches", []):
        t = patch["target"]
        api = f"{t['group']}/{t['version']}" if t.get("group") else t["version"]
        hits = [i for i, d in enumerate(docs)
                if (d["apiVersion"], d["kind"], d["metadata"]["name"]) == (api, t["kind"], t["name"])]
        if len(hits) != 1:
            raise ManifestError(f"{directory}: patch {patch['path']} targets {t}, which matches {len(hits)} objects")
        docs[hits[0]] = apply_json_patch(docs[hits[0]], yaml.safe_load((directory / patch["path"]).read_text()))
    return docs


def render_overlay(files: dict[str, str], base_dir: Path, out_dir: Path,
                   sources: tuple[str, ...] = ("imagine.yaml", "cluster.yaml")) -> dict[str, str]:
    """A kustomize overlay of the rendered set in `base_dir` that turns it into `files` (JSON 6902 patches)."""
    base = {(d["kind"], d["metadata"]["name"]): d for d in build(base_dir)}
    new = {(d["kind"], d["metadata"]["name"]): d for name, text in files.items() if name != "kustomization.yaml"
           for d in yaml.safe_load_all(text) if d is not None}
    if set(base) != set(new):
        raise ConfigError(f"the overlay must render the same objects as its base {base_dir}: base has "
                          f"{sorted(base)}, overlay has {sorted(new)} (keep `name` and monitoring files alike)")
    header = f"{GENERATED} from {' and '.join(sources)} as an overlay of {base_dir.name}; do not edit by hand.\n"
    out, patches = {}, []
    for kind, name in sorted(base):
        ops = json_patch(base[kind, name], new[kind, name])
        if ops:
            fname = f"patch-{kind.lower()}-{name}.yaml"
            out[fname] = header + dump_yaml(ops)
            group, _, version = base[kind, name]["apiVersion"].rpartition("/")
            patches.append({"path": fname, "target": {"group": group, "version": version, "kind": kind, "name": name}})
    rel = os.path.relpath(Path(base_dir).resolve(), Path(out_dir).resolve())
    out["kustomization.yaml"] = header + dump_yaml({"apiVersion": "kustomize.config.k8s.io/v1beta1",
                                                    "kind": "Kustomization", "resources": [rel], "patches": patches})
    return out
