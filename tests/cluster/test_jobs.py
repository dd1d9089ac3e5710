"""cluster/jobs.py: job records in a real S3 bucket (SeaweedFS on loopback)."""
import urllib.request

import pytest
from pydantic import ValidationError

from cluster.jobs import ImageRecord, JobNotFound, JobRecord, JobState, JobStore, new_job_id
from cluster.storage import job_key

REQUEST = {"prompt": "a red circle", "negative_prompt": "", "n": 2, "width": 64, "height": 64, "steps": 4,
           "guidance_scale": 5.0, "scheduler": "ddim", "seed": 7, "upscale": 1, "best_of": 1, "model": "tiny"}


@pytest.fixture
def store(storage):
    return JobStore(storage)


def test_lifecycle_queued_running_succeeded(store, storage):
    job = store.create(REQUEST)
    assert (job.state, job.stage, job.progress, job.is_terminal()) == ("queued", "queued", 0.0, False)
    assert job.id.startswith("img_") and len(job.id) == 28
    assert store.get(job.id) == job

    running = store.update(job.id, state="running", stage="diffuser", progress=0.5)
    assert (running.state, running.stage, running.progress) == (JobState.running, "diffuser", 0.5)
    assert running.updated_at >= job.updated_at

    keys = [storage.put_png(job.id, i, b"png%d" % i, {"prompt": REQUEST["prompt"], "seed": 7 + i}) for i in range(2)]
    images = [ImageRecord(key=k, width=64, height=64, seed=7 + i, url="http://not-stored") for i, k in enumerate(keys)]
    done = store.update(job.id, state="succeeded", stage="done", progress=1.0, images=images)
    assert done.is_terminal() and [im.key for im in done.images] == keys

    stored = storage.get_json(job_key(job.id))
    assert stored["state"] == "succeeded" and "url" not in stored["images"][0]
    assert stored["request"] == REQUEST
    served = store.with_urls(store.get(job.id), expires_s=60)
    with urllib.request.urlopen(served.images[1].url, timeout=10) as resp:
        assert resp.read() == b"png1"


def test_cancelled_job_stays_cancelled(store):
    job = store.create(REQUEST)
    store.update(job.id, state="running", stage="text_encoder")
    assert store.cancel(job.id).state == "cancelled"
    assert store.update(job.id, state="running", stage="diffuser", progress=0.9).state == "cancelled"
    assert store.mark_failed(job.id, "boom", "RuntimeError").state == "cancelled"
    got = store.get(job.id)
    assert (got.state, got.stage, got.error) == ("cancelled", "text_encoder", None)


def test_cancel_racing_an_update_wins(store):
    """A cancel that lands between update()'s read and write makes the write fail its If-Match; the retry sees it."""
    job = store.create(REQUEST)

    class RacingStore(JobStore):
        raced = False

        def _read(self, job_id):
            got = super()._read(job_id)
            if not self.raced:
                self.raced = True
                JobStore(self.storage).cancel(job_id)  # another writer, after our read
            return got

    assert RacingStore(store.storage).update(job.id, state="running").state == "cancelled"
    assert store.get(job.id).state == "cancelled"


def test_mark_failed_records_the_reason(store):
    job = store.create(REQUEST)
    failed = store.mark_failed(job.id, "CUDA out of memory", "OutOfMemoryError")
    assert (failed.state, failed.error, failed.error_type) == ("failed", "CUDA out of memory", "OutOfMemoryError")
    assert store.get(job.id).error_type == "OutOfMemoryError"


@pytest.mark.parametrize("bad", ["../../etc/passwd", "img_../x", "img_" + "g" * 24, "IMG_" + "a" * 24, "", None])
def test_bad_job_ids_are_not_found(store, bad):
    for call in (store.get, store.cancel, lambda i: store.update(i, progress=0.1)):
        with pytest.raises(JobNotFound):
            call(bad)


def test_unknown_job_is_not_found(store):
    with pytest.raises(JobNotFound, match="no job"):
        store.get(new_job_id())


def test_records_survive_a_new_store(store, storage):
    job = store.create(REQUEST)
    store.update(job.id, state="running", stage="upscaler", progress=0.75)
    fresh = JobStore(storage)  # the record in S3 is the source of truth
    assert fresh.get(job.id).stage == "upscaler"
    listed = fresh.list()
    assert job.id in [r.id for r in listed]
    assert [r.created_at for r in listed] == sorted((r.created_at for r in listed), reverse=True)
    assert [r.id for r in fresh.list(job.id[:10])] == [r.id for r in listed if r.id.startswith(job.id[:10])]


def test_records_refuse_bad_fields(store):
    with pytest.raises(ValidationError, match="credential-like"):
        store.create({**REQUEST, "secret_key": "x"})
    job = store.create(REQUEST)
    with pytest.raises(ValueError):
        store.update(job.id, progress=1.5)
    with pytest.raises(ValueError):
        store.update(job.id, stage="painting")
    with pytest.raises(ValueError, match="cannot change"):
        store.update(job.id, id=new_job_id())
    with pytest.raises(ValidationError):
        JobRecord(id="img_x", created_at=0, updated_at=0, request={})
