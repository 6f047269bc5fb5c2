"""Ingest stage (I/O shell): candidates -> downloaded, validated, content-addressed blobs + `images`, `image_links`
and `near_pairs` tables, and the near-duplicate index.

Shards: a shard (`run_ingest(..., wnids=..., tag=..., merge=False)`, one mapped DAG task) reads only its synsets'
candidates (filter on wnid), only the `images` rows of those URLs (narrow columns, filter on first_url) and only its
own parts (its tag: earlier attempts of the same task). It skips URLs already settled (accepted, duplicate, or
rejected for a permanent reason); transient failures (timeout, 429, 5xx, connection errors) and refusals by the
configuration are tried again. Results are checkpointed as Parquet parts under ingest/parts/ every `flush_every`
rows (blobs are content-addressed), next to a small JSON note saying which synsets the shard covered, which
candidates version it read and which already-stored images gained a candidate pair since that synset was last
merged.

Merge (`merge_ingest`): the working tables keep history. Delta Lake (delta-rs, no deletion vectors) changes a row
only by rewriting its whole data file, and the rows a merge changes (a retried URL, an exact duplicate whose
canonical URL moves to a smaller one, the link rows of an image that gained a synset or a near copy) sit in files
spread over the whole table, so overwriting them costs the table. So a merge appends new versions of the changed
rows only (O(new work)), and readers keep the latest version per key: `read_images` (latest per first_url by
fetched_at; an exact duplicate's status change is a new version with the same fetched_at, which wins) and
`read_links` (per (image_id, wnid) the version furthest along: a link only gains URLs, synsets and near-copy
marks). Readers that only look images up by image_id (crowd task data, boxes) see the same facts in every version.
A table is rewritten with one row per key when that is cheap: when it holds at most COLLAPSE_FACTOR times the rows
the merge appended, or when superseded versions pass COLLAPSE_SHARE of it (amortised O(new work) too).

The near-duplicate index (pipeline.ingest.neardup.StoredIndex) lives under ingest/neardup/: each merge looks only
its new images up against it (then adds them as a new segment), appends the verified pairs to `near_pairs`, and
recomputes `image_links` for the images it touched (new URLs, new pairs, new candidate pairs) closed over their
near-duplicate groups, from candidates filtered on those URLs. Commit order: new segment files, a pending note,
the table appends, then the index manifest (exclusive put: the commit point, naming the parts it merged and the
table versions it saw), then the parts are deleted. Every read a merge makes of its own tables is pinned to the
versions the last manifest recorded, so a merge that crashed halfway is rerun to the same rows (its appends are
then de-duplicated); a table changed by anything else, a missing or incompatible index, or `synsetforge ingest
--rebuild-index` runs the full rebuild instead: settle everything, re-index, rewrite the four tables.

Exact duplicates: every row with bytes carries its image_id; among rows sharing one, the URL that sorts first is
`accepted`, the others `duplicate` (deterministic, whatever the download order was).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.faults import failpoint
from pipeline.ingest.fetch import CONFIG_REASONS, TRANSIENT_REASONS, FetchConfig, Fetcher
from pipeline.ingest.validate import ValidateConfig
from pipeline.ingest.worker import ContentCache, _worker, process_result
from pipeline.schemas import arrow_schema

PARTS_PREFIX = "ingest/parts/"
PENDING_PREFIX = "ingest/neardup/pending/"
IMAGE_COLUMNS = arrow_schema("images").names
LINK_COLUMNS = arrow_schema("image_links").names
PAIR_COLUMNS = arrow_schema("near_pairs").names
KEY_COLUMNS = ["first_url", "image_id", "status", "reject_reason", "fetched_at"]  # what settling a URL needs
CANDIDATE_LINK_COLUMNS = ["wnid", "url", "source", "rank"]
_NULLABLE = {pa.uint64(): pd.UInt64Dtype(), pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype()}
# Of two versions of a URL with the same fetch time, the later status wins (accepted -> duplicate only).
_STATUS_RANK = {"rejected": 0, "accepted": 1, "duplicate": 2}
COLLAPSE_FACTOR = 4
COLLAPSE_SHARE = 0.25
# A stored index segment holds at most this many images: merging segments never re-sorts more at once (~8 GB of
# sorted values at 6 hashes per image and 84 chunk combinations), and a rebuild indexes this many at a time.
INDEX_MAX_MERGE = 2_000_000
_DATA_NEUTRAL = frozenset({"OPTIMIZE", "VACUUM START", "VACUUM END", "CREATE CHECKPOINT"})


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


def latest_images(frames: Sequence[pd.DataFrame] | pd.DataFrame) -> pd.DataFrame:
    """The latest version of each URL among images rows (pure): by `fetched_at`, then (same time: a status change
    written by a merge) by status, accepted before duplicate. Rows without a time (tables written before images
    version 2) count as oldest, in frame order. Columns are kept as given; row order follows first_url."""
    if isinstance(frames, pd.DataFrame):
        frames = [frames]
    frames = [f for f in frames if len(f)]
    if not frames:
        return rows_frame([])
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)
    when = pd.to_datetime(df["fetched_at"], utc=True) if "fetched_at" in df.columns else pd.Series(pd.NaT, index=df.index)
    timed = when.notna().to_numpy()
    keys = np.where(timed, when.to_numpy(dtype="datetime64[us]").astype("int64"), np.iinfo(np.int64).min)
    rank = np.where(timed, df["status"].map(_STATUS_RANK).fillna(0).to_numpy(dtype=np.int64), 0)
    order = np.lexsort((np.arange(len(df)), rank, keys))
    df = df.iloc[order].drop_duplicates("first_url", keep="last")
    return df.sort_values("first_url", kind="stable").reset_index(drop=True)


def mark_exact_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """Among rows (one per URL) sharing an image_id, the smallest URL is `accepted`, the others `duplicate`."""
    df = df.copy()
    has = df["image_id"].notna()
    df.loc[has, "status"] = "accepted"
    order = df[has].sort_values("first_url", kind="stable")
    dup = order.duplicated("image_id", keep="first")
    df.loc[dup[dup].index, "status"] = "duplicate"
    return df


def settle_images(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Fold images rows into one row per URL, its latest outcome by `fetched_at`, and mark exact duplicates (pure).

    Order by the recorded time, not by frame or part-key order: part keys carry a random attempt id, so a killed
    attempt's `timeout` row may sort after its retry's `accepted` row. Rows without a time (tables written before
    images version 2) count as oldest, in frame order."""
    latest = latest_images(frames)
    if not len(latest):
        return rows_frame([])
    return mark_exact_duplicates(latest).sort_values("first_url", kind="stable").reset_index(drop=True)[IMAGE_COLUMNS]


def latest_links(frames: Sequence[pd.DataFrame] | pd.DataFrame) -> pd.DataFrame:
    """The current version of each (image_id, wnid) link among several (pure). A link only moves forward (more
    URLs, more synsets, multi_synset set, near_duplicate_of set or moved to a smaller kept image), so the current
    version is the one furthest along in that order."""
    if isinstance(frames, pd.DataFrame):
        frames = [frames]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in LINK_COLUMNS})
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)
    nd = df["near_duplicate_of"]
    nd_set = nd.notna().to_numpy()
    codes, _ = pd.factorize(nd, sort=True)  # -1 for null
    order = np.lexsort((np.arange(len(df)), -codes, nd_set, df["multi_synset"].to_numpy(dtype=bool),
                        df["n_synsets"].to_numpy(dtype=np.int64), df["n_urls"].to_numpy(dtype=np.int64)))
    df = df.iloc[order].drop_duplicates(["image_id", "wnid"], keep="last")
    return df.sort_values(["wnid", "rank", "image_id"], kind="stable").reset_index(drop=True)


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


def apply_near_groups(links: pd.DataFrame, groups: pd.DataFrame) -> pd.DataFrame:
    """near_duplicate_of per synset and multi_synset through near copies, from near-duplicate groups (pure; see
    pipeline.ingest.dedup)."""
    if links.empty:
        return links
    from pipeline.ingest import dedup

    near = dedup.dedup_within_synset(links, None, groups=groups)
    links = links.drop(columns=["near_duplicate_of"]).merge(
        near.rename(columns={"duplicate_of": "near_duplicate_of"}), on=["wnid", "image_id"], how="left")
    links["near_duplicate_of"] = links["near_duplicate_of"].astype("object").where(links["near_duplicate_of"].notna(), None)
    multi = set(dedup.multi_synset_images(links, None, groups=groups)["image_id"])
    links["multi_synset"] = links["multi_synset"] | links["image_id"].isin(multi)
    return links[LINK_COLUMNS]


def _apply_near_duplicates(links: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """near_duplicate_of and multi_synset from a full near-duplicate search over the accepted images (pure)."""
    if links.empty:
        return links
    from pipeline.ingest import dedup

    stored = images[images["status"] == "accepted"]
    return apply_near_groups(links, dedup.near_duplicate_groups(stored))


def pairs_frame(pairs: pd.DataFrame, found_at: datetime) -> pd.DataFrame:
    """NearDupIndex pairs (image_id, other_image_id, distances) -> near_pairs rows, smaller id first, each once."""
    if not len(pairs):
        return pd.DataFrame({"image_id_a": pd.Series(dtype=object), "image_id_b": pd.Series(dtype=object),
                             "hash_distance": pd.Series(dtype=np.int32), "thumb_distance": pd.Series(dtype=np.float32),
                             "found_at": pd.Series(dtype="datetime64[us, UTC]")})
    a, b = pairs["image_id"].astype(str), pairs["other_image_id"].astype(str)
    out = pd.DataFrame({"image_id_a": np.where(a < b, a, b), "image_id_b": np.where(a < b, b, a),
                        "hash_distance": pairs["hash_distance"].astype(np.int32).to_numpy(),
                        "thumb_distance": pairs["thumb_distance"].astype(np.float32).to_numpy()})
    out["found_at"] = pd.Timestamp(found_at).tz_convert("UTC") if pd.Timestamp(found_at).tzinfo else pd.Timestamp(found_at, tz="UTC")
    out = out.drop_duplicates(["image_id_a", "image_id_b"]).sort_values(["image_id_a", "image_id_b"])
    return out.reset_index(drop=True)


def settled_urls(frames: Sequence[pd.DataFrame], retry: Sequence[str] | bool = ()) -> set[str]:
    """URLs whose latest outcome is final: not a transient failure, not a refusal by the configuration (tried again
    in case the configuration now allows it), and not a rejection `retry` asks for (True: every rejection; or a
    list of reasons)."""
    latest = latest_images(frames)
    if not len(latest):
        return set()
    reason = latest["reject_reason"]
    again = reason.isin(TRANSIENT_REASONS | CONFIG_REASONS)
    if retry is True:
        again |= latest["status"] == "rejected"
    elif retry:
        again |= reason.isin(set(retry))
    return set(latest.loc[~again, "first_url"])


def near_closure(seeds: set[str], a: np.ndarray, b: np.ndarray) -> set[str]:
    """The seeds and every image connected to one of them through the pairs (a[i], b[i])."""
    found = set(seeds)
    if not len(a) or not found:
        return found
    frontier = found
    while frontier:
        probe = pa.array(sorted(frontier), pa.string())
        hit = pc.is_in(pa.array(a, pa.string()), value_set=probe).to_numpy(zero_copy_only=False) | \
            pc.is_in(pa.array(b, pa.string()), value_set=probe).to_numpy(zero_copy_only=False)
        reached = set(a[hit].tolist()) | set(b[hit].tolist())
        frontier = reached - found
        found |= reached
    return found


# --- I/O shell: reading -----------------------------------------------------------------------------------------


def _isin(column: str, values: Sequence[str]) -> pc.Expression:
    return pc.field(column).isin(pa.array(list(values), pa.string()))


def read_images(store: Any, columns: Sequence[str] | None = None, filter: Any = None, *,
                version: int | None = None) -> pd.DataFrame:
    """The images table with one row per URL (its latest version), through the store (column selection and
    filter pushdown as in Store.read_table). A filter should select whole URLs (e.g. on first_url or image_id)."""
    cols = None if columns is None else list(dict.fromkeys([*columns, "first_url", "fetched_at", "status"]))
    table = store.read_table("images", columns=cols, filter=filter, version=version, missing_ok=version is None)
    latest = latest_images([table_frame(table)])
    return latest if columns is None else latest[list(columns)]


def read_links(store: Any, columns: Sequence[str] | None = None, filter: Any = None, *,
               version: int | None = None) -> pd.DataFrame:
    """The image_links table with one row per (image_id, wnid): its current version (see `latest_links`)."""
    table = store.read_table("image_links", filter=filter, version=version, missing_ok=version is None)
    latest = latest_links(table.to_pandas())
    return latest if columns is None else latest[list(columns)]


def _read_parts(store: Any, prefix: str = PARTS_PREFIX) -> list[pd.DataFrame]:
    return [table_frame(store.read_table("images", key=k)) for k in store.list(prefix) if k.endswith(".parquet")]


@dataclasses.dataclass
class ShardPlan:
    """What one shard fetches: URLs best-ranked first, how many of its URLs were already settled, and the note it
    leaves for the merge (synsets covered, candidates version read, stored images with new candidate pairs)."""

    todo: list[str]
    skipped_settled: int
    note: dict[str, Any]


def plan_shard(store: Any, *, wnids: Sequence[str] | None = None, tag: str | None = None,
               retry_rejected: Sequence[str] | bool = ()) -> ShardPlan:
    """The shard's to-do list, reading only its synsets' candidates, the images rows of their URLs and its own
    parts (`tag`: parts of earlier attempts of the same task; None: every part, as a stand-alone run)."""
    from pipeline.errors import UserError
    from pipeline.ingest.neardup import StoredIndex
    from pipeline.store import MissingKey

    version = store.table_version("candidates") if store.has_table("candidates") else None
    wanted = sorted(set(wnids)) if wnids else None
    try:
        candidates = store.read_table("candidates", columns=["wnid", "url", "rank"], version=version,
                                      filter=[("wnid", "in", wanted)] if wanted else None).to_pandas()
    except MissingKey as exc:
        raise UserError(f"{exc}; run `synsetforge collect` first") from None
    urls = candidates["url"].drop_duplicates().tolist()
    known = table_frame(store.read_table("images", columns=KEY_COLUMNS, filter=_isin("first_url", urls),
                                         missing_ok=True)) if urls else rows_frame([])[KEY_COLUMNS]
    own = _read_parts(store, f"{PARTS_PREFIX}{tag}-" if tag else PARTS_PREFIX)
    done = settled_urls([known, *own], retry=retry_rejected)
    # Best-ranked first across synsets, so a partial run covers every synset a little.
    ordered = candidates.sort_values(["rank", "wnid"], kind="stable")["url"].drop_duplicates()
    todo = [u for u in ordered if u not in done]
    manifest = StoredIndex(store).latest()
    seeds = _new_pair_seeds(store, candidates, version, manifest, latest_images([known, *own]))
    covered = wanted if wanted is not None else sorted(candidates["wnid"].unique().tolist())
    note = {"wnids": covered, "candidates_version": version, "seeds": sorted(seeds)}
    return ShardPlan(todo, len(done.intersection(ordered)), note)


def _new_pair_seeds(store: Any, candidates: pd.DataFrame, version: int | None, manifest: dict[str, Any] | None,
                    known: pd.DataFrame) -> set[str]:
    """Stored images that gained a candidate pair since their synset was last merged: the merge recomputes their
    links (a URL ingested for one synset and found later for another). Found by comparing the synset's candidates
    with the version the last merge of that synset read (pinned reads, no clocks)."""
    from pipeline.store import MissingKey

    imaged = known[known["image_id"].notna()]
    if not len(imaged) or not len(candidates):
        return set()
    marks = (manifest or {}).get("synsets", {})
    by_version: dict[int | None, list[str]] = {}
    for w in candidates["wnid"].unique().tolist():
        seen = marks.get(w)
        if version is None or seen is None or int(seen) != int(version):
            by_version.setdefault(None if version is None or seen is None else int(seen), []).append(w)
    new_pairs = []
    for seen, group in by_version.items():
        current = candidates[candidates["wnid"].isin(set(group))][["wnid", "url"]]
        if seen is not None:
            try:
                before = store.read_table("candidates", columns=["wnid", "url"], version=seen,
                                          filter=[("wnid", "in", sorted(group))]).to_pandas()
            except MissingKey:  # vacuumed: every pair of these synsets counts as new
                before = current.iloc[:0]
            current = current.merge(before.assign(_old=True), on=["wnid", "url"], how="left")
            current = current[current["_old"].isna()]
        new_pairs.append(current)
    urls = set(pd.concat(new_pairs)["url"]) if new_pairs else set()
    return set(imaged.loc[imaged["first_url"].isin(urls), "image_id"])


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

    def note(self, note: dict[str, Any]) -> None:
        """The shard's note for the merge (written before any part, so even a shard that fetches nothing has one)."""
        self.store.put(f"{PARTS_PREFIX}{self.tag}-{self.attempt}.json", json.dumps(note, sort_keys=True).encode())

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
    """Fetch and validate every unsettled candidate URL; checkpoint; then (with merge) fold the parts into the tables.

    `retry_rejected`: also fetch again URLs rejected before (True: all; or these reasons). Refusals caused by the
    configuration (local root, networks, schemes) are always tried again. file:// and s3:// candidates are read
    under the roots in the configuration plus those the collect runs recorded. With `tag` (a mapped task), only
    that tag's parts are read; without, every part (a stand-alone run resuming what a crashed one left)."""
    plan = plan_shard(store, wnids=wnids, tag=tag, retry_rejected=retry_rejected)
    todo = plan.todo if limit is None else plan.todo[:limit]
    if on_start:
        on_start(len(todo))
    fcfg = fetch_config or fetch_config_for(store, settings)
    vcfg = ValidateConfig.from_settings(settings.ingest)
    ckpt = _Checkpoint(store, settings.ingest.flush_every, tag or f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}")
    ckpt.note(plan.note)
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
    summary: dict[str, Any] = {"fetched": len(todo), "skipped_settled": plan.skipped_settled,
                               "seconds": round(time.monotonic() - t0, 3), "outcomes": dict(counts)}
    if merge:
        summary.update(merge_ingest(store))
    return summary


# --- I/O shell: merging -----------------------------------------------------------------------------------------

_TABLES = ("images", "image_links", "near_pairs")


def _pending_key(generation: int) -> str:
    return f"{PENDING_PREFIX}{generation:010d}.json"


def _table_versions(store: Any) -> dict[str, int | None]:
    return {n: store.table_version(n) if store.has_table(n) else None for n in _TABLES}


def _changed_outside(store: Any, manifest: dict[str, Any]) -> str | None:
    """Why the tables no longer match the index manifest (None when they do): a commit other than compaction or
    vacuum since the versions it recorded, unless a crashed attempt of the next merge made it (its pending note)."""
    pending = store.exists(_pending_key(int(manifest["generation"]) + 1))
    for name, seen in manifest.get("tables", {}).items():
        now = store.table_version(name) if store.has_table(name) else None
        if now == seen:
            continue
        if seen is None or now is None or now < seen:
            return f"table {name!r} is at version {now}, the index recorded {seen}"
        if pending or _unchanged_since(store, name, seen):
            continue
        return f"table {name!r} was written outside the ingest merge (version {seen} -> {now})"
    return None


def _unchanged_since(store: Any, name: str, version: int | None) -> bool:
    """Has working table `name` kept its rows since `version` (later commits only compaction or vacuum)?"""
    now = store.table_version(name) if store.has_table(name) else None
    if now == version:
        return True
    if now is None or version is None or now < version:
        return False
    return all(h.get("operation") in _DATA_NEUTRAL for h in store.table_history(name, now - version)
               if int(h.get("version", -1)) > version)


def near_pairs_covering(store: Any, images_version: int) -> pa.Table | None:
    """near_pairs (image_id_a, image_id_b) when they hold every verified pair among the accepted images of this
    version of the images table: the last ingest merge saw exactly these images and wrote these pairs, with the
    search parameters pipeline.ingest.neardup uses now. None otherwise (then a reader searches)."""
    from pipeline.ingest.neardup import StoredIndex, compatible

    manifest = StoredIndex(store).latest()
    if manifest is None or not store.has_table("near_pairs"):
        return None
    seen = manifest.get("tables", {})
    if not compatible(manifest.get("index", {})):
        return None
    merged, pairs = seen.get("images"), seen.get("near_pairs")
    if merged is None or pairs is None or images_version < merged:
        return None
    # the reader's version must hold the merge's rows: the same version, or only compaction / vacuum since
    if images_version > merged:
        now = store.table_version("images")
        if not all(h.get("operation") in _DATA_NEUTRAL for h in store.table_history("images", now - merged)
                   if merged < int(h.get("version", -1)) <= images_version):
            return None
    return store.read_table("near_pairs", columns=["image_id_a", "image_id_b"], version=pairs)


def _index_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    return {"generation": manifest["generation"], "segments": len(manifest["segments"]),
            "images": int(manifest.get("n_images", 0))}


def _index_chunks(n_images: int) -> int:
    """Chunking for a (re)built index: the cheapest lookup of a 100,000-image batch against twice the current
    size (at least a million images), so the plan holds while the index grows, among the plans whose sorted values
    fit the storage budget at the current size. (Holding the doubled size to the budget gave 2.3 M images (14 M
    hashes) 8 chunks; a 100,000-image lookup with 8 chunks took 2.2x the CPU of 9 chunks already at 2.4 M hashes,
    and its candidates grow with the index: benchmarks/neardup_index.py.)"""
    from pipeline.ingest.fingerprint import HASH_COLUMNS
    from pipeline.ingest.neardup import DEFAULT_RADIUS, LOOKUP_BUDGET_BYTES, plan_lookup

    h = len(HASH_COLUMNS)
    grown = max(2 * n_images, 1_000_000)
    return plan_lookup(DEFAULT_RADIUS, h * grown, h * 100_000,
                       budget_bytes=LOOKUP_BUDGET_BYTES * grown / max(n_images, 1))[0]


def merge_ingest(store: Any, *, rebuild: bool = False, collapse_factor: float = COLLAPSE_FACTOR) -> dict[str, Any]:
    """Fold the parts into images, near_pairs and image_links and the near-duplicate index, then delete them.

    Incremental (cost ~ the parts' rows and the images they touch) when the stored index matches the tables; a full
    rebuild when asked (`rebuild`), when the store has no index yet or an incompatible one, or when a table was
    written outside the merge. Rerunnable: a rerun after a crash gives the same tables, a rerun with nothing new
    changes nothing. `collapse_factor`: rewrite a table with one row per key when it holds at most this many times
    the rows appended (0: only when superseded versions pass COLLAPSE_SHARE)."""
    from pipeline.ingest.neardup import IndexMismatch, StoredIndex

    sidx = StoredIndex(store)
    parts = sorted(k for k in store.list(PARTS_PREFIX) if k.endswith(".parquet"))
    notes = sorted(k for k in store.list(PARTS_PREFIX) if k.endswith(".json"))
    manifest = sidx.latest()
    if manifest is not None:
        merged = set(manifest.get("parts", []))
        for k in [k for k in (*parts, *notes) if k in merged]:
            store.delete(k)  # committed by the last merge; a crash came before their deletion
        parts = [k for k in parts if k not in merged]
        notes = [k for k in notes if k not in merged]
    if rebuild:
        reason = "asked (--rebuild-index)"
    elif manifest is None:
        reason = "no near-duplicate index in the store yet"
    else:
        reason = _changed_outside(store, manifest)
    index = None
    if reason is None:
        try:
            index = sidx.load(manifest)
        except IndexMismatch as exc:
            reason = str(exc)
    if reason is not None:
        return _rebuild(store, sidx, manifest, parts, notes, reason)
    if not parts and not notes:
        return {**_counts(rows_frame([]), pd.DataFrame(columns=LINK_COLUMNS)), "merged_parts": 0, "near_pairs": 0,
                "status_changes": 0, "index": _index_summary(manifest), "rebuilt": None}
    return _merge_new(store, sidx, manifest, index, parts, notes, collapse_factor)


def _pinned_keys(store: Any, seen: dict[str, Any], flt: Any) -> pd.DataFrame:
    """Latest settle columns of the images rows matching `flt`, as of the table version the last merge recorded."""
    version = seen.get("images")
    if version is None:
        return rows_frame([])[KEY_COLUMNS]
    table = store.read_table("images", columns=KEY_COLUMNS, filter=flt, version=version)
    return latest_images([table_frame(table)])[KEY_COLUMNS]


def exact_duplicate_versions(batch: pd.DataFrame, holders: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(batch rows with their final status, new versions of stored rows whose status changes), pure.

    `holders`: the latest settle columns of stored rows sharing an image_id with the batch (URLs not in the batch).
    The smallest URL of an image is accepted; a stored row that loses that place gets a `duplicate` version with its
    own URL and fetch time and the image's facts (the same bytes give the same facts)."""
    rows = batch.copy()
    has = rows["image_id"].notna().to_numpy()
    if not has.any():
        return rows, rows.iloc[:0]
    held = holders[holders["image_id"].isin(set(rows.loc[has, "image_id"]))]
    urls = pd.concat([rows.loc[has, ["first_url", "image_id"]], held[["first_url", "image_id"]]], ignore_index=True)
    canon = urls.groupby("image_id")["first_url"].min()
    rows.loc[has, "status"] = np.where(rows.loc[has, "first_url"].to_numpy() == rows.loc[has, "image_id"].map(canon).to_numpy(),
                                       "accepted", "duplicate")
    final = np.where(held["first_url"].to_numpy() == held["image_id"].map(canon).to_numpy(), "accepted", "duplicate")
    changed = held[held["status"].to_numpy() != final].assign(status=final[held["status"].to_numpy() != final])
    if not len(changed):
        return rows, rows.iloc[:0]
    facts = rows[has].drop_duplicates("image_id").set_index("image_id")
    flips = facts.loc[changed["image_id"].to_numpy()].reset_index()
    flips["first_url"] = changed["first_url"].to_numpy()
    flips["fetched_at"] = pd.to_datetime(changed["fetched_at"], utc=True).to_numpy()
    flips["status"] = changed["status"].to_numpy()
    flips["reject_reason"] = None
    return rows, flips[rows.columns]


def _counts(rows: pd.DataFrame, links: pd.DataFrame) -> dict[str, Any]:
    rejected = rows[rows["status"] == "rejected"]["reject_reason"].value_counts()
    return {
        "images_rows": int(len(rows)),
        "accepted": int((rows["status"] == "accepted").sum()),
        "duplicates": int((rows["status"] == "duplicate").sum()),
        "rejected": {str(k): int(v) for k, v in rejected.items()},
        "links": int(len(links)),
        "multi_synset_images": int(links.loc[links["multi_synset"].astype(bool), "image_id"].nunique()) if len(links) else 0,
        "near_duplicates": int(links["near_duplicate_of"].notna().sum()) if len(links) else 0,
    }


def _merge_new(store: Any, sidx: Any, manifest: dict[str, Any], index: Any, parts: list[str], notes: list[str],
               collapse_factor: float) -> dict[str, Any]:
    from pipeline.ingest.dedup import groups_from_pairs

    gen = int(manifest["generation"]) + 1
    seen = manifest["tables"]
    rerun = store.exists(_pending_key(gen))
    now = datetime.now(UTC)
    docs = [json.loads(store.get(k)) for k in notes]
    frames = [table_frame(store.read_table("images", key=k)) for k in parts]
    batch = latest_images(frames)[IMAGE_COLUMNS] if frames else rows_frame([])
    # 1. A batch row not newer than the URL's version in the table is stale (a zombie attempt's part).
    prev = _pinned_keys(store, seen, _isin("first_url", batch["first_url"].tolist())) if len(batch) else None
    replaced = 0
    if prev is not None and len(prev):
        before = batch["first_url"].map(prev.set_index("first_url")["fetched_at"])
        when = pd.to_datetime(batch["fetched_at"], utc=True)
        stale = (before.notna() & ~(when > pd.to_datetime(before, utc=True))).to_numpy()
        batch = batch[~stale].reset_index(drop=True)
        replaced = int(batch["first_url"].isin(set(prev["first_url"])).sum())
    imaged = batch[batch["image_id"].notna()]
    # 2. The near-duplicate search: only the images the index does not hold yet, against it and among themselves.
    found, _ = index.add_batch(imaged.drop_duplicates("image_id"))
    new_pairs = pairs_frame(found, now)
    # 3. Images whose links change, closed over their near-duplicate groups.
    old = (store.read_table("near_pairs", columns=["image_id_a", "image_id_b"], version=seen["near_pairs"]).to_pandas()
           if seen.get("near_pairs") is not None else new_pairs.iloc[:0])
    a = np.concatenate([old["image_id_a"].to_numpy(dtype=object), new_pairs["image_id_a"].to_numpy(dtype=object)])
    b = np.concatenate([old["image_id_b"].to_numpy(dtype=object), new_pairs["image_id_b"].to_numpy(dtype=object)])
    seeds = set(imaged["image_id"]) | {s for d in docs for s in d.get("seeds", [])} | set(a[len(old):]) | set(b[len(old):])
    affected = near_closure(seeds, a, b)
    holders = _pinned_keys(store, seen, _isin("image_id", sorted(affected))) if affected else rows_frame([])[KEY_COLUMNS]
    holders = holders[holders["image_id"].notna() & ~holders["first_url"].isin(set(batch["first_url"]))]
    rows, flips = exact_duplicate_versions(batch, holders)
    # 4. Their links, recomputed whole from the candidates of every URL holding them.
    url_image = pd.concat([holders[["first_url", "image_id"]], rows.loc[rows["image_id"].notna(), ["first_url", "image_id"]]],
                          ignore_index=True)
    links = pd.DataFrame(columns=LINK_COLUMNS)
    if len(url_image):
        cands = store.read_table("candidates", columns=CANDIDATE_LINK_COLUMNS, missing_ok=True,
                                 filter=_isin("url", url_image["first_url"].unique().tolist())).to_pandas()
        links = build_links(cands, url_image)
        if len(links):
            inside = np.isin(a, list(affected))
            pairs = pd.DataFrame({"image_id_a": a[inside], "image_id_b": b[inside]})
            links = apply_near_groups(links, groups_from_pairs(links["image_id"].unique(), pairs))
    # 5. Commit: index files, a pending note, the table appends, the manifest (commit point), then clean up.
    segments = sidx.write_segments(index, gen)
    failpoint("ingest.index_written")
    store.put(_pending_key(gen), json.dumps({"generation": gen, "parts": [*parts, *notes]}).encode())
    versions = pd.concat([rows, flips], ignore_index=True)[IMAGE_COLUMNS] if len(flips) else rows[IMAGE_COLUMNS]
    if len(versions):
        store.append_table("images", versions, unique_by=["fetched_at", "first_url", "status"] if rerun else None)
    if len(new_pairs):
        store.append_table("near_pairs", new_pairs, unique_by=["image_id_a", "image_id_b"] if rerun else None)
    if len(links):
        if rerun:  # drop the versions a crashed attempt of this merge already appended
            have = store.read_table("image_links", filter=_isin("image_id", links["image_id"].unique().tolist())).to_pandas()
            links = links.merge(have.drop_duplicates().assign(_have=True), on=LINK_COLUMNS, how="left")
            links = links[links["_have"].isna()].drop(columns="_have")
        if len(links):
            store.append_table("image_links", links)
    failpoint("ingest.tables_written")
    held_before = set(holders["image_id"]) | set(affected - set(imaged["image_id"]))
    stats = dict(manifest.get("stats", {}))
    collapsed = []
    for name, n_rows, n_superseded in (("images", len(versions), replaced + len(flips)),
                                       ("image_links", len(links), int(links["image_id"].isin(held_before).sum()))):
        stats[name] = _collapse(store, name, stats.get(name), n_rows, n_superseded, collapse_factor)
        if stats[name].pop("collapsed", False):
            collapsed.append(name)
    marks = dict(manifest.get("synsets", {}))
    for d in docs:
        if d.get("candidates_version") is not None:
            for w in d.get("wnids", []):
                marks[w] = max(int(marks.get(w, -1)), int(d["candidates_version"]))
    new_manifest = {"generation": gen, "created_at": now.isoformat(), "index": sidx.spec(index), "segments": segments,
                    "n_images": len(index), "parts": [*parts, *notes], "tables": _table_versions(store),
                    "synsets": marks, "stats": stats, "rebuilt": None}
    _commit_generation(store, sidx, new_manifest, [*parts, *notes], "this one ran; rerun the merge")
    return {**_counts(versions, links), "merged_parts": len(parts), "near_pairs": int(len(new_pairs)),
            "status_changes": int(len(flips)), "affected_images": len(affected), "collapsed": collapsed,
            "index": _index_summary(new_manifest), "rebuilt": None}


def _commit_generation(store: Any, sidx: Any, manifest: dict[str, Any], merged: list[str], retry: str) -> None:
    """Commit an index generation's manifest (the merge's commit point), then delete the parts and notes it merged,
    the segments no live manifest names and the generation's pending marker. `retry`: the end of the message when
    another merge committed the same generation first."""
    from pipeline.store import KeyExists, TableConflict

    gen = manifest["generation"]
    try:
        sidx.commit(manifest)
    except KeyExists:
        raise TableConflict(f"another ingest merge committed index generation {gen} at {store.url} while "
                            f"{retry}") from None
    for k in merged:
        store.delete(k)
    sidx.cleanup(manifest)
    store.delete(_pending_key(gen))


def _collapse(store: Any, name: str, stats: dict[str, Any] | None, appended: int, superseded: int,
              factor: float) -> dict[str, Any]:
    """Rewrite `name` with one row per key when the table holds at most `factor` times the rows just appended or
    superseded versions pass COLLAPSE_SHARE of it; returns the table's updated row counts."""
    st = {"rows": 0, "superseded": 0, **(stats or {})}
    rows, sup = int(st["rows"]) + appended, int(st["superseded"]) + superseded
    if appended and (rows <= factor * appended or sup > COLLAPSE_SHARE * rows):
        if name == "images":
            table = latest_images([table_frame(store.read_table("images"))])[IMAGE_COLUMNS]
        else:
            table = latest_links(store.read_table("image_links").to_pandas())[LINK_COLUMNS]
        store.write_table(name, table)
        return {"rows": int(len(table)), "superseded": 0, "collapsed": True}
    return {"rows": rows, "superseded": sup}


def _rebuild(store: Any, sidx: Any, manifest: dict[str, Any] | None, parts: list[str], notes: list[str],
             reason: str) -> dict[str, Any]:
    """The full path: settle every images row and part, index every accepted image from scratch, rewrite images,
    near_pairs and image_links with one row per key, and start a new index generation (recovery, first merge)."""
    from pipeline.ingest.neardup import NearDupIndex

    gen = int(manifest["generation"]) + 1 if manifest else 1
    now = datetime.now(UTC)
    images = settle_images([table_frame(store.read_table("images", missing_ok=True)),
                            *[table_frame(store.read_table("images", key=k)) for k in parts]])
    accepted = images[images["status"] == "accepted"]
    index = NearDupIndex(chunks=_index_chunks(len(accepted)), max_merge=INDEX_MAX_MERGE)
    found = [index.add_batch(accepted.iloc[i:i + INDEX_MAX_MERGE])[0] for i in range(0, len(accepted), INDEX_MAX_MERGE)]
    near = pairs_frame(pd.concat(found, ignore_index=True) if found else pd.DataFrame(), now)
    version = store.table_version("candidates") if store.has_table("candidates") else None
    candidates = store.read_table("candidates", columns=CANDIDATE_LINK_COLUMNS, version=version,
                                  missing_ok=version is None).to_pandas()
    links = build_links(candidates, images)
    if len(links):
        from pipeline.ingest.dedup import groups_from_pairs

        links = apply_near_groups(links, groups_from_pairs(accepted["image_id"].unique(), near))
    segments = sidx.write_segments(index, gen)  # the index files exist before any table relies on them
    failpoint("ingest.index_written")
    store.write_table("images", images)
    store.write_table("near_pairs", near)
    store.write_table("image_links", links)
    failpoint("ingest.tables_written")
    marks = {w: int(version) for w in candidates["wnid"].unique().tolist()} if version is not None else {}
    new_manifest = {"generation": gen, "created_at": now.isoformat(), "index": sidx.spec(index), "segments": segments,
                    "n_images": len(index), "parts": [*parts, *notes], "tables": _table_versions(store),
                    "synsets": marks, "rebuilt": reason,
                    "stats": {"images": {"rows": int(len(images)), "superseded": 0},
                              "image_links": {"rows": int(len(links)), "superseded": 0}}}
    _commit_generation(store, sidx, new_manifest, [*parts, *notes], "this rebuild ran; rerun it")
    return {**summarize(images, links), "merged_parts": len(parts), "near_pairs": int(len(near)), "status_changes": 0,
            "index": _index_summary(new_manifest), "rebuilt": reason}


def summarize(images: pd.DataFrame, links: pd.DataFrame) -> dict[str, Any]:
    return _counts(images, links)


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, sort_keys=True, default=str)
