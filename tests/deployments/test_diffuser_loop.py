"""The Diffuser's step-level loop in this process (the deployment class itself, without Serve):
join at step boundaries, leave when done, batch ceiling, cancellation, equality with sampling alone."""
import asyncio

import pytest
import torch

from cluster.config import ImagineConfig
from deployments.diffuser import Diffuser
from pipeline.sampler import SampleRequest


@pytest.fixture(scope="module")
def diffuser(tiny_model_dir):
    d = Diffuser.func_or_class(ImagineConfig.from_dict({"model": str(tiny_model_dir)}).model_dump(mode="json"))
    sizes = []
    step = d.sampler.step

    def observed_step(states):  # record each step's batch size, then run the real step
        sizes.append(len(states))
        return step(states)

    d.sampler.step = observed_step
    d.step_sizes = sizes
    return d


def configure(d, **kw):
    base = {"max_replicas": 1, "join": "every_step", "max_batch_size": 8,
            "batch_wait_timeout_s": 0.0}
    d.reconfigure({**base, **kw})
    d.step_sizes.clear()


def request(d, steps, seed, guidance=3.0, scheduler="ddim", size=32):
    cfg = d.sampler.unet.config
    g = torch.Generator().manual_seed(seed)
    dim, pooled = cfg.cross_attention_dim, cfg.projection_class_embeddings_input_dim or 1
    return SampleRequest(torch.randn(8, dim, generator=g), torch.zeros(8, dim), torch.randn(pooled, generator=g),
                         torch.zeros(pooled), size, size, steps, guidance, scheduler, seed)


async def collect(d, req, log=None, name=None, heartbeats=None, priority=0):
    """The progress and image events of one request (its waiting heartbeats go to `heartbeats`)."""
    events = []
    async for e in d.sample(req, priority):
        if "waiting" in e:
            if heartbeats is not None:
                heartbeats.append(e["waiting"])
            continue
        events.append(e)
        if log is not None:
            log.append((name, "image" if "image" in e else e["progress"]))
    return events


def test_requests_leave_when_done_and_join_at_the_next_step(diffuser):
    configure(diffuser)

    async def run():
        log = []
        a = asyncio.ensure_future(collect(diffuser, request(diffuser, 6, 1), log, "a"))
        b = asyncio.ensure_future(collect(diffuser, request(diffuser, 3, 2), log, "b"))
        while not any(n == "a" for n, _ in log):
            await asyncio.sleep(0.001)
        c = asyncio.ensure_future(collect(diffuser, request(diffuser, 2, 3), log, "c"))  # joins mid-flight
        return await asyncio.gather(a, b, c), log

    (a, b, c), log = asyncio.run(run())
    for events, steps in ((a, 6), (b, 3), (c, 2)):  # progress (at most one per step, the last 1.0), then the image
        progress = [e["progress"] for e in events[:-1]]
        assert "image" in events[-1] and 1 <= len(progress) <= steps and progress[-1] == 1.0
        assert progress == sorted(progress)
    assert max(diffuser.step_sizes) == 3 and diffuser.step_sizes[0] == 2 and diffuser.step_sizes[-1] == 1
    assert sum(diffuser.step_sizes) == 6 + 3 + 2  # no step for a request that is done
    order = [n for n, e in log if e == "image"]
    assert order.index("b") < order.index("a") and order.index("c") < order.index("a")  # no head-of-line wait


def test_batch_ceiling_holds_requests_until_a_slot_frees(diffuser):
    configure(diffuser, max_batch_size=2)

    async def run():
        return await asyncio.gather(*(collect(diffuser, request(diffuser, s, i)) for i, s in enumerate((4, 2, 3))))

    asyncio.run(run())
    assert max(diffuser.step_sizes) == 2 and sum(diffuser.step_sizes) == 9


def test_when_empty_join_policy_waits_for_the_batch_to_drain(diffuser):
    configure(diffuser, join="when_empty")

    async def run():
        log = []
        a = asyncio.ensure_future(collect(diffuser, request(diffuser, 4, 1), log, "a"))
        while not log:
            await asyncio.sleep(0.001)
        b = asyncio.ensure_future(collect(diffuser, request(diffuser, 2, 2), log, "b"))
        await asyncio.gather(a, b)

    asyncio.run(run())
    assert diffuser.step_sizes == [1, 1, 1, 1, 1, 1]


def test_a_waiting_request_sends_heartbeats_with_its_place_in_line(diffuser, monkeypatch):
    import deployments.diffuser as module
    monkeypatch.setattr(module, "WAITING_EVERY_S", 0.0)  # a heartbeat after every step
    configure(diffuser, max_batch_size=1)

    async def run():
        beats_b, beats_c = [], []
        a = asyncio.ensure_future(collect(diffuser, request(diffuser, 8, 1)))
        await asyncio.sleep(0.05)
        b = asyncio.ensure_future(collect(diffuser, request(diffuser, 2, 2), heartbeats=beats_b))
        await asyncio.sleep(0)
        c = asyncio.ensure_future(collect(diffuser, request(diffuser, 2, 3), heartbeats=beats_c, priority=-1))
        await asyncio.gather(a, b, c)
        return beats_b, beats_c

    beats_b, beats_c = asyncio.run(run())
    assert beats_b[0] == 0 and 1 in beats_b   # first in line, then behind c, which has the better priority
    assert beats_c and set(beats_c) == {0} and len(beats_b) >= 4


def test_cancelled_request_leaves_at_the_next_step(diffuser):
    configure(diffuser, max_batch_size=1)

    async def run():
        gen = diffuser.sample(request(diffuser, 40, 1))
        assert "waiting" in await gen.__anext__()  # the replica has it
        await gen.__anext__()
        await gen.__anext__()
        waiting = asyncio.ensure_future(collect(diffuser, request(diffuser, 2, 2)))  # no slot yet
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await gen.aclose()  # the caller went away
        return await asyncio.wait_for(waiting, 30)

    events = asyncio.run(run())
    assert "image" in events[-1]
    assert sum(diffuser.step_sizes) < 40  # the 40-step request stopped early
    assert diffuser.step_sizes[-2:] == [1, 1] and len(diffuser.step_sizes) < 20


def test_images_in_a_mixed_batch_equal_each_alone(diffuser):
    configure(diffuser)
    reqs = [request(diffuser, 5, 1), request(diffuser, 3, 2, guidance=1.0, scheduler="euler_a"),
            request(diffuser, 4, 3, scheduler="dpmpp_2m", size=64), request(diffuser, 6, 4, scheduler="euler")]

    async def together():
        return await asyncio.gather(*(collect(diffuser, r) for r in reqs))

    mixed = [events[-1]["image"] for events in asyncio.run(together())]
    for r, img in zip(reqs, mixed):
        alone = asyncio.run(collect(diffuser, r))[-1]["image"]
        assert img.shape == alone.shape
        assert (img - alone).abs().max().item() <= 1 / 255
