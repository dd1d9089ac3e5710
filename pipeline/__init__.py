"""imagine's pure-PyTorch pipeline: text encoder, sampler, upscaler, scorer. No Ray, no HTTP.

    from pipeline import Pipeline, GenerationRequest
    results = Pipeline.load().generate([GenerationRequest(prompt="a red circle on a black background", n=4)])
"""
from .generate import GenerationResult, Pipeline, generate, make_grid, to_pil
from .spec import ModelInfo, PipelineSpec
from .request import GenerationRequest, InvalidRequestError, ResolvedRequest

__all__ = ["GenerationRequest", "GenerationResult", "InvalidRequestError", "ModelInfo", "Pipeline", "PipelineSpec",
           "ResolvedRequest", "generate", "make_grid", "to_pil"]
