"""Tests for pipeline/upscaler.py: Real-ESRGAN checkpoint compatibility, persistence,
factor handling and tiled inference, on tiny random-init RRDBNets (CPU, seconds)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.upscaler import (
    RRDBConfig,
    RRDBNet,
    Upscaler,
    bicubic_upscale,
    infer_rrdb_config,
    load_rrdb_state_dict,
)

TINY = dict(num_feat=8, num_block=1, num_grow_ch=4)


def tiny_net(scale=4, seed=0, **kw):
    torch.manual_seed(seed)
    return RRDBNet(scale=scale, **{**TINY, **kw}).eval()


def rand_images(b, h, w, seed=1):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def basicsr_pixel_unshuffle(x, scale):
    # basicsr.archs.arch_util.pixel_unshuffle, written out independently
    b, c, hh, hw = x.size()
    x_view = x.view(b, c, hh // scale, scale, hw // scale, scale)
    return x_view.permute(0, 1, 3, 5, 2, 4).reshape(b, c * scale**2, hh // scale, hw // scale)


def basicsr_forward(net, x):
    """BasicSR's RRDBNet.forward, literally, driven by our submodules."""
    lrelu = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
    feat = {4: x, 2: basicsr_pixel_unshuffle(x, 2), 1: basicsr_pixel_unshuffle(x, 4)}[net.scale]
    feat = net.conv_first(feat)
    feat = feat + net.conv_body(net.body(feat))
    feat = lrelu(net.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
    feat = lrelu(net.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
    return net.conv_last(lrelu(net.conv_hr(feat)))


# -----------------------------------------------------------------------------
# architecture


def test_state_dict_keys_match_real_esrgan_layout():
    keys = set(RRDBNet(num_block=2).state_dict())
    expected = set()
    for name in ["conv_first", "conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]:
        expected |= {f"{name}.weight", f"{name}.bias"}
    for i in range(2):
        for j in (1, 2, 3):
            for k in range(1, 6):
                expected |= {f"body.{i}.rdb{j}.conv{k}.weight", f"body.{i}.rdb{j}.conv{k}.bias"}
    assert keys == expected
    assert {"conv_first.weight", "body.0.rdb1.conv1.weight", "body.1.rdb3.conv5.bias"} <= keys


def test_default_config_matches_realesrgan_x4plus():
    net = RRDBNet()
    assert sum(p.numel() for p in net.parameters()) == 16_697_987  # RealESRGAN_x4plus.pth
    sd = net.state_dict()
    assert sd["conv_first.weight"].shape == (64, 3, 3, 3)
    assert sd["body.22.rdb3.conv5.weight"].shape == (64, 64 + 4 * 32, 3, 3)
    assert infer_rrdb_config(sd) == RRDBConfig()
    x2 = RRDBNet(scale=2).state_dict()  # RealESRGAN_x2plus layout
    assert x2["conv_first.weight"].shape == (64, 12, 3, 3)
    assert infer_rrdb_config(x2) == RRDBConfig(scale=2)


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_forward_matches_basicsr(scale):
    net = tiny_net(scale)
    x = rand_images(2, 8, 12)
    with torch.no_grad():
        y = net(x)
        assert y.shape == (2, 3, 8 * scale, 12 * scale)
        torch.testing.assert_close(y, basicsr_forward(net, x), rtol=0, atol=1e-6)


def test_unsupported_scale_asserts():
    with pytest.raises(AssertionError, match="scale"):
        RRDBNet(scale=3)


def test_config_dict_round_trip():
    cfg = RRDBConfig(scale=2, num_feat=8, num_block=1, num_grow_ch=4)
    assert RRDBConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="bogus"):
        RRDBConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# -----------------------------------------------------------------------------
# loading Real-ESRGAN checkpoints


@pytest.mark.parametrize("wrapper", ["params_ema", "params", None])
def test_from_file_real_esrgan_pth(tmp_path, wrapper):
    net = tiny_net(4)
    sd = net.state_dict()
    path = tmp_path / "RealESRGAN_tiny_x4.pth"
    torch.save(sd if wrapper is None else {wrapper: sd}, path)

    up = Upscaler.from_file(path)
    assert up.scale == 4 and up.net.config == RRDBConfig(scale=4, **TINY)
    x = rand_images(2, 6, 10)
    with torch.no_grad():
        torch.testing.assert_close(up.net(x), net(x), rtol=0, atol=0)
        expected = net(x).clamp(0, 1)
    torch.testing.assert_close(up.upscale(x), expected, rtol=0, atol=0)


def test_params_ema_preferred_over_params(tmp_path):
    ema, raw = tiny_net(4, seed=0), tiny_net(4, seed=1)
    path = tmp_path / "both.pth"
    torch.save({"params": raw.state_dict(), "params_ema": ema.state_dict()}, path)
    sd = load_rrdb_state_dict(path)
    assert all(torch.equal(sd[k], v) for k, v in ema.state_dict().items())


def test_from_file_safetensors(tmp_path):
    from safetensors.torch import save_file

    net = tiny_net(4)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    up = Upscaler.from_file(path)
    x = rand_images(1, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(up.upscale(x), net(x).clamp(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("scale", [2, 1])
def test_from_file_pixel_unshuffle_variants(tmp_path, scale):
    net = tiny_net(scale)
    path = tmp_path / f"tiny_x{scale}.pth"
    torch.save({"params_ema": net.state_dict()}, path)
    up = Upscaler.from_file(path)
    assert up.scale == scale and up.net.config.scale == scale
    x = rand_images(2, 8, 12)
    out = up.upscale(x)  # an x1 net is a restoration net: it runs even though f == 1
    assert out.shape == (2, 3, 8 * scale, 12 * scale)
    with torch.no_grad():
        torch.testing.assert_close(out, net(x).clamp(0, 1), rtol=0, atol=0)


def test_unshuffle_variant_pads_odd_sizes():
    up = Upscaler(tiny_net(2))
    out = up.upscale(rand_images(1, 7, 9))
    assert out.shape == (1, 3, 14, 18)


def test_shape_mismatch_raises_with_key_name(tmp_path):
    sd = tiny_net(4).state_dict()
    sd["body.0.rdb2.conv3.weight"] = torch.zeros(4, 15, 3, 3)  # should be (4, 16, 3, 3)
    path = tmp_path / "broken.pth"
    torch.save({"params_ema": sd}, path)
    with pytest.raises(ValueError, match=r"body\.0\.rdb2\.conv3\.weight") as err:
        Upscaler.from_file(path)
    assert "(4, 15, 3, 3)" in str(err.value) and "(4, 16, 3, 3)" in str(err.value)


def test_missing_key_and_wrong_config_raise(tmp_path):
    sd = tiny_net(4).state_dict()
    del sd["conv_hr.bias"]
    with pytest.raises(ValueError, match="conv_hr.bias"):
        Upscaler.from_file(sd)
    good = tiny_net(4).state_dict()
    with pytest.raises(ValueError, match="conv_first.weight"):
        Upscaler.from_file(good, config=RRDBConfig(scale=2, **TINY))
    with pytest.raises(ValueError, match="conv_first.weight"):
        infer_rrdb_config({"conv_last.weight": torch.zeros(3, 8, 3, 3)})


# -----------------------------------------------------------------------------
# persistence


def test_save_from_folder_round_trip(tmp_path):
    from safetensors.torch import load_file

    net = tiny_net(4)
    up = Upscaler(net)
    up.save(tmp_path / "up")
    assert json.loads((tmp_path / "up" / "config.json").read_text()) == RRDBConfig(scale=4, **TINY).to_dict()
    stored = load_file(str(tmp_path / "up" / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}

    back = Upscaler.from_folder(tmp_path / "up")
    assert back.net.conv_first.weight.dtype == torch.float32
    x = rand_images(2, 6, 6)
    diff = (back.upscale(x) - up.upscale(x)).abs().max().item()
    assert diff < 1e-2
    with pytest.raises(ValueError):
        Upscaler.bicubic(4).save(tmp_path / "nothing")


# -----------------------------------------------------------------------------
# upscale(): shapes, dtypes, factors


def test_upscale_shape_dtype_range():
    up = Upscaler(tiny_net(4))
    x = rand_images(3, 5, 7)
    out = up.upscale(x)
    assert out.shape == (3, 3, 20, 28) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    out64 = up.upscale(x.double())  # computed in the module's dtype, returned in the input's
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out, rtol=0, atol=0)


def test_factor_below_net_scale_downsamples():
    net = tiny_net(4)
    up = Upscaler(net)
    x = rand_images(1, 6, 8)
    out = up.upscale(x, factor=2)
    assert out.shape == (1, 3, 12, 16)
    with torch.no_grad():
        ref = F.interpolate(net(x), size=(12, 16), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(out, ref.clamp(0, 1), rtol=0, atol=1e-6)


def test_factor_one_is_identity_and_bad_factors_raise():
    up = Upscaler(tiny_net(4))
    x = rand_images(1, 6, 8)
    assert up.upscale(x, factor=1) is x
    with pytest.raises(ValueError):
        up.upscale(x, factor=8)
    with pytest.raises(ValueError):
        up.upscale(x, factor=0)
    with pytest.raises(ValueError):
        up.upscale(x[:, :2])  # wrong channel count


def test_bicubic_fallback():
    up = Upscaler.bicubic(4)
    assert up.net is None and up.scale == 4
    x = rand_images(2, 5, 6)
    out = up.upscale(x)
    assert out.shape == (2, 3, 20, 24)
    assert out.min() >= 0 and out.max() <= 1
    ref = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(out, ref)
    assert up.upscale(x, factor=2).shape == (2, 3, 10, 12)
    assert bicubic_upscale(x, 3).shape == (2, 3, 15, 18)
    assert up.upscale(x, factor=1) is x


# -----------------------------------------------------------------------------
# tiling


def count_forward_calls(net):
    calls = []
    net.register_forward_hook(lambda mod, args, out: calls.append(tuple(args[0].shape[-2:])))
    return calls


# Receptive field of the trunk, in its input pixels (after any pixel_unshuffle): one per
# conv_first / conv_body, 15 per RRDB (3 RDBs x 5 convs), plus 2 for the upsampling tail
# (conv_up1 at x2 and conv_up2 / conv_hr / conv_last at x4 reach +-1.75 LR pixels). So exact
# tiling needs tile_pad >= 4 for num_block=0 and >= 19 for num_block=1. With num_block=1 the
# brief's 24x20 / tile 8 would make every 8 + 2*19 window cover the whole image (a vacuous
# test), so that case runs on a 48x40 image with tile 16 instead; num_block=0 keeps 24x20 /
# tile 8 / tile_pad 4. For x2 / x1 nets the trunk sees H/2 (H/4), so tile_pad doubles (x4).
TILE_CASES = [
    # scale, num_block, (H, W), tile, tile_pad
    (4, 0, (24, 20), 8, 4),
    (4, 1, (48, 40), 16, 19),
    (2, 0, (31, 27), 8, 8),  # odd size: exercises the reflect mod-pad too
    (1, 0, (48, 44), 8, 16),
]


@pytest.mark.parametrize("scale,num_block,hw,tile,tile_pad", TILE_CASES)
def test_tiled_equals_untiled(scale, num_block, hw, tile, tile_pad):
    net = tiny_net(scale, num_block=num_block)
    x = rand_images(2, *hw)
    full = Upscaler(net).upscale(x)

    tiled_up = Upscaler(net, tile=tile, tile_pad=tile_pad)
    calls = count_forward_calls(tiled_up.net)
    tiled = tiled_up.upscale(x)

    r = {4: 1, 2: 2, 1: 4}[scale]
    ph, pw = math.ceil(hw[0] / r) * r, math.ceil(hw[1] / r) * r  # after mod padding
    assert len(calls) == math.ceil(ph / tile) * math.ceil(pw / tile) > 1
    assert any(h < ph and w < pw for h, w in calls)  # tiles really saw only part of the image
    assert tiled.shape == full.shape
    assert (tiled - full).abs().max().item() <= 1e-4


def test_tile_pad_too_small_is_visible():
    # guards against the test above passing vacuously: without enough context the seams show
    net = tiny_net(4, num_block=0)
    x = rand_images(1, 24, 20)
    full = Upscaler(net).upscale(x)
    seams = Upscaler(net, tile=8, tile_pad=1).upscale(x)
    assert (seams - full).abs().max().item() > 1e-3


def test_image_smaller_than_tile_runs_untiled():
    up = Upscaler(tiny_net(4), tile=16, tile_pad=4)
    calls = count_forward_calls(up.net)
    out = up.upscale(rand_images(1, 12, 16))
    assert out.shape == (1, 3, 48, 64)
    assert calls == [(12, 16)]
