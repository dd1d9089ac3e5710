"""The training command runs end to end (tiny sizes, a few steps) and its export loads."""
import json

from pipeline import Pipeline
from pipeline.builtin.train import main, vocabulary


def test_train_all_smoke_run_exports_a_loadable_model(tmp_path):
    main(["all", "--arch", "tiny", "--steps-scale", "0.002", "--work", str(tmp_path / "work"),
          "--out", str(tmp_path / "model")])
    log = json.loads((tmp_path / "work" / "train_log.json").read_text())
    assert {"clip", "vae", "unet", "upscaler", "export"} <= set(log)
    assert log["vae"]["latent_std"] > 0
    [res] = Pipeline.load(tmp_path / "model").generate([{"prompt": "a red circle on a black background",
                                                         "seed": 0, "steps": 2}])
    assert res.images[0].size == (64, 64)


def test_vocabulary_covers_every_caption_word():
    words = set(vocabulary())
    assert {"red", "circle", "background", "coloured", "against", "with", "an"} <= words
