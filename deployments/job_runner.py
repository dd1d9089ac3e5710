"""The JobRunner deployment: the job queue's consumer. It takes a job only when a worker thread is free, runs
it through the stages (deployments/runner.py) and acknowledges its message only once the job has an outcome.

Ray Serve's task consumer runs Celery worker threads in the replica (`max_ongoing_requests` of them); each
handler call bridges onto the replica's event loop, where the stage calls, the heartbeats and the deadline
live. Per delivery (deployments/queue.py sends the messages, cluster/jobqueue.py keeps the leases):

1. the record in S3 says the job ended: the delivery was a duplicate (flush an outcome S3 missed, then ack);
2. a cancel was asked for while it waited: record it, ack;
3. claim the job (attempts + 1); a live lease of another runner means a duplicate delivery: ack, it runs there;
4. more attempts than `jobs.max_attempts`: the job fails with `retries_exhausted` and goes to the dead letters;
5. run it, renewing the lease (and checking for a cancel) every `lease_s / 3`; record the outcome.

A runner that dies leaves its lease to expire: every runner's watchdog re-enqueues such jobs (`expired()`
hands each to exactly one of them), and the job runs again from the start: same seeds, same images, the
same S3 keys overwritten. Celery's own redelivery of the dead runner's message (after the visibility timeout)
then finds the job ended or running elsewhere. A storage error while recording an outcome is raised to
Celery, which retries the message later (the outcome waits in Redis, so the job is not run again).
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time

from ray import serve
from ray.serve.task_consumer import task_consumer, task_handler

from cluster.jobs import JobStore
from cluster.storage import Storage

from . import errors
from . import metrics as m
from .calls import StageHandles
from .common import parse_config
from .queue import TASK_NAME, enqueue, producer, task_processor_config
from .runner import JobRunner

logger = logging.getLogger(__name__)
# messages waiting this long beside free worker threads: the consumer is stuck (longer than kombu's longest
# pause between reconnection attempts, 30 s, so a consumer still reconnecting after a long outage is left alone)
CONSUMER_STALL_S = 45.0


class JobRunnerBase:
    def __init__(self, config: dict, text_encoder, diffuser, upscaler, publisher):
        self.cfg = parse_config(config)
        self.loop = asyncio.get_running_loop()
        self.queue = self.cfg.queue.job_queue()
        self.store = JobStore(Storage.from_config(self.cfg.storage))
        self.producer = producer(self.cfg)
        self.owner = f"{serve.get_replica_context().replica_tag}-{secrets.token_hex(3)}"
        self.runner = JobRunner(StageHandles(text_encoder, diffuser, upscaler, publisher), self.store, self.queue,
                                self.cfg, webhooks=self._webhook_sender())
        self.concurrency = self.cfg.stages.job_runner.max_ongoing_requests  # Celery's worker threads here
        self.active, self.last_delivery, self.idle_with_backlog_since = 0, time.monotonic(), None
        self.active_lock = threading.Lock()  # Celery's worker threads count themselves in and out
        self.metrics_task = self.loop.create_task(self.runner.export_queue_metrics())
        self.watchdog = self.loop.create_task(self._redeliver_expired())

    def _webhook_sender(self):
        from .webhooks import WebhookSender
        secret = self.cfg.webhooks.server_secret()
        if secret is None:  # the Ingress refuses jobs with a webhook then
            logger.warning("no webhook secret (webhooks.secret_env / secret_file): webhooks are off")
            return None
        return WebhookSender(self.cfg.webhooks, secret, loop=self.loop,
                             on_outcome=lambda event, outcome: m.inc("imagine_webhooks_total", outcome=outcome))

    @task_handler(name=TASK_NAME)
    def run_job(self, job_id: str) -> str:
        """Celery's worker thread: run the job on the replica's event loop and wait for its outcome.

        While Redis is away nothing is raised to Celery: its retry would need the broker to requeue the
        message, and a retry that cannot be sent makes Celery drop the message. The delivery waits for Redis
        instead (up to jobs.deadline_s) and is handled again from the start (the protocol is idempotent)."""
        waited_since = None
        with self.active_lock:  # (read by check_health only)
            self.active, self.last_delivery = self.active + 1, time.monotonic()
        try:
            while True:
                try:
                    return asyncio.run_coroutine_threadsafe(self.runner.handle(job_id, self.owner),
                                                            self.loop).result()
                except Exception as e:
                    if not errors.is_broker_error(e):
                        raise
                    waited_since = waited_since or time.monotonic()
                    if time.monotonic() - waited_since > self.cfg.jobs.deadline_s:
                        raise
                    logger.warning("job %s: the queue's Redis is away (%s); waiting for it", job_id, e)
                    time.sleep(1.0)
        finally:
            with self.active_lock:
                self.active -= 1

    async def _redeliver_expired(self) -> None:
        """Re-enqueue the jobs whose runner stopped renewing its lease (it died), ahead of new work."""
        every_s = self.cfg.jobs.lease_s / 3
        while True:
            try:
                for job_id in await asyncio.to_thread(self.queue.expired):
                    logger.warning("job %s: its runner's lease expired; redelivering it", job_id)
                    await asyncio.to_thread(enqueue, self.producer, job_id, 0)
                    m.inc("imagine_jobs_redelivered_total")
            except Exception as e:  # Redis away: try again at the next tick
                logger.warning("lease check failed: %s", e)
            await asyncio.sleep(every_s)

    async def check_health(self) -> None:
        """Serve's health check: fails when this replica's queue consumer no longer takes messages, so that
        Serve replaces the replica (its running jobs' leases expire and they are redelivered).

        Two ways a Celery consumer stops: its thread ends on an unrecoverable error (seen with celery 5.7 when
        Redis goes away while messages are unacknowledged), or it reconnects after a broker restart but never
        fetches again (celery issues 8030, 8091, 10205). The second means: messages have waited in the
        queue's lists for CONSUMER_STALL_S while this replica had free worker threads and got none of them."""
        adapter = getattr(self, "_adapter", None)  # set by Ray's task_consumer once the replica is initialized
        if adapter is not None and not adapter.consumer_alive():
            self._unhealthy("the job queue's consumer thread has stopped")
        try:
            waiting = await asyncio.to_thread(self.queue.messages_waiting, self.cfg.queue.queue_name)
        except Exception:  # Redis away: readiness reports that; the consumer reconnects by itself
            self.idle_with_backlog_since = None
            return
        now = time.monotonic()
        if not waiting or self.active >= self.concurrency:
            self.idle_with_backlog_since = None
            return
        since = self.idle_with_backlog_since
        if since is None or self.last_delivery > since:
            self.idle_with_backlog_since = now
        elif now - since > CONSUMER_STALL_S:
            self._unhealthy(f"the job queue's consumer took no message for {now - since:.0f}s while {waiting} "
                            f"waited and {self.concurrency - self.active} of its worker threads were free")

    @staticmethod
    def _unhealthy(why: str) -> None:
        logger.error("%s: failing the health check (Serve replaces this replica)", why)
        raise RuntimeError(why)

    def reconfigure(self, user_config: dict) -> None:
        m.set_gauge("imagine_stage_replicas_max", user_config["max_replicas"])

    def ready(self) -> bool:
        return True


def job_runner_deployment(cfg):
    """The JobRunner deployment for this config (Ray's task consumer needs its queue settings up front)."""
    consumer = task_consumer(task_processor_config=task_processor_config(cfg))(JobRunnerBase)
    return serve.deployment(name="JobRunner")(consumer)

