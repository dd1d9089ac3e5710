"""Super-resolution stage: RRDBNet (ESRGAN / Real-ESRGAN) with tiled inference.

References:
  - ESRGAN: Enhanced Super-Resolution Generative Adversarial Networks,
    X. Wang et al., ECCV Workshops 2018. https://arxiv.org/abs/1809.00219
  - Real-ESRGAN: Training Real-World Blind Super-Resolution with Pure Synthetic
    Data, X. Wang et al., ICCV Workshops 2021. https://arxiv.org/abs/2107.10833
  - The network mirrors `RRDBNet` in BasicSR (basicsr/archs/rrdbnet_arch.py,
    used by xinntao/Real-ESRGAN) module for module, so the published
    Real-ESRGAN `.pth` files (RealESRGAN_x4plus, RealESRGAN_x2plus, ...) load
    with strict=True. Tiling follows `RealESRGANer.tile_process`.

Everything here is plain PyTorch: images are float tensors `(B, C, H, W)` in [0, 1].
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SUPPORTED_SCALES = (1, 2, 4)
# scale -> pixel_unshuffle factor applied before conv_first (BasicSR's x2 / x1 trick)
_UNSHUFFLE = {4: 1, 2: 2, 1: 4}

# -----------------------------------------------------------------------------
# network


@dataclass
class RRDBConfig:
    num_in_ch: int = 3
    num_out_ch: int = 3
    scale: int = 4
    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "RRDBConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown RRDBConfig keys: {sorted(unknown)}")
        return cls(**{k: int(v) for k, v in d.items()})


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; the output is scaled by 0.2 and added back."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        f, g = num_feat, num_grow_ch
        self.conv1 = nn.Conv2d(f, g, 3, 1, 1)
        self.conv2 = nn.Conv2d(f + g, g, 3, 1, 1)
        self.conv3 = nn.Conv2d(f + 2 * g, g, 3, 1, 1)
        self.conv4 = nn.Conv2d(f + 3 * g, g, 3, 1, 1)
        self.conv5 = nn.Conv2d(f + 4 * g, f, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        # BasicSR's default_init_weights(..., scale=0.1): small residuals at init
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            nn.init.kaiming_normal_(conv.weight)
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, F, H, W); each x_i: (B, G, H, W)
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))  # (B, F, H, W)
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-Residual Dense Block: three RDBs plus a 0.2-scaled outer residual."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rdb3(self.rdb2(self.rdb1(x)))
        return out * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN generator, BasicSR layout. x4 runs on the input directly; x2 and x1
    first pixel-unshuffle the input by 2 and 4, then the trunk always upsamples x4."""

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, scale: int = 4,
                 num_feat: int = 64, num_block: int = 23, num_grow_ch: int = 32):
        super().__init__()
        assert scale in SUPPORTED_SCALES, f"RRDBNet scale must be one of {SUPPORTED_SCALES}, got {scale}"
        self.config = RRDBConfig(num_in_ch, num_out_ch, scale, num_feat, num_block, num_grow_ch)
        self.scale = scale
        self.unshuffle = _UNSHUFFLE[scale]
        in_ch = num_in_ch * self.unshuffle ** 2
        self.conv_first = nn.Conv2d(in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, C_out, H*scale, W*scale)
        r = self.unshuffle
        if r > 1:
            assert x.shape[-2] % r == 0 and x.shape[-1] % r == 0, (
                f"x{self.scale} RRDBNet needs H, W divisible by {r}, got {tuple(x.shape[-2:])}")
            x = F.pixel_unshuffle(x, r)  # (B, C*r*r, H/r, W/r)
        feat = self.conv_first(x)  # (B, F, h, w)
        feat = feat + self.conv_body(self.body(feat))
        # two nearest x2 upsamplings, each followed by a conv + lrelu: (B, F, 2h, 2w), (B, F, 4h, 4w)
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))  # (B, C_out, 4h, 4w)


# -----------------------------------------------------------------------------
# checkpoints


def load_rrdb_state_dict(path_or_dict) -> dict[str, torch.Tensor]:
    """Read a Real-ESRGAN `.pth` or a `.safetensors` file (or take a dict) and unwrap
    the `params_ema` (preferred) / `params` wrapper. Tensors end up on the CPU."""
    if isinstance(path_or_dict, Mapping):
        sd = path_or_dict
    else:
        path = Path(path_or_dict)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("params_ema", "params"):
        if isinstance(sd, Mapping) and wrapper in sd:
            sd = sd[wrapper]
            break
    if not isinstance(sd, Mapping):
        raise ValueError(f"expected a state dict, got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"state dict entry {k!r} is {type(v).__name__}, not a tensor")
        out[k.removeprefix("module.")] = v  # DataParallel checkpoints
    return out


def _require(sd: Mapping[str, torch.Tensor], key: str, ndim: int = 4) -> torch.Size:
    if key not in sd:
        raise ValueError(f"not an RRDBNet state dict: missing {key!r}")
    shape = sd[key].shape
    if len(shape) != ndim:
        raise ValueError(f"{key}: expected a {ndim}-d tensor, got shape {tuple(shape)}")
    return shape


def infer_rrdb_config(state_dict: Mapping[str, torch.Tensor]) -> RRDBConfig:
    """Read the architecture off the tensor shapes (in_ch == out_ch is assumed, as in
    every Real-ESRGAN release: conv_first in-channels 3 -> x4, 12 -> x2, 48 -> x1)."""
    num_feat, in_eff = _require(state_dict, "conv_first.weight")[:2]
    num_out_ch = _require(state_dict, "conv_last.weight")[0]
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"body\.(\d+)\.", k))}
    num_block = len(blocks)
    if blocks != set(range(num_block)):
        raise ValueError(f"body blocks are not numbered 0..{num_block - 1}: {sorted(blocks)}")
    num_grow_ch = _require(state_dict, "body.0.rdb1.conv1.weight")[0] if num_block else 32
    scale = next((s for s, r in _UNSHUFFLE.items() if in_eff == num_out_ch * r * r), None)
    if scale is None:
        expected = [num_out_ch * r * r for r in _UNSHUFFLE.values()]
        raise ValueError(f"conv_first.weight has {in_eff} input channels; expected one of "
                         f"{expected} (x4, x2, x1) for {num_out_ch} image channels")
    return RRDBConfig(num_in_ch=num_out_ch, num_out_ch=num_out_ch, scale=scale,
                      num_feat=num_feat, num_block=num_block, num_grow_ch=num_grow_ch)


def load_checked(net: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """strict=True load that first checks every key and shape, raising ValueError
    with the offending key (and both shapes) instead of a wall of RuntimeError text."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"state dict does not match RRDBNet: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for key, ref in expected.items():
        if state_dict[key].shape != ref.shape:
            raise ValueError(f"shape mismatch for {key!r}: checkpoint has "
                             f"{tuple(state_dict[key].shape)}, model expects {tuple(ref.shape)}")
    net.load_state_dict(state_dict, strict=True)


# -----------------------------------------------------------------------------
# inference


def bicubic_upscale(images: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H*factor, W*factor), bicubic, clamped to [0, 1]."""
    h, w = images.shape[-2:]
    out = F.interpolate(images.float(), size=(h * factor, w * factor), mode="bicubic", align_corners=False)
    return out.clamp_(0, 1).to(images.dtype)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _tiles(h: int, w: int, tile: int, pad: int) -> Iterator[tuple[int, ...]]:
    """Yield (y0, y1, x0, x1, py0, py1, px0, px1) per tile: the valid area [y0:y1, x0:x1]
    and the padded input window [py0:py1, px0:px1] around it, clipped to the image."""
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            yield y0, y1, x0, x1, max(y0 - pad, 0), min(y1 + pad, h), max(x0 - pad, 0), min(x1 + pad, w)


class Upscaler:
    """An RRDBNet (or None: bicubic fallback) plus inference settings.

    tile > 0 splits inputs into tile x tile windows (plus tile_pad context pixels per
    side) to bound memory, like RealESRGANer; tile == 0 runs the whole image at once.
    """

    def __init__(self, net: RRDBNet | None, scale: int | None = None, device="cpu",
                 dtype: torch.dtype = torch.float32, tile: int = 0, tile_pad: int = 10):
        if net is not None:
            if scale is not None and scale != net.scale:
                raise ValueError(f"scale={scale} but the network is x{net.scale}")
            scale = net.scale
            net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
        if scale is None or scale < 1:
            raise ValueError(f"bicubic Upscaler needs a scale >= 1, got {scale}")
        if tile < 0 or tile_pad < 0:
            raise ValueError(f"tile and tile_pad must be >= 0, got {tile}, {tile_pad}")
        self.net, self.scale = net, int(scale)
        self.device, self.dtype = torch.device(device), dtype
        self.tile, self.tile_pad = tile, tile_pad

    def __repr__(self) -> str:
        kind = "bicubic" if self.net is None else f"RRDBNet({self.net.config})"
        return f"Upscaler({kind}, x{self.scale}, device={self.device}, tile={self.tile})"

    # ---- construction / persistence

    @classmethod
    def from_file(cls, path, device="cpu", tile: int = 0, tile_pad: int = 10,
                  dtype: torch.dtype = torch.float32, config: RRDBConfig | None = None) -> "Upscaler":
        """Load a Real-ESRGAN `.pth` / `.safetensors`; the config is inferred unless given."""
        sd = load_rrdb_state_dict(path)
        config = config or infer_rrdb_config(sd)
        net = RRDBNet(**config.to_dict())
        load_checked(net, sd)
        logger.info("loaded RRDBNet x%d (%d blocks, %d feat) from %s",
                    config.scale, config.num_block, config.num_feat, path)
        return cls(net, device=device, dtype=dtype, tile=tile, tile_pad=tile_pad)

    @classmethod
    def from_folder(cls, folder, device="cpu", tile: int = 0, tile_pad: int = 10,
                    dtype: torch.dtype = torch.float32) -> "Upscaler":
        """Load `config.json` + `model.safetensors` as written by `save`."""
        folder = Path(folder)
        config = RRDBConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
        return cls.from_file(folder / WEIGHTS_NAME, device=device, tile=tile,
                             tile_pad=tile_pad, dtype=dtype, config=config)

    @classmethod
    def bicubic(cls, scale: int = 4) -> "Upscaler":
        return cls(None, scale=scale)

    def save(self, folder) -> None:
        """Write `config.json` + `model.safetensors` (weights stored as float16)."""
        if self.net is None:
            raise ValueError("the bicubic fallback has no weights to save")
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in self.net.state_dict().items()}
        tmp = folder / (WEIGHTS_NAME + ".tmp")
        save_file(sd, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / WEIGHTS_NAME)
        (folder / CONFIG_NAME).write_text(json.dumps(self.net.config.to_dict(), indent=2) + "\n")
        logger.info("saved upscaler to %s", folder)

    # ---- inference

    @torch.no_grad()
    def upscale(self, images: torch.Tensor, factor: int | None = None) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, C, H*f, W*f) in [0, 1], f = factor or self.scale.
        The result has the input's dtype and device."""
        f = self.scale if factor is None else factor
        if f != int(f) or f < 1:
            raise ValueError(f"upscale factor must be a positive integer, got {factor}")
        f = int(f)
        if images.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(images.shape)}")
        if f == 1 and (self.net is None or self.scale != 1):
            return images  # an x1 (restoration) net still runs; otherwise nothing to do
        if self.net is None:
            return bicubic_upscale(images, f)
        if f > self.scale:
            raise ValueError(f"factor {f} exceeds the x{self.scale} network")
        if images.shape[1] != self.net.config.num_in_ch:
            raise ValueError(f"expected {self.net.config.num_in_ch} channels, got {images.shape[1]}")
        h, w = images.shape[-2:]
        out = self._run(images.to(device=self.device, dtype=self.dtype))  # (B, C, H*s, W*s)
        if f < self.scale:
            out = F.interpolate(out.float(), size=(h * f, w * f), mode="bicubic",
                                align_corners=False, antialias=True)
        return out.clamp_(0, 1).to(device=images.device, dtype=images.dtype)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """Pad H, W to what the net's pixel_unshuffle needs, run (tiled or not), crop."""
        r = self.net.unshuffle
        h, w = x.shape[-2:]
        ph, pw = _round_up(h, r) - h, _round_up(w, r) - w
        if ph or pw:
            mode = "reflect" if min(h, w) > max(ph, pw) else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)  # (B, C, H', W'), H', W' divisible by r
        # tile boundaries must sit on the unshuffle grid so tiles see the same pixel blocks
        tile, pad = _round_up(self.tile, r), _round_up(self.tile_pad, r)
        if tile and (x.shape[-2] > tile or x.shape[-1] > tile):
            out = self._run_tiled(x, tile, pad)
        else:
            out = self.net(x)
        return out[..., : h * self.scale, : w * self.scale]

    def _run_tiled(self, x: torch.Tensor, tile: int, pad: int) -> torch.Tensor:
        """RealESRGANer.tile_process: run each padded tile, keep its valid centre."""
        b, _, h, w = x.shape
        s = self.scale
        out = None
        n = math.ceil(h / tile) * math.ceil(w / tile)
        for i, (y0, y1, x0, x1, py0, py1, px0, px1) in enumerate(_tiles(h, w, tile, pad)):
            tile_out = self.net(x[:, :, py0:py1, px0:px1])  # (B, C, (py1-py0)*s, (px1-px0)*s)
            if out is None:
                out = tile_out.new_zeros(b, tile_out.shape[1], h * s, w * s)
            # crop the valid centre out of the padded tile and paste it in place
            oy, ox = (y0 - py0) * s, (x0 - px0) * s
            valid = tile_out[:, :, oy: oy + (y1 - y0) * s, ox: ox + (x1 - x0) * s]
            out[:, :, y0 * s: y1 * s, x0 * s: x1 * s] = valid
            logger.debug("upscaler tile %d/%d", i + 1, n)
        return out
