"""The errors of `imagine k8s` besides cluster.config's ConfigError."""
from __future__ import annotations


class ManifestError(ValueError):
    """Rendered manifests that a schema rejects; the message lists each error by file, object and path."""


class FetchError(RuntimeError):
    """A model folder could not be downloaded from S3; the message names the URI and S3's answer."""

