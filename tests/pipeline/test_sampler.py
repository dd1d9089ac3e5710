import pytest
import torch

from pipeline.builtin.configs import build_unet, build_vae, clip_model_cfg, save_diffusion
from pipeline.sampler import Sampler, SampleRequest


def make_request(pipe, prompt="a red circle", negative="", **kw) -> SampleRequest:
    emb = pipe.text_encoder.encode([prompt, negative])
    args = dict(height=16, width=16, num_inference_steps=4, guidance_scale=4.0, scheduler="ddim", seed=0)
    args.update(kw)
    return SampleRequest(prompt_embeds=emb.prompt_embeds[0], negative_prompt_embeds=emb.prompt_embeds[1],
                         pooled=emb.pooled[0], negative_pooled=emb.pooled[1], **args)


def test_diffusers_folder_round_trips(tmp_path):
    cfg = clip_model_cfg("tiny", None)
    torch.manual_seed(0)
    unet, vae = build_unet("tiny", cfg["text_cfg"]["width"], cfg["embed_dim"]), build_vae("tiny")
    save_diffusion(unet, vae, tmp_path / "m")
    s = Sampler.from_pretrained(tmp_path / "m")
    ref = {k: v.half().float() for k, v in unet.state_dict().items()}  # stored as fp16
    for k, v in s.unet.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    assert s.vae_scale_factor == 2 and s.latent_channels == 4 and s.uses_pooled
    with pytest.raises(FileNotFoundError, match="unet"):
        Sampler.from_pretrained(tmp_path)


def test_shapes_dtype_and_range(tiny_pipeline):
    images = tiny_pipeline.sampler.sample([make_request(tiny_pipeline), make_request(tiny_pipeline, width=24)])
    assert images[0].shape == (3, 16, 16) and images[1].shape == (3, 16, 24)
    assert images[0].dtype == torch.float32
    assert 0 <= images[0].min() and images[0].max() <= 1


def test_image_does_not_depend_on_batch_composition(tiny_pipeline):
    """The same request alone and inside a batch of 8 mixed requests: equal within 1/255."""
    pipe = tiny_pipeline
    target = make_request(pipe, "a blue square on a white background", seed=7, scheduler="euler_a",
                          num_inference_steps=5, guidance_scale=5.0)
    alone = pipe.sampler.sample([target])[0]
    mixed = [make_request(pipe, "a red circle", negative="green", seed=1, scheduler="ddim", num_inference_steps=3),
             make_request(pipe, "a green triangle", seed=2, scheduler="dpmpp_2m", num_inference_steps=6,
                          guidance_scale=1.0),
             make_request(pipe, "black", seed=3, scheduler="euler", num_inference_steps=2, guidance_scale=9.0),
             make_request(pipe, "a red square", seed=4, scheduler="euler_a", num_inference_steps=8, width=24),
             target,
             make_request(pipe, "white circle", seed=5, scheduler="dpmpp_2m", num_inference_steps=4, height=24),
             make_request(pipe, "blue", seed=6, scheduler="ddim", num_inference_steps=7, guidance_scale=2.5),
             make_request(pipe, "a blue square on a white background", seed=8, scheduler="euler_a",
                          num_inference_steps=5, guidance_scale=5.0)]
    batched = pipe.sampler.sample(mixed)
    assert (batched[4] - alone).abs().max() <= 1 / 255
    assert (batched[7] - alone).abs().max() > 1 / 255  # another seed is another image


def test_step_level_interface_advances_any_subset(tiny_pipeline):
    pipe = tiny_pipeline
    reqs = [make_request(pipe, seed=1, num_inference_steps=2), make_request(pipe, seed=2, num_inference_steps=5)]
    states = pipe.sampler.start(reqs)
    pipe.sampler.step(states)
    pipe.sampler.step(states)
    assert states[0].done and not states[1].done and states[1].progress == pytest.approx(0.4)
    pipe.sampler.step([states[1]])  # a subset; a new request may join at this boundary
    late = pipe.sampler.start([make_request(pipe, seed=3, num_inference_steps=1)])[0]
    pipe.sampler.step([states[1], late])
    pipe.sampler.step(states + [late])  # done states are skipped
    assert late.done and states[1].step_index == 5
    images = pipe.sampler.finish(states + [late])
    alone = pipe.sampler.sample([reqs[1]])[0]
    assert (images[1] - alone).abs().max() <= 1 / 255


def test_negative_prompt_and_guidance_change_the_output(tiny_pipeline):
    pipe = tiny_pipeline
    base = pipe.sampler.sample([make_request(pipe, seed=3)])[0]
    neg = pipe.sampler.sample([make_request(pipe, negative="blue background", seed=3)])[0]
    cfg = pipe.sampler.sample([make_request(pipe, seed=3, guidance_scale=8.0)])[0]
    assert (base - neg).abs().max() > 1e-3
    assert (base - cfg).abs().max() > 1e-3


def test_unknown_scheduler_and_bad_size_are_rejected(tiny_pipeline):
    with pytest.raises(ValueError, match="scheduler"):
        tiny_pipeline.sampler.start([make_request(tiny_pipeline, scheduler="plms")])
    with pytest.raises(ValueError, match="multiple"):
        tiny_pipeline.sampler.start([make_request(tiny_pipeline, width=18)])


def test_euler_ancestral_is_finite_with_few_steps_and_matches_diffusers_otherwise(tiny_pipeline):
    """With the cosine/trailing schedule and 3 steps diffusers' own step gives NaN (sigma_down is a
    cancelling difference); ours computes the same quantity without cancellation."""
    from diffusers import EulerAncestralDiscreteScheduler

    from pipeline.sampler import StableEulerAncestralScheduler
    sampler = tiny_pipeline.sampler
    config = sampler.scheduler_config
    for steps in (3, 8):
        ours = StableEulerAncestralScheduler.from_config(config)
        theirs = EulerAncestralDiscreteScheduler.from_config(config)
        for sch in (ours, theirs):
            sch.set_timesteps(steps)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * ours.init_noise_sigma
        a, b = x.clone(), x.clone()
        for t in ours.timesteps:
            out = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(int(t)))
            a = ours.step(out, t, a, generator=torch.Generator().manual_seed(1)).prev_sample
            b = theirs.step(out, t, b, generator=torch.Generator().manual_seed(1)).prev_sample
        assert torch.isfinite(a).all()
        if torch.isfinite(b).all():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        else:
            assert steps == 3  # the case the subclass exists for


# ---- image-to-image (SDEdit): the variations' and init images' path ------------------------------------
def striped(h=16, w=16) -> torch.Tensor:
    """A (3, h, w) test image: red and blue vertical stripes."""
    x = torch.zeros(3, h, w)
    x[0, :, ::4], x[0, :, 1::4], x[2, :, 2::4], x[2, :, 3::4] = 1, 1, 1, 1
    return x


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a", "dpmpp_2m"])
def test_img2img_runs_the_last_part_of_the_schedule_from_the_noised_image(tiny_pipeline, scheduler):
    pipe, init = tiny_pipeline, striped()
    start = pipe.sampler.start([make_request(pipe, scheduler=scheduler, num_inference_steps=10, init_image=init,
                                             strength=s) for s in (0.3, 0.6, 1.0)])
    # the tiny model's cosine schedule: 0.3 and 0.6 on SD's schedule are 0.44 and 0.73 of it (matched_strength)
    assert [s.num_steps - s.step_index for s in start] == [4, 7, 10]  # the steps that run
    calls = []
    images = pipe.sampler.sample([make_request(pipe, scheduler=scheduler, num_inference_steps=10, init_image=init,
                                               strength=0.3)], callback=lambda done, total: calls.append(done))
    assert calls == [7, 8, 9, 10] and torch.isfinite(images[0]).all()
    # in latent space (a random-init VAE decoder amplifies any change): from the lowest noise level the result
    # stays next to the encoded image; from a high one it moves far from it
    encoded = pipe.sampler.encode(init[None])
    distance = {}
    for strength in (0.005, 0.9):
        states = pipe.sampler.start([make_request(pipe, scheduler=scheduler, num_inference_steps=50, init_image=init,
                                                  strength=strength)])
        while not states[0].done:
            pipe.sampler.step(states)
        distance[strength] = (states[0].latents - encoded).abs().mean().item()
    assert distance[0.005] < 0.1 < 0.5 < distance[0.9], distance


def test_strength_means_the_same_noise_for_any_schedule(tiny_pipeline):
    """A strength is read on Stable Diffusion's schedule: a model trained on SD's scaled-linear schedule runs the
    last `strength` of its steps as in diffusers' img2img; a cosine-schedule model starts at the timestep with the
    same signal-to-noise ratio (more of its steps), so a 0.3 variation moves as much as it would with SD."""
    from diffusers import DDPMScheduler

    from pipeline.sampler import matched_strength
    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    cosine = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    for s in (0.02, 0.3, 0.6, 0.95):
        assert matched_strength(s, sd) == s
        m = matched_strength(s, cosine)
        assert 0 < m < 1
        snr = [(a / (1 - a)).item() for a in (sd[round(s * 999)], cosine[round(m * 999)])]
        assert abs(snr[0] / snr[1] - 1) < 0.03, (s, m, snr)  # the same signal-to-noise, within a timestep
    # cosine keeps more signal until late in its schedule: the subtle and strong strengths start at a later share
    assert 0.4 < matched_strength(0.3, cosine) < 0.5 and 0.7 < matched_strength(0.6, cosine) < 0.8
    assert matched_strength(1.0, cosine) == 1.0
    pipe, init = tiny_pipeline, striped()
    sd_sampler = Sampler(pipe.sampler.unet, pipe.sampler.vae, {**pipe.sampler.scheduler_config,
                                                               "beta_schedule": "scaled_linear",
                                                               "beta_start": 0.00085, "beta_end": 0.012})
    start = sd_sampler.start([make_request(pipe, scheduler="dpmpp_2m", num_inference_steps=10, init_image=init,
                                           strength=s) for s in (0.3, 0.6, 1.0)])
    assert [s.num_steps - s.step_index for s in start] == [3, 6, 10]


def test_img2img_is_deterministic_and_batch_invariant(tiny_pipeline):
    pipe, init = tiny_pipeline, striped()
    target = make_request(pipe, "a blue square", seed=3, scheduler="euler_a", num_inference_steps=6, init_image=init,
                          strength=0.5)
    alone = pipe.sampler.sample([target])[0]
    mixed = pipe.sampler.sample([make_request(pipe, seed=1, num_inference_steps=4), target,
                                 make_request(pipe, seed=3, scheduler="euler_a", num_inference_steps=6, init_image=init,
                                              strength=0.8),
                                 make_request(pipe, seed=9, scheduler="euler_a", num_inference_steps=6,
                                              init_image=init, strength=0.5)])
    assert (mixed[1] - alone).abs().max() <= 1 / 255
    assert (mixed[3] - alone).abs().max() > 1 / 255  # the seed still decides the noise


def test_img2img_checks_its_inputs(tiny_pipeline):
    pipe = tiny_pipeline
    with pytest.raises(ValueError, match="init_image must be"):
        pipe.sampler.start([make_request(pipe, init_image=striped(8, 8), strength=0.5)])
    with pytest.raises(ValueError, match="strength"):
        pipe.sampler.start([make_request(pipe, init_image=striped(), strength=0.0)])


# ---- guidance in a limited interval (Kynkaanniemi et al. 2024) ---------------------------------------------
def test_guidance_interval_empty_is_guidance_1_and_full_is_plain_guidance(tiny_pipeline):
    pipe = tiny_pipeline
    plain = pipe.sampler.sample([make_request(pipe, seed=5, guidance_scale=4.0)])[0]
    none = pipe.sampler.sample([make_request(pipe, seed=5, guidance_scale=1.0)])[0]
    empty = pipe.sampler.sample([make_request(pipe, seed=5, guidance_scale=4.0, guidance_interval=(0.0, 0.0))])[0]
    full = pipe.sampler.sample([make_request(pipe, seed=5, guidance_scale=4.0, guidance_interval=(0.0, 1.0))])[0]
    # 4 trailing steps are at noise levels 0.999, 0.749, 0.499, 0.249: (0.2, 1] holds all of them
    covering = pipe.sampler.sample([make_request(pipe, seed=5, guidance_scale=4.0, guidance_interval=(0.2, 1.0))])[0]
    torch.testing.assert_close(empty, none, rtol=0, atol=1e-6)
    torch.testing.assert_close(full, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(covering, plain, rtol=0, atol=1e-6)
    assert (plain - none).abs().max() > 1e-3  # guidance does something here, so the checks above mean something


def test_guidance_interval_guides_exactly_the_steps_inside_it(tiny_pipeline):
    """(0, 0.8] on 4 steps (levels 0.999, 0.749, 0.499, 0.249): the first step unguided, the others at the scale;
    the same as running the first step at guidance 1 and switching to the full scale after it."""
    from dataclasses import replace
    pipe = tiny_pipeline
    req = make_request(pipe, seed=6, guidance_scale=5.0, scheduler="dpmpp_2m", guidance_interval=(0.0, 0.8))
    [state] = pipe.sampler.start([req])
    scales = []
    while not state.done:
        scales.append(state.guidance)
        pipe.sampler.step([state])
    assert scales == [1.0, 5.0, 5.0, 5.0]
    interval = pipe.sampler.finish([state])[0]
    [manual] = pipe.sampler.start([replace(req, guidance_scale=1.0, guidance_interval=(0.0, 1.0))])
    pipe.sampler.step([manual])
    manual.request = replace(req, guidance_interval=(0.0, 1.0))
    while not manual.done:
        pipe.sampler.step([manual])
    torch.testing.assert_close(interval, pipe.sampler.finish([manual])[0], rtol=0, atol=1e-6)
    plain = pipe.sampler.sample([replace(req, guidance_interval=(0.0, 1.0))])[0]
    assert (interval - plain).abs().max() > 1e-3


def test_guidance_interval_is_batch_invariant(tiny_pipeline):
    """A request with an interval alone, and in one batch with requests of other intervals, scales and schedulers
    (so the batch's rows per request change from step to step): equal within 1/255."""
    pipe = tiny_pipeline
    target = make_request(pipe, "a blue square on a white background", seed=7, scheduler="dpmpp_2m",
                          num_inference_steps=6, guidance_scale=5.0, guidance_interval=(0.1, 0.7), early_guidance=0.6)
    alone = pipe.sampler.sample([target])[0]
    mixed = [make_request(pipe, "a red circle", seed=1, num_inference_steps=3, guidance_interval=(0.0, 0.5)),
             target,
             make_request(pipe, "green", seed=2, scheduler="euler_a", num_inference_steps=6,
                          guidance_interval=(0.6, 1), early_guidance=0.5),
             make_request(pipe, "black", seed=3, scheduler="euler", num_inference_steps=5, guidance_scale=9.0),
             make_request(pipe, "white", seed=4, num_inference_steps=4, guidance_interval=(0.0, 0.0)),
             make_request(pipe, "a blue square on a white background", seed=7, scheduler="dpmpp_2m",
                          num_inference_steps=6, guidance_scale=5.0)]
    batched = pipe.sampler.sample(mixed)
    assert (batched[1] - alone).abs().max() <= 1 / 255
    assert (batched[5] - alone).abs().max() > 1 / 255  # the same request without the interval is another image


def test_early_guidance_weights_the_steps_above_the_interval(tiny_pipeline):
    """Above the interval the weight is early_guidance: below 1 it mixes the unconditional prediction in, and 0
    is the unconditional prediction itself, i.e. the negative prompt's conditional one."""
    pipe = tiny_pipeline
    [state] = pipe.sampler.start([make_request(pipe, guidance_interval=(0.3, 0.8), early_guidance=0.5)])
    scales = []
    while not state.done:
        scales.append(state.guidance)
        pipe.sampler.step([state])
    assert scales == [0.5, 4.0, 4.0, 1.0]  # levels 0.999 | 0.749, 0.499 | 0.249
    uncond = pipe.sampler.sample([make_request(pipe, seed=2, negative="blue", guidance_interval=(0.0, 0.0),
                                               early_guidance=0.0)])[0]
    negative = pipe.sampler.sample([make_request(pipe, "blue", seed=2, guidance_scale=1.0)])[0]
    cond = pipe.sampler.sample([make_request(pipe, seed=2, guidance_scale=1.0)])[0]
    torch.testing.assert_close(uncond, negative, rtol=0, atol=1e-5)
    assert (uncond - cond).abs().max() > 1e-3


@pytest.mark.parametrize("interval", [(0.5, 0.2), (-0.1, 0.5), (0.0, 1.5), (0.3,), "0-1"])
def test_bad_guidance_intervals_are_rejected(tiny_pipeline, interval):
    with pytest.raises(ValueError, match="guidance_interval"):
        tiny_pipeline.sampler.start([make_request(tiny_pipeline, guidance_interval=interval)])
    with pytest.raises(ValueError, match="early_guidance"):
        tiny_pipeline.sampler.start([make_request(tiny_pipeline, early_guidance=-0.5)])
