"""Job webhooks, as Replicate has them: a job may name a `webhook` URL and a `webhook_events_filter` (a subset
of `start`, `progress`, `completed`); the job's record is POSTed there (JSON) on those events.

Signatures follow Standard Webhooks (https://www.standardwebhooks.com), the scheme Replicate uses, so its
verification libraries work unchanged. Each message carries

    Webhook-Id: msg_...              the same for every attempt of one event (receivers dedupe on it)
    Webhook-Timestamp: 1712345678    unix seconds of this attempt
    Webhook-Signature: v1,<base64 of HMAC-SHA256(key, f"{id}.{timestamp}.{body}")>
    Webhook-Event: start | progress | completed     (informational; not signed)
    Content-Type: application/json

where the key is the API key's signing secret, `whsec_<base64 of the key>`: `key_secret(server_secret, key_id)`,
HMAC-SHA256 of the key's id under the server's webhook secret (config `webhooks.secret_env` / `secret_file`).

URLs are checked against `webhooks.allowed_hosts` (see `cluster.config.WebhooksConfig`) when a job is submitted
(`validate_webhook_url`, a 422 naming `webhook`) and again before every delivery attempt, whose connection then
goes to exactly the addresses that were checked (DNS cannot change in between), without following redirects
(deployments/webhook_urls.py).

`WebhookSender.notify()` never blocks and never raises: each job's events are delivered in order by one task per
job, each retried with exponential backoff on connection errors, timeouts, 5xx and 429 (not on other answers),
on a small thread pool of its own (a slow receiver never holds up the threads the job runner uses).

    sender = WebhookSender(cfg.webhooks, cfg.webhooks.server_secret())
    sender.notify(job_id, url, record.key_id, "progress", record.model_dump(mode="json"), events=filter)
    await sender.drain(10)  # at shutdown
"""
from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline.request import InvalidRequestError

from .webhook_urls import AllowList, Attempt, WebhookURLError, connection, resolve_target, validate_webhook_url

logger = logging.getLogger(__name__)
__all__ = ["EVENTS", "AllowList", "WebhookSender", "WebhookURLError", "key_secret", "sign", "validate_events_filter",
           "validate_webhook_url", "verify"]

EVENTS = ("start", "progress", "completed")
USER_AGENT = "imagine-webhooks/1"


def validate_events_filter(events: Iterable[str] | None) -> tuple[str, ...]:
    """A job's `webhook_events_filter`: the events in EVENTS order; None = all of them (Replicate's default).

    Raises:
        InvalidRequestError: for the field `webhook_events_filter` (empty, not a list, or an unknown event).
    """
    if events is None:
        return EVENTS
    if isinstance(events, str) or not isinstance(events, Iterable):
        raise InvalidRequestError("webhook_events_filter", f"must be a list of events: {', '.join(EVENTS)}")
    events = list(events)
    unknown = [e for e in events if e not in EVENTS]
    if unknown:
        raise InvalidRequestError("webhook_events_filter",
                                  f"unknown event(s) {unknown!r}; events are {', '.join(EVENTS)}")
    if not events:
        raise InvalidRequestError("webhook_events_filter", f"must name at least one of {', '.join(EVENTS)}")
    return tuple(e for e in EVENTS if e in events)


# ---- secrets and signatures ---------------------------------------------------------------------------

def key_secret(server_secret: bytes, key_id: str | None) -> str:
    """An API key's webhook signing secret, `whsec_<base64>` (the Standard Webhooks form): HMAC-SHA256 of the
    key's id under the server's secret. Jobs without a key (auth disabled) share the secret of key id ""."""
    if not server_secret:
        raise ValueError("no server webhook secret")
    key = hmac.new(server_secret, (key_id or "").encode(), hashlib.sha256).digest()
    return "whsec_" + base64.b64encode(key).decode()


def _key_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secret: str, body: bytes, timestamp: int, webhook_id: str) -> str:
    """The Webhook-Signature header's value: `v1,` + base64 of HMAC-SHA256 of f"{webhook_id}.{timestamp}.{body}"
    under the secret's key (the base64 after `whsec_`)."""
    mac = hmac.new(_key_bytes(secret), f"{webhook_id}.{int(timestamp)}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def verify(secret: str, headers: dict, body: bytes, tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """What a receiver checks: a `v1` signature of the headers' id and timestamp with this body matches, and the
    timestamp is within `tolerance_s` of now. (Header names as sent, or lowercased.)"""
    h = {k.lower(): v for k, v in headers.items()}
    try:
        webhook_id, timestamp = h["webhook-id"], int(h["webhook-timestamp"])
        expected = sign(secret, body, timestamp, webhook_id)
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    return any(hmac.compare_digest(expected, s) for s in h.get("webhook-signature", "").split())


# ---- delivery -----------------------------------------------------------------------------------------

@dataclass
class _Delivery:
    job_id: str
    event: str
    url: str
    secret: str
    body: bytes
    id: str = field(default_factory=lambda: "msg_" + secrets.token_hex(12))


@dataclass
class _Channel:
    """One job's deliveries: `pending` in order; `task` delivers them one at a time."""
    pending: collections.deque = field(default_factory=collections.deque)
    task: asyncio.Task | None = None
    in_flight: bool = False


class WebhookSender:
    """Delivers jobs' webhook events: in order per job, retried, throttled, never blocking the caller.

    `counts` (a Counter) for metrics: `delivered`, `rejected` (a 4xx other than 429, or a redirect: not retried),
    `refused` (the URL is no longer allowed), `failed` (out of attempts), `retries`, `throttled` (progress events
    dropped), `coalesced` (a waiting progress event replaced by a newer one or by the completed event), `filtered`,
    `dropped`. `on_outcome(event, outcome)`, if given, is called on the event loop with each event's final outcome
    (one of the first four), e.g. to count a Prometheus metric.
    """

    def __init__(self, cfg, server_secret: bytes | None, *, max_workers: int = 16,
                 on_outcome: Callable[[str, str], None] | None = None, loop: asyncio.AbstractEventLoop | None = None):
        """`cfg`: the WebhooksConfig; `server_secret`: `cfg.server_secret()` (ValueError when there is none)."""
        if not server_secret:
            raise ValueError(f"no webhook secret: set {cfg.secret_env} or write {cfg.secret_file}")
        self.cfg = cfg
        self.allowed = AllowList.parse(cfg.allowed_hosts)
        self.counts: collections.Counter[str] = collections.Counter()
        self.on_outcome = on_outcome
        self._server_secret = server_secret
        self._channels: dict[str, _Channel] = {}
        self._last_progress: dict[str, float] = {}
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="webhook")
        self._loop = loop
        self._closed = False

    # ---- the caller's side ----------------------------------------------------------------------------
    def notify(self, job_id: str, url: str | None, key_id: str | None, event: str, record: dict,
               events: Collection[str] | None = None) -> None:
        """Schedule `event` for the job (its `record` as it is now, JSON-able) to `url`, signed with `key_id`'s
        secret; `events`: the job's webhook_events_filter (None = all). Returns at once and never raises. From a
        thread other than the event loop's, the event is handed to the loop the sender last ran on (or `loop`)."""
        try:
            if not url or self._closed:
                return
            if event not in EVENTS:
                logger.warning("webhook: unknown event %r for job %s dropped", event, job_id)
                self.counts["dropped"] += 1
                return
            if events is not None and event not in events:
                if event == "completed":
                    self._last_progress.pop(job_id, None)
                self.counts["filtered"] += 1
                return
            body = json.dumps(record, separators=(",", ":"), default=str).encode()
            delivery = _Delivery(job_id, event, url, key_secret(self._server_secret, key_id), body)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._loop = loop
                self._enqueue(delivery)
            elif self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._enqueue, delivery)
            else:
                logger.warning("webhook: no event loop to deliver job %s's %s event on", job_id, event)
                self.counts["dropped"] += 1
        except Exception:  # never into the job
            logger.exception("webhook: job %s's %s event could not be scheduled", job_id, event)
            self.counts["dropped"] += 1

    def _enqueue(self, d: _Delivery) -> None:
        try:
            now = time.monotonic()
            if d.event == "progress":
                last = self._last_progress.get(d.job_id)
                if last is not None and now - last < self.cfg.progress_every_s:
                    self.counts["throttled"] += 1
                    return
                self._last_progress[d.job_id] = now
                if len(self._last_progress) > 4096:  # jobs that never completed here (their lease went elsewhere)
                    horizon = max(3600.0, 10 * self.cfg.progress_every_s)
                    self._last_progress = {k: t for k, t in self._last_progress.items() if now - t < horizon}
            elif d.event == "completed":
                self._last_progress.pop(d.job_id, None)
            ch = self._channels.get(d.job_id)
            if ch is None:
                ch = self._channels[d.job_id] = _Channel()
            if d.event == "progress" and ch.pending and ch.pending[-1].event == "progress":
                ch.pending[-1] = d  # the receiver is behind: it gets the newest progress, not every one
                self.counts["coalesced"] += 1
            elif d.event == "completed" and any(p.event == "progress" for p in ch.pending):
                self.counts["coalesced"] += sum(p.event == "progress" for p in ch.pending)
                ch.pending = collections.deque(p for p in ch.pending if p.event != "progress")  # superseded
                ch.pending.append(d)
            else:
                ch.pending.append(d)
            if ch.task is None:
                ch.task = asyncio.get_running_loop().create_task(self._run_channel(d.job_id, ch))
        except Exception:
            logger.exception("webhook: job %s's %s event could not be queued", d.job_id, d.event)
            self.counts["dropped"] += 1

    async def _run_channel(self, job_id: str, ch: _Channel) -> None:
        try:
            while ch.pending:
                d = ch.pending.popleft()
                ch.in_flight = True
                try:
                    await self._deliver(d)
                except Exception:
                    logger.exception("webhook: job %s's %s event", job_id, d.event)
                    self.counts["dropped"] += 1
                finally:
                    ch.in_flight = False
        finally:
            if self._channels.get(job_id) is ch:  # (no await since the last look at pending: nothing was added)
                del self._channels[job_id]

    # ---- one event, retried -----------------------------------------------------------------------------
    async def _deliver(self, d: _Delivery) -> str:
        cfg = self.cfg
        outcome = "failed"
        for n in range(1, cfg.max_attempts + 1):
            result, detail = await self._attempt(d)
            if result in ("delivered", "rejected", "refused"):
                outcome = result
                break
            if n < cfg.max_attempts:
                delay = cfg.backoff_s * 2 ** (n - 1)
                logger.info("webhook: job %s's %s event, attempt %d/%d: %s; retrying in %.1fs", d.job_id, d.event,
                            n, cfg.max_attempts, detail, delay)
                self.counts["retries"] += 1
                await asyncio.sleep(delay)
            else:
                logger.warning("webhook: job %s's %s event not delivered after %d attempts: %s", d.job_id, d.event,
                               n, detail)
        if outcome in ("rejected", "refused"):
            logger.warning("webhook: job %s's %s event %s: %s", d.job_id, d.event, outcome, detail)
        self.counts[outcome] += 1
        if self.on_outcome is not None:
            try:
                self.on_outcome(d.event, outcome)
            except Exception:
                logger.exception("webhook: on_outcome")
        return outcome

    async def _attempt(self, d: _Delivery) -> tuple[str, str]:
        """('delivered' | 'rejected' | 'refused' | 'retry', what happened)."""
        attempt, timeout = Attempt(), self.cfg.timeout_s
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._post, d, attempt)
        wait = timeout  # counted from when a thread takes the attempt (other receivers' slowness is not its own)
        while not future.done():
            await asyncio.wait({future}, timeout=wait)
            if future.done():
                break
            wait = timeout if attempt.started is None else attempt.started + timeout - time.monotonic()
            if wait <= 0:
                attempt.abort()  # the thread's socket is shut down; its result, if any, is ignored
                future.cancel()
                return "retry", f"no answer within {timeout:g}s"
        try:
            status = future.result()
        except WebhookURLError as e:
            return ("retry" if e.transient else "refused"), e.message
        except Exception as e:  # connection refused or reset, TLS, a malformed answer: worth another try
            return "retry", f"{type(e).__name__}: {e}"
        if 200 <= status < 300:
            return "delivered", str(status)
        if status == 429 or status >= 500:
            return "retry", f"HTTP {status}"
        return "rejected", f"HTTP {status}"

    def _post(self, d: _Delivery, attempt: Attempt) -> int:
        """One POST (a worker thread): check the URL again, connect to the checked addresses, the status."""
        attempt.started = time.monotonic()
        target = resolve_target(d.url, self.allowed)
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "Webhook-Id": d.id,
                   "Webhook-Timestamp": str(timestamp), "Webhook-Signature": sign(d.secret, d.body, timestamp, d.id),
                   "Webhook-Event": d.event, "Connection": "close"}
        conn = connection(target, self.cfg.timeout_s, attempt)
        try:
            conn.request("POST", target.path, body=d.body, headers=headers)
            return conn.getresponse().status  # the body is not read: redirects are not followed
        finally:
            conn.close()

    # ---- shutdown -------------------------------------------------------------------------------------
    def pending(self) -> int:
        """Events waiting or being delivered."""
        return sum(len(ch.pending) + ch.in_flight for ch in self._channels.values())

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every scheduled event is delivered or given up (True), or `timeout` seconds (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._channels:
            tasks = {ch.task for ch in self._channels.values() if ch.task is not None}
            left = None if deadline is None else deadline - time.monotonic()
            if not tasks or (left is not None and left <= 0):
                return not self._channels
            await asyncio.wait(tasks, timeout=left)
        return True

    async def close(self, timeout: float | None = 0) -> None:
        """Drain for up to `timeout` seconds, then drop what is left and stop the threads."""
        if timeout is None or timeout > 0:
            await self.drain(timeout)
        self._closed = True
        for ch in list(self._channels.values()):
            if ch.task is not None:
                ch.task.cancel()
        self._channels.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
