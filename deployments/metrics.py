"""The metrics every deployment exports, through Ray's metrics path.

Metrics are `ray.serve.metrics` objects: Serve adds the `deployment`, `replica` and `application`
labels, and Ray's per-node metrics agent exports them (next to Serve's own `ray_serve_*` metrics) on
each node's metrics export port. Ray prefixes every exported name with `ray_`; the Prometheus scrape
config (`monitoring/prometheus.yml`, and the PodMonitor on k8s) renames `ray_imagine_*` back to
`imagine_*`. Labels are bounded: no prompts, job ids or free text.

Each name below is the name Prometheus stores (after that rename). `METRICS` is the catalogue that
the dashboards, the alert rules and the tests refer to.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from .errors import reason as error_reason

logger = logging.getLogger(__name__)

# Log-spaced from 2 ms to 10 min, so every stage's range falls on fine buckets: text encoding (ms),
# sampling (0.1 s .. minutes on CPU), upscaling, S3 writes (ms .. s), and whole jobs.
LATENCY_BUCKETS = [0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 150.0, 600.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
STEP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]

# name -> (type, labels added by imagine (Serve adds deployment, replica, application), help)
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    # every stage (TextEncoder, Diffuser, Upscaler, Publisher)
    "imagine_stage_requests_total": ("counter", (), "Calls handled by the stage (one per image or prompt)."),
    "imagine_stage_errors_total": ("counter", ("reason",), "Calls that raised, by reason."),
    "imagine_stage_latency_seconds": ("histogram", (), "Time a call spends in the replica, batch wait included."),
    "imagine_stage_batch_size": ("histogram", (),
                                 "Items per batch the stage runs (step-level Diffuser: images per denoising step)."),
    "imagine_stage_ongoing_requests": ("gauge", (), "Calls in flight in the replica (queued for a batch or running)."),
    "imagine_stage_replicas_max": ("gauge", (), "The stage's replica ceiling from the config (max_replicas)."),
    "imagine_accelerator_memory_bytes": ("gauge", ("device",),
                                         "Accelerator memory in use: CUDA allocated, or process RSS on CPU."),
    "imagine_model_load_seconds": ("gauge", (), "Time the replica took to load its model."),
    # Diffuser
    "imagine_denoising_steps_total": ("counter", (), "Denoising steps done, one per image per step."),
    "imagine_denoising_step_seconds": ("histogram", (), "Wall time of one batched denoising step."),
    "imagine_images_generated_total": ("counter", (), "Images the Diffuser finished sampling."),
    # Publisher
    "imagine_storage_writes_total": ("counter", ("outcome",), "S3 object writes, by outcome (ok, error)."),
    "imagine_storage_write_bytes_total": ("counter", (), "Bytes written to S3."),
    "imagine_storage_write_seconds": ("histogram", (), "Latency of one S3 write."),
    "imagine_images_published_total": ("counter", (), "Images written to S3 for succeeded jobs."),
    # Ingress
    "imagine_http_requests_total": ("counter", ("handler", "method", "code"), "HTTP requests, by route template."),
    "imagine_jobs_submitted_total": ("counter", (), "Jobs accepted."),
    "imagine_jobs_finished_total": ("counter", ("state",), "Jobs ended, by state (succeeded, failed, cancelled)."),
    "imagine_jobs": ("gauge", ("state",), "Jobs in the queue's bookkeeping, by state (queued, running)."),
    "imagine_job_latency_seconds": ("histogram", (), "End-to-end latency of succeeded jobs (accepted to published)."),
    "imagine_job_queue_wait_seconds": ("histogram", (), "Time from acceptance to the job's first denoising step."),
    # JobRunner (the durable queue; every runner replica exports the same queue-wide gauges)
    "imagine_queue_depth": ("gauge", ("priority",), "Jobs waiting in the queue, by priority tier (fast, relax)."),
    "imagine_queue_oldest_seconds": ("gauge", (), "Age of the oldest job waiting in the queue."),
    "imagine_jobs_redelivered_total": ("counter", (), "Jobs re-enqueued because their runner's lease expired."),
    "imagine_jobs_dead_total": ("counter", (), "Jobs that ran out of attempts (sent to the dead letters)."),
    "imagine_webhooks_total": ("counter", ("outcome",), "Webhook events by final outcome (delivered, failed, ...)."),
}
_BOUNDARIES = {"imagine_stage_batch_size": BATCH_BUCKETS, "imagine_denoising_step_seconds": STEP_BUCKETS}

_lock = threading.Lock()
_objects: dict[str, object] = {}


def metric(name: str):
    """The Ray metric object for `name` (one per process), created on first use."""
    with _lock:
        if name not in _objects:
            from ray.serve import metrics as serve_metrics
            kind, labels, help_ = METRICS[name]
            exported = name[:-len("_total")] if kind == "counter" and name.endswith("_total") else name
            if kind == "counter":  # Ray adds the `_total` suffix to counters itself
                obj = serve_metrics.Counter(exported, description=help_, tag_keys=labels)
            elif kind == "gauge":
                obj = serve_metrics.Gauge(exported, description=help_, tag_keys=labels)
            else:
                obj = serve_metrics.Histogram(exported, description=help_, tag_keys=labels,
                                              boundaries=_BOUNDARIES.get(name, LATENCY_BUCKETS))
            _objects[name] = obj
        return _objects[name]


def inc(name: str, value: float = 1.0, **tags: str) -> None:
    if value > 0:  # Ray's counters refuse 0
        metric(name).inc(value, tags=tags or None)


def observe(name: str, value: float, **tags: str) -> None:
    metric(name).observe(value, tags=tags or None)


_gauges: dict[tuple, float] = {}
_refresher: threading.Thread | None = None
GAUGE_REFRESH_S = 1.0


def set_gauge(name: str, value: float, **tags: str) -> None:
    """Set a gauge, and keep re-reporting its value: Ray's metrics agent forgets a gauge value that is
    not reported again within two report intervals, so a value set once (the model load time, the
    replica ceiling, an idle queue's 0) would vanish from Prometheus."""
    global _refresher
    metric(name).set(value, tags=tags or None)
    with _lock:
        _gauges[(name, tuple(sorted(tags.items())))] = value
        if _refresher is None:
            _refresher = threading.Thread(target=_refresh_gauges, name="imagine-gauges", daemon=True)
            _refresher.start()


def _refresh_gauges() -> None:
    while True:
        time.sleep(GAUGE_REFRESH_S)
        with _lock:
            current = list(_gauges.items())
        for (name, tags), value in current:
            try:
                metric(name).set(value, tags=dict(tags) or None)
            except Exception as e:  # never let a metric kill the replica
                logger.debug("gauge refresh failed for %s: %s", name, e)


class StageMetrics:
    """Per-replica instrumentation of one stage: calls, errors, latency, batches, memory, load time."""

    def __init__(self, device: str = "cpu", memory_every_s: float = 2.0):
        self.device = device
        self._ongoing = 0
        self._ongoing_lock = threading.Lock()
        set_gauge("imagine_stage_ongoing_requests", 0)
        self._memory_every_s = memory_every_s
        threading.Thread(target=self._sample_memory, name="imagine-memory", daemon=True).start()

    @contextlib.asynccontextmanager
    async def call(self, items: int = 1):
        """Time one call of `items` items; count it, and its error with a bounded reason."""
        self._add_ongoing(items)
        start = time.perf_counter()
        try:
            yield
        except BaseException as e:
            inc("imagine_stage_errors_total", items, reason=error_reason(e))
            raise
        finally:
            self._add_ongoing(-items)
            inc("imagine_stage_requests_total", items)
            observe("imagine_stage_latency_seconds", time.perf_counter() - start)

    def batch(self, size: int) -> None:
        observe("imagine_stage_batch_size", size)

    def loaded(self, seconds: float) -> None:
        set_gauge("imagine_model_load_seconds", seconds)

    def replicas_max(self, n: int) -> None:
        set_gauge("imagine_stage_replicas_max", n)

    def _add_ongoing(self, n: int) -> None:
        with self._ongoing_lock:
            self._ongoing += n
            value = self._ongoing
        set_gauge("imagine_stage_ongoing_requests", value)

    def _sample_memory(self) -> None:
        while True:
            try:
                set_gauge("imagine_accelerator_memory_bytes", memory_in_use(self.device), device=self.device)
            except Exception as e:  # never let a metric kill the replica
                logger.debug("memory sample failed: %s", e)
            time.sleep(self._memory_every_s)


def memory_in_use(device: str) -> float:
    """CUDA memory allocated on `device`, or this process's resident set size on CPU."""
    if device.startswith("cuda"):
        import torch
        return float(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except OSError:
        import resource
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
