"""The UNet behind torch.compile (inductor, C++ through gcc) with bucketed batch sizes: same images as eager."""
import copy

import pytest
import torch

from pipeline.compiled import CompiledUNet, buckets_up_to, compile_sampler
from pipeline.sampler import Sampler

from .test_sampler import make_request


def test_buckets_cover_every_batch_with_at_most_twice_its_rows():
    assert buckets_up_to(1) == [1] and buckets_up_to(32) == [1, 2, 4, 8, 16, 32] and buckets_up_to(24)[-1] == 24
    unet = CompiledUNet.__new__(CompiledUNet)
    unet.buckets = buckets_up_to(24)
    assert [unet.bucket(n) for n in (1, 3, 5, 9, 17, 24, 30)] == [1, 4, 8, 16, 24, 24, 24]
    with pytest.raises(ValueError, match="compile mode"):
        CompiledUNet(torch.nn.Linear(1, 1), mode="fast")


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_sampler_gives_the_eager_images_whatever_the_batch(tiny_pipeline, backend):
    """Mixed requests (rows padded to a bucket, more rows than the largest bucket, guidance on and off) through
    the compiled UNet: within 1/255 of the eager sampler; each bucket compiles once at warm-up. (Inductor's C++
    compile of the buckets takes minutes on 2 cores: `slow`; dynamo alone checks the padding in seconds.)"""
    pipe = tiny_pipeline
    eager = pipe.sampler
    sampler = Sampler(copy.deepcopy(eager.unet), eager.vae, eager.scheduler_config)
    emb = pipe.text_encoder.encode(["x"])
    seconds = compile_sampler(sampler, "default", max_rows=4, sample_size=(16, 16),
                              embed_shape=tuple(emb.prompt_embeds.shape[1:]), pooled_dim=emb.pooled.shape[1],
                              backend=backend)
    assert seconds > 0 and sampler.unet.buckets == [1, 2, 4]
    reqs = [make_request(pipe, "a red circle", seed=1, num_inference_steps=3),
            make_request(pipe, "a blue square", seed=2, num_inference_steps=4, guidance_scale=1.0),
            make_request(pipe, "a green triangle", seed=3, num_inference_steps=3, scheduler="dpmpp_2m"),
            make_request(pipe, "white", seed=4, num_inference_steps=2, scheduler="euler_a")]  # 7 rows: 4 + 3 (pad 1)
    want = eager.sample(reqs)
    got = sampler.sample(reqs)
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) <= 1 / 255
    alone = sampler.sample(reqs[2:3])[0]  # 2 rows: another bucket, same image
    assert (alone - want[2]).abs().max() <= 1 / 255
