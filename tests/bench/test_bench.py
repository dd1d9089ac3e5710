"""The pieces of `imagine bench` (bench/) on real components: the Poisson schedule, percentiles, the load generators
driving the reference design's per-request function (tiny model, real S3), the ceiling, and the writers.
The served modes themselves run in `imagine bench --quick` (Ray and three deployments take minutes); the
request-level graph is served in test_request_level.py."""
import io
import json
import os
import random
import threading
import time

import numpy as np
import pytest
from PIL import Image

from bench import load, report, serving, stats, workload
from bench.ceiling import run_ceiling
from bench.reference import generate_and_publish
from cluster.cli import main

MIX = ((2, 1), (3, 2))  # (steps, n): short for the tiny model
PLAN = workload.Plan("test", fractions=(0.3, 0.7), clients=2, warmup_s=0.3, closed_window_s=1.5,
                     open_window_s=2.0, max_requests=6, drain_s=30, ceiling_batch_sizes=(1, 2), mix=MIX)


def test_poisson_schedule_has_the_rate_the_mix_and_the_bounds():
    a = workload.poisson_schedule(20.0, 200.0, 10**6, workload.MIX, seed=3)
    assert a == workload.poisson_schedule(20.0, 200.0, 10**6, workload.MIX, seed=3)  # same arrivals for every mode
    assert a != workload.poisson_schedule(20.0, 200.0, 10**6, workload.MIX, seed=4)
    assert abs(len(a) - 4000) < 4 * 4000**0.5  # Poisson count: mean rate * duration, sd sqrt(mean)
    times = [x.at_s for x in a]
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 200.0
    gaps = np.diff(times)
    assert abs(gaps.mean() - 1 / 20) < 0.003 and abs(gaps.std() / gaps.mean() - 1) < 0.1  # exponential: cv 1
    for kind in workload.MIX:
        assert abs(sum((x.steps, x.n) == kind for x in a) / len(a) - 0.25) < 0.03
    assert len(workload.poisson_schedule(100.0, 10.0, 7, seed=1)) == 7
    slow, fast = workload.poisson_schedule(2.0, 200.0, 10**6, seed=3), a  # same seed, a tenth of the rate
    assert [(x.steps, x.n, x.seed) for x in slow] == [(x.steps, x.n, x.seed) for x in fast[:len(slow)]]
    assert [x.at_s for x in slow] == pytest.approx([10 * x.at_s for x in fast[:len(slow)]])
    assert workload.mean_images(workload.MIX) == 2.5 and workload.mean_steps_per_image(workload.MIX) == 35


def test_percentiles_match_numpy():
    xs = [random.Random(1).expovariate(1.0) for _ in range(101)]
    for q in (50, 95, 99):
        assert stats.percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert stats.percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert stats.percentile([], 50) is None and stats.percentile([2.0], 99) == 2.0


def test_cpu_share_sees_this_process_work():
    before, t = stats.cpu_seconds_by_process(), time.time()
    while time.time() - t < 0.5:
        sum(i * i for i in range(10_000))
    share = stats.cpu_share(before, stats.cpu_seconds_by_process(), time.time() - t)
    cores = os.cpu_count()
    assert 0.3 / cores < share["bench driver"] <= 1.05 / cores  # one busy thread: at most one core of `cores`
    assert stats._program(["ray::ServeReplica:bench:Diffuser.sample"]) == "Diffuser replica"


def test_reference_request_writes_the_pipelines_images_to_s3(tiny_pipeline, make_storage):
    storage = make_storage()
    storage.ensure_bucket()
    request = {"prompt": "a red circle on a black background", "n": 2, "steps": 3, "seed": 5}
    answer = generate_and_publish(tiny_pipeline, storage, request)
    [expected] = tiny_pipeline.generate([request])
    t = answer["timings"]
    assert t["started_at"] < t["first_step_at"] < t["finished_at"]
    assert [img["seed"] for img in answer["images"]] == [5, 6]
    for img, want in zip(answer["images"], expected.images):
        got = np.asarray(Image.open(io.BytesIO(storage.get_bytes(img["key"]))))
        assert img["key"].startswith(f"images/{answer['job_id']}/") and (img["width"], img["height"]) == want.size
        assert np.abs(got.astype(int) - np.asarray(want).astype(int)).max() <= 1


@pytest.fixture(scope="module")
def reference_send(tiny_pipeline, make_storage):
    """The reference's per-request function as a load generator's `send`, in this process, one request at a
    time (as the reference replica, max_ongoing_requests=1), so queues really form."""
    storage = make_storage()
    storage.ensure_bucket()
    lock = threading.Lock()

    def send(steps, n, seed, deadline):
        out = load.Outcome(steps, n, sent=time.time())
        with lock:
            answer = generate_and_publish(tiny_pipeline, storage, workload.body(steps, n, seed))
        out.first_step, out.done = answer["timings"]["first_step_at"], time.time()
        return out
    return send


def test_open_and_closed_loops_time_real_requests(reference_send):
    schedule = workload.poisson_schedule(30.0, 1.0, 8, MIX, seed=2)
    outs, start = load.run_open_loop(reference_send, schedule, deadline_s=30)
    assert len(outs) == len(schedule) and all(o.ok for o in outs)
    for o, a in zip(outs, schedule):  # each request went out at its arrival time, not after the one before
        assert abs(o.sent - start - a.at_s) < 0.25 and o.sent <= o.first_step < o.done
    lat = stats.latency_stats(outs)
    assert lat["completed"] == len(outs) and lat["failed"] == 0
    assert lat["latency_s"]["p99"] == pytest.approx(np.percentile([o.done - o.sent for o in outs], 99), abs=1e-4)
    # one at a time, 8 arrivals in well under a second: the later ones queue behind the earlier ones
    assert lat["queue_wait_s"]["p99"] > 2 * min(o.first_step - o.sent for o in outs)

    outs, t0, t1 = load.run_closed_loop(reference_send, 2, 0.3, 1.5, 30, MIX, seed=1)
    peak = stats.window_throughput(outs, t0, t1)
    inside = [o for o in outs if t0 <= o.done <= t1]
    assert peak["completed_in_window"] == len(inside) > 0 and peak["failed"] == 0
    assert peak["images_per_s"] == pytest.approx(sum(o.n for o in inside) / 1.5, abs=1e-3)
    assert max(o.sent for o in outs) < t1  # clients stop sending at the end of the window


def test_results_files_from_a_measured_ceiling_and_reference(tiny_model_dir, reference_send, tmp_path):
    ceiling = run_ceiling(PLAN, str(tiny_model_dir), lambda msg: None)
    assert [s["batch_size"] for s in ceiling["sweep"]] == [1, 2]
    assert ceiling["images_per_s"] == max(s["images_per_s"] for s in ceiling["sweep"]) > 0
    assert set(ceiling["alone_s"]) == {"2x1", "3x2"} and ceiling["latency_s"]["p99"] <= max(ceiling["alone_s"].values())
    assert workload.arrival_rates(PLAN, 3.0) == {"0.3": pytest.approx(0.3 * 3.0 / 1.5), "0.7": pytest.approx(1.4)}
    # no rates given: the plan's fractions of this mode's own peak (as for step-level, the basis)
    reference, rates = serving.measure("reference", reference_send, PLAN, None, lambda msg: None)
    peak = reference["peak"]["images_per_s"]
    assert peak > 0 and rates == workload.arrival_rates(PLAN, peak)
    assert {f: o["rate_rps"] for f, o in reference["open_loop"].items()} == pytest.approx(rates, abs=1e-5)

    results = report.assemble(PLAN, report.describe_machine(), str(tiny_model_dir), ceiling, {"reference": reference},
                             {}, "reference", rates, seconds=1.0)
    paths = report.write_results(results, tmp_path, "bench")
    assert [p.name for p in paths] == ["bench.json", "bench.md", "bench.png"]
    summary = json.loads(paths[0].read_text())["summary"]
    assert summary == {
        "peak_images_per_s": {"ceiling": ceiling["images_per_s"], "reference": reference["peak"]["images_per_s"],
                              "request_level": None, "step_level": None},
        "p99_s": {"ceiling": {f: ceiling["latency_s"]["p99"] for f in ("0.3", "0.7")},
                  "reference": {f: reference["open_loop"][f]["latency_s"]["p99"] for f in ("0.3", "0.7")},
                  "request_level": {"0.3": None, "0.7": None}, "step_level": {"0.3": None, "0.7": None}}}
    md = paths[1].read_text()
    assert f"| reference | {reference['peak']['images_per_s']:.3f} |" in md and "| reference | 0.7 |" in md
    assert "Load fractions are of the **reference** peak" in md
    assert "not run (no GPU lent)" in md and "step-level peak >= 85%" in md
    plot = np.asarray(Image.open(paths[2]).convert("RGB")).reshape(-1, 3)
    colours = {tuple(c) for c in np.unique(plot, axis=0)}
    assert report.COLORS["reference"] in colours and report.COLORS["ceiling"] in colours  # the measured modes
    assert report.COLORS["step_level"] not in colours
    assert Image.open(paths[2]).size == (1000, 460)


def test_bench_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(w in text for w in ("--quick", "--modes", "Queue wait", "ceiling", "step_level"))
    assert main(["bench", "--modes", "reference,bogus"]) == 2
    assert "unknown --modes ['bogus']" in capsys.readouterr().err


def test_the_imagine_command_line_finds_bench_by_name_only(monkeypatch, capsys, tmp_path):
    """cluster/ never imports bench/ (nor deployments/): `imagine bench` comes from cluster.cli.EXTENSIONS, by
    module name; an extension that is not installed adds no command, an import error inside one surfaces."""
    import ast
    from pathlib import Path

    import cluster
    from cluster import cli
    for path in Path(cluster.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("bench", "deployments")], path
    monkeypatch.setitem(cli.EXTENSIONS, "bench", "bench.not_installed")
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "invalid choice: 'bench'" in capsys.readouterr().err
    (tmp_path / "imagine_ext_broken.py").write_text("import imagine_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.EXTENSIONS, "bench", "imagine_ext_broken")
    with pytest.raises(ModuleNotFoundError, match="imagine_missing_dependency"):
        cli.build_parser()
