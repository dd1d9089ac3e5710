"""Stages placed on separate nodes by custom resources (standing for GPU node groups)."""
import json
import os
import subprocess
import sys

import pytest

from cluster.raynode import ray_temp_dir
from cluster.seaweed import find_free_port
from tests.deployments.conftest import REPO


@pytest.mark.slow
def test_stages_land_on_separate_nodes(app_config, tmp_path):
    cfg, _ = app_config
    d = cfg.model_dump(mode="json")
    d["cluster"]["dashboard_port"] = find_free_port()
    d["cluster"]["http_port"] = find_free_port()
    d["api"]["api_keys_file"] = None
    stages = d["stages"]
    stages["text_encoder"]["ray_actor_options"] = {"num_cpus": 0.5, "resources": {"accel_a": 1}}
    stages["upscaler"]["ray_actor_options"] = {"num_cpus": 0.5, "resources": {"accel_a": 1}}
    stages["diffuser"]["ray_actor_options"] = {"num_cpus": 1, "resources": {"accel_b": 1}}
    temp = ray_temp_dir(REPO / ".imagine" / f"ray-mn-{os.getpid()}")
    out = subprocess.run([sys.executable, str(REPO / "tests/deployments/multinode_app.py"), json.dumps(d),
                          str(temp)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    placed, head = result["placed"], result["head"]
    assert placed["TextEncoder"] == placed["Upscaler"]          # both need accel_a: the same node
    assert placed["Diffuser"] != placed["TextEncoder"]           # accel_b lives elsewhere
    assert head not in placed["Diffuser"] + placed["TextEncoder"]
