"""An S3 prefix with one sub-prefix of images per wnid (s3://bucket/prefix/n02084071/...).

Candidates are s3:// URLs; the ingest stage reads them with the same endpoint/credentials.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

from pipeline.sources.base import Source, SourceConfigError, SourceError


def split_s3_url(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise SourceConfigError(f"s3_prefix: {url!r} is not an s3://bucket/prefix URL")
    return parsed.netloc, parsed.path.lstrip("/")


class S3PrefixSource(Source):
    name = "s3_prefix"
    per_query = False

    def __init__(self, url: str | None, *, endpoint_url: str | None = None, client: Any = None):
        if not url:
            raise SourceConfigError("s3_prefix: collect.s3_prefix is not set; use s3://bucket/prefix with one sub-prefix per wnid")
        self.bucket, prefix = split_s3_url(url)
        self.prefix = prefix.strip("/")
        if client is None:
            import boto3

            client = boto3.client("s3", endpoint_url=endpoint_url)
        self.client = client

    def search(self, synset: Mapping[str, Any], query: str | None, budget: int) -> Iterator[dict[str, Any]]:
        from botocore.exceptions import BotoCoreError, ClientError

        prefix = f"{self.prefix}/{synset['wnid']}/" if self.prefix else f"{synset['wnid']}/"
        sent = 0
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if key.endswith("/"):
                        continue
                    yield {"url": f"s3://{self.bucket}/{key}", "page_url": None, "title": key.rsplit("/", 1)[-1],
                           "license": None, "license_url": None, "creator": None}
                    sent += 1
                    if sent >= budget:
                        return
        except (BotoCoreError, ClientError) as exc:
            raise SourceError(f"s3_prefix: listing s3://{self.bucket}/{prefix} failed: {exc}") from exc
