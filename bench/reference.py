"""The reference design for `imagine bench`: Ray Serve's official Stable Diffusion example, built from our pipeline.

Ray's example (doc/source/serve/doc_code/stable_diffusion.py) is an `APIIngress` (FastAPI) that hands
each prompt to one `StableDiffusionV2` deployment whose `generate` runs the whole diffusers pipeline
for that one request: no batching across requests, no streaming, no job records. This module keeps that
shape and puts our pipeline inside it, and does the output work of our graph's Publisher (PNG encoding,
one S3 write per image), so the benchmark compares serving designs on the same model and output:

    ReferenceIngress   POST /imagine {GenerationRequest}  ->  ReferencePipeline.generate(request)
    ReferencePipeline  text encode -> sample (the request's own n images together) -> upscale -> PNG -> S3

The example's replica ran one request at a time (its sync `generate` held the replica's event loop in
the Ray of its day); Ray 2.60 would run sync methods in a thread pool, so `max_ongoing_requests=1`
keeps that behaviour. The answer carries the S3 keys and server timestamps (unix seconds, this host's
clock): `started_at` (the replica took the request), `first_step_at` (its first denoising step is
done: where the benchmark's queue wait ends) and `finished_at`.

    from bench.reference import build_reference_app
    serve.run(build_reference_app(cfg), route_prefix="/")
"""
import io
import time

from fastapi import FastAPI, Request
from ray import serve

from cluster.config import ImagineConfig
from deployments.app import deployment_options
from deployments.common import parse_config, pick_device, setup_torch
from pipeline.request import GenerationRequest, InvalidRequestError

app = FastAPI(title="imagine reference", description="Ray Serve's Stable Diffusion example design, our pipeline.")


def generate_and_publish(pipe, storage, request: dict, job_id: str | None = None) -> dict:
    """The whole pipeline for one request: generate its n images, PNG-encode them and write each to S3.

    Args:
        pipe: a `pipeline.Pipeline`.
        storage: a `cluster.storage.Storage` whose bucket exists.
        request: the fields of a `GenerationRequest`.
        job_id: the S3 prefix of the images (default: a new job id).

    Returns:
        {"job_id", "images": [{"key", "width", "height", "seed"}], "timings": {"started_at",
        "first_step_at", "finished_at"}} with unix-second timestamps.

    Raises:
        InvalidRequestError: the request does not fit the model (names the field).
    """
    from cluster.jobs import new_job_id

    job_id = job_id or new_job_id()
    started_at, first_step_at = time.time(), []
    [result] = pipe.generate([request], callback=lambda done, total: first_step_at or first_step_at.append(time.time()))
    req = result.request
    images = []
    for i, (img, seed) in enumerate(zip(result.images, result.seeds)):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        meta = {"prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": seed, "steps": req.steps,
                "guidance_scale": req.guidance_scale, "scheduler": req.scheduler, "model": pipe.spec.name,
                "width": req.width, "height": req.height, "upscale": req.upscale}
        key = storage.put_png(job_id, i, buf.getvalue(), meta)
        images.append({"key": key, "width": img.width, "height": img.height, "seed": seed})
    return {"job_id": job_id, "images": images,
            "timings": {"started_at": started_at, "first_step_at": first_step_at[0], "finished_at": time.time()}}


@serve.deployment(name="ReferencePipeline", max_ongoing_requests=1)
class ReferencePipeline:
    """The example's `StableDiffusionV2`: loads the whole pipeline once, runs one request per call."""

    def __init__(self, config: dict):
        from cluster.storage import Storage
        from pipeline import Pipeline

        cfg = parse_config(config)
        stage = cfg.stages.diffuser  # the reference replica gets the Diffuser's resources
        setup_torch()
        from .sd15 import run_dtype

        device = pick_device(stage)
        self.pipe = Pipeline.load(cfg.model_for("diffuser"), device=device, dtype=run_dtype(device))
        self.storage = Storage.from_config(cfg.storage)
        self.storage.ensure_bucket()

    def generate(self, request: dict) -> dict:
        return generate_and_publish(self.pipe, self.storage, request)


@app.exception_handler(InvalidRequestError)
async def _invalid(request: Request, e: InvalidRequestError):
    from fastapi.responses import JSONResponse
    return JSONResponse(status_code=422, content={"error": {"message": e.message, "param": e.field}})


@serve.deployment(name="ReferenceIngress")
@serve.ingress(app)
class ReferenceIngress:
    """The example's `APIIngress`: validates the body and awaits the pipeline deployment."""

    def __init__(self, pipeline_handle):
        self.handle = pipeline_handle

    @app.post("/imagine")
    async def imagine(self, body: GenerationRequest) -> dict:
        return await self.handle.generate.remote(body.model_dump(exclude_none=True))


def build_reference_app(cfg: ImagineConfig):
    """The reference application: the ingress with our Ingress's options (less its `user_config`: the job queue's
    admission limits, which the reference has no queue for and no `reconfigure` to take), one pipeline deployment
    with the Diffuser's replicas and resources."""
    stage = cfg.stages.diffuser
    pipeline = ReferencePipeline.options(num_replicas=stage.num_replicas or 1,
                                         ray_actor_options=stage.ray_actor_options.to_ray())
    ingress = {k: v for k, v in deployment_options(cfg, "ingress").items() if k != "user_config"}
    return ReferenceIngress.options(**ingress).bind(pipeline.bind(cfg.model_dump(mode="json")))
