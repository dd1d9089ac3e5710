"""Job webhooks (deployments/webhooks.py) against a real HTTP receiver on loopback: signatures, order per job,
retries with growing backoff, no retry on 4xx, throttling, a caller that is never blocked, URL validation.
No Ray."""
import asyncio
import base64
import collections
import datetime
import hashlib
import hmac
import ipaddress
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cluster.config import ConfigError, ImagineConfig, WebhooksConfig
from deployments import webhook_urls
from deployments.webhooks import (
    WebhookSender,
    WebhookURLError,
    key_secret,
    sign,
    validate_events_filter,
    validate_webhook_url,
    verify,
)
from pipeline.request import InvalidRequestError

SERVER_SECRET = b"server-webhook-secret-for-tests"


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST. `plan[path]` holds what its next requests get: a
    status (500, 400, ...) or ("sleep", seconds, status); then 200."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.requests: list[dict] = []
        self.plan: dict[str, list] = collections.defaultdict(list)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    action = receiver.plan[self.path].pop(0) if receiver.plan[self.path] else 200
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                              "t": time.monotonic(), "answer": action})
                if isinstance(action, tuple):
                    time.sleep(action[1])
                    action = action[2]
                try:
                    self.send_response(action)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the sender gave up waiting
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def at(self, path: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def config(**overrides) -> WebhooksConfig:
    return WebhooksConfig.model_validate({"backoff_s": 0.05, "timeout_s": 2.0, "progress_every_s": 0, **overrides})


def record(job_id: str, state: str = "running", progress: float = 0.0, **extra) -> dict:
    return {"id": job_id, "state": state, "progress": progress, "key_id": "k1", **extra}


def run(coro):
    return asyncio.run(coro)


def events_of(requests: list[dict]) -> list[str]:
    return [r["headers"]["Webhook-Event"] for r in requests]


# ---- signatures -----------------------------------------------------------------------------------------

def test_signature_with_the_key_secret_derived_from_the_server_secret(receiver):
    async def main():
        sender = WebhookSender(config(), SERVER_SECRET)
        sender.notify("img_a", receiver.url("/hook"), "key-1", "start", record("img_a", extra=[1, 2]))
        assert await sender.drain(10)
        await sender.close()
    run(main())
    [req] = receiver.at("/hook")
    h, body = req["headers"], req["body"]
    assert h["Content-Type"] == "application/json" and h["Webhook-Event"] == "start"
    assert json.loads(body) == record("img_a", extra=[1, 2])
    assert h["Webhook-Id"].startswith("msg_") and abs(int(h["Webhook-Timestamp"]) - time.time()) < 60
    # Standard Webhooks by hand: key = HMAC-SHA256(server secret, key id); v1,base64(HMAC(key, "id.ts.body"))
    key = hmac.new(SERVER_SECRET, b"key-1", hashlib.sha256).digest()
    signed = f"{h['Webhook-Id']}.{h['Webhook-Timestamp']}.".encode() + body
    assert h["Webhook-Signature"] == "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    secret = key_secret(SERVER_SECRET, "key-1")
    assert secret == "whsec_" + base64.b64encode(key).decode()
    assert verify(secret, h, body)
    assert not verify(key_secret(SERVER_SECRET, "key-2"), h, body)  # another key's secret
    assert not verify(key_secret(b"another server", "key-1"), h, body)
    assert not verify(secret, h, body + b" ")  # a changed body
    assert not verify(secret, h, body, now=time.time() + 3600)  # a replay an hour later
    assert key_secret(SERVER_SECRET, None) == key_secret(SERVER_SECRET, "")  # jobs without a key share one
    assert sign(secret, b"{}", 1, "msg_x") != sign(secret, b"{}", 2, "msg_x")


# ---- order, throttling ------------------------------------------------------------------------------------

def test_events_arrive_in_order_per_job_with_two_jobs_interleaved(receiver):
    receiver.plan["/a"] = [500] + [("sleep", 0.3, 200)] * 2  # job a's receiver fails once, then is slow
    async def main():
        sender = WebhookSender(config(), SERVER_SECRET)
        for job in ("a", "b"):
            sender.notify(f"img_{job}", receiver.url(f"/{job}"), "k", "start", record(f"img_{job}"))
        for i in range(1, 6):
            await asyncio.sleep(0.1)
            for job in ("a", "b"):
                sender.notify(f"img_{job}", receiver.url(f"/{job}"), "k", "progress",
                              record(f"img_{job}", progress=i / 10))
        for job in ("a", "b"):
            sender.notify(f"img_{job}", receiver.url(f"/{job}"), "k", "completed",
                          record(f"img_{job}", state="succeeded", progress=1.0))
        assert sender.pending() > 0
        assert await sender.drain(20)
        assert sender.pending() == 0
        return sender.counts
    counts = run(main())
    for job in ("a", "b"):
        got = [r for r in receiver.at(f"/{job}") if r["answer"] != 500]
        names = events_of(got)
        assert names[0] == "start" and names[-1] == "completed" and set(names[1:-1]) <= {"progress"}
        progress = [json.loads(r["body"])["progress"] for r in got]
        assert progress == sorted(progress) and progress[0] == 0.0 and progress[-1] == 1.0
        assert all(json.loads(r["body"])["id"] == f"img_{job}" for r in got)
        assert len({r["headers"]["Webhook-Id"] for r in got}) == len(got)  # one id per event
    # job b was not held up by job a's failing, slow receiver
    assert receiver.at("/b")[-1]["t"] < receiver.at("/a")[-1]["t"]
    assert counts["delivered"] == len(receiver.at("/a")) - 1 + len(receiver.at("/b")) and counts["retries"] == 1
    assert counts["coalesced"] >= 1  # a's receiver was behind: it got the newest progress, not each one
    assert events_of(receiver.at("/a")).count("progress") < 5 and events_of(receiver.at("/b")).count("progress") >= 3


def test_waiting_progress_events_are_coalesced(receiver):
    async def main():
        sender = WebhookSender(config(), SERVER_SECRET)
        url = receiver.url("/c")
        sender.notify("img_c", url, "k", "start", record("img_c"))
        for i in range(1, 6):  # none is sent before the next comes (no await in between): the newest goes
            sender.notify("img_c", url, "k", "progress", record("img_c", progress=i / 10))
        assert await sender.drain(10)
        sender.notify("img_c", url, "k", "progress", record("img_c", progress=0.6))
        sender.notify("img_c", url, "k", "progress", record("img_c", progress=0.7))
        sender.notify("img_c", url, "k", "completed", record("img_c", state="succeeded", progress=1.0))
        assert await sender.drain(10)  # the completed event superseded the waiting progress
        return sender.counts
    counts = run(main())
    got = receiver.at("/c")
    assert events_of(got) == ["start", "progress", "completed"] and json.loads(got[1]["body"])["progress"] == 0.5
    assert counts["coalesced"] == 6 and counts["delivered"] == 3


def test_progress_is_throttled_but_start_and_completed_always_go(receiver):
    async def main():
        sender = WebhookSender(config(progress_every_s=30), SERVER_SECRET)
        url = receiver.url("/t")
        sender.notify("img_t", url, "k", "start", record("img_t"))
        sender.notify("img_t", url, "k", "progress", record("img_t", progress=0.1))
        assert await sender.drain(10)
        for i in range(2, 6):
            sender.notify("img_t", url, "k", "progress", record("img_t", progress=i / 10))
            await asyncio.sleep(0.01)
        sender.notify("img_t", url, "k", "completed", record("img_t", state="failed", progress=0.5))
        assert await sender.drain(10)
        return sender.counts
    counts = run(main())
    got = receiver.at("/t")
    assert events_of(got) == ["start", "progress", "completed"]
    assert json.loads(got[1]["body"])["progress"] == 0.1 and json.loads(got[2]["body"])["state"] == "failed"
    assert counts["throttled"] == 4


def test_events_filter(receiver):
    async def main():
        sender = WebhookSender(config(), SERVER_SECRET)
        url, only = receiver.url("/f"), validate_events_filter(["completed"])
        for event in ("start", "progress", "completed"):
            sender.notify("img_f", url, "k", event, record("img_f"), events=only)
        assert await sender.drain(10)
        return sender.counts
    counts = run(main())
    assert events_of(receiver.at("/f")) == ["completed"] and counts["filtered"] == 2
    assert validate_events_filter(None) == ("start", "progress", "completed")
    assert validate_events_filter(["completed", "start", "start"]) == ("start", "completed")
    for bad in ([], ["output"], "start"):
        with pytest.raises(InvalidRequestError) as e:
            validate_events_filter(bad)
        assert e.value.field == "webhook_events_filter"


# ---- retries ----------------------------------------------------------------------------------------------

def test_failures_are_retried_with_growing_backoff_then_delivered(receiver):
    receiver.plan["/r"] = [500, 429, 503]
    outcomes = []
    async def main():
        sender = WebhookSender(config(backoff_s=0.1, max_attempts=5), SERVER_SECRET,
                               on_outcome=lambda event, outcome: outcomes.append((event, outcome)))
        sender.notify("img_r", receiver.url("/r"), "k", "completed", record("img_r", state="succeeded"))
        assert await sender.drain(10)
        return sender.counts
    counts = run(main())
    got = receiver.at("/r")
    assert [r["answer"] for r in got] == [500, 429, 503, 200]
    assert len({r["headers"]["Webhook-Id"] for r in got}) == 1  # the same message, attempted again
    secret = key_secret(SERVER_SECRET, "k")
    assert all(verify(secret, r["headers"], r["body"]) for r in got)  # each attempt signed anew
    gaps = [b["t"] - a["t"] for a, b in zip(got, got[1:])]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19 and gaps[2] >= 0.39  # 0.1, 0.2, 0.4 s
    assert gaps[0] < gaps[1] < gaps[2]
    assert counts["delivered"] == 1 and counts["retries"] == 3 and outcomes == [("completed", "delivered")]


def test_a_timeout_is_retried_and_cut_off_at_the_deadline(receiver):
    receiver.plan["/slow"] = [("sleep", 3.0, 200)]
    async def main():
        sender = WebhookSender(config(timeout_s=1.0, backoff_s=0.05), SERVER_SECRET)
        sender.notify("img_s", receiver.url("/slow"), "k", "start", record("img_s"))
        # the event loop (the job) runs on while the receiver sits on the request
        lags = []
        for _ in range(20):
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t)
        assert max(lags) < 0.5
        assert await sender.drain(10)
        return sender.counts
    counts = run(main())
    got = receiver.at("/slow")
    assert [r["answer"] for r in got] == [("sleep", 3.0, 200), 200]
    assert got[1]["t"] - got[0]["t"] < 2.5  # gave up after timeout_s, not after the receiver's 3 s
    assert counts["delivered"] == 1 and counts["retries"] == 1


def test_the_timeout_counts_from_when_a_thread_takes_the_attempt(receiver):
    for path in ("/s1", "/s2"):
        receiver.plan[path] = [("sleep", 0.4, 200)]
    async def main():
        sender = WebhookSender(config(timeout_s=0.6), SERVER_SECRET, max_workers=1)  # one thread for all jobs
        for job in ("s1", "s2", "s3"):  # s3 waits 0.8 s for the thread: not its receiver's fault
            sender.notify(f"img_{job}", receiver.url(f"/{job}"), "k", "start", record(f"img_{job}"))
        assert await sender.drain(10)
        return sender.counts
    counts = run(main())
    assert counts["delivered"] == 3 and counts["retries"] == 0


def test_a_4xx_is_not_retried_and_later_events_still_go(receiver):
    receiver.plan["/bad"] = [400]
    outcomes = []
    async def main():
        sender = WebhookSender(config(), SERVER_SECRET, on_outcome=lambda e, o: outcomes.append((e, o)))
        sender.notify("img_x", receiver.url("/bad"), "k", "start", record("img_x"))
        sender.notify("img_x", receiver.url("/bad"), "k", "completed", record("img_x", state="succeeded"))
        assert await sender.drain(10)
        return sender.counts
    counts = run(main())
    assert [(r["headers"]["Webhook-Event"], r["answer"]) for r in receiver.at("/bad")] == [("start", 400),
                                                                                           ("completed", 200)]
    assert counts["rejected"] == 1 and counts["retries"] == 0 and counts["delivered"] == 1
    assert outcomes == [("start", "rejected"), ("completed", "delivered")]


def test_out_of_attempts_then_the_next_event(receiver):
    receiver.plan["/down"] = [500] * 3
    async def main():
        sender = WebhookSender(config(max_attempts=3, backoff_s=0.02), SERVER_SECRET)
        sender.notify("img_d", receiver.url("/down"), "k", "start", record("img_d"))
        sender.notify("img_d", receiver.url("/down"), "k", "completed", record("img_d", state="succeeded"))
        assert await sender.drain(10)
        return sender.counts
    counts = run(main())
    assert events_of(receiver.at("/down")) == ["start"] * 3 + ["completed"]
    assert counts["failed"] == 1 and counts["delivered"] == 1 and counts["retries"] == 2


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_notify_never_blocks_or_raises():
    url = f"http://127.0.0.1:{_closed_port()}/nobody"  # connection refused
    async def main():
        sender = WebhookSender(config(max_attempts=3, backoff_s=0.05), SERVER_SECRET)
        t = time.monotonic()
        for i in range(200):
            sender.notify(f"img_{i % 20}", url, "k", "progress", record(f"img_{i % 20}", progress=i / 200))
        sender.notify("img_z", url, "k", "completed", {"not": object()})  # not JSON: sent as its str()
        sender.notify("img_z", "ftp://127.0.0.1/x", "k", "start", record("img_z"))  # refused at delivery
        sender.notify("img_y", "http://10.0.0.1/x", "k", "start", record("img_y"))  # never connected to
        sender.notify("img_z", url, "k", "no-such-event", record("img_z"))
        sender.notify("img_z", None, "k", "start", record("img_z"))  # no webhook: nothing
        assert time.monotonic() - t < 0.5
        assert await sender.drain(20)
        await sender.close()
        sender.notify("img_z", url, "k", "start", record("img_z"))  # after close: dropped quietly
        return sender.counts
    counts = run(main())
    assert counts["failed"] >= 21 and counts["refused"] == 2 and counts["dropped"] == 1 and counts["delivered"] == 0
    # from a thread with no event loop and none known yet: dropped, not raised
    WebhookSender(config(), SERVER_SECRET).notify("img_q", url, "k", "start", record("img_q"))


def test_notify_from_another_thread_uses_the_senders_loop(receiver):
    async def main():
        sender = WebhookSender(config(), SERVER_SECRET, loop=asyncio.get_running_loop())
        threads = [threading.Thread(target=sender.notify, args=("img_th", receiver.url("/th"), "k", "start",
                                                                 record("img_th")))]
        threads[0].start()
        await asyncio.to_thread(threads[0].join)
        await asyncio.sleep(0.05)
        assert await sender.drain(10)
    run(main())
    assert events_of(receiver.at("/th")) == ["start"]


def test_url_checked_again_before_each_delivery(receiver, monkeypatch):
    answers = {"hooks.test": "127.0.0.1"}
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host in answers:
            return real(answers[host], port, *args, **kwargs)
        return real(host, port, *args, **kwargs)
    monkeypatch.setattr(webhook_urls, "_getaddrinfo", fake)
    url = receiver.url("/dns", host="hooks.test")
    assert validate_webhook_url(url, WebhooksConfig().allowed_hosts) == url
    async def main():
        sender = WebhookSender(config(), SERVER_SECRET)
        sender.notify("img_n", url, "k", "start", record("img_n"))
        assert await sender.drain(10)
        answers["hooks.test"] = "10.0.0.1"  # the name now points inside the network
        sender.notify("img_n", url, "k", "completed", record("img_n", state="succeeded"))
        assert await sender.drain(10)
        return sender.counts
    counts = run(main())
    [got] = receiver.at("/dns")
    assert got["headers"]["Host"] == f"hooks.test:{receiver.port}"  # connected to the checked address, by name
    assert counts["delivered"] == 1 and counts["refused"] == 1


def _self_signed(tmp_path):
    """A certificate for localhost, 127.0.0.1 and hooks.test (its own issuer) and a server context with it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "webhook receiver")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.DNSName("hooks.test"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return tmp_path / "cert.pem", ctx


def test_https_checks_the_certificate_against_the_name_while_connecting_to_the_checked_address(tmp_path, monkeypatch):
    cert, ctx = _self_signed(tmp_path)
    real = socket.getaddrinfo
    monkeypatch.setattr(webhook_urls, "_getaddrinfo",
                        lambda host, *a, **k: real("127.0.0.1" if host == "hooks.test" else host, *a, **k))
    tls = Receiver(tls=ctx)
    try:
        async def main(url):
            sender = WebhookSender(config(max_attempts=2, backoff_s=0.02), SERVER_SECRET)
            sender.notify("img_h", url, "k", "start", record("img_h"))
            assert await sender.drain(10)
            await sender.close()
            return sender.counts
        # a certificate nobody vouches for: not delivered
        assert run(main(tls.url("/s", host="hooks.test", scheme="https")))["failed"] == 1
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # now trusted (OpenSSL's default verify paths read it)
        assert run(main(tls.url("/s", host="hooks.test", scheme="https")))["delivered"] == 1
        assert run(main(tls.url("/s", scheme="https")))["delivered"] == 1  # an address literal, checked as such
        assert [r["headers"]["Host"] for r in tls.at("/s")] == [f"hooks.test:{tls.port}", f"127.0.0.1:{tls.port}"]
    finally:
        tls.close()


# ---- URL validation -----------------------------------------------------------------------------------------

LOOPBACK = WebhooksConfig().allowed_hosts


@pytest.fixture
def dns(monkeypatch):
    """Names for the tests: *.test and example names resolve as listed (several addresses allowed)."""
    table = {"hooks.test": ["127.0.0.1"], "evil.test": ["127.0.0.1", "10.0.0.5"], "api.example.com": ["93.184.215.14"],
             "internal.example.com": ["192.168.1.5"], "example.org": ["93.184.215.14"], "lan.test": ["10.1.2.3"],
             "mapped.test": ["::ffff:10.0.0.1"]}
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host.endswith((".test", ".example.com", "example.org")):
            if host not in table:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                      (a, port, 0, 0) if ":" in a else (a, port)) for a in table[host]]
        return real(host, port, *args, **kwargs)
    monkeypatch.setattr(webhook_urls, "_getaddrinfo", fake)
    return table


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/hook?x=1", "https://127.0.0.5/h", "http://localhost:9/x",
                                 "http://[::1]:9999/h", "http://hooks.test:1234/h"])
def test_loopback_urls_are_allowed_by_default(url, dns):
    assert validate_webhook_url(url, LOOPBACK) == url


@pytest.mark.parametrize("url, why", [
    ("http://10.0.0.1/h", "not allowed"),
    ("http://169.254.169.254/latest/meta-data/", "not allowed"),
    ("http://0.0.0.0:8000/", "not allowed"),
    ("http://8.8.8.8/", "not allowed"),  # public, but no name is allowed by default
    ("http://[::ffff:10.0.0.1]/", "not allowed"),
    ("http://mapped.test/", "not allowed"),
    ("http://evil.test/h", "not allowed"),  # one of its addresses is internal
    ("http://api.example.com/h", "not allowed"),
    ("http://nowhere.test/h", "cannot be resolved"),
    ("ftp://127.0.0.1/h", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("127.0.0.1:8000/h", "http:// or https://"),
    ("http://user:pass@127.0.0.1/h", "credentials"),
    ("http://user@127.0.0.1/h", "credentials"),
    ("http://127.0.0.1:99999/h", "port"),
    ("http:///h", "no host"),
    ("http://127.0.0.1/a b", "spaces"),
    ("http://127.0.0.1/\r\nX-Injected: 1", "control"),
    ("", "http:// or https://"),
    ("http://127.0.0.1/" + "a" * 3000, "at most"),
])
def test_refused_urls(url, why, dns):
    with pytest.raises(WebhookURLError) as e:
        validate_webhook_url(url, LOOPBACK)
    assert isinstance(e.value, InvalidRequestError) and e.value.field == "webhook" and why in e.value.message
    assert e.value.transient == (url == "http://nowhere.test/h")


def test_allowed_hosts_open_ranges_and_names(dns):
    lan = ("10.0.0.0/8",)
    assert validate_webhook_url("http://10.0.0.1/h", lan) and validate_webhook_url("http://lan.test/h", lan)
    assert validate_webhook_url("http://mapped.test/h", lan)
    for url in ("http://127.0.0.1/h", "http://169.254.169.254/", "http://192.168.1.5/"):
        with pytest.raises(WebhookURLError):
            validate_webhook_url(url, lan)
    named = ("*.example.com",)  # names there may resolve to public addresses only
    assert validate_webhook_url("https://api.example.com/h", named)
    for url in ("https://internal.example.com/h", "https://example.org/h", "http://8.8.8.8/"):
        with pytest.raises(WebhookURLError):
            validate_webhook_url(url, named)
    anything_public = ("*",)
    assert validate_webhook_url("http://8.8.8.8/", anything_public)
    assert validate_webhook_url("https://example.org/h", anything_public)
    for url in ("http://10.0.0.1/", "http://127.0.0.1/", "http://internal.example.com/", "http://169.254.169.254/"):
        with pytest.raises(WebhookURLError):
            validate_webhook_url(url, anything_public)
    assert validate_webhook_url("http://192.168.1.5/", ("*", "192.168.1.0/24"))
    with pytest.raises(ValueError):
        validate_webhook_url("http://127.0.0.1/", ("http://bad entry",))


# ---- config -------------------------------------------------------------------------------------------------

def test_config_section(tmp_path, monkeypatch):
    w = ImagineConfig().webhooks
    assert w.allowed_hosts == ("127.0.0.0/8", "::1", "localhost") and w.max_attempts == 5 and w.timeout_s == 5.0
    assert w.backoff_s == 0.5 and w.progress_every_s == 2.0 and w.secret_file == ".imagine/webhook-secret"
    assert ImagineConfig().resolve_paths(tmp_path).webhooks.secret_file == str(tmp_path / ".imagine/webhook-secret")
    cfg = ImagineConfig.from_dict({"webhooks": {"allowed_hosts": [" 10.0.0.0/8", "*.Example.COM.", "*"]}})
    assert cfg.webhooks.allowed_hosts == ("10.0.0.0/8", "*.example.com", "*")
    for bad in (["http://x"], ["*.*.com"], ["a b"]):
        with pytest.raises(ConfigError, match="webhooks.allowed_hosts"):
            ImagineConfig.from_dict({"webhooks": {"allowed_hosts": bad}})
    with pytest.raises(ConfigError, match="webhooks.max_attempts"):
        ImagineConfig.from_dict({"webhooks": {"max_attempts": 0}})
    # the server secret: the environment variable, else the file
    monkeypatch.delenv("IMAGINE_WEBHOOK_SECRET", raising=False)
    w = ImagineConfig().resolve_paths(tmp_path).webhooks
    assert w.server_secret() is None
    with pytest.raises(ValueError, match="IMAGINE_WEBHOOK_SECRET"):
        WebhookSender(w, w.server_secret())
    (tmp_path / ".imagine").mkdir()
    (tmp_path / ".imagine/webhook-secret").write_text("from-file\n")
    assert w.server_secret() == b"from-file"
    monkeypatch.setenv("IMAGINE_WEBHOOK_SECRET", "from-env")
    assert w.server_secret() == b"from-env"
