"""Blob and table storage: one interface, a local-filesystem backend (the embedded default) and S3.

Keys are "/"-separated relative paths ("tables/synsets.parquet", "blobs/ab/ab12...jpg"). Every write is
atomic: the local backend writes a temp file in the target folder and renames it; S3 writes with a
single PUT. A reader therefore sees either the old object or the new one, never half a table.

    >>> store = open_store("/tmp/sf-doc-store")
    >>> key = store.put_content(b"hello", suffix=".txt")
    >>> store.get(key)
    b'hello'
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import SynsetforgeError
from pipeline.schemas import empty_table, validate


class StoreError(SynsetforgeError, RuntimeError):
    """A store operation failed in a way the user must act on."""


class MissingKey(StoreError, KeyError):
    """The key does not exist in the store."""


class KeyExists(StoreError):
    """An exclusive write found the key already there (published objects are immutable)."""


def table_key(name: str) -> str:
    return f"tables/{name}.parquet"


def content_key(digest: str, suffix: str = "") -> str:
    return f"blobs/{digest[:2]}/{digest}{suffix}"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid store key {key!r}: use a relative path without '..' or empty parts")
    return key


class Store(ABC):
    """What every backend offers. Subclasses implement the five blob primitives."""

    url: str

    @abstractmethod
    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        """Write atomically; with exclusive=True raise KeyExists instead of overwriting."""

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys starting with `prefix`, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    # Content addressing and tables are the same on every backend.
    def put_content(self, data: bytes, suffix: str = "") -> str:
        """Store bytes under their sha256; storing the same bytes twice writes once."""
        key = content_key(hashlib.sha256(data).hexdigest(), suffix)
        if not self.exists(key):
            self.put(key, data)
        return key

    def write_table(self, name: str, data: Any, key: str | None = None, *, exclusive: bool = False) -> str:
        """Validate `data` against schemas/<name>.json and write it as one Parquet object."""
        table = validate(name, data)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        key = key or table_key(name)
        self.put(key, sink.getvalue().to_pybytes(), exclusive=exclusive)
        return key

    def read_table(self, name: str, key: str | None = None, *, missing_ok: bool = False) -> pa.Table:
        """Read a table written by write_table; with missing_ok an absent table reads as empty."""
        key = key or table_key(name)
        try:
            data = self.get(key)
        except MissingKey:
            if missing_ok:
                return empty_table(name)
            raise MissingKey(f"table {name!r} not found at {self.url}/{key}; run the stage that writes it first") from None
        return validate(name, pq.read_table(io.BytesIO(data)))

    def has_table(self, name: str, key: str | None = None) -> bool:
        return self.exists(key or table_key(name))


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)

    def path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if exclusive:
                try:
                    os.link(tmp, target)  # fails if target exists: exclusive create, still atomic
                except FileExistsError:
                    raise KeyExists(f"{self.url}/{key} already exists and is immutable") from None
                os.unlink(tmp)
            else:
                os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise MissingKey(f"{self.url}/{key} does not exist") from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        keys = []
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                if f.startswith(".tmp-"):
                    continue  # an unfinished write is invisible
                rel = os.path.relpath(os.path.join(dirpath, f), self.root).replace(os.sep, "/")
                if rel.startswith(prefix):
                    keys.append(rel)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


class S3Store(Store):
    """S3 API via boto3; endpoint_url makes MinIO, moto or any S3-compatible server work."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client: Any = None):
        import boto3  # imported here so the local default never pays for it

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url)
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def _k(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, *, exclusive: bool = False) -> None:
        from botocore.exceptions import ClientError

        extra = {"IfNoneMatch": "*"} if exclusive else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **extra)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise KeyExists(f"{self.url}/{key} already exists and is immutable") from None
            raise StoreError(f"S3 put of {self.url}/{key} failed: {code or exc}") from exc

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise MissingKey(f"{self.url}/{key} does not exist") from None
            raise StoreError(f"S3 get of {self.url}/{key} failed: {exc}") from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StoreError(f"S3 head of {self.url}/{key} failed: {exc}") from exc

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        base = self.prefix + "/" if self.prefix else ""
        full = base + prefix
        cut = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield obj["Key"][cut:]

    def list(self, prefix: str = "") -> list[str]:
        if prefix:
            _check_key(prefix.rstrip("/"))
        return sorted(self._iter_keys(prefix))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._k(key)}, ExpiresIn=expires_s
        )


def open_store(url: str | os.PathLike[str], *, endpoint_url: str | None = None) -> Store:
    """Open a store from a URL: a plain path or file:// URL (local) or s3://bucket/prefix."""
    text = str(url)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"store URL {text!r} has no bucket; write s3://BUCKET/PREFIX")
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url or os.environ.get("SYNSETFORGE_S3_ENDPOINT_URL"))
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:
        raise StoreError(f"store URL {text!r}: unsupported scheme {parsed.scheme!r}; use a path, file:// or s3://")
    return LocalStore(text)


def store_from_settings(settings: Any) -> Store:
    """The store the configuration names (settings.store.url and its S3 endpoint)."""
    return open_store(settings.store.url, endpoint_url=settings.store.s3_endpoint_url)
