"""The step scheduler's policy, without a model: admission, ceiling, join policy, priority, cancel, retire."""
import pytest

from deployments.scheduler import Status, StepScheduler


def names(entries) -> list:
    return [e.request for e in entries]


def test_admits_up_to_the_ceiling_and_refills_as_requests_finish():
    s = StepScheduler(max_batch_size=2)
    a, _, c = s.add("a"), s.add("b"), s.add("c")
    out = s.schedule()
    assert names(out.admitted) == ["a", "b"] and names(out.running) == ["a", "b"]
    assert c.status is Status.WAITING and s.position(c) == 0
    out = s.schedule()  # nothing finished: the same batch, nothing admitted
    assert out.admitted == [] and names(out.running) == ["a", "b"]
    s.retire([a])
    out = s.schedule()
    assert names(out.admitted) == ["c"] and names(out.running) == ["b", "c"]
    assert a.status is Status.FINISHED and s.position(a) is None


def test_when_empty_waits_for_the_batch_to_drain():
    s = StepScheduler(max_batch_size=4, join="when_empty")
    a = s.add("a")
    s.schedule()
    s.add("b")
    assert names(s.schedule().running) == ["a"]  # b waits although there is room
    s.retire([a])
    assert names(s.schedule().admitted) == ["b"]


def test_every_step_joins_mid_flight():
    s = StepScheduler(max_batch_size=4)
    s.add("a")
    s.schedule()
    s.add("b")
    out = s.schedule()
    assert names(out.admitted) == ["b"] and names(out.running) == ["a", "b"]


def test_priority_orders_the_waiting_queue_then_arrival():
    s = StepScheduler(max_batch_size=1)
    s.add("relax-1", priority=1)
    s.add("fast-1", priority=0)
    r2 = s.add("relax-2", priority=1)
    s.add("fast-2", priority=0)
    assert names(s.waiting) == ["fast-1", "fast-2", "relax-1", "relax-2"] and s.position(r2) == 3
    assert names(s.schedule().admitted) == ["fast-1"]


def test_cancel_waiting_leaves_now_and_running_at_the_next_step():
    s = StepScheduler(max_batch_size=1)
    a, b, _ = s.add("a"), s.add("b"), s.add("c")
    s.schedule()
    s.cancel(b)  # waiting: gone at once
    assert names(s.waiting) == ["c"] and b.status is Status.CANCELLED
    s.cancel(a)  # running: leaves at the next step, and its slot goes to c
    out = s.schedule()
    assert names(out.running) == ["c"] and a.status is Status.CANCELLED
    s.cancel(a)  # cancelling twice is harmless
    assert not s.waiting


def test_a_failed_entry_leaves_alone():
    s = StepScheduler(max_batch_size=3)
    a, b = s.add("a"), s.add("b")
    s.schedule()
    s.fail(a)
    assert names(s.running) == ["b"] and a.status is Status.FAILED
    s.retire([b])
    assert not s.has_work


def test_reconfigure_in_place_and_bad_policy():
    s = StepScheduler(max_batch_size=1)
    for x in "abc":
        s.add(x)
    s.schedule()
    s.configure(3, "every_step")
    assert names(s.schedule().running) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="max_batch_size"):
        s.configure(0, "every_step")
    with pytest.raises(ValueError, match="join"):
        s.configure(2, "sometimes")
