"""A real SeaweedFS S3 server on loopback for the cluster tests (no mocks of S3)."""
import pytest


@pytest.fixture(scope="module")
def storage(make_storage):
    """A Storage on a fresh bucket, one per test module."""
    s = make_storage()
    s.ensure_bucket()
    return s
