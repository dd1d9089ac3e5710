"""The job queue's bookkeeping on a real Redis: admission limits, priority levels, place in line, leases
that expire exactly once, duplicate claims refused, events for late readers, dead letters."""
import secrets
import time

import pytest

from cluster.jobqueue import JobQueue


@pytest.fixture
def queue(redis_server):
    return JobQueue(redis_server.client(), max_queued_cost=1000, max_queued_cost_per_key=600,
                    prefix=f"t{secrets.token_hex(4)}:")


def test_admission_counts_image_steps_in_total_and_per_key(queue):
    assert queue.admit("j1", "A", "fast", 500).ok
    refused = queue.admit("j2", "A", "fast", 200)  # key A would hold 700 > 600
    assert not refused.ok and refused.refused_by == "key" and refused.queued_cost == 500
    assert queue.admit("j3", "B", "fast", 400).ok
    refused = queue.admit("j4", "C", "fast", 200)  # 900 + 200 > 1000 in total
    assert not refused.ok and refused.refused_by == "total"
    assert queue.release("j1") and not queue.release("j1")  # idempotent
    assert queue.admit("j4", "C", "fast", 200).ok
    assert queue.stats()["queued_image_steps"] == 600


def test_levels_put_a_keys_first_job_ahead_of_anothers_flood(queue):
    levels = [queue.admit(f"a{i}", "A", "fast", 10).level for i in range(4)]
    assert levels == [0, 3, 3, 3]
    assert queue.admit("b0", "B", "fast", 10).level == 0
    assert queue.admit("r0", "R", "relax", 10).level == 6 and queue.admit("r1", "R", "relax", 10).level == 9
    assert queue.position("a0") == (0, 0) and queue.position("b0") == (1, 10)  # behind a0 only
    assert queue.position("a1") == (2, 20) and queue.position("r1")[0] == 6
    queue.release("a0")
    assert queue.admit("a4", "A", "fast", 10).level == 3  # A still has queued jobs
    assert queue.stats()["queued"] == {"fast": 5, "relax": 2} and queue.position("nope") is None


def test_leases_refuse_a_second_claim_and_expire_exactly_once(queue):
    assert queue.claim("j", "runner-1", lease_s=0.3) == 1
    assert queue.claim("j", "runner-2", lease_s=0.3) == 0  # a duplicate delivery while runner-1 lives
    assert queue.renew("j", "runner-1", lease_s=0.3)
    assert queue.expired() == []
    time.sleep(0.4)
    assert queue.expired() == ["j"] and queue.expired() == []  # one caller re-enqueues it
    assert queue.renew("j", "runner-1", lease_s=0.3)           # nobody claimed it yet: runner-1 takes it back
    assert queue.claim("j", "runner-2", lease_s=5) == 0        # so the redelivered message finds it alive
    time.sleep(0.4)
    assert queue.expired() == ["j"]                            # runner-1 really died this time
    assert queue.claim("j", "runner-2", lease_s=5) == 2 and queue.attempts("j") == 2
    assert not queue.renew("j", "runner-1", lease_s=0.3)       # runner-1 lost it
    assert queue.stats()["redelivered"] == 2 and queue.stats()["running"] == 1
    assert not queue.finish("j", "succeeded", owner="runner-1") and queue.finish("j", "succeeded", owner="runner-2")
    assert queue.stats()["running"] == 0


def test_events_reach_late_readers_and_the_live_record_is_the_last(queue):
    for p in (0.1, 0.5, 1.0):
        queue.publish("j", {"id": "j", "progress": p})
    events = queue.events("j", block_ms=10)
    assert [r["progress"] for _, r in events] == [0.1, 0.5, 1.0]
    assert queue.events("j", after=events[-1][0], block_ms=10) == []
    assert queue.live_record("j")["progress"] == 1.0 and queue.live_record("other") is None


def test_cancel_flag_dead_letters_and_drain_rate(queue):
    queue.request_cancel("j")
    assert queue.cancel_requested("j") and not queue.cancel_requested("k")
    queue.bury("j", "retries exhausted", attempts=3)
    assert queue.dead()[0]["job_id"] == "j" and queue.stats()["dead"] == 1
    for i in range(3):
        queue.admit(f"d{i}", "A", "fast", 100)
        queue.claim(f"d{i}", "r", 10)
        queue.finish(f"d{i}", "succeeded", owner="r")
        time.sleep(0.05)
    assert queue.drain_rate() > 0 and 1 <= queue.retry_after_s(50) <= 600
