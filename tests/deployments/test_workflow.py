"""The Midjourney workflow end to end through HTTP and the CLI: U (upscale one image), V (variations of one image),
reroll, image-to-image from a stored or an uploaded image, the lineage of jobs, a key's job history, and webhooks
delivered to a receiver on loopback (signature, order, retries)."""
import base64
import hashlib
import hmac
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from .test_api import wait_job

PROMPT = "a red circle on a black background"


def png_of(storage, key: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.get_bytes(key))).convert("RGB")).astype(float)


def png_b64(size=(64, 64), fmt="PNG", color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def parent(app):
    import requests
    _, url, key = app
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {key}"
    http.base = url
    r = http.post(f"{http.base}/v1/jobs", json={"prompt": PROMPT, "size": "64x64", "seed": 21, "steps": 4})
    assert r.status_code == 202, r.text
    job = wait_job(http, r.json()["id"])
    assert job["state"] == "succeeded" and len(job["images"]) == 4 and job["action"] == "imagine"
    return job


def child(http, path: str, **kw) -> dict:
    r = http.post(f"{http.base}/v1/jobs/{path}", **kw)
    assert r.status_code == 202, r.text
    return r.json()


def test_upscale_one_image_without_sampling(http, parent, make_storage, tiny_pipeline):
    from pipeline.generate import image_tensor
    job = child(http, f"{parent['id']}/images/2/upscale")
    assert job["action"] == "upscale" and job["parent_id"] == parent["id"] and job["state"] == "queued"
    assert job["request"]["upscale_only"] == 2 and job["request"]["init_key"] == parent["images"][1]["key"]
    done = wait_job(http, job["id"])
    assert done["state"] == "succeeded", done
    [image] = done["images"]
    assert (image["width"], image["height"]) == (128, 128) and image["seed"] == parent["images"][1]["seed"]
    storage = make_storage("imagine-test")
    big = png_of(storage, image["key"])
    # exactly the Upscaler run on the stored image (no sampling): the same in this process, within 1/255
    source = image_tensor(storage.get_bytes(parent["images"][1]["key"]), 64, 64)
    expected = tiny_pipeline.upscaler.upscale(source[None], 2)[0].permute(1, 2, 0).numpy() * 255
    assert big.shape == (128, 128, 3) and np.abs(big - expected).max() <= 1.01
    assert http.get(f"{http.base}/v1/jobs/{parent['id']}").json()["children"][:1] == [job["id"]]


@pytest.mark.parametrize("strength", [0.3, 0.6])
def test_variations_start_from_the_chosen_image(http, parent, make_storage, strength):
    job = child(http, f"{parent['id']}/images/3/variations", json={"strength": strength})
    assert job["action"] == "vary" and job["request"]["strength"] == strength and job["request"]["n"] == 4
    done = wait_job(http, job["id"])
    assert done["state"] == "succeeded", done
    seeds = [im["seed"] for im in done["images"]]
    assert len(set(seeds)) == 4 and seeds == [(seeds[0] + i) % 2**32 for i in range(4)]  # recorded, as always
    storage = make_storage("imagine-test")
    chosen = png_of(storage, parent["images"][2]["key"])
    other = png_of(storage, parent["images"][0]["key"])
    for image in done["images"]:
        varied = png_of(storage, image["key"])
        assert varied.shape == chosen.shape and np.abs(varied - chosen).mean() > 0  # changed ...
    if strength == 0.3:  # ... but nearer the chosen image than its sibling (the tiny model's noise dominates at 0.6)
        mean_to_chosen = np.mean([np.abs(png_of(storage, im["key"]) - chosen).mean() for im in done["images"]])
        assert mean_to_chosen < np.abs(other - chosen).mean()
    assert job["id"] in http.get(f"{http.base}/v1/jobs/{parent['id']}").json()["children"]


def test_reroll_keeps_the_prompt_and_settings_with_new_seeds(http, parent):
    job = child(http, f"{parent['id']}/reroll")
    assert job["action"] == "reroll" and job["parent_id"] == parent["id"]
    same = ("prompt", "negative_prompt", "n", "steps", "width", "height", "guidance_scale", "scheduler")
    assert {k: job["request"][k] for k in same} == {k: parent["request"][k] for k in same}
    assert job["request"]["seed"] != parent["request"]["seed"]
    done = wait_job(http, job["id"])
    assert done["state"] == "succeeded" and len(done["images"]) == 4


def test_image_to_image_from_a_stored_and_an_uploaded_image(http, parent):
    stored = http.post(f"{http.base}/v1/jobs", json={"prompt": "a blue square", "size": "64x64", "steps": 4,
                                                     "init_image": {"job_id": parent["id"], "index": 1},
                                                     "strength": 0.5})
    assert stored.status_code == 202, stored.text
    assert stored.json()["action"] == "img2img" and stored.json()["request"]["init_key"] == parent["images"][0]["key"]
    uploaded = http.post(f"{http.base}/v1/jobs", json={"prompt": "a blue square", "size": "64x64", "steps": 4, "n": 1,
                                                       "init_image": {"png_base64": png_b64((48, 80))}})
    assert uploaded.status_code == 202, uploaded.text
    assert uploaded.json()["request"]["strength"] == 0.6  # the default
    for r in (stored, uploaded):
        done = wait_job(http, r.json()["id"])
        assert done["state"] == "succeeded", done


@pytest.mark.parametrize("init, message", [
    ({"png_base64": "not base64!"}, "not base64"),
    ({"png_base64": base64.b64encode(b"GIF89a" + b"\0" * 64).decode()}, "not a readable image"),
    ({"png_base64": png_b64(fmt="JPEG")}, "must be a PNG"),
    ({"png_base64": png_b64((4, 64))}, "within 8..2048"),
    ({"job_id": "img_doesnotexist0000000000", "index": 1}, "no job"),
    ({"job_id": "img_x"}, "index is needed"),
    ({"png_base64": png_b64(), "job_id": "img_x", "index": 1}, "either"),
])
def test_bad_init_images_get_422(http, init, message):
    r = http.post(f"{http.base}/v1/jobs", json={"prompt": "a blue square", "init_image": init})
    assert r.status_code == 422 and message in r.text, r.text


def test_children_are_refused_with_reasons(http, parent, other_key):
    import requests
    base = f"{http.base}/v1/jobs/{parent['id']}"
    assert http.post(f"{base}/images/5/upscale").status_code == 422
    assert http.post(f"{base}/images/0/variations").status_code == 422
    assert http.post(f"{base}/images/1/variations", json={"strength": 1.5}).status_code == 422
    assert http.post(f"{http.base}/v1/jobs/img_doesnotexist0000000000/reroll").status_code == 404
    running = http.post(f"{http.base}/v1/jobs", json={"prompt": PROMPT, "steps": 150, "n": 1}).json()
    r = http.post(f"{http.base}/v1/jobs/{running['id']}/reroll")
    assert r.status_code == 422 and "wait for it to end" in r.text
    http.delete(f"{http.base}/v1/jobs/{running['id']}")
    stranger = requests.post(f"{base}/images/1/upscale", headers={"Authorization": f"Bearer {other_key}"})
    assert stranger.status_code == 404  # another key's job does not exist for it
    r = requests.post(f"{http.base}/v1/jobs", headers={"Authorization": f"Bearer {other_key}"},
                      json={"prompt": "x", "init_image": {"job_id": parent["id"], "index": 1}})
    assert r.status_code == 422 and "of yours" in r.text


def test_a_keys_history_pages_newest_first(http, parent, other_key):
    import requests
    first = http.get(f"{http.base}/v1/jobs", params={"limit": 2}).json()
    assert len(first["jobs"]) == 2 and first["next_before"] is not None
    created = [j["created_at"] for j in first["jobs"]]
    assert created == sorted(created, reverse=True)
    seen, page = [j["id"] for j in first["jobs"]], first
    while page["next_before"] is not None:
        page = http.get(f"{http.base}/v1/jobs", params={"limit": 2, "before": page["next_before"]}).json()
        seen += [j["id"] for j in page["jobs"]]
    assert parent["id"] in seen and len(seen) == len(set(seen))
    theirs = requests.get(f"{http.base}/v1/jobs", headers={"Authorization": f"Bearer {other_key}"}).json()["jobs"]
    assert parent["id"] not in [j["id"] for j in theirs]
    assert http.get(f"{http.base}/v1/jobs", params={"limit": 0}).status_code == 422


# ---- webhooks --------------------------------------------------------------------------------------
class Receiver:
    """A webhook receiver on loopback: records every delivery; answers 503 to the first `fail_first` of an event."""

    def __init__(self, fail_first: dict[str, int] | None = None):
        self.deliveries, self.fail_first, self.lock = [], dict(fail_first or {}), threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                event = self.headers.get("Webhook-Event")
                with receiver.lock:
                    fail = receiver.fail_first.get(event, 0) > 0
                    if fail:
                        receiver.fail_first[event] -= 1
                    receiver.deliveries.append((dict(self.headers), body, 503 if fail else 200, time.monotonic()))
                self.send_response(503 if fail else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def verify(secret: str, headers: dict, body: bytes) -> bool:
    """Standard Webhooks' check, written out: HMAC-SHA256 of "id.timestamp.body" under the key's secret."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['Webhook-Id']}.{headers['Webhook-Timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(expected, s.split(",", 1)[1]) for s in headers["Webhook-Signature"].split())


def test_webhook_events_are_signed_ordered_and_retried(http):
    receiver = Receiver(fail_first={"completed": 2})
    try:
        secret = http.get(f"{http.base}/v1/webhooks/default/secret").json()["key"]
        r = http.post(f"{http.base}/v1/jobs", json={"prompt": PROMPT, "steps": 12, "n": 2, "size": "64x64",
                                                     "webhook": receiver.url})
        assert r.status_code == 202, r.text
        job = r.json()
        assert wait_job(http, job["id"])["state"] == "succeeded"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(d[2] == 200 and d[0]["Webhook-Event"] == "completed"
                                                  for d in receiver.deliveries) < 1:
            time.sleep(0.2)
        deliveries = list(receiver.deliveries)
        assert all(verify(secret, h, body) for h, body, _, _ in deliveries)
        records = [json.loads(body) for _, body, _, _ in deliveries]
        assert {rec["id"] for rec in records} == {job["id"]}
        events = [h["Webhook-Event"] for h, _, status, _ in deliveries if status == 200]
        assert events[0] == "start" and events[-1] == "completed" and set(events[1:-1]) <= {"progress"}
        assert "progress" in events
        progress = [rec["progress"] for (h, _, status, _), rec in zip(deliveries, records)
                    if status == 200 and h["Webhook-Event"] == "progress"]
        assert progress == sorted(progress)
        completed = [(h, rec, t) for (h, _, _, t), rec in zip(deliveries, records) if h["Webhook-Event"] == "completed"]
        assert len(completed) == 3  # two 503s, then delivered: retried, with the same message id
        assert len({h["Webhook-Id"] for h, _, _ in completed}) == 1
        gaps = [b[2] - a[2] for a, b in zip(completed, completed[1:])]
        assert gaps[0] >= 0.15 and gaps[1] > gaps[0]  # backoff 0.2 s, doubling
        final = completed[-1][1]
        assert final["state"] == "succeeded" and len(final["images"]) == 2 and final["images"][0]["url"]
        wrong = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")
        assert not verify(wrong, *deliveries[0][:2])
    finally:
        receiver.close()


def test_webhook_events_filter_and_refused_urls(http):
    receiver = Receiver()
    try:
        r = http.post(f"{http.base}/v1/jobs", json={"prompt": PROMPT, "steps": 6, "n": 1, "webhook": receiver.url,
                                                     "webhook_events_filter": ["completed"]})
        assert r.status_code == 202, r.text
        assert wait_job(http, r.json()["id"])["state"] == "succeeded"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not receiver.deliveries:
            time.sleep(0.2)
        time.sleep(0.5)
        assert [h["Webhook-Event"] for h, *_ in receiver.deliveries] == ["completed"]
    finally:
        receiver.close()
    for url in ("http://169.254.169.254/latest/meta-data", "http://10.1.2.3/hook", "ftp://127.0.0.1/x",
                "http://metadata.google.internal/x"):
        r = http.post(f"{http.base}/v1/jobs", json={"prompt": PROMPT, "webhook": url})
        assert r.status_code == 422 and "webhook" in r.text, (url, r.text)
    r = http.post(f"{http.base}/v1/jobs", json={"prompt": PROMPT, "webhook": receiver.url,
                                                 "webhook_events_filter": ["finished"]})
    assert r.status_code == 422


# ---- the CLI ---------------------------------------------------------------------------------------
def test_cli_upscale_vary_and_reroll(app, parent, tmp_path, capsys):
    from cluster.cli import main
    _, url, key = app
    (tmp_path / "imagine.yaml").write_text("{}\n")
    common = ["--config", str(tmp_path / "imagine.yaml"), "--endpoint", url, "--api-key", key]
    assert main(["upscale", parent["id"], "2", "--out", str(tmp_path / "u"), *common]) == 0, capsys.readouterr().err
    [png] = [p for p in (tmp_path / "u").glob("*.png") if not p.name.endswith("_grid.png")]
    assert Image.open(png).size == (128, 128)
    assert main(["vary", parent["id"], "3", "--strong", "--out", str(tmp_path / "v"), *common]) == 0
    assert len([p for p in (tmp_path / "v").glob("*.png") if not p.name.endswith("_grid.png")]) == 4
    assert main(["reroll", parent["id"], "--out", str(tmp_path / "r"), *common]) == 0
    assert len([p for p in (tmp_path / "r").glob("*.png") if not p.name.endswith("_grid.png")]) == 4
    actions = {}
    for job_id in http_children(url, key, parent["id"]):
        job = json.loads(urlopen_json(f"{url}/v1/jobs/{job_id}", key))
        actions.setdefault(job["action"], []).append(job["request"].get("strength"))
    assert 0.6 in actions["vary"] and "upscale" in actions and "reroll" in actions
    assert main(["vary", parent["id"], "9", *common]) == 2
    assert "choose 1..4" in capsys.readouterr().err


def urlopen_json(url: str, key: str) -> str:
    import urllib.request
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    return urllib.request.urlopen(req, timeout=10).read().decode()


def http_children(url: str, key: str, job_id: str) -> list[str]:
    return json.loads(urlopen_json(f"{url}/v1/jobs/{job_id}", key))["children"]
