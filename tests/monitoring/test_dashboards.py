"""The Grafana dashboards: the committed JSON is what the generator produces, Grafana can import it, every query
names real metrics, filters on the template variables and evaluates on a real Prometheus holding series shaped
like the exporters', and `imagine dashboards export` writes the files."""
from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from deployments.metrics import METRICS
from monitoring.dashboards import REGENERATE, build_dashboards, panel_queries, render

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "monitoring" / "dashboards"
STEMS = ("overview", "stages", "storage")
UIDS = {"overview": "imagine-overview", "stages": "imagine-stages", "storage": "imagine-storage"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                "group_right", "inf", "nan"}


@pytest.fixture(scope="module")
def generated() -> dict[str, dict]:
    return build_dashboards()


def committed(stem: str) -> dict:
    return json.loads((COMMITTED / f"{stem}.json").read_text())


def all_panels(panels: list[dict]):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels") or [])


def all_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) for every target of the committed dashboards."""
    return [(stem, title, expr) for stem in STEMS for title, expr in panel_queries(committed(stem))]


# ---- (a) drift -----------------------------------------------------------------------------------------

def test_committed_json_is_what_the_generator_produces(generated):
    assert sorted(p.stem for p in COMMITTED.glob("*.json")) == sorted(generated), \
        f"monitoring/dashboards/ does not hold exactly the generated dashboards; regenerate with `{REGENERATE}`"
    for stem, dashboard in generated.items():
        path = COMMITTED / f"{stem}.json"
        assert path.read_text() == render(dashboard), f"{path} is out of date; regenerate with `{REGENERATE}`"


def test_generation_is_deterministic(generated):
    assert {k: render(v) for k, v in build_dashboards().items()} == {k: render(v) for k, v in generated.items()}


# ---- (b) importable by Grafana -------------------------------------------------------------------------

@pytest.mark.parametrize("stem", STEMS)
def test_dashboard_is_importable(stem):
    d = committed(stem)
    assert d["uid"] == UIDS[stem] and d["title"] and isinstance(d["schemaVersion"], int)
    assert "id" not in d or d["id"] is None, "an imported dashboard must not carry a database id"
    assert d["refresh"] and "imagine" in d["tags"] and isinstance(d["annotations"]["list"], list)

    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["cluster"]["type"] == "query"
    assert variables["cluster"]["query"] == "label_values(imagine_stage_requests_total, cluster)"
    assert len({v.get("id", v["name"]) for v in variables.values()}) == len(variables), "variable ids collide"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    if stem == "stages":
        dep = variables["deployment"]
        assert dep["query"] == 'label_values(imagine_stage_requests_total{cluster=~"$cluster"}, deployment)'
        assert dep["multi"] and dep["includeAll"]

    panels = list(all_panels(d["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids), ids
    for p in panels:
        g = p["gridPos"]
        assert {"h", "w", "x", "y"} <= g.keys() and g["x"] + g["w"] <= 24 and g["h"] > 0, (p["title"], g)
        if p["type"] == "row":
            assert "targets" not in p
            continue
        assert p["title"] and p.get("description"), f"panel {p['title']!r} needs a description"
        assert p["fieldConfig"]["defaults"].get("unit"), f"panel {p['title']!r} needs a unit"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        if p["type"] == "timeseries":
            assert p["options"]["legend"]["showLegend"], p["title"]
        assert p["targets"], p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(set(ref_ids)) == len(ref_ids) and all(ref_ids), (p["title"], ref_ids)
        for t in p["targets"]:
            assert t["expr"] and t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert t.get("legendFormat"), p["title"]
    # panels do not overlap (rows' nested panels are laid out where the row opens)
    cells = [(x, y) for p in panels for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
             for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])]
    assert len(cells) == len(set(cells)), f"{stem}: panels overlap"


# ---- (c) queries name real metrics and use the variables ------------------------------------------------

def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are neither functions, keywords, label
    names (in matchers and by/without/on/ignoring lists), strings nor durations."""
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "{}", e)
    e = re.sub(r"\[[^\]]*\]", "[]", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    names = re.findall(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", e)
    return {n for n in names if n.lower() not in PROMQL_WORDS}


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (deployment, le) (rate(imagine_stage_latency_seconds_bucket'
            '{cluster=~"$cluster", deployment=~"a|b"}[$__rate_interval]))) / on (le) group_left (x) foo '
            'or vector(0) > bool 1e3 unless max without (replica) (ray_serve_x)')
    assert metric_names(expr) == {"imagine_stage_latency_seconds_bucket", "foo", "ray_serve_x"}


def allowed(name: str) -> bool:
    if name.startswith("ray_serve_"):
        return True
    if name in METRICS:
        return METRICS[name][0] != "histogram"  # a histogram is stored only as _bucket/_sum/_count
    return any(name.endswith(s) and METRICS.get(name[:-len(s)], ("",))[0] == "histogram"
               for s in HISTOGRAM_SUFFIXES)


@pytest.mark.parametrize("stem", STEMS)
def test_every_query_names_catalogued_metrics(stem):
    queries = panel_queries(committed(stem))
    assert queries
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"{stem}/{title}: no metric found in {expr}"
        unknown = sorted(n for n in names if not allowed(n))
        assert not unknown, f"{stem}/{title}: {unknown} not in deployments.metrics.METRICS (or ray_serve_*): {expr}"


@pytest.mark.parametrize("stem", STEMS)
def test_every_query_filters_on_the_variables(stem):
    for title, expr in panel_queries(committed(stem)):
        for name in metric_names(expr):  # every selector of every metric carries matchers
            after = re.findall(rf"(?<![\w:]){re.escape(name)}(?![\w:])(.)", expr)
            assert after and set(after) == {"{"}, f"{stem}/{title}: {name} without matchers in {expr}"
        for matchers in re.findall(r"[a-zA-Z_:][\w:]*\{([^}]*)\}", expr):
            assert 'cluster=~"$cluster"' in matchers, f"{stem}/{title}: {expr}"
            if stem == "stages" and "deployment=" not in matchers:
                pytest.fail(f"{stem}/{title}: no deployment filter in {expr}")
        assert all(r == "$__rate_interval" for r in re.findall(r"\[([^\]]*)\]", expr)), f"{stem}/{title}: {expr}"


# gauges of the job queue that every JobRunner replica exports with the same queue-wide value
QUEUE_WIDE = ("imagine_queue_depth", "imagine_queue_oldest_seconds", "imagine_jobs")


def maxed_over_replicas(expr: str, name: str) -> bool:
    """Every selector of `name` in `expr` is the direct argument of a `max` (never summed over replicas)."""
    selectors = re.findall(rf"(?<![\w:]){name}\{{", expr)
    maxed = re.findall(rf"\bmax(?:\s+by\s*\([^)]*\))?\s*\(\s*{name}\{{", expr)
    return len(selectors) == len(maxed)


def test_queue_wide_gauges_are_maxed_not_summed():
    assert maxed_over_replicas('sum(max by (cluster, application) (imagine_jobs{a="b"}))', "imagine_jobs")
    assert not maxed_over_replicas('sum by (state) (imagine_jobs{a="b"})', "imagine_jobs")
    assert maxed_over_replicas('sum(imagine_jobs_finished_total{a="b"})', "imagine_jobs")
    seen = set()
    for stem, title, expr in all_queries():
        for name in set(QUEUE_WIDE) & metric_names(expr):
            seen.add(name)
            assert maxed_over_replicas(expr, name), f"{stem}/{title}: {name} must be max'ed over replicas: {expr}"
    assert seen == set(QUEUE_WIDE)


def test_the_dashboards_cover_the_catalogue():
    used = {n for _, _, expr in all_queries() for n in metric_names(expr)}
    used = {next((n[:-len(s)] for s in HISTOGRAM_SUFFIXES if n.endswith(s) and n[:-len(s)] in METRICS), n)
            for n in used}
    assert set(METRICS) <= used, f"metrics on no dashboard: {sorted(set(METRICS) - used)}"
    assert {"ray_serve_deployment_replica_healthy", "ray_serve_deployment_queued_queries",
            "ray_serve_replica_processing_queries", "ray_serve_num_ongoing_requests_at_replicas"} <= used


# ---- every query on a real Prometheus --------------------------------------------------------------------

STAGES = ("TextEncoder", "Diffuser", "Upscaler", "Publisher", "Ingress", "JobRunner")
LABEL_VALUES = {"reason": ("timeout", "storage"), "outcome": ("ok", "error"), "handler": ("/v1/jobs",),
                "method": ("POST",), "code": ("202", "422", "503"), "device": ("cpu",),
                "state": ("queued", "running", "succeeded", "failed"), "priority": ("fast", "relax")}
SERVE_GAUGES = ("ray_serve_deployment_replica_healthy", "ray_serve_deployment_queued_queries",
                "ray_serve_replica_processing_queries", "ray_serve_num_ongoing_requests_at_replicas")
BUCKETS = (("0.1", 0.2), ("1", 0.7), ("10", 0.95), ("+Inf", 1.0))  # (le, cumulative share)
STEP_S, POINTS = 15, 20


def openmetrics(start: int) -> str:
    """Every catalogued metric (and Serve's gauges) for every stage, 2 replicas, every 15 s for 5 minutes."""
    series: list[tuple[str, str, str]] = []  # (name, labels, kind)
    for stage, replica in itertools.product(STAGES, ("r1", "r2")):
        base = f'cluster="test",application="imagine",deployment="{stage}",replica="{stage}#{replica}"'
        for name, (kind, labels, _) in METRICS.items():
            for values in itertools.product(*(LABEL_VALUES[label] for label in labels)):
                extra = "".join(f',{label}="{v}"' for label, v in zip(labels, values))
                series.append((name, base + extra, kind))
        series += [(name, base, "gauge") for name in SERVE_GAUGES]
    lines = []
    for i in range(POINTS):
        t = start + i * STEP_S
        for name, labels, kind in series:
            if kind == "counter":
                lines.append(f"{name}{{{labels}}} {3 * i} {t}")
            elif kind == "gauge":
                lines.append(f"{name}{{{labels}}} 2 {t}")
            else:
                lines += [f'{name}_bucket{{{labels},le="{le}"}} {round(10 * i * share)} {t}' for le, share in BUCKETS]
                lines += [f"{name}_sum{{{labels}}} {5 * i} {t}", f"{name}_count{{{labels}}} {10 * i} {t}"]
    return "\n".join(lines) + "\n# EOF\n"


@pytest.fixture(scope="module")
def prometheus_api(tmp_path_factory):
    """A real Prometheus on backfilled series; yields (query URL, evaluation time)."""
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        pytest.fail("needs prometheus and promtool on PATH: run `make prometheus` (apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("prometheus")
    start = int(time.time()) // 60 * 60 - 3 * 3600  # older than the head block of a fresh server
    (tmp / "series.om").write_text(openmetrics(start))
    subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", str(tmp / "series.om"),
                    str(tmp / "data")], check=True, capture_output=True)
    (tmp / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp / "prometheus.log", "w")
    proc = subprocess.Popen(["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "prometheus.log").read_text()
            time.sleep(0.2)
        yield f"{base}/api/v1/query", start + (POINTS - 1) * STEP_S
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def grafana_expand(expr: str) -> str:
    """What Grafana sends for the default variable values: one cluster, All deployments, a 1m rate interval."""
    return expr.replace("$__rate_interval", "1m").replace("$cluster", "test").replace("$deployment", ".*")


def test_every_query_returns_finite_data_on_prometheus(prometheus_api):
    url, at = prometheus_api
    for stem, title, expr in all_queries():
        q = urllib.parse.urlencode({"query": grafana_expand(expr), "time": at})
        try:
            with urllib.request.urlopen(f"{url}?{q}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            pytest.fail(f"{stem}/{title}: Prometheus rejected {expr}: {e.read().decode()}")
        result = body["data"]["result"]
        assert body["status"] == "success" and result, f"{stem}/{title}: no data for {expr}"
        values = [float(s["value"][1]) for s in result]
        assert all(math.isfinite(v) for v in values), f"{stem}/{title}: {values} from {expr}"


def test_queue_wide_gauges_count_the_queue_once(prometheus_api):
    """Every replica of the synthetic cluster reports each gauge at 2: the queue panels show 2, not 2 x replicas."""
    url, at = prometheus_api
    queries = {title: expr for stem, title, expr in all_queries()
               if any(n in QUEUE_WIDE for n in metric_names(expr))}
    assert {"Jobs queued", "Queue depth by priority", "Oldest waiting job", "Jobs by state"} <= set(queries)
    for title, expr in queries.items():
        q = urllib.parse.urlencode({"query": grafana_expand(expr), "time": at})
        with urllib.request.urlopen(f"{url}?{q}", timeout=10) as r:
            result = json.load(r)["data"]["result"]
        assert result and {float(s["value"][1]) for s in result} == {2.0}, (title, expr, result)


# ---- (d) the export command --------------------------------------------------------------------------------

def test_imagine_dashboards_export_writes_the_files(tmp_path):
    out = tmp_path / "grafana"
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "dashboards", "export", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"{s}.json" for s in STEMS]
    for stem in STEMS:
        assert (out / f"{stem}.json").read_text() == (COMMITTED / f"{stem}.json").read_text()
    assert str(out.resolve()) in r.stdout and "Import" in r.stdout


def test_imagine_dashboards_export_help_explains_the_import():
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "dashboards", "export", "--help"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Dashboards > New > Import" in r.stdout and "ConfigMap" in r.stdout


def test_imagine_dashboards_export_fails_clearly_without_dashboards(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "dashboards", "export", "--out", str(tmp_path / "o"),
                        "--from", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "python -m monitoring.dashboards" in r.stderr
