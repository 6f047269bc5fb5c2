"""The per-URL work of an ingest worker: fetch outcome -> validated, stored blob -> one images row.

Kept apart from stage.py so a spawned worker process imports only what it needs (no pandas): fetch, validate,
fingerprint, store.

Every step's thread CPU time is added to `STEPS` (receive, hash, decode, fingerprint, encode, store write, row):
a few clock reads per image. With SYNSETFORGE_INGEST_STEPS set to a folder, each worker process writes its totals
there when it ends (benchmarks/ingest_vs_img2dataset.py prints them as a breakdown).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

from pipeline.ingest.fetch import FetchConfig, Fetcher, FetchResult
from pipeline.ingest.validate import ValidateConfig, validate_image
from pipeline.schemas import arrow_schema
from pipeline.store import content_key

IMAGE_COLUMNS = arrow_schema("images").names
STEPS_ENV = "SYNSETFORGE_INGEST_STEPS"


class StepTimes:
    """Thread CPU nanoseconds per ingest step, summed over the threads of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ns: dict[str, int] = {}
        self.images = 0

    def add(self, times: dict[str, int], images: int = 0) -> None:
        with self._lock:
            for k, v in times.items():
                self.ns[k] = self.ns.get(k, 0) + v
            self.images += images

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"ns": dict(self.ns), "images": self.images}

    def dump(self, folder: str) -> None:
        """Write this process's totals (and its whole CPU time) to folder/steps-<pid>.json."""
        cpu = os.times()
        out = {**self.snapshot(), "process_cpu_s": cpu.user + cpu.system, "pid": os.getpid()}
        with open(os.path.join(folder, f"steps-{os.getpid()}.json"), "w") as fh:
            json.dump(out, fh)


STEPS = StepTimes()


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
    times = {"receive": result.cpu_ns}
    t0 = time.thread_time_ns()
    row: dict[str, Any] = dict.fromkeys(IMAGE_COLUMNS)
    row["first_url"] = result.url
    row["fetched_at"] = datetime.now(UTC)  # settling keeps each URL's latest outcome by this time
    if not result.ok:
        row.update(status="rejected", reject_reason=result.reason)
        times["row"] = time.thread_time_ns() - t0
        STEPS.add(times)
        return row
    body = result.body or b""
    digest = None
    if cache is not None:
        t1 = time.thread_time_ns()
        digest = hashlib.sha256(body).hexdigest()  # one hash serves the cache and, for a clean JPEG, the blob key
        times["hash"] = time.thread_time_ns() - t1
        if (hit := cache.get(digest)) is not None:
            row.update(hit)
            times["row"] = time.thread_time_ns() - t0 - times["hash"]
            STEPS.add(times)
            return row
    facts = _validate_and_store(body, vcfg, store, digest, times)
    if cache is not None:
        cache.put(digest, facts)  # type: ignore[arg-type]
    row.update(facts)
    inner = sum(v for k, v in times.items() if k != "receive")
    times["row"] = time.thread_time_ns() - t0 - inner  # the row dict and the bookkeeping around the steps
    STEPS.add(times, images=1)
    return row


def _validate_and_store(body: bytes, vcfg: ValidateConfig, store: Any, digest: str | None,
                        times: dict[str, int]) -> dict[str, Any]:
    t0 = time.thread_time_ns()
    try:
        v = validate_image(body, vcfg)
    except Exception:  # noqa: BLE001 - a Pillow bug on one hostile file must not stop the run
        times["decode"] = time.thread_time_ns() - t0
        return {"status": "rejected", "reject_reason": "decode_error"}
    t1 = time.thread_time_ns()
    for k in ("fingerprint", "encode"):
        times[k] = times.get(k, 0) + v.cpu_ns.get(k, 0)
    # decode = all of validate_image but the fingerprint and the re-encode (header parse, checks, the decode)
    times["decode"] = times.get("decode", 0) + (t1 - t0) - v.cpu_ns.get("fingerprint", 0) - v.cpu_ns.get("encode", 0)
    if not v.ok:
        return {"status": "rejected", "reject_reason": v.reason, "format": v.format, "width": v.width, "height": v.height}
    data = v.stored
    assert data is not None
    if digest is None or v.reencoded:
        digest = hashlib.sha256(data).hexdigest()
    t2 = time.thread_time_ns()
    times["hash"] = times.get("hash", 0) + (t2 - t1)
    key = content_key(digest, ".jpg")  # what store.put_content(data, ".jpg") names it, without hashing again
    if not store.exists(key):
        store.put(key, data)
    times["store_write"] = time.thread_time_ns() - t2
    return {"image_id": digest, "format": v.format, "width": v.width, "height": v.height,
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
        if folder := os.environ.get(STEPS_ENV):
            STEPS.dump(folder)
        queue.put(None)
