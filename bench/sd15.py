"""SD-1.5-shaped models for the GPU plan of `imagine bench` (issue 15): the public architectures, random weights.

No model hub is reachable, so `imagine bench --model sd15-shaped` builds a model folder that `Pipeline.load`
reads (the built-in model's formats: an open_clip folder, a diffusers folder, a `pipeline.json`) with Stable
Diffusion 1.5's shapes and seeded random weights. Its cost per step is SD-1.5's; its images are noise.

    sd15-shaped   UNet2DConditionModel with SD-1.5's config (320/640/1280/1280, 2 layers per block, cross-attention
                  768, 8 heads, 64x64 latents: 859.5M parameters), SD's AutoencoderKL (128/256/512/512, 4 latent
                  channels, scaling 0.18215: 83.7M), an open_clip text tower of OpenAI's ViT-L/14 shape (width 768,
                  12 layers, 12 heads, 77 tokens, 49,408-token vocabulary, quick-GELU: 123.7M) conditioning on its
                  last layer, as SD 1.x does; 512x512 out, no upscaler (SD-1.5's native size: requests ask for
                  upscale 1 and the Upscaler stage passes images through); SD-1.5's training noise schedule
                  (scaled-linear betas, epsilon prediction), sampled with the project's default (DPM-Solver++ 2M).
    sd15-tiny     the same structure (4 UNet levels, the last without attention; 4 VAE levels; a 77-token text
                  tower) with few channels and 1 layer per block, 64x64 out: the whole plan runs on a CPU in seconds.

The image tower of the CLIP model (used only by the CLIP scorer, for `best_of` > 1, which the bench never asks
for) is a minimal ViT in both, not ViT-L/14's 304M parameters. Weights are stored in float16; the loaders cast
them to the run's dtype (`run_dtype`: float16 on CUDA, float32 on the CPU).

    folder = ensure_model("sd15-tiny")    # .imagine/models/sd15-tiny, written once (seeded), reused after
    param_counts("sd15-shaped")           # from the configs on torch's meta device: nothing allocated
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

SEED = 1515
BUILDER_VERSION = 1  # bump when the written files change: folders of another version are rebuilt
MINIMAL_VISION = {"image_size": 32, "patch_size": 16, "width": 64, "layers": 1, "head_width": 32}

SHAPES: dict[str, dict] = {
    "sd15-shaped": {
        # runwayml/stable-diffusion-v1-5 unet/config.json (the non-default keys)
        "unet": {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                 "block_out_channels": [320, 640, 1280, 1280],
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32},
        # runwayml/stable-diffusion-v1-5 vae/config.json
        "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
                "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
                "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32, "sample_size": 512,
                "scaling_factor": 0.18215},
        # open_clip's ViT-L-14 text_cfg (OpenAI's CLIP text transformer, SD 1.x's text encoder)
        "clip": {"embed_dim": 768, "quick_gelu": True, "vision_cfg": MINIMAL_VISION,
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}},
        "sample_size": 512, "max_sample_size": 768, "guidance_scale": 7.5,
    },
    "sd15-tiny": {
        "unet": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
                 "block_out_channels": [16, 16, 32, 32],
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8},
        "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
                "block_out_channels": [8, 8, 16, 16], "down_block_types": ["DownEncoderBlock2D"] * 4,
                "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 8, "sample_size": 64,
                "scaling_factor": 0.18215},
        "clip": {"embed_dim": 32, "quick_gelu": True, "vision_cfg": MINIMAL_VISION,
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
        "sample_size": 64, "max_sample_size": 128, "guidance_scale": 7.5,
    },
}
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json: the noise schedule SD 1.5 was trained with
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1}
# what SD-1.5's pipeline sizes are known as (the full model's published figures, for the checks)
SD15_PARAMS = {"unet": 859_520_964, "vae": 83_653_863}


def run_dtype(device: str):
    """The dtype the bench runs the nets in: the served stages' own rule (float16 on CUDA, float32 on a CPU)."""
    from deployments.common import torch_dtype
    return torch_dtype(device)


def models_dir() -> Path:
    """Where named models are written: .imagine/models under the working directory (ignored by git)."""
    return Path.cwd() / ".imagine" / "models"


def resolve_model(model: str | None) -> str | None:
    """A `--model` value: one of SHAPES -> its folder (built when missing); anything else unchanged."""
    return str(ensure_model(model)) if model in SHAPES else model


def _fingerprint(name: str) -> str:
    blob = json.dumps({"shape": SHAPES[name], "scheduler": SD15_SCHEDULER, "seed": SEED,
                       "version": BUILDER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_model(name: str, root: Path | None = None) -> Path:
    """The folder of model `name`, written (seeded) only when missing or built from other shapes. Written in a
    temporary folder beside it and renamed into place, so a folder that exists is complete."""
    folder = (root or models_dir()) / name
    marker = folder / "built.json"
    if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == _fingerprint(name):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        write_model(name, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build_unet(name: str):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**SHAPES[name]["unet"])


def build_vae(name: str):
    from diffusers import AutoencoderKL
    return AutoencoderKL(**SHAPES[name]["vae"])


def build_clip(name: str):
    import open_clip
    return open_clip.CLIP(**SHAPES[name]["clip"])


def text_tower_params(clip) -> int:
    """Parameters of an open_clip CLIP's text tower (transformer, embeddings, final norm, projection)."""
    parts = (clip.transformer, clip.token_embedding, clip.ln_final)
    return (sum(p.numel() for m in parts for p in m.parameters()) + clip.positional_embedding.numel()
            + clip.text_projection.numel())


def param_counts(name: str) -> dict[str, int]:
    """Parameters of each net of model `name`, built on torch's meta device (no memory, no time)."""
    import torch

    def count(m) -> int:
        return sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        unet, vae, clip = build_unet(name), build_vae(name), build_clip(name)
    return {"unet": count(unet), "vae": count(vae), "text_encoder": text_tower_params(clip),
            "image_tower": count(clip.visual)}


def write_model(name: str, folder: Path) -> Path:
    """Write model `name` into `folder`: clip/ (open_clip hub layout), diffusion/ (unet/, vae/, scheduler/;
    float16 safetensors), pipeline.json, and built.json (what was built, and its fingerprint) last."""
    import diffusers
    import torch
    from diffusers import PNDMScheduler
    from safetensors.torch import save_file

    from pipeline.builtin.configs import save_clip

    shape = SHAPES[name]
    torch.manual_seed(SEED)
    save_clip(build_clip(name), shape["clip"], folder / "clip")  # the default BPE tokenizer (open_clip's own)
    diffusion = folder / "diffusion"
    for sub, build in (("unet", build_unet), ("vae", build_vae)):
        net = build(name)
        net.save_config(diffusion / sub)
        weights = {k: v.detach().half().contiguous() for k, v in net.state_dict().items()}
        del net
        save_file(weights, str(diffusion / sub / "diffusion_pytorch_model.safetensors"))
        del weights
    PNDMScheduler(**SD15_SCHEDULER).save_pretrained(diffusion / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "PNDMScheduler"]}
    (diffusion / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    spec = {"name": f"imagine-{name}", "text_encoder": {"path": "clip", "layer": "last"},
            "diffusion": "diffusion", "upscaler": None, "upscaler_scale": 1,
            "defaults": {"sample_size": shape["sample_size"], "upscale": 1, "steps": 20,
                         "guidance_scale": shape["guidance_scale"], "scheduler": "dpmpp_2m"},
            "max_sample_size": shape["max_sample_size"]}
    (folder / "pipeline.json").write_text(json.dumps(spec, indent=2) + "\n")
    (folder / "built.json").write_text(json.dumps(
        {"name": name, "seed": SEED, "fingerprint": _fingerprint(name), "params": param_counts(name)}, indent=2) + "\n")
    return folder
