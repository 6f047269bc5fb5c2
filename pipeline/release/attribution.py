"""Attribution of released images: who made each image, under which license, where it was found.

CC-BY and CC-BY-SA images may be redistributed only with their creator, title, license and source named, so
a release carries, per image, the candidate record (candidates table, collect stage) of the URL the image
was first fetched from: source, page_url, title, creator, license, license_url. An image that came from
several URLs takes the record of its first URL (the images row the release publishes). When several
candidate rows share that URL (found for two synsets, or by two sources), the one with the most of these
fields set wins, then the smallest wnid, source and rank, so the choice does not depend on row order.

No absolute local path reaches a release: a file:// URL (or a bare absolute path) is written as its path
relative to a collect root it lies under, else as its file name (`portable_url`).

    >>> portable_url("file:///home/ann/photos/n02084071/rex%201.jpg", ["/home/ann/photos"])
    'n02084071/rex 1.jpg'
    >>> portable_url("file:///tmp/elsewhere/rex.jpg", ["/home/ann/photos"]), portable_url("https://a.test/x.jpg")
    ('rex.jpg', 'https://a.test/x.jpg')
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath, PureWindowsPath
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc

# release images columns taken from the candidates table, in schema order
ATTRIBUTION_COLUMNS = ("source", "page_url", "title", "creator", "license", "license_url")
# the fields that make a candidate record more complete (the tie-break between rows of one URL)
_RECORD_FIELDS = ("page_url", "title", "creator", "license", "license_url")
_CANDIDATE_COLUMNS = ("url", "wnid", "rank", *ATTRIBUTION_COLUMNS)
_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")


def is_local(value: str | None) -> bool:
    """Whether `value` names a local file: a file: URL or an absolute path (POSIX, ~, or a Windows drive)."""
    if not value:
        return False
    return value[:5].lower() == "file:" or value.startswith(("/", "~", "\\")) or bool(_WINDOWS_PATH.match(value))


def _local_path(value: str) -> str:
    if value[:5].lower() == "file:":
        parts = urlsplit(value)
        return unquote(parts.path)
    return value


def portable_url(value: str | None, roots: Sequence[str] = ()) -> str | None:
    """`value` unchanged unless it names a local file; then its path relative to the first of `roots` it lies
    under (POSIX separators), else its file name. Never an absolute path."""
    if not is_local(value):
        return value
    path = _local_path(value)
    if _WINDOWS_PATH.match(path) or "\\" in path:
        pure: PurePosixPath | PureWindowsPath = PureWindowsPath(path)
    else:
        pure = PurePosixPath(path)
    for root in roots:
        if not root:
            continue
        root_path = _local_path(str(root))
        base = type(pure)(root_path)
        try:
            rel = pure.relative_to(base)
        except ValueError:
            continue
        if rel.parts and ".." not in rel.parts:
            return "/".join(rel.parts)
    return pure.name or None


def portable_urls(values: pa.Array | pa.ChunkedArray, roots: Sequence[str] = ()) -> pa.Array:
    """`portable_url` over a string column; only the local entries are touched in Python."""
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if arr.type != pa.string():
        arr = arr.cast(pa.string())
    local = pc.fill_null(pc.or_(pc.starts_with(pc.utf8_lower(pc.utf8_slice_codeunits(arr, 0, 5)), "file:"),
                                pc.match_substring_regex(arr, r"^([/~\\]|[A-Za-z]:[\\/])")), False)
    if not pc.any(local).as_py():
        return arr
    rows = pc.indices_nonzero(local)
    fixed = pa.array([portable_url(v, roots) for v in arr.take(rows).to_pylist()], pa.string())
    return pc.replace_with_mask(arr, local, fixed)


def empty_attribution(n: int) -> pa.Table:
    return pa.table({c: pa.nulls(n, pa.string()) for c in ATTRIBUTION_COLUMNS})


def attribution_for(urls: pa.Array | pa.ChunkedArray, candidates: Iterable[pa.RecordBatch | pa.Table] | None,
                    roots: Sequence[str] = ()) -> pa.Table:
    """The candidate record of each of `urls` (distinct), as a table of ATTRIBUTION_COLUMNS aligned with
    `urls` (nulls where no candidate row has the URL). `candidates`: batches of the candidates table with at
    least url, wnid, rank and the attribution columns; rows of other URLs are dropped batch by batch, so only
    the matching rows are ever held. Local page URLs are made portable."""
    urls = urls.combine_chunks() if isinstance(urls, pa.ChunkedArray) else urls
    n = len(urls)
    if candidates is None or n == 0:
        return empty_attribution(n)
    matched = []
    for batch in candidates:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        table = table.select(list(_CANDIDATE_COLUMNS))
        hit = pc.is_in(table["url"], value_set=urls)
        if pc.any(hit).as_py():
            matched.append(table.filter(hit))
    if not matched:
        return empty_attribution(n)
    t = pa.concat_tables(matched)
    filled = None
    for c in _RECORD_FIELDS:
        v = pc.cast(pc.is_valid(t[c]), pa.int8())
        filled = v if filled is None else pc.add(filled, v)
    t = t.append_column("_missing", pc.subtract(pa.scalar(len(_RECORD_FIELDS), pa.int8()), filled))
    t = t.take(pc.sort_indices(t, [("url", "ascending"), ("_missing", "ascending"), ("wnid", "ascending"),
                                   ("source", "ascending"), ("rank", "ascending")]))
    url = t["url"].combine_chunks()
    first = pa.concat_arrays([pa.array([True]), pc.not_equal(url.slice(1), url.slice(0, len(url) - 1))]) \
        if len(url) else pa.array([], pa.bool_())
    best = t.filter(first)
    pos = pc.index_in(urls, value_set=best["url"])
    cols = {c: best[c].take(pos) for c in ATTRIBUTION_COLUMNS}
    cols["page_url"] = portable_urls(cols["page_url"], roots)
    cols["license_url"] = portable_urls(cols["license_url"], roots)
    return pa.table({c: (v.combine_chunks() if isinstance(v, pa.ChunkedArray) else v).cast(pa.string())
                     for c, v in cols.items()})
