"""Ingest stage (I/O shell): candidates -> downloaded, validated, content-addressed blobs + `images` and
`image_links` tables.

Resume: results are checkpointed as Parquet parts under ingest/parts/ every `flush_every` rows, blobs are
content-addressed, and a run starts by reading the images table plus any parts a crashed run left. URLs
already settled (accepted, duplicate, or rejected for a permanent reason) are skipped; transient failures
(timeout, 429, 5xx, connection errors) are tried again and their row replaced. The merge keeps one row per
URL, so a rerun never duplicates a row.

Exact duplicates: every row with bytes carries its image_id; among rows sharing one, the URL that sorts
first is `accepted`, the others `duplicate` (deterministic, whatever the download order was).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.faults import failpoint
from pipeline.ingest.fetch import CONFIG_REASONS, TRANSIENT_REASONS, FetchConfig, Fetcher
from pipeline.ingest.validate import ValidateConfig
from pipeline.ingest.worker import ContentCache, _worker, process_result
from pipeline.schemas import arrow_schema

PARTS_PREFIX = "ingest/parts/"
IMAGE_COLUMNS = arrow_schema("images").names
LINK_COLUMNS = arrow_schema("image_links").names
_NULLABLE = {pa.uint64(): pd.UInt64Dtype(), pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype()}


def table_frame(table: pa.Table) -> pd.DataFrame:
    """Arrow -> pandas keeping 64-bit hashes exact (uint64 with nulls would otherwise become float64); columns an
    older version of the images table lacks (fetched_at before version 2) come back empty."""
    df = table.to_pandas(types_mapper=_NULLABLE.get)
    if "first_url" in df.columns:
        for f in arrow_schema("images"):
            if f.name not in df.columns:
                df[f.name] = pd.Series([None] * len(df), dtype=_NULLABLE.get(f.type, "object"))
    return df


def rows_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """images rows (dicts) -> a frame with exact nullable integer columns."""
    schema = arrow_schema("images")
    cols = {}
    for f in schema:
        values = [r.get(f.name) for r in rows]
        dtype = _NULLABLE.get(f.type)
        cols[f.name] = pd.array(values, dtype=dtype) if dtype is not None else pd.Series(values, dtype="object")
    return pd.DataFrame(cols)


def iter_rows(urls: list[str], fcfg: FetchConfig, vcfg: ValidateConfig, store: Any, *, processes: int = 1,
              endpoint: str | None = None, reuse: bool = True) -> Iterator[dict[str, Any]]:
    """images rows for `urls`, in completion order, from one process (threads) or several (each with threads).

    With N processes each gets every N-th URL, concurrency/N threads and per_host/N host slots, so the
    configured totals still hold.
    """
    if processes <= 1 or len(urls) < 2 * processes:
        fetcher, cache = Fetcher(fcfg), ContentCache() if reuse else None
        try:
            for _url, row in fetcher.fetch_many(urls, lambda r: process_result(r, vcfg, store, cache)):
                yield row
        finally:
            fetcher.close()
        return
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")  # never fork a process that has threads
    q = ctx.Queue(maxsize=256)
    sub = dataclasses.replace(fcfg, concurrency=max(1, -(-fcfg.concurrency // processes)),
                              per_host=max(1, -(-fcfg.per_host // processes)))
    procs = [ctx.Process(target=_worker, args=(urls[i::processes], sub, vcfg, store.url, endpoint, q, reuse),
                         daemon=True)
             for i in range(processes)]
    for p in procs:
        p.start()
    finished = 0
    try:
        while finished < processes:
            try:
                batch = q.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"ingest worker exited with code {dead[0].exitcode}; rerun to resume") from None
                continue
            if batch is None:
                finished += 1
                continue
            yield from batch
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(10)


def settle_images(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Fold images rows into one row per URL, its latest outcome by `fetched_at`, and mark exact duplicates (pure).

    Order by the recorded time, not by frame or part-key order: part keys carry a random attempt id, so a killed
    attempt's `timeout` row may sort after its retry's `accepted` row. Rows without a time (tables written before
    images version 2) count as oldest, in frame order."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return rows_frame([])
    df = pd.concat(frames, ignore_index=True)
    when = pd.to_datetime(df["fetched_at"], utc=True) if "fetched_at" in df.columns else pd.Series(pd.NaT, index=df.index)
    df = df.iloc[_oldest_first(when)]
    df = df.drop_duplicates("first_url", keep="last")
    has = df["image_id"].notna()
    df.loc[has, "status"] = "accepted"
    order = df[has].sort_values("first_url", kind="stable")
    dup = order.duplicated("image_id", keep="first")
    df.loc[dup[dup].index, "status"] = "duplicate"
    return df.sort_values("first_url", kind="stable").reset_index(drop=True)[IMAGE_COLUMNS]


def _oldest_first(when: pd.Series) -> np.ndarray:
    """Row positions ordered by time, rows without a time first, ties in their given order."""
    keys = when.to_numpy(dtype="datetime64[us]").astype("int64")
    keys = np.where(when.isna().to_numpy(), np.iinfo(np.int64).min, keys)
    return np.argsort(keys, kind="stable")


def build_links(candidates: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """(image_id, wnid) pairs from candidates x images (pure): best-ranked URL per pair, synset counts."""
    good = images[images["image_id"].notna()][["first_url", "image_id"]]
    df = candidates[["wnid", "url", "source", "rank"]].merge(good, left_on="url", right_on="first_url", how="inner")
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in LINK_COLUMNS})
    df = df.sort_values(["wnid", "rank", "url"], kind="stable")
    n_urls = df.groupby(["image_id", "wnid"]).size().rename("n_urls")
    links = df.drop_duplicates(["image_id", "wnid"], keep="first").join(n_urls, on=["image_id", "wnid"])
    links["n_synsets"] = links.groupby("image_id")["wnid"].transform("nunique")
    links["multi_synset"] = links["n_synsets"] > 1
    links["near_duplicate_of"] = None
    for col in ("rank", "n_urls", "n_synsets"):
        links[col] = links[col].astype("int32")
    return links.sort_values(["wnid", "rank"], kind="stable").reset_index(drop=True)[LINK_COLUMNS]


def _apply_near_duplicates(links: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """near_duplicate_of per synset and multi_synset through near copies, from pipeline.ingest.dedup (pure)."""
    if links.empty:
        return links
    from pipeline.ingest import dedup  # near-duplicate detector: hash search + thumbnail verification

    stored = images[images["status"] == "accepted"]
    groups = dedup.near_duplicate_groups(stored)  # the costly search, once for both uses below
    near = dedup.dedup_within_synset(links, stored, groups=groups)
    links = links.drop(columns=["near_duplicate_of"]).merge(
        near.rename(columns={"duplicate_of": "near_duplicate_of"}), on=["wnid", "image_id"], how="left")
    links["near_duplicate_of"] = links["near_duplicate_of"].astype("object").where(links["near_duplicate_of"].notna(), None)
    multi = set(dedup.multi_synset_images(links, stored, groups=groups)["image_id"])
    links["multi_synset"] = links["multi_synset"] | links["image_id"].isin(multi)
    return links[LINK_COLUMNS]


# --- I/O shell --------------------------------------------------------------------------------------------------


def _read_parts(store: Any) -> list[pd.DataFrame]:
    return [table_frame(store.read_table("images", key=k)) for k in store.list(PARTS_PREFIX) if k.endswith(".parquet")]


def settled_urls(frames: Sequence[pd.DataFrame], retry: Sequence[str] | bool = ()) -> set[str]:
    """URLs whose latest outcome is final: not a transient failure, not a refusal by the configuration (tried again
    in case the configuration now allows it), and not a rejection `retry` asks for (True: every rejection; or a
    list of reasons)."""
    latest = settle_images(frames)
    reason = latest["reject_reason"]
    again = reason.isin(TRANSIENT_REASONS | CONFIG_REASONS)
    if retry is True:
        again |= latest["status"] == "rejected"
    elif retry:
        again |= reason.isin(set(retry))
    return set(latest.loc[~again, "first_url"])


class _Checkpoint:
    """Buffers rows and writes a part every `every` rows; thread-safe; flush() on exit."""

    def __init__(self, store: Any, every: int, tag: str):
        self.store, self.every, self.tag = store, every, tag
        self.rows: list[dict[str, Any]] = []
        self.seq = 0
        self.lock = threading.Lock()
        self.keys: list[str] = []
        # A retry of the same task (same tag) must not overwrite the parts of the attempt that died.
        self.attempt = uuid.uuid4().hex[:8]

    def add(self, row: dict[str, Any]) -> None:
        with self.lock:
            self.rows.append(row)
            if len(self.rows) >= self.every:
                self._flush()

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        df = rows_frame(self.rows)
        key = f"{PARTS_PREFIX}{self.tag}-{self.attempt}-{self.seq:05d}.parquet"
        self.store.write_table("images", df, key=key)
        self.keys.append(key)
        self.rows, self.seq = [], self.seq + 1
        failpoint("ingest.part_written")


def fetch_config_for(store: Any, settings: Any) -> FetchConfig:
    """FetchConfig from the settings, with the local roots and S3 buckets the collect runs recorded added."""
    from urllib.parse import urlsplit

    from pipeline.sources.collect import recorded_roots

    fcfg = FetchConfig.from_settings(settings)
    roots = recorded_roots(store)
    buckets = tuple(urlsplit(p).netloc for p in roots["s3_prefix"])
    return dataclasses.replace(fcfg, file_roots=tuple(dict.fromkeys((*fcfg.file_roots, *roots["local_dir"]))),
                               s3_buckets=tuple(dict.fromkeys((*fcfg.s3_buckets, *buckets))))


def run_ingest(
    store: Any,
    settings: Any,
    *,
    wnids: Sequence[str] | None = None,
    limit: int | None = None,
    merge: bool = True,
    fetch_config: FetchConfig | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    tag: str | None = None,
    retry_rejected: Sequence[str] | bool = (),
) -> dict[str, Any]:
    """Fetch and validate every unsettled candidate URL; checkpoint; then (with merge) write the tables.

    `retry_rejected`: also fetch again URLs rejected before (True: all; or these reasons). Refusals caused by the
    configuration (local root, networks, schemes) are always tried again. file:// and s3:// candidates are read
    under the roots in the configuration plus those the collect runs recorded."""
    from pipeline.errors import UserError
    from pipeline.store import MissingKey

    try:
        candidates = store.read_table("candidates").to_pandas()
    except MissingKey as exc:
        raise UserError(f"{exc}; run `synsetforge collect` first") from None
    if wnids:
        candidates = candidates[candidates["wnid"].isin(set(wnids))]
    existing = table_frame(store.read_table("images", missing_ok=True))
    done = settled_urls([existing, *_read_parts(store)], retry=retry_rejected)
    # Best-ranked first across synsets, so a partial run covers every synset a little.
    ordered = candidates.sort_values(["rank", "wnid"], kind="stable")["url"].drop_duplicates()
    todo = [u for u in ordered if u not in done]
    if limit is not None:
        todo = todo[:limit]
    if on_start:
        on_start(len(todo))
    fcfg = fetch_config or fetch_config_for(store, settings)
    vcfg = ValidateConfig.from_settings(settings.ingest)
    ckpt = _Checkpoint(store, settings.ingest.flush_every, tag or f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}")
    counts: Counter[str] = Counter()
    t0 = time.monotonic()
    try:
        for row in iter_rows(todo, fcfg, vcfg, store, processes=settings.ingest.processes,
                             endpoint=settings.store.s3_endpoint_url, reuse=settings.ingest.reuse_validation):
            ckpt.add(row)
            counts[row["status"] if row["status"] != "rejected" else f"rejected:{row['reject_reason']}"] += 1
            if on_result:
                on_result(row)
    finally:
        ckpt.flush()  # an interrupted run keeps what it finished
    summary: dict[str, Any] = {"fetched": len(todo), "skipped_settled": len(done.intersection(ordered)),
                               "seconds": round(time.monotonic() - t0, 3), "outcomes": dict(counts)}
    if merge:
        summary.update(merge_ingest(store))
    return summary


def merge_ingest(store: Any) -> dict[str, Any]:
    """Fold parts into the images table, rebuild image_links from candidates, delete the parts (rerunnable)."""
    parts = [k for k in store.list(PARTS_PREFIX) if k.endswith(".parquet")]
    existing = table_frame(store.read_table("images", missing_ok=True))
    images = settle_images([existing, *[table_frame(store.read_table("images", key=k)) for k in parts]])
    store.write_table("images", images)
    candidates = store.read_table("candidates", missing_ok=True).to_pandas()
    links = _apply_near_duplicates(build_links(candidates, images), images)
    store.write_table("image_links", links)
    for k in parts:
        store.delete(k)
    return summarize(images, links)


def summarize(images: pd.DataFrame, links: pd.DataFrame) -> dict[str, Any]:
    rejected = images[images["status"] == "rejected"]["reject_reason"].value_counts()
    return {
        "images_rows": int(len(images)),
        "accepted": int((images["status"] == "accepted").sum()),
        "duplicates": int((images["status"] == "duplicate").sum()),
        "rejected": {str(k): int(v) for k, v in rejected.items()},
        "links": int(len(links)),
        "multi_synset_images": int(links.loc[links["multi_synset"].astype(bool), "image_id"].nunique()) if len(links) else 0,
        "near_duplicates": int(links["near_duplicate_of"].notna().sum()) if len(links) else 0,
    }


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, sort_keys=True, default=str)
