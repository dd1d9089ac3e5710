"""monitoring/: the Prometheus config and alert rules pass promtool, their unit tests pass, and every metric
they name is one the deployments export (deployments/metrics.py) or one of Serve's own."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.config import DEPLOYMENT_NAMES
from cluster.prometheus import ALERT_RULES, CONFIG_TEMPLATE, MONITORING_DIR, SD_FILE, find_promtool, render_local_config
from deployments.errors import REASONS as ERROR_REASONS
from deployments.metrics import METRICS

ROOT = Path(__file__).resolve().parents[2]
RULE_TESTS = MONITORING_DIR / "tests" / "alerts_test.yml"
SERVE_LABELS = {"deployment", "replica", "application"}
SCRAPE_LABELS = {"cluster", "job", "instance"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = find_promtool()
    if path is None:  # CI installs it (`make test` depends on `make prometheus`): never skip silently
        pytest.fail("promtool is not installed: run `make prometheus` (Debian's prometheus package)")
    return path


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=120)


def ok(out: subprocess.CompletedProcess) -> bool:
    return out.returncode == 0


# ---- promtool -----------------------------------------------------------------------------------

def copy_monitoring(root: Path) -> None:
    """monitoring/prometheus.yml and alerts.yml as they are, under root/monitoring/ (so that the repo's own
    .imagine/ray, whatever state a local cluster left it in, does not decide the outcome)."""
    (root / "monitoring").mkdir()
    for f in (CONFIG_TEMPLATE, ALERT_RULES):
        shutil.copy(f, root / "monitoring" / f.name)


def write_ray_service_discovery(ray: Path) -> None:
    """Ray's layout: the session folder holds the file, the temp dir a symlink to it."""
    session = ray / "session_2026-11-25_17-42-48_489916_29231"
    session.mkdir(parents=True)
    (session / SD_FILE).write_text('[{"labels": {"job": "ray"}, "targets": ["127.0.0.1:8080", "10.0.0.2:8080"]}]')
    (ray / SD_FILE).symlink_to(session / SD_FILE)


def test_config_is_valid_and_finds_rays_file_in_the_local_temp_dir(promtool, tmp_path):
    copy_monitoring(tmp_path)
    write_ray_service_discovery(tmp_path / ".imagine" / "ray")  # the local cluster's default temp dir
    out = run(promtool, "check", "config", "monitoring/prometheus.yml", cwd=tmp_path)
    assert ok(out), out.stdout + out.stderr
    assert "1 rule files found" in out.stdout
    assert "does not exist" not in out.stdout + out.stderr  # ../.imagine/ray/... resolved and read


def test_config_is_valid_before_ray_wrote_its_service_discovery_file(promtool, tmp_path):
    copy_monitoring(tmp_path)  # no .imagine/ray here: Prometheus starts and waits for the file
    out = run(promtool, "check", "config", "monitoring/prometheus.yml", cwd=tmp_path)
    assert ok(out), out.stdout + out.stderr
    assert "does not exist" in out.stdout + out.stderr  # a warning, not an error


def test_rendered_config_is_valid_with_a_ray_service_discovery_file(promtool, tmp_path):
    ray = tmp_path / "ray"
    write_ray_service_discovery(ray)
    cfg = render_local_config(tmp_path / "out" / "prometheus.yml", ray, scrape_interval="1s")
    doc = yaml.safe_load(cfg.read_text())
    assert doc["global"]["scrape_interval"] == "1s"
    assert doc["rule_files"] == [str(ALERT_RULES)]
    assert doc["scrape_configs"][0]["file_sd_configs"][0]["files"] == [str(ray / SD_FILE)]
    out = run(promtool, "check", "config", str(cfg), cwd=tmp_path)
    assert ok(out), out.stdout + out.stderr
    assert "does not exist" not in out.stdout + out.stderr


def test_rules_are_valid(promtool):
    out = run(promtool, "check", "rules", "monitoring/alerts.yml")
    assert ok(out), out.stdout + out.stderr


def test_rule_unit_tests_pass(promtool):
    out = run(promtool, "test", "rules", "monitoring/tests/alerts_test.yml")
    assert ok(out), out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


# ---- the rules themselves -----------------------------------------------------------------------

def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


EXPECTED_ALERTS = {"ImagineHighErrorRatio", "ImagineStageLatencyHigh", "ImagineQueueGrowingAtMaxReplicas",
                   "ImagineNoImagesPublished", "ImagineStorageWriteFailures", "ImagineStageNoHealthyReplicas",
                   "ImagineJobFailureRatio", "ImagineQueueOldJobs", "ImagineJobsDeadLettered"}


def test_every_alert_has_for_severity_and_annotations():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == EXPECTED_ALERTS
    for r in rules:
        assert r.get("for"), r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


def test_latency_slos_per_stage():
    slos = {}
    for r in alert_rules():
        if r["alert"] == "ImagineStageLatencyHigh":
            [stage] = re.findall(r'deployment="(\w+)"', r["expr"])
            threshold = float(re.search(r"\)\s*>\s*([0-9.]+)\s*$", r["expr"].strip()).group(1))
            assert float(r["labels"]["slo_seconds"]) == threshold, stage
            slos[stage] = threshold
    assert slos == {"TextEncoder": 0.5, "Diffuser": 30, "Upscaler": 10, "Publisher": 5}


def test_every_alert_fires_and_stays_silent_in_the_unit_tests():
    firing, silent = set(), set()
    for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in t.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
            for alert in case.get("exp_alerts") or []:  # annotations are checked exactly, not left out
                assert set(alert["exp_annotations"]) == {"summary", "description"}, case["alertname"]
    assert firing >= EXPECTED_ALERTS, EXPECTED_ALERTS - firing
    assert silent >= EXPECTED_ALERTS, EXPECTED_ALERTS - silent


PROMQL_WORDS = {"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring", "group_left",
                "group_right", "inf", "nan"}


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, label matchers) of every vector selector in a PromQL expression."""
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range durations
    expr = re.sub(r"(?<![\w.])\d[\w.]*", " ", expr)  # numbers and durations (0.05, 15m, 1e3)
    found = []
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?(\s*\()?", expr):
        name, matchers, call = m.group(1), m.group(2) or "", m.group(3)
        if call or name.lower() in PROMQL_WORDS:
            continue  # a function or aggregation, or a keyword
        found.append((name, matchers))
    return found


def test_selector_parser():
    sel = selectors('sum by (a, b) (rate(x_total{reason!="c"}[5m])) / on (a) y > 0.5 unless z offset 15m')
    assert sel == [("x_total", '{reason!="c"}'), ("y", ""), ("z", "")]


def imagine_base(name: str) -> str:
    if name in METRICS:
        return name
    base, _, suffix = name.rpartition("_")
    assert suffix in ("bucket", "sum", "count") and METRICS.get(base, ("",))[0] == "histogram", \
        f"{name} is not in deployments.metrics.METRICS"
    return base


def test_every_metric_in_the_rules_is_exported():
    used = set()
    for r in alert_rules():
        for name, matchers in selectors(r["expr"]):
            used.add(name)
            assert not name.startswith("ray_imagine_"), f"{r['alert']}: {name} (Prometheus stores imagine_*)"
            labels = dict(re.findall(r'(\w+)\s*[!=]~?\s*"([^"]*)"', matchers))
            if name.startswith("ray_serve_"):
                assert set(labels) <= SERVE_LABELS | SCRAPE_LABELS, (r["alert"], name, labels)
                continue
            assert name.startswith("imagine_"), f"{r['alert']}: {name} is neither imagine_* nor ray_serve_*"
            base = imagine_base(name)
            allowed = set(METRICS[base][1]) | SERVE_LABELS | SCRAPE_LABELS | ({"le"} if name.endswith("_bucket")
                                                                              else set())
            assert set(labels) <= allowed, (r["alert"], name, labels)
            if "deployment" in labels:
                assert labels["deployment"] in DEPLOYMENT_NAMES.values(), (r["alert"], labels)
            if "reason" in labels:
                assert set(labels["reason"].split("|")) <= set(ERROR_REASONS), (r["alert"], labels)
    assert "imagine_images_published_total" in used and "ray_serve_deployment_replica_healthy" in used


QUEUE_WIDE = ("imagine_queue_depth", "imagine_queue_oldest_seconds", "imagine_jobs")  # same on every JobRunner


def test_queue_wide_gauges_are_maxed_not_summed():
    """The job queue's gauges are reported alike by every JobRunner replica: a rule takes their max, never sum."""
    seen = set()
    for r in alert_rules():
        for name in QUEUE_WIDE:
            uses = re.findall(rf"(?<![\w:]){name}(?![\w:])", r["expr"])
            maxed = re.findall(rf"\bmax(?:\s+by\s*\([^)]*\))?\s*\(\s*{name}(?![\w:])", r["expr"])
            assert len(uses) == len(maxed), f"{r['alert']}: {name} must be max'ed over the replicas: {r['expr']}"
            seen |= {name} if uses else set()
    assert "imagine_queue_oldest_seconds" in seen
