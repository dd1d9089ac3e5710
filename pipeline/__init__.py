"""imagine's pure-PyTorch pipeline: text encoder, sampler, upscaler, scorer. No Ray, no HTTP.

    from pipeline import Pipeline, GenerationRequest
    results = Pipeline.load().generate([GenerationRequest(prompt="a red circle on a black background", n=4)])

Names are imported lazily, so torch-free parts (`pipeline.request`, `pipeline.spec`,
`pipeline.images`) can be used without importing torch.
"""
import importlib

_EXPORTS = {
    "GenerationResult": "generate", "Pipeline": "generate", "generate": "generate", "to_pil": "generate",
    "make_grid": "images", "ModelInfo": "spec", "PipelineSpec": "spec",
    "GenerationRequest": "request", "InvalidRequestError": "request", "ResolvedRequest": "request",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
