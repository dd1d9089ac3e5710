"""The Grafana dashboards for imagine, built in code with grafana-foundation-sdk.

    python -m monitoring.dashboards --out monitoring/dashboards   # regenerate the committed JSON

Three dashboards, each importable as it is (Grafana: Dashboards > New > Import, or the k8s ConfigMap that
`imagine k8s render` makes of `monitoring/dashboards/*.json` for Grafana's dashboard sidecar):

- `overview` (uid imagine-overview): HTTP traffic, images, job latency, the job queue (depth by priority, oldest
  waiting job, queue wait, jobs by state, redelivered and dead jobs), errors.
- `stages` (uid imagine-stages): per-stage latency, batching, queues, replicas, denoising, memory, load time,
  and a row per deployment (repeated over `$deployment`) broken down by replica.
- `storage` (uid imagine-storage): S3 writes, bytes, write latency, images published, Publisher errors.

Every query reads the metrics of deployments/metrics.py (names as Prometheus stores them, after the scrape
config's `ray_imagine_*` -> `imagine_*` rename) or Serve's own `ray_serve_*`, filters on `cluster=~"$cluster"`
(and `deployment=~"$deployment"` on the stages dashboard) and takes rates over `$__rate_interval`. The job
queue's gauges (imagine_queue_*, imagine_jobs) are queue-wide and reported by every JobRunner replica alike, so
they are aggregated with max over the replicas, never summed.
"""
from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
REGENERATE = "python -m monitoring.dashboards --out monitoring/dashboards"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
CLUSTER = 'cluster=~"$cluster"'
DEPLOYMENT = 'deployment=~"$deployment"'
REFRESH = "30s"


# ---- PromQL ------------------------------------------------------------------------------------------

def sel(metric: str, *matchers: str) -> str:
    """`metric{cluster=~"$cluster", ...}`."""
    return f"{metric}{{{', '.join((CLUSTER, *matchers))}}}"


def rate(metric: str, *matchers: str) -> str:
    return f"rate({sel(metric, *matchers)}[$__rate_interval])"


def sum_rate(metric: str, *matchers: str, by: str = "") -> str:
    return f"sum by ({by}) ({rate(metric, *matchers)})" if by else f"sum({rate(metric, *matchers)})"


def quantile(q: float, histogram: str, *matchers: str, by: str = "") -> str:
    """The q-quantile of a histogram over the rate interval, per `by` labels."""
    buckets = sum_rate(histogram + "_bucket", *matchers, by=f"{by}, le" if by else "le")
    return f"histogram_quantile({q}, {buckets})"


def mean(histogram: str, *matchers: str, by: str = "") -> str:
    return f"{sum_rate(histogram + '_sum', *matchers, by=by)} / {sum_rate(histogram + '_count', *matchers, by=by)}"


def share(metric: str, matcher: str) -> str:
    """The share of a counter's rate that matches `matcher` (0 when none does)."""
    return f"({sum_rate(metric, matcher)} or vector(0)) / {sum_rate(metric)}"


def queue_wide(metric: str, *matchers: str, by: str = "") -> str:
    """A gauge every JobRunner replica exports with the same queue-wide value: the max over the replicas of each
    cluster and application (a sum would count the queue once per replica), summed over those selected."""
    inner = f"max by ({', '.join(('cluster', 'application', *([by] if by else [])))}) ({sel(metric, *matchers)})"
    return f"sum by ({by}) ({inner})" if by else f"sum({inner})"


def events(metric: str, *matchers: str) -> str:
    """How many times a rare counter went up in the rate interval, 0 when it never did. Ray exports a counter
    from its first increment on, already at 1, which increase() cannot see: a series that is new in the
    interval counts with its value (as in alerts.yml), one that is older with its increase."""
    s, interval = sel(metric, *matchers), "$__rate_interval"
    older = f"sum(increase({s}[{interval}]) and {s} offset {interval})"
    new = f"sum({s} unless {s} offset {interval})"
    return f"({older} or vector(0)) + ({new} or vector(0))"


def percentiles(histogram: str, *matchers: str, by: str = "", qs=(0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    """(expr, legend) for p50/p95/p99, the legend prefixed with the `by` labels."""
    prefix = "".join(f"{{{{{label.strip()}}}}} " for label in by.split(",") if label.strip())
    return [(quantile(q, histogram, *matchers, by=by), f"{prefix}p{round(q * 100)}") for q in qs]


# ---- panels ------------------------------------------------------------------------------------------

def _targets(queries: list[tuple[str, str]]) -> list[prometheus.Dataquery]:
    return [prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(string.ascii_uppercase[i])
            .datasource(DATASOURCE) for i, (expr, legend) in enumerate(queries)]


def graph(title: str, description: str, unit: str, queries: list[tuple[str, str]], *, width: int = 12,
          height: int = 8, dashed: str | None = None) -> timeseries.Panel:
    """A time series panel; `queries` are (PromQL, legend format); series matching the regex `dashed` are dashed."""
    p = (timeseries.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
         .targets(_targets(queries)).span(width).height(height).min(0).fill_opacity(10)
         .legend(cb.VizLegendOptions().show_legend(True).display_mode(cm.LegendDisplayMode.TABLE)
                 .placement(cm.LegendPlacement.BOTTOM).calcs(["mean", "max", "lastNotNull"]))
         .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)))
    if dashed:
        p = p.override_by_regexp(dashed, [dm.DynamicConfigValue(
            id_val="custom.lineStyle", value={"dash": [10, 10], "fill": "dash"})])
    return p


def single(title: str, description: str, unit: str, expr: str, *, width: int = 4, height: int = 4,
           thresholds: list[tuple[float | None, str]] = ((None, "green"),)) -> stat.Panel:
    """A stat panel: the last value of one query, with a sparkline; `thresholds` are (from value, colour)."""
    return (stat.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
            .targets(_targets([(expr, title)])).span(width).height(height)
            .graph_mode(cm.BigValueGraphMode.AREA).color_mode(cm.BigValueColorMode.VALUE)
            .text_mode(cm.BigValueTextMode.AUTO).justify_mode(cm.BigValueJustifyMode.AUTO)
            .orientation(cm.VizOrientation.AUTO)
            .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .thresholds(db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE)
                        .steps([dm.Threshold(value=v, color=c) for v, c in thresholds])))


def _dashboard(uid: str, title: str, description: str, tags: list[str], deployment_variable: bool) -> db.Dashboard:
    d = (db.Dashboard(title).uid(uid).description(description).tags(["imagine", "ray-serve", *tags])
         .refresh(REFRESH).time("now-1h", "now").timezone("browser").tooltip(dm.DashboardCursorSync.CROSSHAIR)
         .annotations([])
         .link(db.DashboardLink("imagine").type(dm.DashboardLinkType.DASHBOARDS).tags(["imagine"])
               .as_dropdown(True).include_vars(True).keep_time(True))
         .with_variable(db.DatasourceVariable("datasource").id("datasource").label("Data source").type("prometheus"))
         .with_variable(db.QueryVariable("cluster").id("cluster").label("Cluster").datasource(DATASOURCE)
                        .description("The `cluster` label the scrape config adds to every series.")
                        .query("label_values(imagine_stage_requests_total, cluster)")
                        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
                        .multi(True).include_all(True).all_value(".*")))
    if deployment_variable:
        d = d.with_variable(
            db.QueryVariable("deployment").id("deployment").label("Deployment").datasource(DATASOURCE)
            .description("Serve deployments (stages); All also covers the Ingress in Serve's own metrics.")
            .query('label_values(imagine_stage_requests_total{cluster=~"$cluster"}, deployment)')
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(dm.VariableOption(selected=True, text="All", value="$__all")))
    return d


# ---- the dashboards ----------------------------------------------------------------------------------

def overview() -> db.Dashboard:
    http, finished = "imagine_http_requests_total", "imagine_jobs_finished_total"
    return (
        _dashboard("imagine-overview", "imagine / Overview",
                   "The text-to-image service as its users see it: requests, images, job latency, the job "
                   "queue, errors.",
                   ["overview"], deployment_variable=False)
        .with_row(db.Row("Service"))
        .with_panel(single("HTTP requests/s", "Requests to the Ingress, all routes and codes.", "reqps",
                           sum_rate(http)))
        .with_panel(single("Images published/s", "Images written to S3 for succeeded jobs.", "short",
                           sum_rate("imagine_images_published_total")))
        .with_panel(single("Job latency p95", "95th percentile of end-to-end latency of succeeded jobs "
                           "(accepted to published).", "s", quantile(0.95, "imagine_job_latency_seconds"),
                           thresholds=[(None, "green"), (30, "orange"), (120, "red")]))
        .with_panel(single("Job success ratio", "Succeeded / all finished jobs (failed and cancelled count "
                           "against it).", "percentunit",
                           share(finished, 'state="succeeded"'),
                           thresholds=[(None, "red"), (0.9, "orange"), (0.99, "green")]))
        .with_panel(single("HTTP 5xx ratio", "Share of HTTP responses with a 5xx code.", "percentunit",
                           share(http, 'code=~"5.."'),
                           thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")]))
        .with_panel(single("Jobs queued", "Jobs waiting in the job queue, all priorities (queue-wide: the max "
                           "over the JobRunner replicas, which all report it).", "short",
                           queue_wide("imagine_jobs", 'state="queued"'),
                           thresholds=[(None, "green"), (50, "orange"), (200, "red")]))
        .with_row(db.Row("Traffic and latency"))
        .with_panel(graph("HTTP requests/s by code", "Requests to the Ingress by status code (all routes).",
                          "reqps", [(sum_rate(http, by="code"), "{{code}}")], width=8))
        .with_panel(graph("Images/s", "Images the Diffuser finished sampling and images published to S3.",
                          "short", [(sum_rate("imagine_images_published_total"), "published"),
                                    (sum_rate("imagine_images_generated_total"), "generated")], width=8))
        .with_panel(graph("Job latency (end to end)", "Accepted to published, succeeded jobs only.", "s",
                          percentiles("imagine_job_latency_seconds"), width=8))
        .with_row(db.Row("Queue and jobs"))
        .with_panel(graph("Queue depth by priority", "Jobs waiting in the job queue by priority tier (relax "
                          "waits behind every fast job). Queue-wide: the max over the JobRunner replicas, which "
                          "all report it.", "short",
                          [(queue_wide("imagine_queue_depth", by="priority"), "{{priority}}")], width=8))
        .with_panel(graph("Oldest waiting job", "Age of the oldest job waiting in the queue (0 when none waits); "
                          "the alert ImagineQueueOldJobs fires above 10 minutes.", "s",
                          [(f"max({sel('imagine_queue_oldest_seconds')})", "oldest waiting job")], width=8))
        .with_panel(graph("Queue wait", "Time from acceptance to the job's first denoising step.", "s",
                          percentiles("imagine_job_queue_wait_seconds", qs=(0.5, 0.95)), width=8))
        .with_panel(graph("Jobs by state", "Jobs waiting in the queue and jobs the JobRunners run (gauges; "
                          "queue-wide: the max over the JobRunner replicas, which all report them).", "short",
                          [(queue_wide("imagine_jobs", by="state"), "{{state}}")], width=8))
        .with_panel(graph("Jobs submitted and finished/s", "Jobs accepted, and jobs ended by final state.",
                          "short", [(sum_rate("imagine_jobs_submitted_total"), "submitted"),
                                    (sum_rate(finished, by="state"), "{{state}}")], width=8))
        .with_panel(graph("Jobs redelivered and dead", "Jobs per rate interval ($__rate_interval) re-enqueued "
                          "because their runner's lease expired (a runner died), and jobs that ran out of "
                          "attempts (dead letters, failed with retries_exhausted; alert ImagineJobsDeadLettered). "
                          "0 while none happened.", "short",
                          [(events("imagine_jobs_redelivered_total"), "redelivered"),
                           (events("imagine_jobs_dead_total"), "dead")], width=8))
        .with_row(db.Row("Errors"))
        .with_panel(graph("Stage errors/s by deployment and reason", "Stage calls that raised, by the bounded "
                          "reason of deployments/metrics.py (timeout, storage, out_of_memory, ...).", "reqps",
                          [(sum_rate("imagine_stage_errors_total", by="deployment, reason"),
                            "{{deployment}} {{reason}}")], width=8))
        .with_panel(graph("HTTP errors/s (4xx, 5xx)", "Ingress responses with a 4xx or 5xx code, by code and "
                          "route.", "reqps",
                          [(sum_rate(http, 'code=~"4..|5.."', by="code, handler"), "{{code}} {{handler}}")], width=8))
        .with_panel(graph("Webhook events/s by outcome", "Jobs' webhook events by final outcome: delivered, "
                          "rejected (a 4xx answer: not retried), refused (the URL is no longer allowed), failed "
                          "(out of attempts). Retries and throttled progress events are not counted.", "reqps",
                          [(sum_rate("imagine_webhooks_total", by="outcome"), "{{outcome}}")], width=8))
    )


def stages() -> db.Dashboard:
    d = DEPLOYMENT
    return (
        _dashboard("imagine-stages", "imagine / Stages",
                   "Each Serve deployment (TextEncoder, Diffuser, Upscaler, Publisher): latency, batching, queues, "
                   "replicas, denoising, memory and model load time.", ["stages"], deployment_variable=True)
        .with_row(db.Row("Throughput and latency"))
        .with_panel(graph("Stage requests/s", "Calls each stage handled (one per image or prompt).", "reqps",
                          [(sum_rate("imagine_stage_requests_total", d, by="deployment"), "{{deployment}}")],
                          width=8))
        .with_panel(graph("Stage latency", "Time a call spends in the replica, batch wait included: p50, p95, "
                          "p99 per deployment.", "s",
                          percentiles("imagine_stage_latency_seconds", d, by="deployment"), width=8))
        .with_panel(graph("Stage errors/s by reason", "Calls that raised, by bounded reason.", "reqps",
                          [(sum_rate("imagine_stage_errors_total", d, by="deployment, reason"),
                            "{{deployment}} {{reason}}")], width=8))
        .with_row(db.Row("Batching and queues"))
        .with_panel(graph("Batch size", "Items per batch the stage runs: mean and p95.", "short",
                          [(mean("imagine_stage_batch_size", d, by="deployment"), "{{deployment}} mean"),
                           (quantile(0.95, "imagine_stage_batch_size", d, by="deployment"), "{{deployment}} p95")],
                          width=8))
        .with_panel(graph("Ongoing and queued requests", "Calls in flight in the replicas (queued for a batch or "
                          "running), requests Serve's handles have assigned to replicas, and requests waiting "
                          "in the handles for a replica.", "short",
                          [(f"sum by (deployment) ({sel('imagine_stage_ongoing_requests', d)})",
                            "{{deployment}} in replicas"),
                           (f"sum by (deployment) ({sel('ray_serve_num_ongoing_requests_at_replicas', d)})",
                            "{{deployment}} assigned (Serve)"),
                           (f"sum by (deployment) ({sel('ray_serve_deployment_queued_queries', d)})",
                            "{{deployment}} queued (Serve)")], width=8))
        .with_panel(graph("Healthy replicas vs max", "Healthy replicas (Serve's health checks) against the "
                          "configured replica ceiling (max_replicas, dashed).", "short",
                          [(f"sum by (deployment) ({sel('ray_serve_deployment_replica_healthy', d)})",
                            "{{deployment}} healthy"),
                           (f"max by (deployment) ({sel('imagine_stage_replicas_max', d)})", "{{deployment}} max")],
                          width=8, dashed=".* max$"))
        .with_row(db.Row("Diffuser"))
        .with_panel(graph("Denoising steps/s", "Denoising steps done, one per image per step.", "short",
                          [(sum_rate("imagine_denoising_steps_total", d, by="deployment"), "{{deployment}}")]))
        .with_panel(graph("Denoising step time", "Wall time of one batched denoising step: mean, p50, p95.", "s",
                          [(mean("imagine_denoising_step_seconds", d, by="deployment"), "{{deployment}} mean"),
                           *percentiles("imagine_denoising_step_seconds", d, by="deployment", qs=(0.5, 0.95))]))
        .with_row(db.Row("Resources"))
        .with_panel(graph("Accelerator memory", "Memory in use per replica: CUDA allocated on GPUs, process RSS "
                          "on CPU.", "bytes",
                          [(f"max by (deployment, replica, device) ({sel('imagine_accelerator_memory_bytes', d)})",
                            "{{deployment}} {{replica}} {{device}}")]))
        .with_panel(graph("Model load time", "Time each replica took to load its model (set once at start).",
                          "s", [(f"max by (deployment, replica) ({sel('imagine_model_load_seconds', d)})",
                                 "{{deployment}} {{replica}}")]))
        .with_row(db.Row("$deployment by replica").repeat("deployment")
                  .with_panel(graph("$deployment requests/s by replica", "Calls each replica handled.", "reqps",
                                    [(sum_rate("imagine_stage_requests_total", d, by="replica"), "{{replica}}")],
                                    width=8))
                  .with_panel(graph("$deployment latency p95 by replica", "95th percentile of call latency per "
                                    "replica.", "s",
                                    [(quantile(0.95, "imagine_stage_latency_seconds", d, by="replica"),
                                      "{{replica}}")], width=8))
                  .with_panel(graph("$deployment processing queries by replica", "Requests each replica is "
                                    "processing, from Serve's own metric.", "short",
                                    [(f"sum by (replica) ({sel('ray_serve_replica_processing_queries', d)})",
                                      "{{replica}}")], width=8)))
    )


def storage() -> db.Dashboard:
    writes = "imagine_storage_writes_total"
    return (
        _dashboard("imagine-storage", "imagine / Storage",
                   "The Publisher's writes to S3-compatible storage: rate, outcome, bytes and latency.",
                   ["storage"], deployment_variable=False)
        .with_row(db.Row("Summary"))
        .with_panel(single("S3 writes/s", "Object writes, all outcomes.", "reqps", sum_rate(writes), width=6))
        .with_panel(single("S3 write error ratio", "Share of object writes that failed.", "percentunit",
                           share(writes, 'outcome="error"'),
                           width=6, thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")]))
        .with_panel(single("Bytes written/s", "Bytes written to S3.", "Bps",
                           sum_rate("imagine_storage_write_bytes_total"), width=6))
        .with_panel(single("S3 write p95", "95th percentile latency of one object write.", "s",
                           quantile(0.95, "imagine_storage_write_seconds"), width=6,
                           thresholds=[(None, "green"), (1, "orange"), (5, "red")]))
        .with_row(db.Row("Writes"))
        .with_panel(graph("S3 writes/s by outcome", "Object writes by outcome (ok, error).", "reqps",
                          [(sum_rate(writes, by="outcome"), "{{outcome}}")]))
        .with_panel(graph("S3 write latency", "Latency of one object write: p50, p95, p99.", "s",
                          percentiles("imagine_storage_write_seconds")))
        .with_panel(graph("Bytes written/s", "Bytes written to S3.", "Bps",
                          [(sum_rate("imagine_storage_write_bytes_total"), "written")]))
        .with_panel(graph("Average object size", "Bytes written per successful object write.", "bytes",
                          [(sum_rate("imagine_storage_write_bytes_total") + " / " + sum_rate(writes, 'outcome="ok"'),
                            "mean size")]))
        .with_row(db.Row("Publishing"))
        .with_panel(graph("Images published/s", "Images written to S3 for succeeded jobs.", "short",
                          [(sum_rate("imagine_images_published_total"), "published")]))
        .with_panel(graph("Publisher errors/s by reason", "Publisher calls that raised, by bounded reason "
                          "(storage = S3 errors).", "reqps",
                          [(sum_rate("imagine_stage_errors_total", 'deployment="Publisher"', by="reason"),
                            "{{reason}}"),
                           # 0 rather than "No data" while the Publisher has never failed
                           (sum_rate("imagine_stage_errors_total", 'deployment="Publisher"') + " or vector(0)",
                            "all reasons")]))
    )


DASHBOARDS = {"overview": overview, "stages": stages, "storage": storage}


# ---- JSON --------------------------------------------------------------------------------------------

def _panels(panels: list[dict]):
    """Every panel, rows and the panels nested in (collapsed) rows included, in order."""
    for p in panels:
        yield p
        yield from _panels(p.get("panels") or [])


def build_dashboards() -> dict[str, dict]:
    """{file stem: dashboard JSON} for every dashboard, with panel ids 1, 2, ... in layout order."""
    out = {}
    for stem, make in DASHBOARDS.items():
        d = json.loads(json.dumps(make().build(), cls=JSONEncoder))
        for i, panel in enumerate(_panels(d["panels"]), start=1):
            panel["id"] = i
        out[stem] = d
    return out


def render(dashboard: dict) -> str:
    """The committed form: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(dashboard, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def write_dashboards(out_dir: Path | str = OUT_DIR) -> list[Path]:
    """Write `<stem>.json` for every dashboard into `out_dir`; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, d in build_dashboards().items():
        path = out_dir / f"{stem}.json"
        path.write_text(render(d))
        paths.append(path)
    return paths


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, panels nested in rows included."""
    return [(p.get("title", ""), t["expr"]) for p in _panels(dashboard.get("panels") or [])
            for t in p.get("targets") or [] if "expr" in t]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m monitoring.dashboards",
                                description="Generate imagine's Grafana dashboards (JSON) from code.")
    p.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default: {OUT_DIR})")
    args = p.parse_args(argv)
    paths = write_dashboards(args.out)
    print(f"wrote {', '.join(path.name for path in paths)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
