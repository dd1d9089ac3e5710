"""The job queue's Celery side, through Ray Serve's asynchronous inference API.

Jobs travel as Celery messages (task `imagine.run_job`, argument: the job id) on Redis. The Ingress sends
them with Ray's Celery adapter (`producer`); the JobRunner deployment consumes them with Ray's
`@task_consumer` / `@task_handler` (Celery worker threads inside each replica, acks late, requeued when a
worker is lost). cluster/jobqueue.py keeps what Celery does not know (admission, leases, live state).

The broker password never enters the config, the Serve app or a log: the config holds the Redis URL without
it plus where to read it (an environment variable or a file), and `ImagineCeleryAdapter`, Ray's adapter with
the password put into the URLs where it runs, reads it in the replica. Message priorities use kombu's Redis
steps (0, 3, 6, 9; 0 first), which are also what Ray's queue-length reader sums for autoscaling.
"""
from __future__ import annotations

import logging

from ray.serve.async_inference_autoscaling_policy import AsyncInferenceAutoscalingPolicy
from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig
from ray.serve.task_consumer import instantiate_adapter_from_config
from ray.serve.task_processor import CeleryTaskProcessorAdapter

from cluster.config import ImagineConfig, QueueConfig
from cluster.redis_server import url_with_password

logger = logging.getLogger(__name__)
TASK_NAME = "imagine.run_job"


class ImagineCeleryConfig(CeleryAdapterConfig):
    """Ray's Celery adapter config, with URLs that carry no password and where the password is read."""
    password_env: str | None = None
    password_file: str | None = None


class ImagineCeleryAdapter(CeleryTaskProcessorAdapter):
    """Ray's Celery adapter; the broker and result-backend URLs get the password where the adapter runs."""

    def __init__(self, config: TaskProcessorConfig, *args, **kwargs):
        a = config.adapter_config
        password = QueueConfig.read_password(a.password_env, a.password_file)
        adapter_config = CeleryAdapterConfig(
            broker_url=url_with_password(a.broker_url, password),
            backend_url=url_with_password(a.backend_url, password),
            broker_transport_options=a.broker_transport_options, app_custom_config=a.app_custom_config,
            task_custom_config=a.task_custom_config)
        super().__init__(config.model_copy(update={"adapter_config": adapter_config}), *args, **kwargs)

    def consumer_alive(self) -> bool:
        """Whether the Celery worker thread runs (it ends on an "Unrecoverable error": celery 5.7 / kombu 5.7
        raise AttributeError from the Redis channel's close while the broker is away and messages are unacked)."""
        return self._worker_thread is not None and self._worker_thread.is_alive()


def task_processor_config(cfg: ImagineConfig) -> TaskProcessorConfig:
    """The queue's Celery settings from the config (no secret in them)."""
    q, jobs = cfg.queue, cfg.jobs
    transport = {
        # an unacknowledged message comes back after this; our leases redeliver much sooner (see jobqueue.py),
        # so this is only the backstop and must outlast the longest legal run
        "visibility_timeout": int(jobs.deadline_s + 120),
        "queue_order_strategy": "priority",
    }
    celery = {"worker_prefetch_multiplier": 1,  # a replica takes a job only when a worker thread is free
              "broker_connection_retry_on_startup": True, "result_expires": 3600,
              "worker_hijack_root_logger": False, "worker_redirect_stdouts": False}
    return TaskProcessorConfig(
        queue_name=q.queue_name, adapter=ImagineCeleryAdapter,
        adapter_config=ImagineCeleryConfig(broker_url=q.redis_url, backend_url=q.redis_url,
                                           password_env=q.password_env, password_file=q.password_file,
                                           broker_transport_options=transport, app_custom_config=celery),
        max_retries=q.infrastructure_retries, failed_task_queue_name=f"{q.queue_name}-failed",
        unprocessable_task_queue_name=f"{q.queue_name}-unprocessable")


def producer(cfg: ImagineConfig):
    """A Celery adapter that sends jobs (used by the Ingress and by lease redelivery)."""
    return instantiate_adapter_from_config(task_processor_config(cfg))


def enqueue(adapter, job_id: str, level: int) -> None:
    """Send one job's message at a Celery priority level (0, 3, 6 or 9; 0 is served first)."""
    adapter.enqueue_task_sync(TASK_NAME, args=[job_id], priority=level)


class QueueAutoscalingPolicy(AsyncInferenceAutoscalingPolicy):
    """Ray's queue-length autoscaling for the JobRunner, with the broker password read where the policy runs
    (the Serve controller) instead of being written into the application's config.

    Ray's policy sizes the deployment for (queued messages + Serve requests) / target_ongoing_requests. Jobs
    that run are neither (a Celery task is not a Serve request), so `running_jobs()` is added: replicas that
    run jobs are not taken away while the queue happens to be empty.
    """

    def __init__(self, redis_url: str, queue_name: str, password_env: str | None = None,
                 password_file: str | None = None, poll_interval_s: float = 10.0, prefix: str = "imagine:"):
        password = QueueConfig.read_password(password_env, password_file)
        super().__init__(broker_url=url_with_password(redis_url, password), queue_name=queue_name,
                         poll_interval_s=poll_interval_s)
        self._redis_args = (url_with_password(redis_url, password), prefix)
        self._running, self._running_read_at = 0, 0.0
        self._running_every_s = poll_interval_s

    def running_jobs(self) -> int:
        import time

        import redis
        now = time.monotonic()
        if now - self._running_read_at >= self._running_every_s:
            self._running_read_at = now
            url, prefix = self._redis_args
            try:
                self._running = redis.Redis.from_url(url, socket_timeout=1).zcard(prefix + "running")
            except redis.RedisError as e:
                logger.warning("cannot read the running jobs for autoscaling: %s", e)
        return self._running

    def __call__(self, ctx):
        desired, state = super().__call__(ctx)
        target = ctx.config.get_target_ongoing_requests()
        busy = self.running_jobs() / target if target > 0 else 0
        return max(desired, busy), {**state, "running_jobs": self._running}
