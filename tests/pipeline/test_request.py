"""The request contract's chaos and guidance-interval fields: the `--chaos N` prompt flag, the bounds, and what a
model's `resolve` makes of them (the same code the served API runs, torch-free)."""
import pytest

from pipeline.request import GenerationRequest, InvalidRequestError, RequestOptions, request_from_text
from pipeline.spec import ModelInfo


@pytest.mark.parametrize("prompt, chaos", [
    ("a red circle --chaos 50", 50), ("a red circle --c 25 --n 4", 25), ("a red circle --chaos 0", 0),
    ("a red circle --CHAOS 100", 100), ("a red circle", None)])
def test_chaos_flag(prompt, chaos):
    req = request_from_text(prompt, default_n=4)
    assert req.prompt == "a red circle" and req.chaos == chaos


def test_chaos_flag_wins_over_the_body_field():
    assert request_from_text("a red circle --chaos 10", chaos=90).chaos == 10
    assert request_from_text("a red circle", chaos=90).chaos == 90


@pytest.mark.parametrize("prompt, options, field, message", [
    ("a red circle --chaos 101", {}, "prompt", "--chaos: Input should be less than or equal to 100"),
    ("a red circle --chaos -1", {}, "prompt", "--chaos: Input should be greater than or equal to 0"),
    ("a red circle --chaos lots", {}, "prompt", "--chaos needs a int value"),
    ("a red circle --chaos 2.5", {}, "prompt", "--chaos needs a int value"),
    ("a red circle", {"chaos": 101}, "chaos", "less than or equal to 100"),
    ("a red circle", {"chaos": -5}, "chaos", "greater than or equal to 0"),
    ("a red circle", {"guidance_interval": (0.6, 0.2)}, "guidance_interval", "lo <= hi"),
    ("a red circle", {"guidance_interval": (0.0, 1.5)}, "guidance_interval", "less than or equal to 1"),
    ("a red circle", {"guidance_interval": (0.5,)}, "guidance_interval", ""),
])
def test_bad_chaos_and_intervals_are_errors_naming_the_field(prompt, options, field, message):
    """InvalidRequestError is what the HTTP API maps to a 422 naming `field` (deployments/ingress/api.py)."""
    with pytest.raises(InvalidRequestError) as e:
        request_from_text(prompt, **options)
    assert e.value.field == field and message in e.value.message, e.value


def test_the_body_schema_bounds_chaos():
    """The HTTP body is RequestOptions plus HTTP's own fields: the bounds travel in its JSON schema."""
    schema = RequestOptions.model_json_schema()["properties"]
    chaos = schema["chaos"]["anyOf"][0]
    assert (chaos["type"], chaos["minimum"], chaos["maximum"]) == ("integer", 0, 100)
    assert "guidance_interval" in schema


def test_resolve_fills_the_interval_and_records_chaos(tiny_model_dir):
    info = ModelInfo.load(tiny_model_dir)  # the generic defaults: guidance at every step, chaos 100 -> (0, 0.5], 0.5
    plain = info.resolve(GenerationRequest(prompt="a red circle", seed=1))
    assert (plain.chaos, plain.guidance_interval, plain.early_guidance) == (0, (0.0, 1.0), 1.0)
    own = info.resolve(GenerationRequest(prompt="a red circle", seed=1, guidance_interval=(0.2, 0.6)))
    assert own.guidance_interval == (0.2, 0.6) and own.early_guidance == 1.0
    # the record round-trips (the JobRunner rebuilds the request from the stored JSON)
    assert type(own).model_validate(own.model_dump(mode="json")) == own


def resolved(info, **fields):
    r = info.resolve(GenerationRequest(prompt="a red circle", seed=1, **fields))
    return r.guidance_interval, r.early_guidance


def test_chaos_loosens_guidance_linearly_and_never_tightens_it(tiny_model_dir):
    info = ModelInfo.load(tiny_model_dir)
    assert resolved(info, chaos=0) == ((0.0, 1.0), 1.0)
    assert resolved(info, chaos=50) == ((0.0, 0.75), 0.75)
    assert resolved(info, chaos=100) == ((0.0, 0.5), 0.5)
    # on top of a request's own interval and early guidance; a looser one than chaos 100's stays as it is
    assert resolved(info, chaos=100, guidance_interval=(0.2, 0.9)) == ((0.2, 0.5), 0.5)
    assert resolved(info, chaos=100, guidance_interval=(0.7, 0.9)) == ((0.5, 0.5), 0.5)
    assert resolved(info, chaos=100, guidance_interval=(0.0, 0.3), early_guidance=0.2) == ((0.0, 0.3), 0.2)


def test_the_builtin_model_serves_its_measured_guidance_and_chaos():
    """The built-in model's defaults (pipeline.json; reports/evaluation.md, seed diversity): guidance 4 in
    (0, 0.55], 0.7 above it; --chaos lowers the early guidance to 0.1 at 100."""
    info = ModelInfo.load()
    assert resolved(info) == ((0.0, 0.55), 0.7)
    assert [resolved(info, chaos=c)[1] for c in (0, 25, 50, 100)] == [0.7, 0.55, 0.4, 0.1]
    assert resolved(info, chaos=100)[0] == (0.0, 0.55)


def test_chaos_reaches_the_sampler(tiny_pipeline):
    """generate() (and the served JobRunner: make_sample_requests) sample with the resolved interval and early
    guidance: chaos 60 is the same image as asking for them explicitly, and another image than chaos 0."""
    import numpy as np
    base = {"prompt": "a red circle", "seed": 3, "steps": 4, "upscale": 1}
    [chaos] = tiny_pipeline.generate([{**base, "chaos": 60}])
    interval, early = resolved(tiny_pipeline.info, chaos=60)
    [explicit] = tiny_pipeline.generate([{**base, "guidance_interval": interval, "early_guidance": early}])
    [calm] = tiny_pipeline.generate([base])
    assert chaos.request.chaos == 60 and chaos.request.early_guidance == early == 0.7
    a, b, c = (np.asarray(r.images[0]).astype(int) for r in (chaos, explicit, calm))
    assert np.abs(a - b).max() <= 1 and np.abs(a - c).max() > 1
