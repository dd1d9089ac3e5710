"""Model folders from S3 (an init container runs this: `python -m cluster.k8s fetch-weights <uri> <dest> ...`)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from cluster.config import StorageConfig
from cluster.k8s.errors import FetchError

logger = logging.getLogger("cluster.k8s")  # the name its log lines had before cluster/k8s.py became a package


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """("bucket", "prefix/") of s3://bucket/prefix."""
    m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?", uri)
    if m is None:
        raise ValueError(f"{uri!r} is not an S3 URI such as s3://bucket/models/sd15/")
    prefix = (m.group(2) or "").strip("/")
    return m.group(1), prefix + "/" if prefix else ""


def fetch_weights(uri: str, dest: str | Path, storage: StorageConfig) -> int:
    """Download every object under `uri` into `dest` (keys relative to the prefix); returns the file count.

    Raises:
        ConfigError: no credentials in the environment.
        FetchError: S3 refused or could not be reached, nothing is under the prefix, or no pipeline.json at its top.
    """
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError
    bucket, prefix = parse_s3_uri(uri)
    access, secret = storage.credentials()
    client = boto3.session.Session(aws_access_key_id=access, aws_secret_access_key=secret.get_secret_value(),
                                   region_name=storage.region).client(
        "s3", endpoint_url=storage.endpoint_url,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path" if storage.path_style else "auto"},
                      retries={"max_attempts": storage.max_attempts, "mode": "standard"}))
    dest = Path(dest).resolve()
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        if not keys:
            raise FetchError(f"no objects under {uri}")
        for key in keys:
            target = (dest / key[len(prefix):]).resolve()
            if not target.is_relative_to(dest):
                raise FetchError(f"object key {key!r} would land outside {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".part")
            client.download_file(bucket, key, str(part))
            part.replace(target)
            logger.info("fetched s3://%s/%s -> %s", bucket, key, target)
    except (BotoCoreError, ClientError) as e:
        raise FetchError(f"fetching {uri} from {storage.endpoint_url or 'AWS S3'} failed: {e}") from e
    if not (dest / "pipeline.json").is_file():
        raise FetchError(f"{uri} has no pipeline.json at its top; a model folder needs one")
    return len(keys)
