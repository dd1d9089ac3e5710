"""Architectures as data, and a writer of random-init model folders in the real formats.

Two sizes: `builtin` is what `pipeline.builtin.train` trains and ships; `tiny` is for tests (a few
seconds on CPU). `write_model(folder, arch)` writes a complete model in the formats the
loaders read: an open_clip folder (`open_clip_config.json` + `open_clip_model.safetensors`),
a diffusers folder (`unet/`, `vae/`, `scheduler/`, `model_index.json`), an upscaler folder
(`config.json` + `model.safetensors`, Real-ESRGAN key names) and the `pipeline.json` spec.
"""
from __future__ import annotations

import json
from pathlib import Path

import diffusers
import open_clip
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from ..text_encoder import BPE_FILE, write_bpe_merges
from ..upscaler import RRDBNet, Upscaler

ARCHS: dict[str, dict] = {
    "builtin": {
        "clip": {"embed_dim": 64,
                 "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 128, "layers": 3, "head_width": 32},
                 "text_cfg": {"context_length": 16, "width": 128, "heads": 4, "layers": 3}},
        "vae": {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 16},
        "unet": {"block_out_channels": (64, 128, 128), "layers_per_block": 1, "norm_num_groups": 32,
                 "attention_head_dim": 8},
        "rrdb": {"num_feat": 32, "num_block": 4, "num_grow_ch": 16, "scale": 4},
        "sample_size": 32, "max_sample_size": 64,
    },
    "tiny": {
        "clip": {"embed_dim": 32,
                 "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
                 "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 2}},
        "vae": {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8},
        "unet": {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
                 "attention_head_dim": 8},
        "rrdb": {"num_feat": 8, "num_block": 1, "num_grow_ch": 4, "scale": 4},
        "sample_size": 16, "max_sample_size": 32,
    },
}

# The noise schedule the built-in model is trained with (cosine, v-prediction, Nichol &
# Dhariwal 2021; Salimans & Ho 2022); "trailing" spacing starts sampling at the last step.
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                    "prediction_type": "v_prediction", "timestep_spacing": "trailing", "clip_sample": False}
LATENT_CHANNELS = 4


def clip_model_cfg(arch: str, vocab_size: int | None) -> dict:
    cfg = json.loads(json.dumps(ARCHS[arch]["clip"]))
    if vocab_size is not None:
        cfg["text_cfg"]["vocab_size"] = vocab_size
    return cfg


def build_vae(arch: str) -> AutoencoderKL:
    a = ARCHS[arch]["vae"]
    n = len(a["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=a["block_out_channels"], layers_per_block=a["layers_per_block"],
                         norm_num_groups=a["norm_num_groups"], sample_size=ARCHS[arch]["sample_size"])


def build_unet(arch: str, cross_attention_dim: int, pooled_dim: int) -> UNet2DConditionModel:
    a = ARCHS[arch]["unet"]
    n = len(a["block_out_channels"])
    vae_factor = 2 ** (len(ARCHS[arch]["vae"]["block_out_channels"]) - 1)
    return UNet2DConditionModel(
        sample_size=ARCHS[arch]["sample_size"] // vae_factor, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n, block_out_channels=a["block_out_channels"],
        layers_per_block=a["layers_per_block"], norm_num_groups=a["norm_num_groups"],
        attention_head_dim=a["attention_head_dim"], cross_attention_dim=cross_attention_dim,
        class_embed_type="projection", projection_class_embeddings_input_dim=pooled_dim)


def write_model(folder: str | Path, arch: str = "tiny", words: list[str] | None = None, seed: int = 0,
                clip=None, vae=None, unet=None, upscaler=None, defaults: dict | None = None) -> Path:
    """Write a complete model folder; parts not given are random-init (seeded).

    Args:
        words: vocabulary for a small BPE tokenizer (None = open_clip's 49k-token tokenizer).
        clip, vae, unet, upscaler: trained modules to save instead of random ones.
    """
    folder = Path(folder)
    torch.manual_seed(seed)
    vocab_size = None
    (folder / "clip").mkdir(parents=True, exist_ok=True)
    if words is not None:
        vocab_size = write_bpe_merges(words, folder / "clip" / BPE_FILE)
    model_cfg = clip_model_cfg(arch, vocab_size)
    clip = clip if clip is not None else open_clip.CLIP(**model_cfg)
    save_clip(clip, model_cfg, folder / "clip")
    vae = vae if vae is not None else build_vae(arch)
    unet = unet if unet is not None else build_unet(
        arch, model_cfg["text_cfg"]["width"], model_cfg["embed_dim"])
    save_diffusion(unet, vae, folder / "diffusion")
    if upscaler is None:
        upscaler = Upscaler(RRDBNet(**ARCHS[arch]["rrdb"]), scale=ARCHS[arch]["rrdb"]["scale"])
    upscaler.save(folder / "upscaler")
    spec = {"name": f"imagine-{arch}", "text_encoder": {"path": "clip", "layer": "last"},
            "diffusion": "diffusion", "upscaler": "upscaler", "upscaler_scale": ARCHS[arch]["rrdb"]["scale"],
            "defaults": {"sample_size": ARCHS[arch]["sample_size"], "upscale": 4, **(defaults or {})},
            "max_sample_size": ARCHS[arch]["max_sample_size"]}
    (folder / "pipeline.json").write_text(json.dumps(spec, indent=2) + "\n")
    return folder


def save_clip(model, model_cfg: dict, folder: Path) -> None:
    """open_clip's hub layout: open_clip_config.json + open_clip_model.safetensors (fp16)."""
    folder.mkdir(parents=True, exist_ok=True)
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "size": model_cfg["vision_cfg"]["image_size"]}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2) + "\n")
    save_file(_half(model.state_dict()), str(folder / "open_clip_model.safetensors"))


def save_diffusion(unet, vae, folder: Path) -> None:
    """A diffusers folder; weights stored in fp16 (the loaders cast to the run dtype)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in (("unet", unet), ("vae", vae)):
        module.save_pretrained(folder / name, safe_serialization=True)
        save_file(_half(module.state_dict()), str(folder / name / "diffusion_pytorch_model.safetensors"))
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    index = {"_class_name": "ImaginePipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _half(state_dict: dict) -> dict:
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
