"""The stages' sections: how each deployment runs (replicas, autoscaling, resources, batching, model, device)."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from .base import _Model


class ActorOptions(_Model):
    """Resources of one replica, as Ray's `ray_actor_options`."""
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)  # fractions (0.25) let several stages share one GPU
    memory_bytes: int | None = Field(None, gt=0)
    resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources

    @field_validator("num_gpus")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError(f"num_gpus ({v}) above 1 must be a whole number; fractions are only for sharing one GPU")
        return v

    def to_ray(self) -> dict:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_bytes is not None:
            opts["memory"] = self.memory_bytes
        if self.resources:
            opts["resources"] = dict(self.resources)
        return opts


class Autoscaling(_Model):
    """Serve's request-based autoscaling for one stage."""
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must be within min_replicas "
                             f"({self.min_replicas}) and max_replicas ({self.max_replicas})")
        return self

    def to_serve(self) -> dict:
        d = self.model_dump(exclude={"initial_replicas"})
        if self.initial_replicas is not None:
            d["initial_replicas"] = self.initial_replicas
        return d


class StageConfig(_Model):
    """How one deployment runs: replicas, resources, queueing, which model and device."""
    default_num_cpus: ClassVar[float] = 1.0

    num_replicas: int | None = Field(1, ge=1)  # None when `autoscaling` is set
    autoscaling: Autoscaling | None = None
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    max_ongoing_requests: int = Field(8, ge=1)
    max_queued_requests: int = -1  # -1 = unlimited
    model: str | None = None  # model folder (with pipeline.json) for this stage; None = the top-level `model`
    device: Literal["auto", "cpu", "cuda"] = "auto"
    health_check_period_s: float = Field(10.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        # A partial `ray_actor_options` keeps this stage's default num_cpus.
        opts = data.get("ray_actor_options", {})
        if isinstance(opts, dict) and "num_cpus" not in opts:
            data["ray_actor_options"] = {**opts, "num_cpus": cls.default_num_cpus}
        if data.get("autoscaling") is not None:
            if data.get("num_replicas") is not None:
                raise ValueError(f"set either num_replicas ({data['num_replicas']}) or autoscaling "
                                 f"({data['autoscaling']}), not both")
            data["num_replicas"] = None
        return data

    @model_validator(mode="after")
    def _check(self) -> "StageConfig":
        if self.num_replicas is None and self.autoscaling is None:
            raise ValueError("num_replicas is null and autoscaling is not set; set one of them")
        if self.max_queued_requests != -1 and self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests ({self.max_queued_requests}) must be -1 (unlimited) or >= 1")
        if self.ray_actor_options.num_gpus > 0 and self.device == "cpu":
            raise ValueError(f"ray_actor_options.num_gpus ({self.ray_actor_options.num_gpus}) > 0 but device is "
                             f"'{self.device}'; use device 'auto' or 'cuda', or num_gpus 0")
        return self

    @property
    def max_replicas(self) -> int:
        """The most replicas this stage can have: autoscaling's ceiling, or the fixed count."""
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas

    def user_config(self) -> dict | None:
        """The settings Serve hands to `reconfigure()` on live replicas, in place: the replica ceiling
        (exported as imagine_stage_replicas_max for the queue-at-max alert) and batching."""
        return {"max_replicas": self.max_replicas}


class _BatchedStage(StageConfig):
    batch_keys: ClassVar[tuple[str, ...]] = ("max_batch_size", "batch_wait_timeout_s")

    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)

    @model_validator(mode="after")
    def _batches_can_fill(self) -> "_BatchedStage":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or a replica never sees a full batch")
        return self

    def user_config(self) -> dict:
        return {**super().user_config(), **{k: getattr(self, k) for k in self.batch_keys}}


class TextEncoderConfig(_BatchedStage):
    """CLIP text encoder (the CLIP scorer that ranks `best_of` samples runs beside it)."""
    max_ongoing_requests: int = Field(64, ge=1)
    max_batch_size: int = Field(32, ge=1)


class DiffuserConfig(_BatchedStage):
    """The diffusion sampler, continuously batched: requests join and leave the running batch between
    denoising steps (deployments/scheduler.py). `max_batch_size` bounds the images in flight per replica,
    `batch_wait_timeout_s` is how long an idle replica waits to gather its first batch, and `join` when waiting
    requests enter: `every_step` (at each step boundary) or `when_empty` (only once the running batch has drained).
    """
    batch_keys: ClassVar[tuple[str, ...]] = ("join", "max_batch_size", "batch_wait_timeout_s")

    join: Literal["every_step", "when_empty"] = "every_step"
    max_ongoing_requests: int = Field(64, ge=1)
    max_batch_size: int = Field(16, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    # torch.compile of the UNet at replica start (pipeline/compiled.py: batch sizes bucketed to powers of two up
    # to 2 x max_batch_size rows): "off", "default" (inductor), "reduce-overhead" (+ CUDA graphs on a GPU),
    # "max-autotune". A start-up cost (every bucket compiles once) for a faster step; see the README.
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"


class UpscalerConfig(_BatchedStage):
    batch_keys: ClassVar[tuple[str, ...]] = ("tile", "max_batch_size", "batch_wait_timeout_s")

    tile: int = Field(0, ge=0)  # tile size in pixels; 0 = whole image at once


class IngressConfig(StageConfig):
    """The HTTP ingress; its queue limit is `api.max_queued_requests`."""
    default_num_cpus: ClassVar[float] = 0.5

    ray_actor_options: ActorOptions = Field(default_factory=lambda: ActorOptions(num_cpus=0.5))
    max_ongoing_requests: int = Field(100, ge=1)

    def user_config(self) -> dict | None:
        return None

    @field_validator("max_queued_requests")
    @classmethod
    def _use_api_limit(cls, v: int) -> int:
        if v != -1:
            raise ValueError(f"the ingress queue limit is api.max_queued_requests; remove "
                             f"stages.ingress.max_queued_requests ({v})")
        return v


class JobRunnerConfig(StageConfig):
    """The job queue's consumer: each replica runs up to `max_ongoing_requests` jobs at once (its Celery worker
    threads) and takes a job only when one is free. With `autoscaling`, it scales on the queue's length plus the
    jobs running (deployments/queue.py QueueAutoscalingPolicy), polled every `queue_poll_interval_s`."""
    default_num_cpus: ClassVar[float] = 0.5

    ray_actor_options: ActorOptions = Field(default_factory=lambda: ActorOptions(num_cpus=0.5))
    max_ongoing_requests: int = Field(4, ge=1)
    queue_poll_interval_s: float = Field(5.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(30.0, ge=0)


class PublisherConfig(StageConfig):
    """Writes the images to S3."""
    default_num_cpus: ClassVar[float] = 0.5

    ray_actor_options: ActorOptions = Field(default_factory=lambda: ActorOptions(num_cpus=0.5))


class Stages(_Model):
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    job_runner: JobRunnerConfig = Field(default_factory=JobRunnerConfig)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    diffuser: DiffuserConfig = Field(default_factory=DiffuserConfig)
    upscaler: UpscalerConfig = Field(default_factory=UpscalerConfig)
    publisher: PublisherConfig = Field(default_factory=PublisherConfig)
