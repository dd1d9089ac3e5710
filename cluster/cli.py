"""The `imagine` command line.

    imagine up [imagine.yaml]             # Ray head + local S3 + the application; prints endpoint and key
    imagine generate "a red circle on a black background --ar 1:1 --n 4" --out out/
    imagine status | apply imagine.yaml | serve-config imagine.yaml | down
    eval "$(imagine env)"                 # endpoint, API key and S3 settings for aws/boto3/openai in a shell
    imagine demo                          # up, then a grid for a few prompts
    imagine generate --local "..."        # in this process, no cluster (pipeline/ only)
    imagine upscale JOB 2 | vary JOB 3 --strong | reroll JOB     # Midjourney's U, V and reroll
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path

from cluster.config import ConfigError
from cluster.dashboards_cli import add_dashboard_commands, cmd_dashboards
from cluster.k8s import add_k8s_commands, cmd_k8s
from cluster.launcher import DEFAULT_CONFIG, Cluster

logger = logging.getLogger("imagine")

# Commands that live outside the product, found by module name when the parser is built (cluster/ never
# imports them statically): each module provides `add_command(subparsers)` and `run(args) -> int`. A module
# that is not installed (e.g. `bench`, the benchmark, in a production image) simply adds no command.
EXTENSIONS = {"bench": "bench.cli"}


def _extension(command: str):
    """The module of an extension command, or None when it is not installed."""
    module = EXTENSIONS[command]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        parts = module.split(".")
        if e.name not in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
            raise  # the extension is there but something it imports is missing: a real error
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagine", description=(
        "imagine: text-to-image on Ray Serve. Prompts go through a CLIP text encoder, a diffusion "
        "sampler and a super-resolution upscaler, each an autoscaled Serve deployment; PNGs land in "
        "S3-compatible storage. Configure everything in one file (see imagine.example.yaml)."))
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cfg_help = f"config file (default: ./{DEFAULT_CONFIG} if present, else built-in defaults)"

    up = sub.add_parser("up", help="start Ray, the local S3 server and the application on this machine",
                        description="Start a Ray head, SeaweedFS (local S3) and the Serve application; "
                                    "return once /healthz answers; print endpoint, API key and S3 details.")
    up.add_argument("config", nargs="?", default=None, help=cfg_help)
    up.add_argument("--nodes", type=int, default=None, metavar="N",
                    help="local experiments: N Ray nodes, each in its own network namespace (needs root; "
                         "cluster/multinode.py); `imagine down` removes them")
    for name, helptext in (("down", "stop the application, Ray and the local S3 server"),
                           ("env", "print shell `export` lines for the endpoint, API key and S3 (use: "
                                   'eval "$(imagine env)"; then `aws s3 ls`, boto3 or the openai SDK work)'),
                           ("status", "show each deployment's status and replicas"),
                           ("apply", "deploy the config to the running cluster, in place (e.g. new replicas)"),
                           ("serve-config", "print Serve's config file for this config (for `serve deploy`)")):
        c = sub.add_parser(name, help=helptext, description=helptext)
        c.add_argument("config", nargs="?", default=None, help=cfg_help)

    g = sub.add_parser("generate", help="generate images for a prompt (cluster, or --local)",
                       description="Submit a job to the cluster, show live progress, download the PNGs and a "
                                   "grid. Midjourney-style flags in the prompt work: --ar W:H --seed N --no a, b "
                                   "--steps N --cfg X --n N.")
    _add_generation_args(g)
    d = sub.add_parser("demo", help="start the cluster and generate grids for a few prompts",
                       description="`imagine up`, then a 2x2 grid for each demo prompt; prints paths and URLs.")
    d.add_argument("config", nargs="?", default=None, help=cfg_help)
    d.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default: out/demo)")
    d.add_argument("--local", action="store_true", help="no cluster: run pipeline/ in this process")
    for name, helptext in (("upscale", "U: one image of a job, larger (a child job)"),
                           ("vary", "V: four variations of one image of a job (a child job)"),
                           ("reroll", "the same prompt and settings with new seeds (a child job)")):
        w = sub.add_parser(name, help=helptext, description=helptext + "; shows progress, downloads the PNGs.")
        w.add_argument("job", help="the job id (img_...)")
        if name != "reroll":
            w.add_argument("index", type=int, help="which image, from 1 (as U1..U4, V1..V4)")
        if name == "vary":
            w.add_argument("--strong", action="store_true", help="strong variations (strength 0.6; default subtle 0.3)")
            w.add_argument("--strength", type=float, default=None, help="any strength in (0, 1]")
        w.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out/)")
        w.add_argument("--config", default=None, help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
        w.add_argument("--endpoint", default=None, help="API endpoint (default: from the config)")
        w.add_argument("--api-key", default=None, help="API key (default: the first in the config's key file)")
    j = sub.add_parser("jobs", help="the job queue: dead letters", description="Inspect the job queue.")
    jsub = j.add_subparsers(dest="jobs_command", required=True, metavar="JOBS_COMMAND")
    dead = jsub.add_parser("dead", help="jobs that ran out of attempts (newest first)",
                           description="List the dead letters: jobs that were started jobs.max_attempts times "
                                       "without an outcome (their runners died), with the last error.")
    dead.add_argument("config", nargs="?", default=None, help=cfg_help)
    dead.add_argument("--limit", type=int, default=50, help="at most this many (default: 50)")
    add_k8s_commands(sub)
    add_dashboard_commands(sub)
    for command in EXTENSIONS:
        if (ext := _extension(command)) is not None:
            ext.add_command(sub)
    return p


def _add_generation_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("prompt", help="what to draw (may carry --ar/--seed/--no/--steps/--cfg/--n/--chaos flags)")
    g.add_argument("--negative", default="", help="what not to draw (negative prompt)")
    g.add_argument("--n", type=int, default=None, help="number of images (default: 4, a 2x2 grid)")
    g.add_argument("--size", default=None, help="WxH of the delivered image (default: the model's)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    g.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    g.add_argument("--scheduler", default=None, help="ddim, dpmpp_2m, euler or euler_a")
    g.add_argument("--seed", type=int, default=None, help="seed of the first image (default: random)")
    g.add_argument("--upscale", type=int, default=None, choices=(1, 2, 4), help="super-resolution factor")
    g.add_argument("--best-of", type=int, default=1, help="sample n*best_of and keep the n CLIP ranks best")
    g.add_argument("--chaos", type=int, default=None, help="0-100: how different the images are (default: 0)")
    g.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out/)")
    g.add_argument("--config", default=None, help=f"config file (default: ./{DEFAULT_CONFIG} if present)")
    g.add_argument("--endpoint", default=None, help="API endpoint (default: from the config)")
    g.add_argument("--api-key", default=None, help="API key (default: the first in the config's key file)")
    g.add_argument("--local", action="store_true", help="no cluster: run pipeline/ in this process")
    g.add_argument("--model", default=None, help="with --local: model folder (default: built-in)")


def _fields(args) -> dict:
    body = {"negative_prompt": args.negative, "n": args.n, "size": args.size, "steps": args.steps,
            "guidance_scale": args.cfg, "scheduler": args.scheduler, "seed": args.seed,
            "upscale": args.upscale, "best_of": args.best_of, "chaos": args.chaos}
    return {k: v for k, v in body.items() if v not in (None, "")}


def cmd_generate(args) -> int:
    if args.local:
        return cmd_generate_local(args)
    return _run_job(args, lambda client: client.submit(args.prompt, **_fields(args)))


def cmd_workflow(args) -> int:
    """`imagine upscale JOB 2`, `imagine vary JOB 3 [--strong]`, `imagine reroll JOB`: a child job, followed."""
    if args.command == "upscale":
        return _run_job(args, lambda client: client.upscale(args.job, args.index))
    if args.command == "vary":
        strength = args.strength or (0.6 if args.strong else 0.3)
        return _run_job(args, lambda client: client.vary(args.job, args.index, strength))
    return _run_job(args, lambda client: client.reroll(args.job))


def _run_job(args, submit) -> int:
    """Submit with `submit(client)`, show progress, download the PNGs and a grid."""
    from cluster.client import ClientError, ImagineClient
    c = Cluster.load(args.config)
    keys = c.cfg.api.load_api_keys()
    client = ImagineClient(args.endpoint or c.endpoint, api_key=args.api_key or (sorted(keys)[0] if keys else None))
    t0 = time.perf_counter()
    try:
        out = client.follow(submit(client), out_dir=args.out, on_event=_stage_bar())
    except ClientError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"\nerror: cannot reach {client.base_url} ({e}); is the cluster up? (`imagine up`)", file=sys.stderr)
        return 2
    job = out.job
    print(f"\njob {job['id']}: {len(out.paths)} images in {time.perf_counter() - t0:.1f}s")
    for path, img in zip(out.paths, job["images"]):
        print(f"  {path}  (s3 key {img['key']}, seed {img['seed']})")
    print(f"grid: {out.grid.resolve()}")
    return 0


def _stage_bar(stream=None):
    """A live progress bar labelled with the job's current stage; where the output is not a terminal (a pipe,
    a file, a CI log), one line per stage change instead, as pip and tqdm do."""
    stream = stream or sys.stderr
    if not stream.isatty():
        return _stage_lines(stream)
    from tqdm import tqdm
    bar = tqdm(total=100, desc="queued", unit="%", bar_format="{desc:<14} {bar} {n:.0f}%", file=stream)

    def update(record: dict) -> None:
        bar.set_description_str(record.get("stage") or record["state"])
        bar.n = round(100 * record.get("progress", 0.0))
        bar.refresh()
        if record["state"] in ("succeeded", "failed", "cancelled"):
            bar.close()
    return update


def _stage_lines(stream):
    last: list = [None]

    def update(record: dict) -> None:
        stage = record.get("stage") or record["state"]
        if (record["state"], stage) != last[0]:
            last[0] = (record["state"], stage)
            print(f"{stage:<14} {round(100 * record.get('progress', 0.0)):>3}%  ({record['state']})", file=stream,
                  flush=True)
    return update


def cmd_generate_local(args) -> int:
    """The same request parsing as the served API (prompt flags, size), then pipeline/ in this process."""
    from pipeline import InvalidRequestError, Pipeline, make_grid
    from pipeline.request import RequestOptions, request_from_text

    fields = _fields(args)
    options = {k: v for k, v in fields.items() if k in RequestOptions.model_fields}
    try:
        req = request_from_text(args.prompt, size=fields.get("size"), n=fields.get("n"), default_n=4, **options)
    except InvalidRequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    pipe = Pipeline.load(args.model)
    try:
        [res] = pipe.generate([req], callback=_progress_bar())
    except InvalidRequestError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, seed in zip(res.images, res.seeds):
        paths.append(args.out / f"{seed}.png")
        img.save(paths[-1])
    grid = args.out / "grid.png"
    make_grid(res.images).save(grid)
    print(f"\n{len(paths)} images ({res.images[0].width}x{res.images[0].height}) in "
          f"{time.perf_counter() - t0:.1f}s, seeds {res.seeds}")
    for p in paths:
        print(f"  {p}")
    print(f"grid: {grid.resolve()}")
    return 0


DEMO_PROMPTS = ("a red circle on a black background", "a blue square on a yellow background",
                "a white triangle on a purple background --seed 7")


def cmd_demo(args) -> int:
    """Start the cluster (or run locally) and make a 2x2 grid per demo prompt."""
    gen = argparse.Namespace(negative="", n=None, size=None, steps=None, cfg=None, scheduler=None, seed=None,
                             upscale=None, best_of=1, config=args.config, endpoint=None, api_key=None,
                             local=args.local, model=None)
    if not args.local:
        rc = cmd_up(argparse.Namespace(config=args.config))
        if rc:
            return rc
    for i, prompt in enumerate(DEMO_PROMPTS):
        print(f"\n== {prompt}")
        rc = cmd_generate(argparse.Namespace(**vars(gen), prompt=prompt, out=args.out / f"prompt{i}"))
        if rc:
            return rc
    if not args.local:
        print("\nThe cluster is still running: `imagine status`, `imagine generate \"...\"`, `imagine down`.")
    return 0


def cmd_up(args) -> int:
    from cluster import launcher
    c = Cluster.load(args.config)
    print("starting Ray, the local S3 server and the application (first start: about a minute)...")
    if getattr(args, "nodes", None):
        from cluster import multinode
        info = multinode.up(c, args.nodes)
    else:
        info = launcher.up(c)
    print(f"""ready in {info['seconds']}s
  endpoint   {info['endpoint']}   (OpenAI-compatible: {info['endpoint']}/v1)
  api key    {info['api_key'] or '(auth disabled)'}
  S3         {info['s3_endpoint']}  bucket {info['bucket']}
  S3 keys    {info['s3_credentials']}   (for aws/boto3: eval "$(imagine env)")
  job queue  {info['redis']}   (Redis; `imagine status` shows the queue)
  images     {info['images']}
  dashboard  {info['dashboard']}
  prometheus {_prometheus_line(c, info['prometheus'])}
stop with `imagine down`""")
    for ns, node in info.get("nodes", {}).items():
        print(f"  node {ns}: {node['address']}  resources {node['resources']}")
    return 0


def _prometheus_line(c: Cluster, url: str | None) -> str:
    from cluster.prometheus import INSTALL_HINT
    if url:
        return f"{url}   (alerts: {url}/alerts)"
    return f"not installed; {INSTALL_HINT}" if c.cfg.monitoring.enabled else "(monitoring disabled)"


def cmd_env(args) -> int:
    """Shell `export` lines: the API endpoint and key, the S3 endpoint, bucket and credentials (AWS CLI and
    boto3 names, and the config's own variable names, so other `imagine` commands find them too)."""
    import shlex

    from cluster import launcher
    c = Cluster.load(args.config)
    for name, value in launcher.environment(c).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def cmd_jobs(args) -> int:
    c = Cluster.load(args.config)
    try:
        dead = c.cfg.queue.job_queue(socket_timeout=5).dead(args.limit)
    except Exception as e:
        print(f"error: cannot read the job queue at {c.cfg.queue.redis_url}: {e}", file=sys.stderr)
        return 2
    if not dead:
        print("no dead letters")
    for d in dead:
        print(f"{d['job_id']}  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(d['at']))}  "
              f"attempts {d['attempts']}  {d['error']}")
    return 0


def cmd_down(args) -> int:
    from cluster import launcher, multinode
    c = Cluster.load(args.config)
    if multinode.is_running(c):
        multinode.down(c)
    else:
        launcher.down(c)
    print("stopped")
    return 0


def cmd_status(args) -> int:
    from cluster import launcher
    st = launcher.status(Cluster.load(args.config))
    if st.get("ray") == "down":
        print("not running (start with `imagine up`)")
        return 1
    print(f"application: {st['app']}")
    for name, d in st["deployments"].items():
        print(f"  {name:<12} {d['status']:<10} replicas {d['replicas']}/{d['target']}  "
              f"ongoing {d.get('ongoing', 'n/a')}  queued {d.get('queued', 'n/a')}")
    print(f"health: {json.dumps(st['health'])}")
    q = st.get("queue")
    if isinstance(q, dict):
        rate = q["drain_image_steps_per_s"]
        print(f"queue: waiting fast {q['queued']['fast']}, relax {q['queued']['relax']} "
              f"({q['queued_image_steps']} image-steps; oldest {q['oldest_queued_s']}s), running {q['running']}, "
              f"redelivered {q['redelivered']}, dead {q['dead']} (`imagine jobs dead`); "
              f"drain {f'{rate:.0f} image-steps/s' if rate else 'not measured yet'}")
    else:
        print(f"queue: {q}")
    if st.get("prometheus"):
        print(f"prometheus: {st['prometheus']}")
    return 0


def cmd_apply(args) -> int:
    from cluster import launcher
    st = launcher.apply(Cluster.load(args.config))
    for name, d in st["deployments"].items():
        print(f"  {name:<12} {d['status']:<10} replicas {d['replicas']}/{d['target']}")
    return 0


def cmd_serve_config(args) -> int:
    from cluster.config import render_serve_config_yaml
    c = Cluster.load(args.config)
    print(render_serve_config_yaml(c.cfg), end="")
    return 0


def _progress_bar():
    from tqdm import tqdm
    bar = tqdm(total=None, desc="denoising", unit="step", leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
    return update


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = {"generate": cmd_generate, "demo": cmd_demo, "up": cmd_up, "down": cmd_down, "status": cmd_status,
                "env": cmd_env, "jobs": cmd_jobs, "apply": cmd_apply, "serve-config": cmd_serve_config,
                "upscale": cmd_workflow, "vary": cmd_workflow, "reroll": cmd_workflow,
                "k8s": cmd_k8s, "dashboards": cmd_dashboards}
    try:
        if args.command in EXTENSIONS:
            return _extension(args.command).run(args)
        return commands[args.command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
