"""Collect candidates: run each synset's queries against the configured sources up to its budget.

Pure core: `collect_candidates(synsets, sources, ...)` pulls lazily and round-robin from one generator per
(source, query), so every query contributes and no API is paged past what the budget needs; it normalises
URLs, drops repeats within the synset, applies the license filter and numbers the survivors by rank.
I/O shell: `run_collect(store, settings)` reads the `synsets` table and writes the `candidates` table (or a
shard part the DAG merges with `merge_collect_parts`). A rerun replaces the rows of the synsets it covered
and keeps each (wnid, url)'s first found_at, so the table is stable.

    >>> import pandas as pd
    >>> class Fixed(Source):
    ...     name = "fixed"
    ...     def search(self, synset, query, budget):
    ...         yield {"url": f"http://img.example/{query}.jpg", "license": "cc0"}
    ...         yield {"url": f"HTTP://IMG.example/{query}.jpg#dup", "license": "cc0"}
    >>> syn = pd.DataFrame({"wnid": ["n00000001"], "lemmas": [["cat"]], "queries": [["cat", "kitty"]]})
    >>> df, errors = collect_candidates(syn, [Fixed()], budget=5)
    >>> list(df["url"]), list(df["rank"])
    (['http://img.example/cat.jpg', 'http://img.example/kitty.jpg'], [0, 1])
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import UserError
from pipeline.faults import failpoint
from pipeline.schemas import arrow_schema
from pipeline.sources.base import ApiClient, Source, SourceConfigError, SourceError, license_allowed, normalize_url

SOURCE_NAMES = ("openverse", "wikimedia", "flickr", "url_list", "local_dir", "s3_prefix")
CANDIDATE_COLUMNS = arrow_schema("candidates").names
PARTS_PREFIX = "collect/parts/"


def build_sources(settings: Any, names: Sequence[str] | None = None, *, flickr_api_key: str | None = None) -> list[Source]:
    """Instantiate the named sources (default: settings.collect.sources) from the settings."""
    c = settings.collect
    names = list(names or c.sources)
    unknown = [n for n in names if n not in SOURCE_NAMES]
    if unknown:
        raise SourceConfigError(f"unknown source(s) {unknown}; choose from {list(SOURCE_NAMES)}")

    def client(name: str) -> ApiClient:
        return ApiClient(name, timeout_s=c.http_timeout_s, max_retries=c.max_retries,
                         max_retry_after_s=c.max_retry_after_s, user_agent=c.user_agent)

    out: list[Source] = []
    for name in names:
        if name == "openverse":
            from pipeline.sources.openverse import OpenverseSource

            out.append(OpenverseSource(client(name), c.openverse_url, page_size=c.page_size,
                                       allowed_licenses=c.allowed_licenses))
        elif name == "wikimedia":
            from pipeline.sources.wikimedia import WikimediaSource

            out.append(WikimediaSource(client(name), c.wikimedia_url, page_size=c.page_size))
        elif name == "flickr":
            from pipeline.sources.flickr import FlickrSource

            key = flickr_api_key or (c.flickr_api_key.get_secret_value() if c.flickr_api_key else None)
            out.append(FlickrSource(client(name), c.flickr_url, key, page_size=c.page_size,
                                    allowed_licenses=c.allowed_licenses))
        elif name == "url_list":
            from pipeline.sources.url_list import UrlListSource

            if not c.url_list:
                raise SourceConfigError("url_list: collect.url_list is not set; point it at a .txt, .csv or .parquet file")
            out.append(UrlListSource(c.url_list))
        elif name == "local_dir":
            from pipeline.sources.local_dir import LocalDirSource

            out.append(LocalDirSource(c.local_dir, license=c.local_license, creator=c.local_creator))
        elif name == "s3_prefix":
            from pipeline.sources.s3_prefix import S3PrefixSource

            out.append(S3PrefixSource(c.s3_prefix, endpoint_url=settings.store.s3_endpoint_url))
    return out


def synset_queries(row: Any) -> list[str]:
    """The synset's expanded queries, falling back to its lemmas; de-duplicated, order kept."""
    queries = row.get("queries")
    if queries is None or len(queries) == 0:
        queries = row.get("lemmas")
    if queries is None or len(queries) == 0:
        return []
    return list(dict.fromkeys(str(q) for q in queries if str(q).strip()))


def _round_robin(streams: list[tuple[Source, str | None, Iterator[dict[str, Any]]]], errors: list[dict[str, Any]],
                 wnid: str) -> Iterator[tuple[Source, str | None, dict[str, Any]]]:
    live = list(streams)
    while live:
        for entry in list(live):
            source, query, it = entry
            try:
                item = next(it)
            except StopIteration:
                live.remove(entry)
                continue
            except SourceError as exc:
                errors.append({"wnid": wnid, "source": source.name, "query": query, "error": str(exc)})
                live.remove(entry)
                continue
            yield source, query, item


def collect_candidates(
    synsets: pd.DataFrame,
    sources: Sequence[Source],
    *,
    budget: int,
    allowed_licenses: list[str] | None = None,
    now: datetime | None = None,
    on_synset: Callable[[str, int], None] | None = None,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Candidates for every synset row (columns of the candidates table) and the list of source errors."""
    now = now or datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for syn in synsets.to_dict("records"):
        wnid = str(syn["wnid"])
        queries = synset_queries(syn)
        streams = []
        for source in sources:
            for query in (queries if source.per_query else [None]):
                streams.append((source, query, source.search(syn, query, budget)))
        seen: set[str] = set()
        rank = 0
        for source, query, item in _round_robin(streams, errors, wnid):
            url = normalize_url(item.get("url", ""))
            if url is None or url in seen:
                continue
            if not license_allowed(item.get("license"), allowed_licenses):
                continue
            seen.add(url)
            rows.append({
                "wnid": wnid, "source": source.name, "query": query, "url": url,
                "page_url": item.get("page_url"), "title": item.get("title"), "license": item.get("license"),
                "license_url": item.get("license_url"), "creator": item.get("creator"), "rank": rank,
                "found_at": now,
            })
            rank += 1
            if rank >= budget:
                break
        for _s, _q, it in streams:
            close = getattr(it, "close", None)
            if close:
                close()  # stop generators mid-page so they release their state
        if on_synset:
            on_synset(wnid, rank)
    df = pd.DataFrame(rows, columns=CANDIDATE_COLUMNS)
    df["rank"] = df["rank"].astype("int32")
    df["found_at"] = pd.to_datetime(df["found_at"], utc=True)
    return df, errors


def merge_candidates(existing: pd.DataFrame, new: pd.DataFrame, covered_wnids: Sequence[str]) -> pd.DataFrame:
    """Replace the rows of `covered_wnids` with `new`, keeping the first found_at of a (wnid, url) seen before."""
    covered = set(covered_wnids)
    old = existing[existing["wnid"].isin(covered)][["wnid", "url", "found_at"]]
    if len(old) and len(new):
        new = new.merge(old.rename(columns={"found_at": "_old"}), on=["wnid", "url"], how="left")
        new["found_at"] = new["_old"].where(new["_old"].notna(), new["found_at"])
        new = new.drop(columns=["_old"])
    kept = existing[~existing["wnid"].isin(covered)]
    frames = [f for f in (kept, new[CANDIDATE_COLUMNS]) if len(f)]
    out = pd.concat(frames, ignore_index=True) if frames else new[CANDIDATE_COLUMNS]
    out = out.drop_duplicates(["wnid", "url"], keep="last")
    return out.sort_values(["wnid", "rank"], kind="stable").reset_index(drop=True)


# --- I/O shell ------------------------------------------------------------------------------------------------


def plan_shards(wnids: Sequence[str], wanted: Sequence[str] | None, size: int, max_shards: int) -> list[dict[str, Any]]:
    """Cut the synsets into shards of `size` (raised so there are at most `max_shards`), for mapped tasks.

    >>> plan_shards(["a", "b", "c"], None, 2, 1000)
    [{'shard': 0, 'wnids': ['a', 'b']}, {'shard': 1, 'wnids': ['c']}]
    """
    import math

    from pipeline.errors import UserError

    if wanted:
        missing = sorted(set(wanted) - set(wnids))
        if missing:
            raise UserError(f"wnids {missing[:5]} are not in the synsets table; run the vocabulary stage for them")
        keep = set(wanted)
        wnids = [w for w in wnids if w in keep]
    size = max(int(size), math.ceil(len(wnids) / max_shards), 1)
    return [{"shard": i // size, "wnids": list(wnids[i : i + size])} for i in range(0, len(wnids), size)]


def _select_synsets(store: Any, wnids: Sequence[str] | None) -> pd.DataFrame:
    from pipeline.errors import UserError
    from pipeline.store import MissingKey

    try:
        synsets = store.read_table("synsets").to_pandas()
    except MissingKey as exc:
        raise UserError(f"{exc}; run `synsetforge vocabulary` first") from None
    if wnids:
        missing = sorted(set(wnids) - set(synsets["wnid"]))
        if missing:
            raise UserError(f"wnid(s) {missing[:5]} are not in the synsets table; check the list or rebuild the vocabulary")
        synsets = synsets[synsets["wnid"].isin(set(wnids))]
    return synsets.reset_index(drop=True)


def run_collect(
    store: Any,
    settings: Any,
    *,
    wnids: Sequence[str] | None = None,
    source_names: Sequence[str] | None = None,
    budget: int | None = None,
    part: str | None = None,
    flickr_api_key: str | None = None,
    on_synset: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """Collect for the selected synsets; write the candidates table (or, with `part`, a shard part)."""
    synsets = _select_synsets(store, wnids)
    sources = build_sources(settings, source_names, flickr_api_key=flickr_api_key)
    try:
        df, errors = collect_candidates(
            synsets, sources, budget=budget or settings.collect.per_synset_budget,
            allowed_licenses=settings.collect.allowed_licenses, on_synset=on_synset,
        )
    finally:
        for s in sources:
            s.close()
    covered = list(synsets["wnid"])
    record_roots(store, settings, [s.name for s in sources])
    if part:
        store.write_table("candidates", df, key=f"{PARTS_PREFIX}{part}.parquet")
        failpoint("collect.part_written")  # the table part exists, its meta (what merge reads) not yet
        store.put(f"{PARTS_PREFIX}{part}.json", json.dumps({"wnids": covered, "errors": errors}).encode())
    else:
        existing = store.read_table("candidates", missing_ok=True).to_pandas()
        store.write_table("candidates", merge_candidates(existing, df, covered))
    return _summary(df, errors, len(covered))


ROOTS_KEY = "collect/roots.json"


def record_roots(store: Any, settings: Any, source_names: Sequence[str]) -> None:
    """Remember the local folder and S3 prefix a collect run read, so ingest reads those candidates without being
    told the root again. Roots only accumulate (a later collect with another folder keeps the first one's files
    readable); the user removes one by editing this small JSON file."""
    c = settings.collect
    found = {"local_dir": str(Path(c.local_dir).expanduser().resolve()) if "local_dir" in source_names and c.local_dir else None,
             "s3_prefix": c.s3_prefix if "s3_prefix" in source_names and c.s3_prefix else None}
    if not any(found.values()):
        return
    roots = recorded_roots(store)
    changed = False
    for kind, value in found.items():
        if value and value not in roots[kind]:
            roots[kind].append(value)
            changed = True
    if changed:
        store.put(ROOTS_KEY, json.dumps(roots, indent=1).encode())


def recorded_roots(store: Any) -> dict[str, list[str]]:
    """{"local_dir": [...], "s3_prefix": [...]} recorded by collect runs (empty lists when none)."""
    from pipeline.store import MissingKey

    try:
        data = json.loads(store.get(ROOTS_KEY))
    except MissingKey:
        data = {}
    except ValueError as exc:
        raise UserError(f"{store.url}/{ROOTS_KEY} is not valid JSON ({exc}); fix or delete it and rerun collect") from None
    return {k: [str(v) for v in data.get(k, []) if v] for k in ("local_dir", "s3_prefix")}


def merge_collect_parts(store: Any) -> dict[str, Any]:
    """Fold every shard part into the candidates table, then delete the parts (safe to rerun)."""
    metas = [k for k in store.list(PARTS_PREFIX) if k.endswith(".json")]
    table = store.read_table("candidates", missing_ok=True).to_pandas()
    errors: list[dict[str, Any]] = []
    covered_all: list[str] = []
    new_frames = []
    for meta_key in metas:
        meta = json.loads(store.get(meta_key))
        covered_all += meta["wnids"]
        errors += meta.get("errors", [])
        new_frames.append(store.read_table("candidates", key=meta_key[:-5] + ".parquet").to_pandas())
    if metas:
        frames = [f for f in new_frames if len(f)]
        new = pd.concat(frames, ignore_index=True) if frames else new_frames[0]
        table = merge_candidates(table, new, covered_all)
        store.write_table("candidates", table)
        for meta_key in metas:
            store.delete(meta_key[:-5] + ".parquet")
            store.delete(meta_key)
    summary = _summary(table, errors, table["wnid"].nunique())
    summary["parts_merged"] = len(metas)
    return summary


def _summary(df: pd.DataFrame, errors: list[dict[str, Any]], n_synsets: int) -> dict[str, Any]:
    return {
        "synsets": n_synsets,
        "candidates": int(len(df)),
        "by_source": {str(k): int(v) for k, v in df["source"].value_counts().items()} if len(df) else {},
        "synsets_without_candidates": int(n_synsets - df["wnid"].nunique()) if len(df) else n_synsets,
        "errors": errors,
    }
