import pytest
import torch
from PIL import Image

from pipeline import GenerationRequest, InvalidRequestError, make_grid
from pipeline.generate import parse_request


def test_generate_delivers_upscaled_images(tiny_pipeline, tmp_path):
    [res] = tiny_pipeline.generate([{"prompt": "a red circle", "n": 4, "seed": 11, "steps": 3}])
    assert len(res.images) == 4 and res.seeds == [11, 12, 13, 14]
    assert res.images[0].size == (64, 64) and res.request.sample_width == 16  # 16x16 sampled, x4
    grid = make_grid(res.images)
    grid.save(tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == (128, 128)


def test_generate_matches_sampler_and_upscaler(tiny_pipeline):
    """generate() is encode -> sample -> upscale, nothing else."""
    pipe = tiny_pipeline
    [res] = pipe.generate([{"prompt": "blue square", "seed": 5, "steps": 3, "upscale": 2}])
    r = pipe.resolve(GenerationRequest(prompt="blue square", seed=5, steps=3, upscale=2))
    pixels = torch.stack(pipe.sampler.sample(pipe.sample_requests(r)))
    expected = pipe.upscaler.upscale(pixels, 2)
    got = torch.from_numpy(__import__("numpy").asarray(res.images[0])).permute(2, 0, 1).float() / 255
    assert got.shape == expected[0].shape == (3, 32, 32)
    assert (got - expected[0]).abs().max() <= 1 / 255 + 1e-6


def test_best_of_ranks_candidates_best_first(tiny_pipeline):
    [res] = tiny_pipeline.generate([{"prompt": "a red circle", "n": 2, "best_of": 3, "seed": 0, "steps": 2}])
    assert len(res.images) == 2 and len(res.scores) == 2
    assert res.scores[0] >= res.scores[1]
    assert set(res.seeds) <= set(range(6))


def test_requests_of_one_call_share_batches_but_not_pixels(tiny_pipeline):
    a = {"prompt": "a red circle", "seed": 3, "steps": 3}
    b = {"prompt": "green triangle", "seed": 9, "steps": 5, "scheduler": "euler_a", "width": 128}
    alone = tiny_pipeline.generate([a])[0].images[0]
    together = tiny_pipeline.generate([b, a])
    assert together[0].images[0].size == (128, 64)
    diff = torch.tensor(list(alone.tobytes())) - torch.tensor(list(together[1].images[0].tobytes()))
    assert diff.abs().max() <= 1


@pytest.mark.parametrize("body, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 1001}, "prompt"),
    ({"prompt": "ok", "steps": 0}, "steps"),
    ({"prompt": "ok", "steps": 201}, "steps"),
    ({"prompt": "ok", "n": 0}, "n"),
    ({"prompt": "ok", "n": 17}, "n"),
    ({"prompt": "ok", "upscale": 3}, "upscale"),
    ({"prompt": "ok", "scheduler": "plms"}, "scheduler"),
    ({"prompt": "ok", "colour": "red"}, "colour"),
    ({"prompt": "ok", "width": 66}, "width"),      # not a multiple of the model's factor
    ({"prompt": "ok", "height": 4096}, "height"),  # too large for this model
])
def test_invalid_requests_name_the_field(tiny_pipeline, body, field):
    with pytest.raises(InvalidRequestError) as e:
        tiny_pipeline.resolve(parse_request(body))
    assert e.value.field == field
    if field in ("width", "height"):
        assert "choose one of" in e.value.message
