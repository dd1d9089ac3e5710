"""`imagine generate --local`: the served API's request parsing (prompt flags, size), in this process."""
from PIL import Image

from cluster.cli import main


def test_generate_local_understands_prompt_flags(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["generate", "--local", "--model", str(tiny_model_dir), "--out", str(out),
               "a red circle --ar 2:1 --n 2 --seed 3 --steps 2 --no blue"])
    assert rc == 0, capsys.readouterr().err
    images = [Image.open(out / f"{seed}.png") for seed in (3, 4)]
    assert all(img.width == 2 * img.height for img in images)
    assert Image.open(out / "grid.png").width >= images[0].width


def test_generate_local_rejects_bad_input_with_a_message(tiny_model_dir, tmp_path, capsys):
    args = ["generate", "--local", "--model", str(tiny_model_dir), "--out", str(tmp_path)]
    assert main(args + ["a red circle --bogus 3"]) == 2
    assert "unknown flag --bogus" in capsys.readouterr().err
    assert main(args + ["--size", "12x", "a red circle"]) == 2
    assert "size" in capsys.readouterr().err
