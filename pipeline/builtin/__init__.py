"""The built-in model and its research kit: the small models imagine trains itself (no model hub is
reachable), and everything that made and judged them. Not needed to serve: the serving pipeline only
reads this folder's weights (`pipeline.spec.BUILTIN_DIR`: `pipeline.json`, `clip/`, `diffusion/`,
`upscaler/`; see `MODEL_CARD.md`).

    domain.py     the procedural domain: one coloured shape on a coloured background, its captions,
                  the held-out combinations, a renderer
    dataset.py    seeded training batches of that domain
    analyzer.py   an independent rule-based judge: which shape and colours an image shows
    configs.py    the architectures as data; `write_model` writes random-init model folders in the real
                  formats (the `tiny` one is the tests' model)
    train.py      `python -m pipeline.builtin.train all`: trains CLIP, VAE, UNet and upscaler from scratch
                  (CPU, seeded) and exports them here
    evaluate.py   `python -m pipeline.builtin.evaluate`: measures them with the analyzer; writes reports/

Nothing is imported here: the modules import torch (and train.py open_clip and diffusers) when used.
"""
