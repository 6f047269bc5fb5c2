"""The per-URL work of an ingest worker: fetch outcome -> validated, stored blob -> one images row.

Kept apart from stage.py so a spawned worker process imports only what it needs (no pandas): fetch, validate,
fingerprint, store.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from pipeline.ingest.fetch import FetchConfig, Fetcher, FetchResult
from pipeline.ingest.validate import ValidateConfig, validate_image
from pipeline.schemas import arrow_schema

IMAGE_COLUMNS = arrow_schema("images").names


class ContentCache:
    """Validation outcome per body sha256: the same bytes always validate the same way, so the second URL that
    serves them (crawls are full of exact copies) costs a hash, not a decode. Thread-safe (dict ops are atomic)."""

    def __init__(self, max_items: int = 200_000):
        self.max_items = max_items
        self._d: dict[bytes, dict[str, Any]] = {}

    def get(self, digest: bytes) -> dict[str, Any] | None:
        return self._d.get(digest)

    def put(self, digest: bytes, facts: dict[str, Any]) -> None:
        if len(self._d) < self.max_items:
            self._d[digest] = facts


def process_result(result: FetchResult, vcfg: ValidateConfig, store: Any, cache: ContentCache | None = None) -> dict[str, Any]:
    """One fetch outcome -> one images row (blob stored when accepted). Never raises for bad input."""
    row: dict[str, Any] = {c: None for c in IMAGE_COLUMNS}
    row["first_url"] = result.url
    row["fetched_at"] = datetime.now(UTC)  # settling keeps each URL's latest outcome by this time
    if not result.ok:
        row.update(status="rejected", reject_reason=result.reason)
        return row
    body = result.body or b""
    digest = hashlib.sha256(body).digest() if cache is not None else b""
    if cache is not None and (hit := cache.get(digest)) is not None:
        row.update(hit)
        return row
    facts = _validate_and_store(body, vcfg, store)
    if cache is not None:
        cache.put(digest, facts)
    row.update(facts)
    return row


def _validate_and_store(body: bytes, vcfg: ValidateConfig, store: Any) -> dict[str, Any]:
    try:
        v = validate_image(body, vcfg)
    except Exception:  # noqa: BLE001 - a Pillow bug on one hostile file must not stop the run
        return {"status": "rejected", "reject_reason": "decode_error"}
    if not v.ok:
        return {"status": "rejected", "reject_reason": v.reason, "format": v.format, "width": v.width, "height": v.height}
    data = v.stored
    assert data is not None
    key = store.put_content(data, ".jpg")
    return {"image_id": key.rsplit("/", 1)[1][:-4], "format": v.format, "width": v.width, "height": v.height,
            "n_bytes": len(data), "storage_key": key, "status": "accepted", **v.features}


def _worker(urls: list[str], fcfg: FetchConfig, vcfg: ValidateConfig, store_url: str, endpoint: str | None,
            queue: Any, reuse: bool = True) -> None:
    """Child process of a multi-process ingest: download + validate + store, send rows back in batches."""
    from pipeline.store import open_store

    store = open_store(store_url, endpoint_url=endpoint)
    fetcher, cache = Fetcher(fcfg), ContentCache() if reuse else None
    batch: list[dict[str, Any]] = []
    try:
        for _url, row in fetcher.fetch_many(urls, lambda r: process_result(r, vcfg, store, cache)):
            batch.append(row)
            if len(batch) >= 64:
                queue.put(batch)
                batch = []
        queue.put(batch)
    finally:
        fetcher.close()
        queue.put(None)
