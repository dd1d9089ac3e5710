"""The GPU plan of `imagine bench` (issue 15), on the CPU: the SD-1.5-shaped model's sizes (counted on torch's meta
device, nothing allocated), its tiny twin written, loaded and sampled through `Pipeline`, the one-GPU placement of
the served stages, the GPU goals, and `--device cpu --model sd15-tiny --gpu-quick` itself: its ceiling here, every
mode end to end in the `slow` test (Ray and three deployments take minutes on 2 cores)."""
import dataclasses
import json
import os

import pytest
import torch

from bench import report, sd15, workload
from bench.serving import GPU_SHARES, bench_config
from cluster.cli import main


@pytest.fixture
def one_torch_thread():
    """The tiny model's ops are microseconds long: on a shared 2-core machine a second OpenMP thread mostly waits
    at barriers for a core (6x slower steps under load). One thread keeps these tests quick anywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sd15_shaped_has_sd15s_sizes_counted_without_allocating():
    counts = sd15.param_counts("sd15-shaped")
    assert counts["unet"] == pytest.approx(860e6, rel=0.03)
    assert counts["unet"] == sd15.SD15_PARAMS["unet"]  # 859,520,964: Stable Diffusion 1.5's UNet exactly
    assert counts["vae"] == sd15.SD15_PARAMS["vae"]    # 83,653,863: its AutoencoderKL
    assert counts["text_encoder"] == pytest.approx(123.7e6, rel=0.01)  # CLIP ViT-L/14's text tower + projection
    assert counts["image_tower"] < 1e6  # the scorer's tower is kept minimal (never used by the bench)
    tiny = sd15.param_counts("sd15-tiny")
    assert sum(tiny.values()) < 3e6
    full, small = sd15.SHAPES["sd15-shaped"], sd15.SHAPES["sd15-tiny"]
    for net, keys in (("unet", ("down_block_types", "up_block_types", "in_channels", "attention_head_dim")),
                      ("vae", ("down_block_types", "up_block_types", "latent_channels", "scaling_factor"))):
        assert {k: small[net][k] for k in keys} == {k: full[net][k] for k in keys}  # the same structure
    assert small["clip"]["text_cfg"]["context_length"] == full["clip"]["text_cfg"]["context_length"] == 77
    assert (full["unet"]["block_out_channels"], full["unet"]["layers_per_block"]) == ([320, 640, 1280, 1280], 2)
    assert full["unet"]["cross_attention_dim"] == full["clip"]["text_cfg"]["width"] == 768


def test_sd15_tiny_is_written_once_from_its_seed_and_generates_through_the_pipeline(tmp_path, one_torch_thread):
    from pipeline import Pipeline
    from pipeline.spec import ModelInfo

    folder = sd15.ensure_model("sd15-tiny", tmp_path)
    built = (folder / "built.json").stat().st_mtime_ns
    assert sd15.ensure_model("sd15-tiny", tmp_path) == folder and (folder / "built.json").stat().st_mtime_ns == built
    assert [p.name for p in tmp_path.iterdir()] == ["sd15-tiny"]  # written aside and renamed: no leftovers
    again = sd15.ensure_model("sd15-tiny", tmp_path / "again")  # the same seed, the same weights
    for part in ("diffusion/unet/diffusion_pytorch_model.safetensors", "clip/open_clip_model.safetensors"):
        assert (again / part).read_bytes() == (folder / part).read_bytes()
    info = ModelInfo.load(folder)
    assert info.size_multiple == 64 and info.allowed_sizes(1) == [64, 128]  # VAE x8, three UNet downsamplings

    pipe = Pipeline.load(folder)
    assert pipe.sampler.vae.config.scaling_factor == 0.18215 and not pipe.sampler.uses_pooled
    assert pipe.text_encoder.context_length == 77 and pipe.text_encoder.hidden_size == 32
    [result] = pipe.generate([{"prompt": "a red circle on a black background", "n": 1, "steps": 3, "seed": 1}])
    assert result.images[0].size == (64, 64)  # the model's native size, no upscaling
    assert (result.request.scheduler, result.request.upscale, result.request.guidance_scale) == ("dpmpp_2m", 1, 7.5)

    half = Pipeline.load(folder, dtype=torch.float16)  # as the GPU plan loads it (float16 on CUDA)
    assert half.sampler.unet.dtype == half.sampler.vae.dtype == torch.float16
    assert {p.dtype for p in half.text_encoder.model.parameters()} == {torch.float16}
    emb = half.text_encoder.encode(["a red circle", ""])
    assert emb.prompt_embeds.dtype == torch.float32 and torch.isfinite(emb.prompt_embeds).all()
    assert sd15.run_dtype("cuda") == torch.float16 and sd15.run_dtype("cpu") == torch.float32
    assert sd15.resolve_model(str(folder)) == str(folder) and sd15.resolve_model(None) is None


def test_cuda_places_the_model_stages_on_one_gpu(s3_server, redis_server, tmp_path):
    cfg = bench_config("model", s3_server, redis_server, tmp_path, 8000, 8001, device="cuda")
    stages = {n: cfg.stage(n) for n in ("text_encoder", "diffuser", "upscaler")}
    assert {n: s.ray_actor_options.num_gpus for n, s in stages.items()} == GPU_SHARES
    assert sum(GPU_SHARES.values()) <= 1 and all(s.device == "cuda" for s in stages.values())
    assert stages["diffuser"].ray_actor_options.num_cpus == (os.cpu_count() or 1)
    for name in ("ingress", "job_runner", "publisher"):
        assert cfg.stage(name).ray_actor_options.num_gpus == 0
    cpu = bench_config("model", s3_server, redis_server, tmp_path, 8000, 8001)
    assert all(cpu.stage(n).ray_actor_options.num_gpus == 0 and cpu.stage(n).device == "auto" for n in stages)


def test_gpu_goals_are_judged_on_cuda_runs_only():
    summary = {"peak_images_per_s": {"ceiling": 2.0, "reference": 0.5, "request_level": 0.9, "step_level": 1.2},
               "p99_s": {"step_level": {"0.7": 3.0}, "request_level": {"0.7": 6.0}}}
    rate = {"ratio": 0.93}
    gpu = {g["goal"]: g for g in report.goals(summary, "NVIDIA H200", "cuda", rate)}
    assert [(g["value"], g["met"]) for k, g in gpu.items() if k.startswith("GPU:")] == [(2.4, True), (0.93, True)]
    slow = report.goals({**summary, "peak_images_per_s": {**summary["peak_images_per_s"], "step_level": 0.9}},
                        "NVIDIA H200", "cuda", {"ratio": 0.85})
    assert [g["met"] for g in slow if g["goal"].startswith("GPU:")] == [False, False]
    cpu = report.goals(summary, None, "cpu", rate)
    assert not [g for g in cpu if g["goal"].startswith("GPU:")]
    assert cpu[-1]["note"] == "not run (no GPU lent)" and cpu[-2]["value"] == 0.93 and cpu[-2]["met"] is None
    assert report.goals(summary, "NVIDIA H200", "cpu", None)[-1]["note"] == "not run (--device cpu)"


def _check_results(paths, modes) -> dict:
    assert [p.suffix for p in paths] == [".json", ".md", ".png"] and all(p.is_file() for p in paths)
    assert paths[0].name.endswith("-sd15-tiny-gpu-quick.json")
    r = json.loads(paths[0].read_text())
    assert (r["device"], r["dtype"], r["plan"]["name"], r["model"]["name"]) == ("cpu", "float32", "gpu-quick",
                                                                                "imagine-sd15-tiny")
    assert r["model"]["defaults"]["sample_size"] == 64 and r["model"]["defaults"]["upscale"] == 1
    assert set(r["modes"]) == set(modes) and {"gpu", "gpu_memory_gib", "cuda"} <= set(r["machine"])
    for s in r["ceiling"]["sweep"]:
        assert s["sampling_image_steps_per_s"] > 0 and s["images_per_s"] > 0
    md = paths[1].read_text()
    assert "(gpu-quick run)" in md and "raw sampling image-steps/s" in md and "on cpu in float32" in md
    assert "not run (" in md and "imagine bench --device cuda --model sd15-shaped --gpu-quick" in md
    return r


def test_gpu_quick_plan_on_the_cpu_with_the_tiny_model(tmp_path, monkeypatch, one_torch_thread):
    """`imagine bench --device cpu --model sd15-tiny --gpu-quick --modes ""`: the command line, the model built on
    first use under ./.imagine/models, the ceiling sweep with raw sampling, the files. The plan's two smallest
    batch sizes only (its mix of 20 and 50 steps kept): its full sweep is minutes on a CPU."""
    from bench import cli
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "GPU_QUICK", dataclasses.replace(workload.GPU_QUICK, ceiling_batch_sizes=(1, 4)))
    assert main(["bench", "--device", "cpu", "--model", "sd15-tiny", "--gpu-quick", "--modes", "",
                 "--out", "results"]) == 0
    assert (tmp_path / ".imagine" / "models" / "sd15-tiny" / "built.json").is_file()
    paths = sorted((tmp_path / "results").iterdir(), key=lambda p: ".json.md.png".index(p.suffix))
    r = _check_results(paths, ())
    assert [s["batch_size"] for s in r["ceiling"]["sweep"]] == [1, 4] and r["load_basis"] == "ceiling"
    assert r["plan"]["mix"] == [list(k) for k in workload.MIX] and r["step_rate_vs_raw"] is None


def test_gpu_quick_needs_a_gpu_for_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "--device", "cuda", "--model", "sd15-tiny", "--gpu-quick"]) == 2
    assert "no GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--quick", "--gpu-quick"])  # one plan at a time


@pytest.mark.slow
def test_gpu_quick_plan_end_to_end_on_the_cpu(tmp_path, monkeypatch, one_torch_thread):
    """The whole `--gpu-quick` run as `run_bench` makes it (ceiling, local S3 + Redis + Ray, the three served modes
    over HTTP, the files) with `--device cpu --model sd15-tiny`, its windows and steps shortened (a 50-step request
    of four images outlasts a short window on a busy 2-core machine): every request finishes and the served step
    rate is set against raw sampling."""
    import ray

    from bench.cli import run_bench

    assert not ray.is_initialized(), "run the bench tests before (or apart from) those that start Ray"
    monkeypatch.chdir(tmp_path)
    plan = dataclasses.replace(workload.GPU_QUICK, clients=4, warmup_s=2, closed_window_s=8, open_window_s=5,
                               max_requests=3, drain_s=120, ceiling_batch_sizes=(1, 4), mix=((4, 1), (6, 2)))
    environ = dict(os.environ)  # local_cluster sets Ray's environment variables for the run
    try:
        paths = run_bench(plan, tmp_path / "results", model="sd15-tiny", modes=workload.MODES, device="cpu",
                          log=lambda msg: print(msg, flush=True))
    finally:
        os.environ.clear()
        os.environ.update(environ)
    r = _check_results(paths, workload.MODES)
    for mode, res in r["modes"].items():
        assert res["peak"]["failed"] == 0 and res["first_request"]["error"] is None, mode
        for load in res["open_loop"].values():
            assert load["completed"] == load["submitted"] > 0 and load["failed"] == 0, mode
    rate = r["step_rate_vs_raw"]
    assert rate["served_image_steps_per_s"] > 0 and rate["raw_image_steps_per_s"] > 0 and rate["ratio"] > 0
    assert rate["raw_batch_size"] in (1, 4) and r["layout"]["diffuser"]["num_gpus"] == 0
