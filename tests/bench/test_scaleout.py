"""The scale-out projection: the queue model against closed forms, and the table from a committed bench run."""
import json
import math
from pathlib import Path

from bench.scaleout import erlang_c_wait_quantile, main, project

RUN = Path(__file__).parents[2] / "bench" / "results" / "2026-11-30-cpu2.json"


def test_erlang_c_matches_the_single_server_closed_form_and_vanishes_with_many_servers():
    # M/M/1: P(wait) = rho and the wait beyond 0 is exponential with rate mu (1 - rho)
    rho, mu = 0.7, 2.0
    assert math.isclose(erlang_c_wait_quantile(1, rho, mu), math.log(rho / 0.01) / (mu * (1 - rho)))
    assert erlang_c_wait_quantile(2000, 0.7, 1.0) == 0.0  # thousands of slots at 70 %: nobody waits
    assert erlang_c_wait_quantile(4, 0.95, 1.0) > erlang_c_wait_quantile(4, 0.7, 1.0) > 0


def test_projection_scales_with_gpus_until_a_stage_saturates(capsys):
    results = json.loads(RUN.read_text())
    rows = [project(results, g, gpu_image_steps_per_s=30.0, head_cores=8) for g in (1, 4, 16, 64)]
    assert [r["peak_images_per_s"] for r in rows] == sorted(r["peak_images_per_s"] for r in rows)
    assert rows[1]["peak_images_per_s"] == round(4 * 30.0 / 35, 2)  # the mix: 35 steps per image
    tight = project(results, 64, gpu_image_steps_per_s=30.0, head_cores=1)
    assert tight["saturates"] == "head CPU (serving)" and tight["head_cores_at_peak"] == 1.0
    assert main([str(RUN)]) == 0 and "| 64 |" in capsys.readouterr().out
