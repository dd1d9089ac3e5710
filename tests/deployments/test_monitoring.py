"""Every dashboard panel's PromQL and every alert expression, evaluated by a real Prometheus that scrapes
the real test cluster (through Ray's service discovery file) after a real workload."""
import json
import time
from pathlib import Path

import pytest
import yaml

from monitoring.dashboards import panel_queries
from tests.deployments.test_api import wait_job
from tests.deployments.test_workflow import Receiver

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "monitoring" / "dashboards").glob("*.json"))
# Grafana's template variables, as a user looking at the local cluster would set them
VARIABLES = {"$__rate_interval": "5m", "$cluster": "local", "$deployment": ".*"}


def expand(expr: str) -> str:
    for k, v in VARIABLES.items():
        expr = expr.replace(k, v)
    assert "$" not in expr.replace("$1", ""), f"unexpanded variable in {expr}"
    return expr


def workload(http, webhook_url: str) -> None:
    """Succeeded jobs on both endpoints (one with a webhook), a cancelled job, and rejected requests (4xx)."""
    ok = [http.post(f"{http.base}/v1/jobs", json={"prompt": f"a red circle --seed {i}", "steps": 4, "n": 2,
                                                   **({"webhook": webhook_url} if i == 0 else {})}).json()
          for i in range(3)]
    r = http.post(f"{http.base}/v1/images/generations", json={"prompt": "a blue square", "n": 1, "steps": 3})
    assert r.status_code == 200, r.text
    long = http.post(f"{http.base}/v1/jobs", json={"prompt": "a white circle", "steps": 200, "n": 2}).json()
    t0 = time.monotonic()
    while http.get(f"{http.base}/v1/jobs/{long['id']}").json()["progress"] <= 0.06 and time.monotonic() - t0 < 60:
        time.sleep(0.1)
    assert http.delete(f"{http.base}/v1/jobs/{long['id']}").status_code == 200
    assert http.post(f"{http.base}/v1/jobs", json={"prompt": ""}).status_code == 422
    assert http.get(f"{http.base}/v1/jobs/img_doesnotexist").status_code == 404
    assert [wait_job(http, j["id"])["state"] for j in ok] == ["succeeded"] * 3
    assert wait_job(http, long["id"])["state"] == "cancelled"


@pytest.fixture(scope="module")
def scraped(app, prometheus_server, ray_temp):
    import requests
    _, url, key = app
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {key}"
    http.base = url
    prometheus_server.scrape(Path(ray_temp))
    receiver = Receiver()  # a webhook receiver on loopback: the webhook panel has its events too
    try:
        workload(http, receiver.url)
        prometheus_server.wait_for('imagine_webhooks_total{cluster="local"}', timeout_s=60)
    finally:
        receiver.close()
    # Ray exports each worker's metrics within ~1 s here; wait until the last of them is scraped
    prometheus_server.wait_for('imagine_jobs_finished_total{cluster="local", state="cancelled"}', timeout_s=60)
    prometheus_server.wait_for('imagine_images_published_total{cluster="local"}', timeout_s=60)
    return prometheus_server


def test_metrics_arrive_renamed_with_serve_labels(scraped):
    series = scraped.query('{__name__=~"imagine_.+", cluster="local"}')
    names = {s["metric"]["__name__"] for s in series}
    assert {"imagine_stage_requests_total", "imagine_denoising_steps_total", "imagine_storage_writes_total",
            "imagine_http_requests_total", "imagine_job_latency_seconds_bucket"} <= names
    assert not scraped.query('{__name__=~"ray_imagine_.+"}')  # the rename caught every one
    deployments = {s["metric"].get("deployment") for s in series}
    assert {"Ingress", "TextEncoder", "Diffuser", "Upscaler", "Publisher"} <= deployments
    assert all("job_id" not in s["metric"] and "prompt" not in s["metric"] for s in series)
    steps = scraped.query('sum(imagine_denoising_steps_total{cluster="local"})')
    assert float(steps[0]["value"][1]) >= 3 * 2 * 4 + 3  # at least the succeeded jobs' image-steps
    codes = {s["metric"]["code"] for s in scraped.query('imagine_http_requests_total{cluster="local"}')}
    assert {"200", "202", "404", "422"} <= codes
    handlers = {s["metric"]["handler"] for s in scraped.query('imagine_http_requests_total{cluster="local"}')}
    assert "/v1/jobs/{job_id}" in handlers and not any("img_" in h for h in handlers)


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_returns_data(scraped, dashboard):
    """Every target of every panel evaluates without error, and every panel shows at least one series."""
    queries = panel_queries(json.loads(dashboard.read_text()))
    panels = sorted({title for title, _ in queries})
    assert queries
    deadline = time.monotonic() + 30  # a rate() needs two scrapes of a series that appeared last
    while True:
        answers = [(title, expr, scraped.query(expand(expr))) for title, expr in queries]  # raises on bad PromQL
        empty = [p for p in panels if not any(result for title, _, result in answers if title == p)]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not empty, f"{len(empty)} of {len(panels)} panels show no data: " + "; ".join(
        f"{title}: {[expr for t, expr, _ in answers if t == title]}" for title in empty)
    print(f"{dashboard.stem}: {len(panels)} panels, {len(queries)} queries, all panels returned data")


def test_every_alert_expression_evaluates(scraped):
    rules = [r for g in yaml.safe_load((ROOT / "monitoring" / "alerts.yml").read_text())["groups"]
             for r in g["rules"]]
    assert len(rules) >= 6
    for rule in rules:
        scraped.query(rule["expr"])  # raises on a PromQL error
    # healthy cluster after a healthy workload: nothing is firing
    firing = scraped.query('ALERTS{alertstate="firing"}')
    assert not firing, firing
