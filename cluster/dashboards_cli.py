"""`imagine dashboards export`: the committed Grafana dashboards (monitoring/dashboards/*.json), ready to import.

The JSON is generated from code by `python -m monitoring.dashboards` (grafana-foundation-sdk); this command only
copies the committed files, so it needs neither the SDK nor a regeneration.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS_DIR = REPO / "monitoring" / "dashboards"

IMPORT_HELP = (
    "Import each file in Grafana with Dashboards > New > Import (upload the JSON, then pick your Prometheus "
    "data source in the dashboard's `datasource` variable), or on Kubernetes let Grafana's dashboard sidecar load "
    "them: `imagine k8s render` puts monitoring/dashboards/*.json in a ConfigMap labelled grafana_dashboard=1.")


class DashboardsError(Exception):
    pass


def export(out: Path, source: Path = DASHBOARDS_DIR) -> list[Path]:
    """Copy every `*.json` dashboard of `source` into `out` (created); return the written paths."""
    files = sorted(source.glob("*.json"))
    if not files:
        raise DashboardsError(f"no dashboards (*.json) in {source}; generate them with "
                              "`python -m monitoring.dashboards --out monitoring/dashboards`")
    texts = {}
    for f in files:
        text = f.read_text()
        try:
            uid = json.loads(text).get("uid")
        except json.JSONDecodeError as e:
            raise DashboardsError(f"{f} is not valid JSON ({e}); regenerate it") from e
        if not uid:
            raise DashboardsError(f"{f} has no uid; is it a Grafana dashboard?")
        texts[f.name] = text
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in texts.items():
        (out / name).write_text(text)
        written.append(out / name)
    return written


def add_dashboard_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `dashboards export` to the `imagine` command line (run it with `cmd_dashboards`)."""
    p = subparsers.add_parser("dashboards", help="Grafana dashboards for the metrics (export for import)",
                              description="imagine's Grafana dashboards (overview, stages, storage), generated "
                                          "from monitoring/dashboards.py and committed as JSON.")
    sub = p.add_subparsers(dest="dashboards_command", required=True, metavar="DASHBOARDS_COMMAND")
    e = sub.add_parser("export", help="write the dashboards' JSON files into a folder, for Grafana to import",
                       description="Write overview.json, stages.json and storage.json (the committed "
                                   "monitoring/dashboards/*.json) into --out. " + IMPORT_HELP)
    e.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    e.add_argument("--from", dest="source", type=Path, default=DASHBOARDS_DIR,
                   help="folder of dashboard JSON to export (default: the repo's monitoring/dashboards/)")


def cmd_dashboards(args: argparse.Namespace) -> int:
    """Run `imagine dashboards export`."""
    try:
        paths = export(args.out, args.source)
    except (DashboardsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(p.name for p in paths)} to {args.out.resolve()}")
    print(IMPORT_HELP)
    return 0
