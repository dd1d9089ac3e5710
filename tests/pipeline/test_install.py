"""The installed environment imports cleanly in a fresh process (as a Ray worker would)."""
import subprocess
import sys


def test_fresh_process_imports_open_clip_and_diffusers():
    code = ("import open_clip, torchvision; from diffusers import UNet2DConditionModel; "
            "import torch; print(torch.__version__, torchvision.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    torch_version, tv_version = out.stdout.split()
    assert torch_version.startswith("2.14.1") and tv_version.startswith("0.29.1"), out.stdout


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "imagine" in out.stdout and "generate" in out.stdout
