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


def test_generate_local_takes_chaos_as_option_and_flag(tiny_model_dir, tmp_path, capsys):
    args = ["generate", "--local", "--model", str(tiny_model_dir), "--steps", "2", "--n", "1", "--seed", "5"]
    assert main(args + ["--out", str(tmp_path / "a"), "--chaos", "50", "a red circle"]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "a red circle --chaos 50"]) == 0
    assert main(args + ["--out", str(tmp_path / "c"), "a red circle"]) == 0
    a, b, c = (Image.open(tmp_path / d / "5.png").tobytes() for d in "abc")
    assert a == b and a != c
    assert main(args + ["--out", str(tmp_path), "--chaos", "101", "a red circle"]) == 2
    assert "chaos" in capsys.readouterr().err


def test_progress_without_a_terminal_is_one_line_per_stage():
    import io

    from cluster.cli import _stage_bar
    out = io.StringIO()  # not a tty: a pipe, a file, a CI log
    update = _stage_bar(out)
    for state, stage, p in [("queued", "queued", 0), ("running", "text_encoder", 0.02), ("running", "diffuser", 0.05),
                            ("running", "diffuser", 0.4), ("running", "diffuser", 0.8),
                            ("running", "upscaler", 0.88), ("running", "publisher", 0.94),
                            ("succeeded", "done", 1.0)]:
        update({"state": state, "stage": stage, "progress": p})
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split()[0] for line in lines] == ["queued", "text_encoder", "diffuser", "upscaler", "publisher",
                                                   "done"]
    assert lines[-1].split()[1:] == ["100%", "(succeeded)"]


def test_env_exports_what_aws_and_boto3_need(s3_server, tmp_path):
    """`eval "$(imagine env)"` in a real shell, then boto3 reaches the S3 server with nothing else configured."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    (tmp_path / "s3.json").write_text(json.dumps({"access_key": s3_server.access_key,
                                                  "secret_key": s3_server.secret_key}))
    (tmp_path / "keys").write_text("imk_envtest\n")
    (tmp_path / "imagine.yaml").write_text(yaml.safe_dump({
        "storage": {"endpoint_url": s3_server.endpoint_url, "bucket": "env-test", "credentials_file": "s3.json"},
        "api": {"api_keys_file": "keys"}}))
    imagine = Path(sys.executable).parent / "imagine"
    probe = ("import boto3, os; s3 = boto3.client('s3'); s3.create_bucket(Bucket=os.environ['IMAGINE_S3_BUCKET']); "
             "print(sorted(b['Name'] for b in s3.list_buckets()['Buckets']), os.environ['IMAGINE_API_KEY'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "IMAGINE_"))}
    out = subprocess.run(["bash", "-c", f'eval "$({imagine} env imagine.yaml)" && {sys.executable} -c "{probe}"'],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "'env-test'" in out.stdout and "imk_envtest" in out.stdout
