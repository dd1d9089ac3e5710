"""Diffusion sampler on diffusers: UNet + scheduler + classifier-free guidance, batched by step.

The split is diffusers' own (PHILOSOPHY.md, "simple over easy"): a scheduler is a small state
machine (`set_timesteps`, `scale_model_input`, `step`), and the caller writes the denoising loop.
Ours is written for step-level batching from the start, as LLM servers batch tokens:

    states = sampler.start(requests)      # one SampleState per image: own scheduler, own generator
    while any(not s.done for s in states):
        sampler.step([s for s in states if not s.done])   # any subset, one UNet call per shape
    images = sampler.finish(states)       # VAE decode -> (B, 3, H, W) in [0, 1]

Requests of different step counts, guidance scales, schedulers and seeds share one UNet call;
classifier-free guidance (Ho & Salimans 2022) puts each request's unconditional and conditional
rows in the same batch. Each image has its own `torch.Generator` for its initial noise and its
ancestral noise, so its pixels do not depend on which other requests shared its batch.

Guidance in a limited interval (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval
Improves Sample and Distribution Quality in Diffusion Models"): a request's `guidance_interval=(lo, hi)`
applies its guidance scale only at the steps whose noise level t / T (the step's timestep over the
training timesteps: 1 = pure noise, 0 = clean) lies in (lo, hi]. The steps below lo use the conditional
prediction alone (guidance 1, one UNet row instead of two); the steps above hi (the noisiest, where the
layout is decided: where the shape is, how big) use `early_guidance`, 1 by default as in the paper. An
`early_guidance` below 1 mixes the unconditional prediction in there, uncond + w (cond - uncond), which
loosens the layout further (Midjourney's --chaos, pipeline/spec.py). (0, 1] is plain guidance; an empty
interval with early guidance 1 is guidance 1. The weights are per request and per step, so a request's
pixels stay independent of its batch.

Latent diffusion (Rombach et al. 2022) when the model folder has a `vae/`; pixel space otherwise.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)

from .request import SCHEDULER_NAMES

logger = logging.getLogger(__name__)


class StableEulerAncestralScheduler(EulerAncestralDiscreteScheduler):
    """diffusers' Euler-ancestral step with the noise split computed without cancellation.

    diffusers computes sigma_down = sqrt(to^2 - to^2 (from^2 - to^2) / from^2), which is a difference of
    two nearly equal numbers when the first sigma is huge (cosine schedules with trailing spacing and few
    steps: sigma_max ~ 1e4+), goes slightly negative in floating point and turns the image into NaN.
    Algebraically sigma_down = to^2 / from and sigma_up = to * sqrt(1 - (to / from)^2); same result,
    no NaN. The subclass keeps its own position in `sigmas` (`index`, reset by `set_timesteps`), so it
    relies only on the scheduler's public attributes (`sigmas`, `timesteps`, `config`).
    """

    index: int = 0

    def set_timesteps(self, *args, **kwargs) -> None:
        super().set_timesteps(*args, **kwargs)
        self.index = 0

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        sigma = self.sigmas[self.index]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
            EulerAncestralDiscreteSchedulerOutput,
        )
        from diffusers.utils.torch_utils import randn_tensor
        # 1. the model's estimate of the clean sample x0 at this sigma
        sigma = self.sigmas[self.index]
        sample = sample.to(torch.float32)
        if self.config.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        elif self.config.prediction_type == "v_prediction":
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        else:
            raise ValueError(f"prediction_type {self.config.prediction_type!r} is not supported by euler_a")
        # 2. the ancestral split of the next sigma into a deterministic and a noise part, without cancellation
        sigma_to = self.sigmas[self.index + 1]
        ratio = sigma_to / sigma
        sigma_up = sigma_to * (1 - ratio**2).clamp(min=0) ** 0.5
        sigma_down = sigma_to * ratio
        # 3. an Euler step to sigma_down, then fresh noise of sigma_up
        prev = sample + (sample - x0) / sigma * (sigma_down - sigma)
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator)
        prev = (prev + noise * sigma_up).to(model_output.dtype)
        self.index += 1
        if not return_dict:
            return (prev, x0)
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# name (pipeline/request.py SCHEDULER_NAMES) -> (scheduler class, overrides of the model's scheduler config)
SCHEDULERS: dict[str, tuple[type, dict]] = {
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (StableEulerAncestralScheduler, {}),
}


assert set(SCHEDULERS) == set(SCHEDULER_NAMES), f"{sorted(SCHEDULERS)} != {sorted(SCHEDULER_NAMES)}"


@dataclass
class SampleRequest:
    """One image to sample. Embeddings come from the text encoder (no batch dimension)."""
    prompt_embeds: torch.Tensor            # (T, D)
    negative_prompt_embeds: torch.Tensor   # (T, D), the empty prompt when there is no negative
    pooled: torch.Tensor                   # (E,)
    negative_pooled: torch.Tensor          # (E,)
    height: int                            # pixels, as sampled (before any upscaling)
    width: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    init_image: torch.Tensor | None = None  # (3, height, width) in [0, 1]: image-to-image (SDEdit) from it
    strength: float = 1.0                  # how much of the schedule runs from init_image (1.0: all, from noise;
                                           # read on SD's schedule: matched_strength)
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # noise levels t/T in (lo, hi] get guidance_scale
    early_guidance: float = 1.0            # the weight at noise levels above the interval (1: the conditional alone)


def guidance_at(request: SampleRequest, noise_level: float) -> float:
    """The weight w of `request`'s prediction uncond + w (cond - uncond) at a step of noise level t / T (1 = pure
    noise): its `guidance_scale` inside its `guidance_interval` (lo, hi] (a scale <= 1 turns guidance off, as in
    diffusers), its `early_guidance` above hi, 1 below lo. w = 1 is the conditional prediction alone."""
    lo, hi = request.guidance_interval
    if noise_level > hi:
        return float(request.early_guidance)
    if noise_level > lo:
        return max(1.0, float(request.guidance_scale))
    return 1.0


@functools.cache
def _reference_alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's training schedule ("scaled_linear", betas 0.00085..0.012 over 1000 steps) as diffusers
    builds it: the one on which image-to-image strengths are usually chosen (diffusers' img2img; our variations'
    subtle 0.3 and strong 0.6)."""
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.double()


def _log_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.double().clamp(1e-12, 1 - 1e-12)
    return (a / (1 - a)).log()


def matched_strength(strength: float, alphas_cumprod: torch.Tensor) -> float:
    """The share of this model's schedule whose noise level matches `strength` on Stable Diffusion's schedule.

    SDEdit's strength is a point of the training schedule: noise to timestep strength x T, run the rest. The
    same share means different amounts of noise under different schedules: at 0.3, Stable Diffusion's
    scaled-linear schedule leaves signal-to-noise 1.4, a cosine schedule (Nichol & Dhariwal 2021) 3.7, so a
    "subtle" variation of a cosine-schedule model barely moves. This returns the share of `alphas_cumprod`'s
    schedule at which the signal-to-noise ratio equals the reference schedule's at `strength`, so that a
    strength means the same noise for any model; for Stable Diffusion's own schedule it is `strength`."""
    if strength >= 1.0 or strength <= 0.0:
        return float(strength)
    ref = _reference_alphas_cumprod()
    own = alphas_cumprod.detach().cpu().double()
    if own.shape == ref.shape and torch.allclose(own, ref, rtol=1e-5, atol=1e-7):
        return float(strength)
    ref_t = strength * (len(ref) - 1)
    k = min(int(ref_t), len(ref) - 2)
    target = torch.lerp(_log_snr(ref[k:k + 1]), _log_snr(ref[k + 1:k + 2]), ref_t - k).item()
    own_snr = _log_snr(own)  # decreasing with t
    below = int((own_snr > target).sum())  # the first timestep with at most the target's signal-to-noise
    if below == 0:
        return 0.0
    if below >= len(own):
        return 1.0
    a, b = own_snr[below - 1].item(), own_snr[below].item()
    return min(1.0, (below - 1 + (a - target) / (a - b)) / (len(own) - 1))


def check_guidance_interval(interval) -> tuple[float, float]:
    """(lo, hi) with 0 <= lo <= hi <= 1, as floats; raises ValueError otherwise."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be two numbers (lo, hi), got {interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance_interval must have 0 <= lo <= hi <= 1, got ({lo}, {hi})")
    return lo, hi


@dataclass
class SampleState:
    """A request in flight: its scheduler, latents and position in its own timestep list."""
    request: SampleRequest
    scheduler: object
    latents: torch.Tensor                  # (1, C, h, w)
    generator: torch.Generator
    step_index: int = 0

    @property
    def num_steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    @property
    def progress(self) -> float:
        return min(1.0, self.step_index / max(1, self.num_steps))

    @property
    def noise_level(self) -> float:
        """The current step's timestep over the training timesteps (1 = pure noise, 0 = clean)."""
        t = self.scheduler.timesteps[min(self.step_index, self.num_steps - 1)]
        return float(t) / self.scheduler.config.num_train_timesteps

    @property
    def guidance(self) -> float:
        """The guidance weight of the current step (`guidance_at` its noise level; 1 = the conditional alone)."""
        return guidance_at(self.request, self.noise_level)

    @property
    def use_cfg(self) -> bool:
        """Whether the current step runs classifier-free guidance (an unconditional row beside the conditional)."""
        return self.guidance != 1.0


class Sampler:
    """A UNet2DConditionModel, an optional AutoencoderKL and a base scheduler config.

    Args:
        unet: the denoiser.
        vae: the latent autoencoder, or None for a pixel-space model.
        scheduler_config: the model's scheduler config (training betas, prediction type, ...).
        device, dtype: where and how to run the nets.
    """

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL | None, scheduler_config: dict,
                 device="cpu", dtype=torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.unet = unet.to(self.device, dtype).eval().requires_grad_(False)
        self.vae = vae.to(self.device, dtype).eval().requires_grad_(False) if vae is not None else None
        self.scheduler_config = dict(scheduler_config)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.latent_channels = unet.config.in_channels
        # the latent side must survive the UNet's downsamplings
        self.size_multiple = self.vae_scale_factor * 2 ** (len(unet.config.down_block_types) - 1)
        self.uses_pooled = unet.config.class_embed_type == "projection"

    @classmethod
    def from_pretrained(cls, folder: str | Path, device="cpu", dtype=torch.float32) -> "Sampler":
        """Load a local diffusers-format model folder (`unet/`, `scheduler/`, optional `vae/`)."""
        folder = Path(folder)
        if not (folder / "unet").is_dir():
            raise FileNotFoundError(f"{folder} has no unet/ subfolder: not a diffusers model folder")
        kw = {"local_files_only": True, "torch_dtype": dtype}
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw) if (folder / "vae").is_dir() else None
        scheduler_config = DDIMScheduler.load_config(folder, subfolder="scheduler", local_files_only=True)
        return cls(unet, vae, scheduler_config, device=device, dtype=dtype)

    # ---- the step-level interface -------------------------------------------------------------
    def make_scheduler(self, name: str, num_inference_steps: int):
        if name not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
        cls, overrides = SCHEDULERS[name]
        scheduler = cls.from_config({**self.scheduler_config, **overrides})
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        return scheduler

    def start(self, requests: list[SampleRequest]) -> list[SampleState]:
        """Draw each request's initial noise from its own seed; no UNet call yet.

        With an `init_image` (SDEdit, Meng et al. 2022): the image is encoded (the VAE posterior's mean:
        deterministic), noised to the timestep where the last `strength` of the schedule begins, and only those
        steps run (at least one). The strength is read on Stable Diffusion's schedule (`matched_strength`): the
        same strength adds the same noise whatever schedule the model was trained with."""
        states = []
        for r in requests:
            if r.height % self.size_multiple or r.width % self.size_multiple:
                raise ValueError(f"sample size {r.width}x{r.height} is not a multiple of {self.size_multiple}")
            check_guidance_interval(r.guidance_interval)
            if not 0.0 <= r.early_guidance <= 50.0:
                raise ValueError(f"early_guidance must be within 0..50, got {r.early_guidance}")
            scheduler = self.make_scheduler(r.scheduler, r.num_inference_steps)
            generator = torch.Generator("cpu").manual_seed(int(r.seed))
            shape = (1, self.latent_channels, r.height // self.vae_scale_factor, r.width // self.vae_scale_factor)
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)  # on CPU: same on any device
            if r.init_image is None or r.strength >= 1.0:
                latents, first = noise.to(self.device, self.dtype) * scheduler.init_noise_sigma, 0
            else:
                latents, first = self._noised_init(r, scheduler, noise)
            states.append(SampleState(r, scheduler, latents, generator, step_index=first))
        return states

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the latents the sampler works in (the VAE's mean; the pixels themselves,
        in [-1, 1], for a pixel-space model)."""
        x = images.to(self.device, self.dtype) * 2 - 1
        if self.vae is None:
            return x
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    def _noised_init(self, r: SampleRequest, scheduler, noise: torch.Tensor) -> tuple[torch.Tensor, int]:
        if not 0.0 < r.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {r.strength}")
        if tuple(r.init_image.shape) != (3, r.height, r.width):
            raise ValueError(f"init_image must be (3, {r.height}, {r.width}), got {tuple(r.init_image.shape)}")
        steps = len(scheduler.timesteps)
        strength = matched_strength(r.strength, scheduler.alphas_cumprod)  # the same noise as on SD's schedule
        first = min(steps - 1, steps - max(1, round(steps * strength)))  # the steps before it are skipped
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(first)
        if isinstance(scheduler, StableEulerAncestralScheduler):
            scheduler.index = first
        init = self.encode(r.init_image[None])  # (1, C, h, w)
        t = scheduler.timesteps[first:first + 1]
        return scheduler.add_noise(init, noise.to(self.device, self.dtype), t), first

    @torch.no_grad()
    def step(self, states: list[SampleState]) -> None:
        """Advance every state by one denoising step: one UNet call per latent shape."""
        for group in _group_by_shape(s for s in states if not s.done).values():
            self._step_group(group)

    def _step_group(self, states: list[SampleState]) -> None:
        # 1. one or two rows per state: (uncond, cond) under guidance, cond alone otherwise
        rows, timesteps, embeds, pooled = [], [], [], []
        guidance = [s.guidance for s in states]  # this step's weight of each state (its interval, its early guidance)
        for s, w in zip(states, guidance):
            r, t = s.request, s.scheduler.timesteps[s.step_index]
            x = s.scheduler.scale_model_input(s.latents, t)  # (1, C, h, w)
            pairs = [(r.negative_prompt_embeds, r.negative_pooled)] if w != 1.0 else []
            for e, p in pairs + [(r.prompt_embeds, r.pooled)]:
                rows.append(x)
                timesteps.append(float(t))
                embeds.append(e)
                pooled.append(p)
        # 2. the batched UNet call
        model_output = self.unet(
            torch.cat(rows),                                                  # (N, C, h, w)
            timestep=torch.tensor(timesteps, dtype=torch.float32, device=self.device),
            encoder_hidden_states=torch.stack(embeds).to(self.device, self.dtype),  # (N, T, D)
            class_labels=torch.stack(pooled).to(self.device, self.dtype) if self.uses_pooled else None,
        ).sample
        # 3. guidance and each request's own scheduler step
        i = 0
        for s, w in zip(states, guidance):
            if w != 1.0:
                uncond, cond = model_output[i:i + 1], model_output[i + 1:i + 2]
                out = uncond + w * (cond - uncond)
                i += 2
            else:
                out = model_output[i:i + 1]
                i += 1
            t = s.scheduler.timesteps[s.step_index]
            s.latents = s.scheduler.step(out, t, s.latents, generator=s.generator).prev_sample
            s.step_index += 1

    @torch.no_grad()
    def finish(self, states: list[SampleState]) -> list[torch.Tensor]:
        """Decode finished latents; returns one (3, H, W) image in [0, 1] per state, in order."""
        images: dict[int, torch.Tensor] = {}
        for group in _group_by_shape(states).values():
            latents = torch.cat([s.latents for s in group])
            if self.vae is not None:
                latents = latents / self.vae.config.scaling_factor
                pixels = self.vae.decode(latents).sample
            else:
                pixels = latents
            pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W)
            for s, img in zip(group, pixels):
                images[id(s)] = img
        return [images[id(s)] for s in states]

    def sample(self, requests: list[SampleRequest], callback: Callable[[int, int], None] | None = None
               ) -> list[torch.Tensor]:
        """Sample all requests together, step by step, until each is done."""
        states = self.start(requests)
        total = sum(s.num_steps for s in states)
        while live := [s for s in states if not s.done]:
            self.step(live)
            if callback is not None:
                callback(sum(s.step_index for s in states), total)
        return self.finish(states)


def _group_by_shape(states) -> dict[tuple, list[SampleState]]:
    groups: dict[tuple, list[SampleState]] = {}
    for s in states:
        groups.setdefault(tuple(s.latents.shape), []).append(s)
    return groups
