"""S3 access for imagine: one bucket, a fixed key layout, and errors that say what failed.

Layout of the bucket:

    images/<job_id>/<index>.png    PNG; S3 user metadata holds prompt, seed, steps, model, width, height, ...
    jobs/<job_id>.json             the job record (cluster/jobs.py), the source of truth for a job

Works with any S3-compatible endpoint (the local SeaweedFS of cluster/seaweed.py, MinIO, AWS). Each failure
raises `StorageError` (or `KeyNotFound`, `PreconditionFailed`) with the botocore error chained, naming the
operation, the key and, when the endpoint could not be reached, saying so. The secret key is handed to boto3
and kept nowhere else: not in repr() and not in any message.

Metadata encoding: S3 user metadata travels as HTTP headers, so it must be ASCII. `encode_metadata` keeps
printable ASCII as it is and percent-encodes (urllib.parse.quote, UTF-8) everything else and "%" itself;
`decode_metadata` (urllib.parse.unquote) reverses it exactly. AWS caps user metadata at 2 KB (keys plus values),
so `put_png` shortens the longest values to fit and lists the shortened keys in the `truncated` entry; the full
prompt always remains in the job record.

A boto3 client cannot be pickled: build a Storage in each process with `Storage.from_config`.
"""
from __future__ import annotations

import json
import logging
import re
import string
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, unquote

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

logger = logging.getLogger(__name__)

METADATA_LIMIT_BYTES = 2048  # AWS: user metadata, keys plus values, UTF-8 bytes
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # a job id as a key segment: no "/", no ".."
_META_KEY = re.compile(r"[a-z0-9][a-z0-9_-]*")
_META_SAFE = "".join(c for c in string.printable if c not in "%\t\n\r\x0b\x0c")  # kept as is by quote()
_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)
_MISSING = {"NoSuchKey", "404", "NotFound"}


class StorageError(RuntimeError):
    """An S3 operation failed.

    Attributes:
        operation: the Storage method ("put_bytes", "get_bytes", ...).
        key: the object key, or None for bucket-level operations.
        unreachable: True when no answer came from the endpoint (refused, timed out, connection dropped).
        status: the HTTP status of S3's answer, if there was one.
        code: S3's error code ("SignatureDoesNotMatch", "NoSuchBucket", ...), if there was one.
    """

    def __init__(self, message: str, *, operation: str, key: str | None = None, unreachable: bool = False,
                 status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.operation, self.key, self.unreachable, self.status, self.code = operation, key, unreachable, status, code


class KeyNotFound(StorageError):
    """The key does not exist in the bucket."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object changed since it was read (if_match) or exists (if_none_match)."""


# ---- layout and metadata ------------------------------------------------------------------------

def _segment(job_id: str) -> str:
    if not isinstance(job_id, str) or not _SAFE_ID.fullmatch(job_id):
        raise ValueError(f"job_id {job_id!r} is not a safe key segment (letters, digits, '_' and '-' only)")
    return job_id


def image_key(job_id: str, index: int) -> str:
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"index ({index!r}) must be an int >= 0")
    return f"images/{_segment(job_id)}/{index}.png"


def job_key(job_id: str) -> str:
    return f"jobs/{_segment(job_id)}.json"


def encode_metadata(metadata: Mapping[str, object]) -> dict[str, str]:
    """S3-safe user metadata: keys lowercased (S3 does that anyway), values str()-ed and percent-encoded.

    Raises:
        ValueError: a key is not letters, digits, '_' and '-' (it becomes an HTTP header name).
    """
    out = {}
    for k, v in metadata.items():
        key = str(k).lower()
        if not _META_KEY.fullmatch(key):
            raise ValueError(f"metadata key {k!r} must be ASCII letters, digits, '_' and '-'")
        out[key] = _quote(str(v))
    return out


def _quote(text: str) -> str:
    value = quote(text, safe=_META_SAFE)
    # HTTP stacks may strip a header value's outer spaces: encode those
    stripped = value.strip(" ")
    if stripped == value:
        return value
    lead = len(value) - len(value.lstrip(" "))
    return "%20" * lead + stripped + "%20" * (len(value) - lead - len(stripped))


def decode_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The inverse of `encode_metadata` (values come back as str)."""
    return {k: unquote(v) for k, v in metadata.items()}


def _metadata_size(metadata: Mapping[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())


def fit_metadata(metadata: dict[str, str], limit: int = METADATA_LIMIT_BYTES) -> dict[str, str]:
    """Encoded metadata shortened to `limit` bytes: the longest values lose characters from their end
    (never half an encoded character) and the `truncated` entry lists their keys."""
    meta, cut = dict(metadata), set()
    while _metadata_size(meta) > limit:
        k = max((k for k in meta if k != "truncated"), key=lambda k: len(meta[k]))
        text = unquote(meta[k])
        assert text, f"metadata keys alone exceed {limit} bytes: {sorted(meta)}"
        cut.add(k)
        meta["truncated"] = ",".join(sorted(cut))
        excess = _metadata_size(meta) - limit
        meta[k] = _quote(text[:-max(1, excess // 12)])  # one character encodes to at most 12 bytes
    return meta


# ---- storage ------------------------------------------------------------------------------------

class Storage:
    """One S3 bucket through boto3.

    Args:
        endpoint_url: S3 endpoint, e.g. "http://127.0.0.1:8333"; None = AWS's default for `region`.
        bucket: bucket name (3-63 characters).
        access_key, secret_key: S3 credentials (the secret is only handed to boto3).
        region: signing region.
        path_style: path-style addressing (needed by SeaweedFS and MinIO); False = boto3's "auto".
        presign_expiry_s: default lifetime of presigned URLs.
        connect_timeout_s, read_timeout_s: per attempt.
        max_attempts: total attempts per call, botocore's "standard" retry mode.
    """

    def __init__(self, endpoint_url: str | None, bucket: str, access_key: str, secret_key: str,
                 region: str = "us-east-1", path_style: bool = True, presign_expiry_s: int = 3600,
                 connect_timeout_s: float = 5, read_timeout_s: float = 30, max_attempts: int = 3):
        if not 3 <= len(bucket) <= 63:
            raise ValueError(f"bucket {bucket!r} must be 3-63 characters long")
        self.endpoint_url, self.bucket, self.region = endpoint_url, bucket, region
        self.presign_expiry_s = presign_expiry_s
        config = Config(signature_version="s3v4", s3={"addressing_style": "path" if path_style else "auto"},
                        retries={"max_attempts": max_attempts, "mode": "standard"},
                        connect_timeout=connect_timeout_s, read_timeout=read_timeout_s)
        session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                                        region_name=region)
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)

    @classmethod
    def from_config(cls, storage_cfg: Any, base_dir: Any = None) -> Storage:
        """A Storage from the config's `storage` section (cluster.config.StorageConfig, or anything with its
        attributes and a `credentials(base_dir) -> (access_key, secret_key)` method; either may be a SecretStr)."""
        access, secret = (_reveal(v) for v in storage_cfg.credentials(base_dir))
        return cls(storage_cfg.endpoint_url, storage_cfg.bucket, access, secret, region=storage_cfg.region,
                   path_style=storage_cfg.path_style, presign_expiry_s=storage_cfg.presign_expiry_s,
                   connect_timeout_s=storage_cfg.connect_timeout_s, read_timeout_s=storage_cfg.read_timeout_s,
                   max_attempts=storage_cfg.max_attempts)

    def __repr__(self) -> str:
        return f"Storage(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r})"

    @contextmanager
    def _errors(self, operation: str, key: str | None = None) -> Iterator[None]:
        """Turn botocore's exceptions into StorageError, KeyNotFound or PreconditionFailed."""
        where = f"s3://{self.bucket}/{key}" if key is not None else f"bucket {self.bucket!r}"
        endpoint = self.endpoint_url or f"AWS S3 ({self.region})"
        try:
            yield
        except _UNREACHABLE as e:
            raise StorageError(f"{operation} {where} failed: endpoint {endpoint} unreachable "
                               f"({type(e).__name__}: {e})", operation=operation, key=key, unreachable=True) from e
        except ClientError as e:
            err, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
            code, status = err.get("Code"), meta.get("HTTPStatusCode")
            msg = f"{operation} {where} at {endpoint} failed: HTTP {status} {code}: {err.get('Message', '')}"
            if code in _MISSING and key is not None:
                raise KeyNotFound(f"{operation} {where}: no such key", operation=operation, key=key,
                                  status=status, code=code) from e
            if code == "PreconditionFailed" or status == 412:
                raise PreconditionFailed(msg, operation=operation, key=key, status=status, code=code) from e
            if status == 403:
                msg += " (check the access key and secret key)"
            elif code == "NoSuchBucket":
                msg += " (create it with Storage.ensure_bucket() or `imagine up`)"
            raise StorageError(msg, operation=operation, key=key, status=status, code=code) from e
        except BotoCoreError as e:
            raise StorageError(f"{operation} {where} at {endpoint} failed: {type(e).__name__}: {e}",
                               operation=operation, key=key) from e

    # -- bucket --

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (and is ours)."""
        with self._errors("ensure_bucket"):
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket", "NotFound"}:
                    raise
            try:
                self._client.create_bucket(Bucket=self.bucket)
                logger.info("created bucket %s at %s", self.bucket, self.endpoint_url)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                    raise

    # -- objects --

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream",
                  metadata: dict[str, str] | None = None, *, if_match: str | None = None,
                  if_none_match: bool = False) -> None:
        """Write an object. metadata values must be ASCII (see `encode_metadata`).

        if_match: write only if the object's ETag still is this one; if_none_match: only if it does not exist.
        Either raises PreconditionFailed when the condition does not hold.
        """
        self._put(key, data, content_type, metadata, if_match, if_none_match)

    def _put(self, key, data, content_type, metadata, if_match, if_none_match) -> str:
        for k, v in (metadata or {}).items():
            if not (k + v).isascii():
                raise ValueError(f"metadata {k!r} of {key!r} is not ASCII; encode it with encode_metadata()")
        kwargs: dict[str, Any] = {"Metadata": dict(metadata or {})}
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        with self._errors("put_bytes", key):
            resp = self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type,
                                           **kwargs)
        return resp.get("ETag", "")

    def get_bytes(self, key: str) -> bytes:
        return self._get(key)[0]

    def _get(self, key: str) -> tuple[bytes, str]:
        with self._errors("get_bytes", key):
            resp = self._client.get_object(Bucket=self.bucket, Key=key)
            return resp["Body"].read(), resp.get("ETag", "")

    def head(self, key: str) -> dict:
        """{"ContentType", "ContentLength", "Metadata" (as stored: see decode_metadata), "ETag"}."""
        with self._errors("head", key):
            resp = self._client.head_object(Bucket=self.bucket, Key=key)
        return {k: resp.get(k) for k in ("ContentType", "ContentLength", "Metadata", "ETag")}

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except KeyNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        """Delete an object (deleting a missing key is not an error, as in S3)."""
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def list_keys(self, prefix: str = "", page_size: int = 1000) -> list[str]:
        """All keys under prefix, in S3's (lexicographic) order, fetched page_size keys per request."""
        keys: list[str] = []
        with self._errors("list_keys", prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
            for page in pages:
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys

    def presigned_url(self, key: str, expires_s: int | None = None) -> str:
        """A URL that GETs the object without credentials for expires_s (default presign_expiry_s) seconds."""
        with self._errors("presigned_url", key):
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key},
                ExpiresIn=expires_s if expires_s is not None else self.presign_expiry_s)

    # -- JSON and images --

    def put_json(self, key: str, obj: Any, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        """Write obj as UTF-8 JSON; returns the new ETag (conditions as in put_bytes)."""
        return self._put(key, _dumps(obj), "application/json", None, if_match, if_none_match)

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def get_json_etag(self, key: str) -> tuple[Any, str]:
        """(object, ETag): pass the ETag to put_json(if_match=...) for a read-modify-write without lost updates."""
        data, etag = self._get(key)
        return json.loads(data), etag

    def put_png(self, job_id: str, index: int, png_bytes: bytes, metadata: Mapping[str, object]) -> str:
        """Store image `index` of a job as image/png with its parameters as user metadata; returns the key.

        metadata: prompt, seed, steps, model, width, height, ...; values are str()-ed and encoded by
        `encode_metadata` (read them back with `decode_metadata(storage.head(key)["Metadata"])`).
        job_id and index are added. Over 2 KB, the longest values are shortened (see `fit_metadata`).
        """
        key = image_key(job_id, index)
        meta = fit_metadata(encode_metadata({**metadata, "job_id": job_id, "index": index}))
        self.put_bytes(key, png_bytes, "image/png", meta)
        return key


def _reveal(value: Any) -> str:
    """The str behind a pydantic SecretStr, or value itself."""
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
