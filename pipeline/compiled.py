"""The UNet behind `torch.compile`, with batch sizes bucketed to a few compiled shapes.

A continuously batched Diffuser calls its UNet with a different number of rows at almost every step (requests
join and leave, guidance adds a row per request or not). A compiled graph is specialised to its input shapes,
so every new row count would compile again (tens of seconds on a CPU). `CompiledUNet` pads the rows up to the
next bucket (1, 2, 4, ... up to the largest batch) with zero rows, runs the compiled UNet on that fixed shape
and drops the padding: the UNet treats rows independently (convolutions, group norms and attention all work
per row), so a request's result does not depend on the padding. Each (bucket, latent shape) compiles once, at
`warm_up` (a replica's start) for the shapes it expects, later on first use for others.

    sampler.unet = CompiledUNet(sampler.unet, mode="default", max_rows=32)
    sampler.unet.warm_up(latent_shape=(4, 8, 8), embed_shape=(77, 512), pooled_dim=None)

Modes are torch.compile's: "default" (inductor), "reduce-overhead" (CUDA graphs on a GPU: the launch overhead
of the many small kernels goes away), "max-autotune". On a CPU inductor generates C++ (gcc) for the fused
element-wise work and keeps the matmuls and convolutions in oneDNN.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

MODES = ("off", "default", "reduce-overhead", "max-autotune")


def buckets_up_to(max_rows: int) -> list[int]:
    """1, 2, 4, ... and `max_rows` itself: at most twice the rows of the real batch, log2(max) graphs."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return out + [max_rows]


@dataclass
class _Output:
    sample: torch.Tensor  # as diffusers' UNet2DConditionOutput: the Sampler reads `.sample`


class CompiledUNet(torch.nn.Module):
    """A UNet2DConditionModel compiled with `torch.compile(mode=...)` on bucketed batch sizes (see the module)."""

    def __init__(self, unet: torch.nn.Module, mode: str = "default", max_rows: int = 32, backend: str = "inductor"):
        super().__init__()
        if mode not in MODES or mode == "off":
            raise ValueError(f"compile mode must be one of {MODES[1:]}, got {mode!r}")
        self.unet, self.mode, self.buckets = unet, mode, buckets_up_to(max_rows)
        self.config = unet.config  # the Sampler reads the UNet's config
        options = {"mode": mode} if backend == "inductor" else {}  # ("eager": dynamo only, for quick tests)
        self.compiled = torch.compile(unet, backend=backend, dynamic=False, **options)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def bucket(self, rows: int) -> int:
        """The smallest bucket that holds `rows` (rows above the largest run in chunks of the largest)."""
        return next((b for b in self.buckets if b >= rows), self.buckets[-1])

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> _Output:
        n = sample.shape[0]
        if n > self.buckets[-1]:  # more rows than the largest graph: chunks of it
            top = self.buckets[-1]
            parts = [self.forward(sample[i:i + top], timestep[i:i + top], encoder_hidden_states[i:i + top],
                                  None if class_labels is None else class_labels[i:i + top]).sample
                     for i in range(0, n, top)]
            return _Output(torch.cat(parts))
        pad = self.bucket(n) - n  # (the Sampler passes one timestep per row)
        if pad:
            sample, timestep, encoder_hidden_states = (_pad(sample, pad), _pad(timestep, pad),
                                                       _pad(encoder_hidden_states, pad))
            class_labels = None if class_labels is None else _pad(class_labels, pad)
        out = self.compiled(sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                            class_labels=class_labels).sample
        return _Output(out[:n])

    @torch.no_grad()
    def warm_up(self, latent_shape: tuple[int, int, int], embed_shape: tuple[int, int],
                pooled_dim: int | None = None, buckets: list[int] | None = None) -> float:
        """Compile every bucket for one latent shape (C, h, w) and text-embedding shape (T, D); returns the
        seconds it took (a replica's start-up cost, reported in its load time)."""
        t0 = time.perf_counter()
        dtype, device = self.dtype, self.device
        for b in buckets or self.buckets:
            self.forward(torch.zeros((b, *latent_shape), dtype=dtype, device=device),
                         torch.full((b,), 500.0, device=device),
                         torch.zeros((b, *embed_shape), dtype=dtype, device=device),
                         None if pooled_dim is None else torch.zeros((b, pooled_dim), dtype=dtype, device=device))
        return time.perf_counter() - t0


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros((rows, *x.shape[1:]))])


def compile_sampler(sampler, mode: str, max_rows: int, sample_size: tuple[int, int] | None = None,
                    embed_shape: tuple[int, int] | None = None, pooled_dim: int | None = None,
                    backend: str = "inductor") -> float:
    """Put `sampler`'s UNet behind CompiledUNet (no-op for mode "off"); with `sample_size` (height, width in
    pixels) and `embed_shape`, compile every bucket now. Returns the compile seconds."""
    if mode == "off":
        return 0.0
    sampler.unet = CompiledUNet(sampler.unet, mode, max_rows, backend)
    if sample_size is None or embed_shape is None:
        return 0.0
    h, w = sample_size
    latent = (sampler.latent_channels, h // sampler.vae_scale_factor, w // sampler.vae_scale_factor)
    return sampler.unet.warm_up(latent, embed_shape, pooled_dim)


def compile_for_spec(sampler, spec, mode: str, max_rows: int) -> float:
    """`compile_sampler` for a model's default sample size and its text encoder's embedding shape."""
    import json
    context = 77  # CLIP's, unless the open_clip config says otherwise
    if spec.text_encoder.path is not None:
        cfg_file = spec.resolve_path(spec.text_encoder.path) / "open_clip_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            context = cfg.get("model_cfg", cfg).get("text_cfg", {}).get("context_length", context)
    unet_cfg = sampler.unet.config
    size = spec.defaults.sample_size
    pooled = unet_cfg.projection_class_embeddings_input_dim if sampler.uses_pooled else None
    return compile_sampler(sampler, mode, max_rows, (size, size), (context, unet_cfg.cross_attention_dim), pooled)
