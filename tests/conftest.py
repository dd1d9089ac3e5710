"""Shared fixtures: small random-init models written by the tests in the real formats."""
import logging

import pytest
import torch

torch.set_flush_denormal(True)
logging.getLogger("diffusers").setLevel(logging.ERROR)

WORDS = "a red green blue circle square triangle on black white background".split()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A complete tiny model folder: open_clip folder, diffusers folder, upscaler, pipeline.json."""
    from pipeline.configs import write_model
    return write_model(tmp_path_factory.mktemp("tiny-model"), "tiny", words=WORDS, seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    from pipeline import Pipeline
    return Pipeline.load(tiny_model_dir)
