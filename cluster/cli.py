"""The `imagine` command line.

    imagine demo                          # a 2x2 grid for a prompt, in this process
    imagine generate "a red circle on a black background" --n 4 --out out/

Later commands (up, down, status, apply, bench, k8s) join here as they are built.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("imagine")

DEMO_PROMPT = "a red circle on a black background"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagine", description=(
        "imagine: text-to-image on Ray Serve. Prompts go through a CLIP text encoder, a diffusion "
        "sampler and a super-resolution upscaler; images are written as PNGs."))
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate images for a prompt in this process (no cluster)",
                       description="Generate images for a prompt with pipeline/ in this process and "
                                   "write them, and a grid, as PNGs.")
    _add_generation_args(g)
    d = sub.add_parser("demo", help="a 2x2 grid for a demo prompt; prints where the PNG is",
                       description="Generate a 2x2 grid for a demo prompt with the built-in model.")
    d.add_argument("prompt", nargs="?", default=DEMO_PROMPT, help=f"prompt (default: {DEMO_PROMPT!r})")
    d.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default: out/demo)")
    d.add_argument("--model", default=None, help="model folder with pipeline.json (default: built-in)")
    d.add_argument("--seed", type=int, default=0, help="seed of the first image (default: 0)")
    return p


def _add_generation_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("prompt", help="what to draw")
    g.add_argument("--negative", default="", help="what not to draw (negative prompt)")
    g.add_argument("--n", type=int, default=4, help="number of images (default: 4, a 2x2 grid)")
    g.add_argument("--size", default=None, help="WxH of the delivered image (default: the model's)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    g.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    g.add_argument("--scheduler", default=None, help="ddim, dpmpp_2m, euler or euler_a")
    g.add_argument("--seed", type=int, default=None, help="seed of the first image (default: random)")
    g.add_argument("--upscale", type=int, default=None, choices=(1, 2, 4), help="super-resolution factor")
    g.add_argument("--best-of", type=int, default=1, help="sample n*best_of and keep the n CLIP ranks best")
    g.add_argument("--model", default=None, help="model folder with pipeline.json (default: built-in)")
    g.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out/)")


def cmd_generate(args) -> int:
    from pipeline import InvalidRequestError, Pipeline, make_grid

    body = {"prompt": args.prompt, "negative_prompt": args.negative, "n": args.n, "steps": args.steps,
            "guidance_scale": args.cfg, "scheduler": args.scheduler, "seed": args.seed,
            "upscale": args.upscale, "best_of": args.best_of}
    if args.size:
        try:
            body["width"], body["height"] = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            print(f"error: --size must look like 128x128, got {args.size!r}", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    pipe = Pipeline.load(args.model)
    try:
        [res] = pipe.generate([{k: v for k, v in body.items() if v is not None}], callback=_progress_bar())
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


def cmd_demo(args) -> int:
    args.negative, args.n, args.size, args.steps, args.cfg = "", 4, None, None, None
    args.scheduler, args.upscale, args.best_of = None, None, 1
    return cmd_generate(args)


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
    return {"generate": cmd_generate, "demo": cmd_demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
