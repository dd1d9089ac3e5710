"""The command line: `imagine k8s render|validate|fetch-schemas|fetch-weights`, and `python -m cluster.k8s ...`
with the same arguments."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cluster.config import ConfigError, ImagineConfig, StorageConfig
from cluster.k8s.config import K8sConfig
from cluster.k8s.errors import FetchError, ManifestError
from cluster.k8s.manifests import GENERATED, render
from cluster.k8s.overlay import render_overlay
from cluster.k8s.schemas import REPO, UPSTREAM_URL, VENDORED, fetch_schemas
from cluster.k8s.validate import validate_dir
from cluster.k8s.weights import fetch_weights


def _add_subcommands(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="k8s_command", required=True, metavar="K8S_COMMAND")
    r = sub.add_parser("render", help="render the KubeRay RayService and monitoring manifests",
                       description="Render a RayService (serveConfigV2 = the config's Serve config), a PodMonitor "
                                   "and, when monitoring/ has them, the Grafana dashboards ConfigMap and a "
                                   "PrometheusRule, plus a kustomization.yaml.")
    r.add_argument("config", help="the imagine config (e.g. k8s/imagine-prod.yaml)")
    r.add_argument("--k8s", default=None, help="the cluster config (e.g. k8s/cluster.yaml; default: built-in defaults)")
    r.add_argument("--out", type=Path, required=True, help="output folder")
    r.add_argument("--overlay-of", type=Path, default=None,
                   help="write a kustomize overlay of this rendered folder instead of a full set")
    r.add_argument("--monitoring", type=Path, default=REPO / "monitoring",
                   help="folder with dashboards/*.json and alerts.yml (default: the repo's monitoring/)")
    r.add_argument("--validate", action="store_true", help="then validate the result against the schemas")
    v = sub.add_parser("validate", help="validate rendered manifests against the CRDs and Kubernetes schemas")
    v.add_argument("dir", type=Path, help="a folder of rendered manifests or an overlay (with kustomization.yaml)")
    for c in (r, v):
        c.add_argument("--schemas", default=None,
                       help="CRD folder (default: $IMAGINE_K8S_SCHEMAS, else the vendored k8s/schemas/)")
    s = sub.add_parser("fetch-schemas", help="download the pinned KubeRay and prometheus-operator CRDs",
                       description="Download the five CRDs that validation reads (KubeRay v1.7.0, prometheus-operator "
                                   "v0.93.0) from their upstream repositories at the pinned commits, check each "
                                   "sha256 (cluster/k8s/schemas.py, SOURCES) and write them; see "
                                   "k8s/schemas/README.md.")
    s.add_argument("--out", type=Path, default=VENDORED, help="folder to write (default: the repo's k8s/schemas/)")
    s.add_argument("--url-template", default=UPSTREAM_URL,
                   help="download URL with {repo}, {commit}, {path} (default: %(default)s), e.g. for a mirror")
    f = sub.add_parser("fetch-weights", help="download a model folder from S3 (run by the pods' init containers)")
    f.add_argument("uri", help="s3://bucket/prefix/")
    f.add_argument("dest", help="local folder")
    f.add_argument("--endpoint-url", default=None)
    f.add_argument("--region", default="us-east-1")
    f.add_argument("--path-style", action=argparse.BooleanOptionalAction, default=True)
    f.add_argument("--access-key-env", default="IMAGINE_S3_ACCESS_KEY")
    f.add_argument("--secret-key-env", default="IMAGINE_S3_SECRET_KEY")


def add_k8s_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `k8s render|validate|fetch-weights` to the `imagine` command line (run it with `cmd_k8s`)."""
    _add_subcommands(subparsers.add_parser("k8s", help="Kubernetes (KubeRay) manifests from the config",
                                           description="Render and validate KubeRay manifests from the config."))


def cmd_k8s(args: argparse.Namespace) -> int:
    """Run `imagine k8s ...`. A ConfigError propagates (the `imagine` CLI prints it); other failures print here."""
    try:
        if args.k8s_command == "render":
            return _cmd_render(args)
        if args.k8s_command == "validate":
            print(f"{args.dir}: {validate_dir(args.dir, args.schemas)} objects valid")
            return 0
        if args.k8s_command == "fetch-schemas":
            paths = fetch_schemas(args.out, args.url_template)
            print(f"wrote {len(paths)} CRDs (sha256 checked) to {args.out}")
            return 0
        storage = StorageConfig(endpoint_url=args.endpoint_url, region=args.region, path_style=args.path_style,
                                access_key_env=args.access_key_env, secret_key_env=args.secret_key_env,
                                credentials_file=None, local={"enabled": False})
        n = fetch_weights(args.uri, args.dest, storage)
        print(f"fetched {n} files from {args.uri} into {args.dest}")
        return 0
    except (ManifestError, FetchError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _cmd_render(args: argparse.Namespace) -> int:
    cfg, k8s = ImagineConfig.load(args.config), K8sConfig.load(args.k8s)
    sources = (Path(args.config).name, Path(args.k8s).name if args.k8s else "the default cluster config")
    files = render(cfg, k8s, args.monitoring if args.monitoring.is_dir() else None, sources)
    if args.overlay_of is not None:
        files = render_overlay(files, args.overlay_of, args.out, sources)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.yaml"):  # drop files an earlier render wrote that this one does not
        if old.name not in files and old.read_text().startswith(GENERATED):
            old.unlink()
    for name, text in files.items():
        (args.out / name).write_text(text)
    print(f"wrote {', '.join(files)} to {args.out}")
    if args.validate:
        print(f"{args.out}: {validate_dir(args.out, args.schemas)} objects valid")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.k8s", description="KubeRay manifests for imagine.")
    _add_subcommands(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_k8s(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
