"""Assemble a release from the store's tables and publish it immutably (manifest last).

Pure core: `plan_release` decides (accepted labels of accepted images, one primary class per image,
splits, near-duplicate leakage) on integer codes (`IdIndex` joins the string ids); `select_boxes` and
`assemble` finish the tables; `class_splits` + `check_splits` refuse a release that would leave a class
without a train or a val image (unless forced).
I/O shell: `build_release(store, version, ...)` runs the same steps staged, so that about one big table is
in memory at a time (images are read narrow for the decision, and only their other columns afterwards, to be
written), writes releases/<version>/data/<table>-<sha256[:16]>.parquet (encoded, hashed and fsynced on a
second thread while the next table is read), then manifest.json with an exclusive put once every data file
is durable. `plan_from_store` makes the same decision and writes nothing (`synsetforge release plan`).

Released images carry their first URL's attribution from the candidates table (pipeline.release.attribution);
a store without a boxes table gives a classification-only release (an empty boxes table), one without a
candidates table a release whose attribution columns are null.

    >>> import tempfile
    >>> from pipeline.store import open_store
    >>> from pipeline.release.synthetic import make_fixture
    >>> store = open_store(tempfile.mkdtemp())
    >>> _ = make_fixture(store, n_classes=2, per_class=6, seed=3)
    >>> m = build_release(store, "v1", val_per_class=1, test_per_class=1, neardup=False)
    >>> sorted(m["files"]), m["splits"]["val"]
    (['boxes', 'images', 'labels', 'synsets'], 2)
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.release.attribution import ATTRIBUTION_COLUMNS, attribution_for, empty_attribution, portable_urls
from pipeline.release.manifest import (
    ReleaseError,
    ReleaseExists,
    ReleaseInputError,
    ReleaseTooSmall,
    manifest_key,
    read_manifest,
    read_release_table,
    release_exists,
    release_file_source,
    release_prefix,
    validate_manifest,
)
from pipeline.release.splits import (
    SPLITS,
    TRAIN,
    CrossDuplicates,
    Quota,
    argsort_stable,
    check_quota,
    class_quotas,
    class_then_key_order,
    near_pair_drops,
    split_codes,
    split_keys,
    train_near_duplicates_rows,
)
from pipeline.schemas import arrow_schema, empty_table, schema_version, validate
from pipeline.store import KeyExists, LocalStore, Store

# table in the release -> schema it is validated against
RELEASE_TABLES = {"synsets": "synsets", "images": "release_images", "labels": "release_labels", "boxes": "boxes",
                  "test_images": "release_test_images"}  # test_images: challenge builds only (see the end)
MANIFEST_VERSION = 2


@dataclass
class SplitPolicy:
    """Per-class val and test quotas (a count, or a fraction in (0, 1) of each class's images) and the salt."""

    val_per_class: Quota = 50
    test_per_class: Quota = 100
    salt: str = "synsetforge"

    def __post_init__(self) -> None:
        try:
            self.val_per_class = check_quota(self.val_per_class, "val_per_class")
            self.test_per_class = check_quota(self.test_per_class, "test_per_class")
        except ValueError as exc:
            raise ReleaseInputError(f"release split policy: {exc}") from None


@dataclass
class Inputs:
    synsets: pa.Table
    images: pa.Table
    labels: pa.Table
    boxes: pa.Table | None = None  # None: no boxes table (a classification-only release)
    candidates: pa.Table | None = None  # None: no attribution


@dataclass
class Plan:
    """What goes into a release, decided from synsets, images and labels (boxes are filtered afterwards).

    Images are handled as integer codes (positions in `image_ids.ids`), classes as positions in `wnids`
    (sorted), so every join, sort and group below is numpy on integers, not on 1M+ strings.
    """

    image_rows: np.ndarray  # rows of the images table to publish, ascending (images keep their input order)
    labels: pa.Table | None  # the release_labels table
    image_ids: IdIndex | None  # distinct accepted image ids; an image's code is its position in .ids
    wnids: pa.Array  # sorted vocabulary; a class code is a position here
    image_keys: np.ndarray  # salted split key per image code
    primary_class: np.ndarray  # class code of each image's released primary label, -1 if none
    other_pairs: np.ndarray  # image_code * n_classes + class_code of released non-primary labels, sorted
    split_counts: np.ndarray  # n_classes x 3 (train, val, test) primary images
    quotas: np.ndarray  # n_classes x 2 (val, test) images asked of each class
    splits: dict[str, int]
    neardup_dropped: int
    kept_from_parent: int
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Assembled:
    tables: dict[str, pa.Table]
    splits: dict[str, int]
    classes: dict[str, dict[str, int]]
    neardup_dropped: int
    kept_from_parent: int
    stats: dict[str, Any] = field(default_factory=dict)
    qc_methods: list[str] = field(default_factory=list)


def _col(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def _codes(values: Any, value_set: pa.Array) -> np.ndarray:
    """Position of each value in value_set, -1 where absent (or null)."""
    return pc.fill_null(pc.index_in(values, value_set=value_set), -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _mask(expr: Any) -> np.ndarray:
    return pc.fill_null(expr, False).to_numpy(zero_copy_only=False).astype(bool)


_WORD_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                      0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9], dtype=np.uint64)


def _string_parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets as int64, data bytes) of a string array, zero-copy."""
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset:arr.offset + n + 1].astype(np.int64)
    data = arr.buffers()[2]
    return offsets, (np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8))


def _word_hash(values: pa.Array | pa.ChunkedArray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hash of every string of exactly `width` bytes, and which values have that width (nulls and
    other lengths do not; their hash is 0). The bytes are read as uint64 words and mixed with one
    matrix-vector product: two strings differing in one word never collide."""
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    n_words = -(-width // 8)
    mix = _WORD_MIX[np.arange(n_words) % len(_WORD_MIX)] + np.uint64(2) * np.arange(n_words, dtype=np.uint64)
    hashes, fits = [], []
    for chunk in chunks:
        if chunk.type != pa.string():
            chunk = chunk.cast(pa.string())
        offsets, data = _string_parts(chunk)
        lengths = np.diff(offsets)
        fit = lengths == width
        if chunk.null_count:
            fit &= _mask(chunk.is_valid())
        h = np.zeros(len(chunk), dtype=np.uint64)
        if fit.all() and len(chunk) and width % 8 == 0:  # contiguous: a zero-copy n x width view
            mat = data[offsets[0]:offsets[0] + len(chunk) * width].reshape(len(chunk), width)
            h = mat.view(np.uint64) @ mix
        elif fit.any():
            rows = np.nonzero(fit)[0]
            mat = np.zeros((len(rows), n_words * 8), dtype=np.uint8)
            mat[:, :width] = data[offsets[rows][:, None] + np.arange(width)]
            h[rows] = mat.view(np.uint64) @ mix
        hashes.append(h)
        fits.append(fit)
    if not hashes:
        return np.zeros(0, np.uint64), np.zeros(0, bool)
    return np.concatenate(hashes), np.concatenate(fits)


def _sorted_search(sorted_values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """np.searchsorted with the queries sorted first: sequential probes, 4x faster on 1M+ random keys."""
    order = np.argsort(queries)
    pos = np.empty(len(queries), dtype=np.int64)
    pos[order] = np.searchsorted(sorted_values, queries[order])
    return pos


_VERIFY_BLOCK = 1 << 18


class IdIndex:
    """Distinct string ids -> integer codes, and lookups of other string columns into them.

    Arrow's string hash table costs ~0.6 s per pass over 1.3M sha256-hex ids on this machine, and a release
    needs three (dedupe images, join labels, join boxes). When all ids have one byte length (sha256 hex
    always does), they are hashed as uint64 words instead, joined by sorting, and every match is confirmed
    by comparing the strings, so the result is exact. Ids of mixed lengths, or two distinct ids with equal
    word hashes, fall back to Arrow's hash table.

        >>> ix = IdIndex(pa.array(["bb", "aa", "bb", "cc"]))
        >>> ix.ids.to_pylist(), ix.codes.tolist(), ix.first.tolist()
        (['bb', 'aa', 'cc'], [0, 1, 0, 2], [0, 1, 3])
        >>> ix.lookup(pa.array(["cc", "zz", None, "aa", "aaa"])).tolist()
        [2, -1, -1, 1, -1]
    """

    def __init__(self, values: pa.Array | pa.ChunkedArray, rows: np.ndarray | None = None):
        """Index the `values` (those at `rows` if given; they must not be null). codes: code per indexed
        value; first: position (among the indexed values) of each code's first occurrence; ids: id per
        code. Codes are numbered in order of first occurrence."""
        if values.type != pa.string():
            values = values.cast(pa.string())
        chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
        lengths = np.concatenate([np.diff(_string_parts(c)[0]) for c in chunks]) if chunks else np.zeros(0, np.int64)
        nulls = _mask(values.is_null()) if values.null_count else None
        if rows is not None:
            lengths = lengths[rows]
            nulls = nulls[rows] if nulls is not None else None
        if nulls is not None and nulls.any():
            raise ValueError("IdIndex: ids must not be null")
        self.width = -1
        self._hashes: np.ndarray | None = None
        if len(lengths) and lengths[0] > 0 and (lengths == lengths[0]).all():
            h, _ = _word_hash(values, int(lengths[0]))
            if self._index_words(values, h if rows is None else h[rows], rows, int(lengths[0])):
                return
        sub = values if rows is None else values.take(pa.array(rows))
        sub = sub.combine_chunks() if isinstance(sub, pa.ChunkedArray) else sub
        enc = pc.dictionary_encode(sub)
        self.codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        self.ids = enc.dictionary
        new = self.codes > np.r_[-1, np.maximum.accumulate(self.codes)[:-1]] if len(self.codes) else self.codes > 0
        self.first = np.nonzero(new)[0]

    def _index_words(self, values: pa.Array | pa.ChunkedArray, h: np.ndarray, rows: np.ndarray | None,
                     width: int) -> bool:
        """Fast path; returns False if it had to give up (a hash collision between distinct ids)."""
        at = (lambda pos: pa.array(pos)) if rows is None else (lambda pos: pa.array(rows[pos]))
        order = argsort_stable(h)
        hs = h[order]
        same = hs[1:] == hs[:-1]
        if same.any():  # repeated ids, or a collision: compare the strings
            if not pc.all(pc.equal(values.take(at(order[:-1][same])), values.take(at(order[1:][same])))).as_py():
                return False
        start = np.nonzero(np.r_[True, ~same])[0]
        first_sorted = order[start]  # argsort_stable keeps equal ids in input order: the first is the first row
        # code = order of first occurrence; the first rows are distinct positions, so mark them, no sort
        is_first = np.zeros(len(h), dtype=bool)
        is_first[first_sorted] = True
        self.first = np.nonzero(is_first)[0]
        code_of_group = (np.cumsum(is_first) - 1)[first_sorted]
        group = np.cumsum(np.r_[True, ~same]) - 1  # group (in hash order) of each sorted position
        self.codes = np.empty(len(h), dtype=np.int64)
        self.codes[order] = code_of_group[group]
        # ascending positions: a sequential filter, not a random gather
        if rows is None:
            is_id = is_first
        else:
            is_id = np.zeros(len(values), dtype=bool)
            is_id[rows[self.first]] = True
        ids = values.filter(pa.array(is_id)) if len(self.first) < len(values) else values
        self.ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
        self.width = width
        self._hashes = hs[start]  # sorted, one per group
        self._group_code = code_of_group
        return True

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Code of each value, -1 where it is not indexed (or null)."""
        if self._hashes is None:
            return _codes(values, self.ids)
        h, fit = _word_hash(values, self.width)
        pos = _sorted_search(self._hashes, h)
        pos[pos >= len(self._hashes)] = 0
        hit = fit & (self._hashes[pos] == h)
        codes = np.where(hit, self._group_code[pos], -1)
        # confirm every hash match on the strings themselves, a block at a time (no full copy of the ids)
        for a in range(0, len(codes), _VERIFY_BLOCK):
            block = codes[a:a + _VERIFY_BLOCK]
            same = pc.equal(values.slice(a, len(block)), self.ids.take(pa.array(np.maximum(block, 0))))
            block[~_mask(same)] = -1
        return codes


def plan_release(
    synsets: pa.Table,
    images: pa.Table,
    labels: pa.Table,
    policy: SplitPolicy,
    parent_splits: pd.DataFrame | None = None,
    *,
    neardup: bool = True,
    cross_duplicates: CrossDuplicates | None = None,
    near_pairs: pa.Table | None = None,
    first_urls: Callable[[np.ndarray], pa.Array] | None = None,
) -> Plan:
    """Decide the release: accepted labels of accepted images, one primary class per image, splits.

    `near_pairs` (image_id_a, image_id_b): the ingest stage's verified near-duplicate pairs, when they cover these
    images; train images paired with a val/test image are then dropped without searching (`cross_duplicates`, when
    given, searches instead). `first_urls(rows)`: the first_url of those images rows, when `images` lacks the column.
    """
    stats: dict[str, Any] = {"input_labels": labels.num_rows, "input_images": images.num_rows}
    ok_rows = np.nonzero(_mask(pc.and_(pc.equal(images["status"], "accepted"), pc.is_valid(images["image_id"]))))[0]
    index = IdIndex(images["image_id"], ok_rows)
    image_ids = index.ids
    image_row = ok_rows[index.first]
    if len(image_ids) < len(ok_rows):
        image_row = _smallest_url_rows(images, ok_rows, index, image_row, first_urls)
    wnids = pa.array(sorted(synsets["wnid"].to_pylist()), pa.string())
    n_cls = len(wnids)
    status = pc.value_counts(labels["status"]).to_pylist()
    stats["label_status"] = {d["values"]: int(d["counts"]) for d in sorted(status, key=lambda d: d["values"])}

    acc_rows = np.nonzero(_mask(pc.equal(labels["status"], "accepted")))[0]
    lab_img = index.lookup(labels["image_id"])[acc_rows]
    lab_cls = _codes(labels["wnid"], wnids)[acc_rows]
    stats["labels_without_image"] = int((lab_img < 0).sum())
    stats["labels_outside_vocabulary"] = int(((lab_img >= 0) & (lab_cls < 0)).sum())
    keep = (lab_img >= 0) & (lab_cls >= 0)
    rows, lab_img, lab_cls = acc_rows[keep], lab_img[keep], lab_cls[keep]
    conf = _col(labels, "confidence")[rows]

    # the primary class of an image: highest confidence, then smallest wnid; only multi-label images are sorted
    multi = np.bincount(lab_img, minlength=len(image_ids))[lab_img] > 1
    is_primary = ~multi
    m = np.nonzero(multi)[0]
    if len(m):
        order = m[np.lexsort((lab_cls[m], -conf[m], lab_img[m]))]
        is_primary[order[np.r_[True, lab_img[order][1:] != lab_img[order][:-1]]]] = True
    prim = np.nonzero(is_primary)[0]
    prim_img, prim_cls = lab_img[prim], lab_cls[prim]
    # keys of all distinct images at once: the ids are one contiguous array, no gather of strings needed
    key_by_code = split_keys(image_ids, policy.salt)
    keys = key_by_code[prim_img]

    parent_codes = np.full(len(prim), -1, dtype=np.int8)
    if parent_splits is not None and len(parent_splits):
        by_code = np.full(len(image_ids), -1, dtype=np.int8)
        pc_img = index.lookup(pa.array(parent_splits.image_id, pa.string()))
        psplit = parent_splits.split.map({s: k for k, s in enumerate(SPLITS)}).to_numpy()
        if pd.isna(psplit).any():
            raise ValueError(f"parent release has unknown split values; expected {SPLITS}")
        by_code[pc_img[pc_img >= 0]] = psplit[pc_img >= 0].astype(np.int8)
        parent_codes = by_code[prim_img]
    sizes = np.bincount(prim_cls, minlength=n_cls)
    quotas = np.stack([class_quotas(policy.val_per_class, sizes), class_quotas(policy.test_per_class, sizes)], axis=1)
    split = split_codes(prim_cls, keys, parent_codes, val_per_class=quotas[:, 0], test_per_class=quotas[:, 1])

    kept = np.ones(len(prim), dtype=bool)
    if neardup and near_pairs is not None and cross_duplicates is None:
        split_of = np.full(len(image_ids), -1, dtype=np.int64)
        split_of[prim_img] = split
        dropped = near_pair_drops(index.lookup(near_pairs["image_id_a"]), index.lookup(near_pairs["image_id_b"]),
                                  split_of)
        kept[np.isin(prim_img, dropped)] = False
        stats["neardup_source"] = "near_pairs"
    elif neardup:
        stats["neardup_source"] = "search"
        wide = [c for c in ("storage_key", "first_url") if c in images.column_names]
        slim = images.drop_columns(wide)
        train, held = split == TRAIN, split != TRAIN
        dropped_ids = train_near_duplicates_rows(slim, image_row[prim_img[train]], image_row[prim_img[held]],
                                                 cross_duplicates)
        if dropped_ids:
            dropped = index.lookup(pa.array(sorted(dropped_ids), pa.string()))
            kept[np.isin(prim_img, dropped[dropped >= 0])] = False
    n_dropped = int((~kept).sum())

    split_by_code = np.full(len(image_ids), -1, dtype=np.int8)
    split_by_code[prim_img[kept]] = split[kept]
    lab_split = split_by_code[lab_img]
    sel = np.nonzero(lab_split >= 0)[0]
    # output order: class, then salted key (independent of input row order; equal keys keep input order)
    sel = sel[class_then_key_order(lab_cls[sel], key_by_code[lab_img[sel]])]
    out = labels.select(["image_id", "wnid", "confidence", "n_votes", "n_yes", "method"]).take(pa.array(rows[sel]))
    out = out.append_column("split", pa.array(SPLITS, pa.string()).take(pa.array(lab_split[sel])))
    out = out.append_column("is_primary", pa.array(is_primary[sel]))
    out_labels = validate("release_labels", out)

    pk = np.nonzero(kept)[0]
    primary_class = np.full(len(image_ids), -1, dtype=np.int64)
    primary_class[prim_img[pk]] = prim_cls[pk]
    other = sel[~is_primary[sel]]
    counts = np.zeros((max(n_cls, 1), 3), dtype=np.int64)
    np.add.at(counts, (prim_cls[kept], split[kept].astype(np.int64)), 1)
    return Plan(
        image_rows=np.sort(image_row[prim_img[pk]]),  # input order: a sequential take is much cheaper
        labels=out_labels,
        image_ids=index,
        wnids=wnids,
        image_keys=key_by_code,
        primary_class=primary_class,
        other_pairs=np.unique(lab_img[other] * n_cls + lab_cls[other]),
        split_counts=counts,
        quotas=quotas.reshape(-1, 2),
        splits={s: int(counts[:, k].sum()) for k, s in enumerate(SPLITS)},
        neardup_dropped=n_dropped,
        kept_from_parent=int(((parent_codes >= 0) & kept).sum()),
        stats=stats,
    )


def _smallest_url_rows(images: pa.Table, ok_rows: np.ndarray, index: IdIndex, image_row: np.ndarray,
                       first_urls: Callable[[np.ndarray], pa.Array] | None) -> np.ndarray:
    """Several URLs resolve to one stored image: publish the row of its smallest URL, the one the ingest stage
    keeps `accepted` (an images table with superseded versions still holds the URL that lost that place with an
    older `accepted` status). Without URLs at hand, the first row."""
    if "first_url" in images.column_names:
        def first_urls(rows: np.ndarray) -> pa.Array:
            return images["first_url"].take(pa.array(rows))
    if first_urls is None:
        return image_row
    counts = np.bincount(index.codes, minlength=len(index.ids))
    multi = counts[index.codes] > 1
    rows, codes = ok_rows[multi], index.codes[multi]
    urls = np.asarray(pc.fill_null(first_urls(rows), "").to_numpy(zero_copy_only=False), dtype=object)
    order = np.lexsort((urls.astype(str), codes))
    first = order[np.r_[True, codes[order][1:] != codes[order][:-1]]]
    image_row = image_row.copy()
    image_row[codes[first]] = rows[first]
    return image_row


def select_boxes(boxes: pa.Table, plan: Plan) -> tuple[pa.Table, int]:
    """Accepted boxes of released (image, wnid) pairs, in (class, image key) order; plus how many input
    boxes were not accepted."""
    accepted = _mask(pc.equal(boxes["verified"], "accepted"))
    b_img = plan.image_ids.lookup(boxes["image_id"])
    b_cls = _codes(boxes["wnid"], plan.wnids)
    known = (b_img >= 0) & (b_cls >= 0)
    released = known & (plan.primary_class[np.maximum(b_img, 0)] == b_cls)
    if len(plan.other_pairs):  # boxes of an image's other released labels
        rest = np.nonzero(known & ~released)[0]
        released[rest] = np.isin(b_img[rest] * len(plan.wnids) + b_cls[rest], plan.other_pairs)
    rows = np.nonzero(accepted & released)[0]
    rows = rows[class_then_key_order(b_cls[rows], plan.image_keys[b_img[rows]])]
    return boxes.take(pa.array(rows)), int((~accepted).sum())


def sorted_synsets(synsets: pa.Table) -> pa.Table:
    return synsets.take(pc.sort_indices(synsets, [("wnid", "ascending")]))


def class_counts(plan: Plan, boxes: pa.Table) -> dict[str, dict[str, int]]:
    box_cls = _codes(boxes["wnid"], plan.wnids)
    per_box = np.bincount(box_cls[box_cls >= 0], minlength=len(plan.wnids))
    return {w: {"train": int(plan.split_counts[k, 0]), "val": int(plan.split_counts[k, 1]),
                "test": int(plan.split_counts[k, 2]), "boxes": int(per_box[k])}
            for k, w in enumerate(plan.wnids.to_pylist())}


def class_splits(plan: Plan, synsets: pa.Table) -> pd.DataFrame:
    """Per class (wnid order): wnid, synset name, train / val / test images, total, and the val / test quotas
    asked of it."""
    names = dict(zip(synsets.column("wnid").to_pylist(), synsets.column("name").to_pylist(), strict=True))
    wnids = plan.wnids.to_pylist()
    n = len(wnids)
    counts, quotas = plan.split_counts[:n], plan.quotas[:n]
    df = pd.DataFrame({"wnid": wnids, "name": [names.get(w) or "" for w in wnids],
                       "train": counts[:, 0], "val": counts[:, 1], "test": counts[:, 2]})
    df["images"] = df.train + df.val + df.test
    df["val_quota"], df["test_quota"] = quotas[:, 0], quotas[:, 1]
    return df


def _quota_text(q: Quota) -> str:
    return f"{q:g} of each class's images" if isinstance(q, float) else str(q)


def check_splits(classes: pd.DataFrame, policy: SplitPolicy, *, force: bool = False, what: str = "the release"
                 ) -> list[dict[str, Any]]:
    """Classes (from `class_splits`) left without a train or a val image, as dicts. Raises ReleaseTooSmall,
    naming them and what to change, unless `force`."""
    bad = classes[(classes.train == 0) | (classes.val == 0)]
    found = [{"wnid": r.wnid, "name": r.name, "train": int(r.train), "val": int(r.val), "test": int(r.test)}
             for r in bad.itertuples()]
    if not found or force:
        return found
    listed = "; ".join(f"{r['wnid']} {r['name']}: {r['train']} train, {r['val']} val, {r['test']} test"
                       for r in found[:20]) + (f"; and {len(found) - 20} more" if len(found) > 20 else "")
    fixes = []
    empty = int((bad.images == 0).sum())
    if empty:
        fixes.append(f"{empty} of them have no accepted image at all: get images of them accepted (collect, verify) "
                     "or leave them out of the vocabulary (vocabulary.exclude).")
    if ((bad.images > 0) & (bad.val == 0) & (bad.val_quota == 0)).any():
        fixes.append(f"The setting release.val_per_class is {_quota_text(policy.val_per_class)}, which gives these "
                     "classes no val image: raise it (e.g. 1, or a fraction such as 0.1).")
    if ((bad.images > 0) & (bad.train == 0)).any():
        fixes.append(f"Val and test take all their images (release.val_per_class {_quota_text(policy.val_per_class)}"
                     f", release.test_per_class {_quota_text(policy.test_per_class)}): lower them or use fractions "
                     "(e.g. 0.1 and 0.1), or get more of their images accepted.")
    raise ReleaseTooSmall(
        f"{what} would leave {len(found)} of {len(classes)} classes without a train or a val image: {listed}. "
        + " ".join(fixes)
        + " `synsetforge release plan` shows the counts per class; `release build --force` builds it anyway.",
        found)


def qc_methods(labels: pa.Table) -> list[str]:
    """Distinct labels.method values (the QC methods that accepted the released labels), sorted."""
    return sorted(m for m in pc.unique(labels["method"]).to_pylist() if m is not None)


def _combine(base: pa.Table, extra: pa.Table | None) -> pa.Table:
    """`base` with the columns of `extra` (same rows) replacing or added to its own."""
    if extra is None:
        return base
    for name in extra.column_names:
        i = base.schema.get_field_index(name)
        col = extra.column(name)
        base = base.set_column(i, name, col) if i >= 0 else base.append_column(name, col)
    return base


def _fill_nullable(name: str, table: pa.Table) -> pa.Table:
    """`table` with null columns for the nullable schema columns it lacks (an input written before the column
    existed), and without the columns schema `name` does not have."""
    schema = arrow_schema(name)
    table = table.select([c for c in table.column_names if c in schema.names])
    for f in schema:
        if f.name not in table.column_names and f.nullable:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    return table


def image_extra(first_urls: pa.Array | pa.ChunkedArray, candidates: Any, roots: Sequence[str] = ()) -> pa.Table:
    """The release images columns that do not come from the images table, aligned with `first_urls`: the
    portable first_url (no absolute local path) and the candidate record's attribution."""
    urls = first_urls.combine_chunks() if isinstance(first_urls, pa.ChunkedArray) else first_urls
    attribution = attribution_for(urls, candidates, roots) if candidates is not None else empty_attribution(len(urls))
    return _combine(pa.table({"first_url": portable_urls(urls, roots)}), attribution)


def release_images(images: pa.Table, rows: np.ndarray, candidates: Any = None, roots: Sequence[str] = ()
                   ) -> pa.Table:
    """The release images table: rows `rows` of the images table plus `image_extra` (in memory)."""
    sel = images.take(pa.array(rows, pa.int64()))
    return validate("release_images", _fill_nullable("release_images",
                                                     _combine(sel, image_extra(sel["first_url"], candidates, roots))))


def _attribution_stats(extra: pa.Table, have_candidates: bool) -> dict[str, Any]:
    return {"candidates_table": have_candidates,
            "images_with_license": int(pc.count(extra["license"]).as_py()),
            "images_with_creator": int(pc.count(extra["creator"]).as_py())}


def _candidate_batches(candidates: pa.Table | None) -> list[pa.Table] | None:
    return None if candidates is None else [candidates]


def assemble(
    inputs: Inputs,
    policy: SplitPolicy,
    parent_splits: pd.DataFrame | None = None,
    *,
    neardup: bool = True,
    cross_duplicates: CrossDuplicates | None = None,
    roots: Sequence[str] = (),
    plan: Plan | None = None,
) -> Assembled:
    """The release tables from in-memory input tables (the pure core; build_release stages the same steps
    so that only about one big table is in memory at a time). `plan`: one already made from these inputs."""
    if plan is None:
        plan = plan_release(inputs.synsets, inputs.images, inputs.labels, policy, parent_splits, neardup=neardup,
                            cross_duplicates=cross_duplicates)
    boxes_in = inputs.boxes if inputs.boxes is not None else empty_table("boxes")
    boxes, not_accepted = select_boxes(boxes_in, plan)
    images = release_images(inputs.images, plan.image_rows, _candidate_batches(inputs.candidates), roots)
    return Assembled(
        tables={"synsets": sorted_synsets(inputs.synsets), "images": images, "labels": plan.labels, "boxes": boxes},
        splits=plan.splits, classes=class_counts(plan, boxes),
        neardup_dropped=plan.neardup_dropped, kept_from_parent=plan.kept_from_parent,
        stats={**plan.stats, "boxes_not_accepted": not_accepted, "boxes_table": inputs.boxes is not None,
               **_attribution_stats(images, inputs.candidates is not None)},
        qc_methods=qc_methods(plan.labels),
    )


def code_version() -> str:
    """Package version plus the git commit of the working tree, read from .git without running git."""
    from pipeline import __version__

    root = Path(__file__).resolve().parents[2] / ".git"
    commit = ""
    try:
        head = (root / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            ref_file = root / ref
            if ref_file.exists():
                commit = ref_file.read_text().strip()
            elif (root / "packed-refs").exists():
                for line in (root / "packed-refs").read_text().splitlines():
                    if line.endswith(" " + ref):
                        commit = line.split()[0]
        else:
            commit = head
    except OSError:
        pass
    return f"synsetforge {__version__}" + (f"+g{commit[:12]}" if commit else "")


ROW_GROUP = 1 << 20  # pyarrow's default row group size

# finish(piece, start, stop): the piece of rows rows[start:stop] as it is written (extra columns joined)
Finish = Callable[[pa.Table, int, int], pa.Table]


def _parquet_bytes(table: pa.Table, rows: np.ndarray | None = None, finish: Finish | None = None,
                   schema: pa.Schema | None = None) -> tuple[pa.Buffer, int]:
    """Parquet (zstd) of `table`, or of its `rows` in that order, taken one row group at a time so the
    selected copy never exists in full."""
    sink = pa.BufferOutputStream()
    if rows is None:
        pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP)
        return sink.getvalue(), table.num_rows
    with pq.ParquetWriter(sink, schema or table.schema, compression="zstd") as writer:
        _write_rows(writer, table, rows, finish)
    return sink.getvalue(), len(rows)


def _write_rows(writer: pq.ParquetWriter, table: pa.Table, rows: np.ndarray, finish: Finish | None = None) -> None:
    """Write `table` rows `rows` (ascending) one row group at a time: long runs of consecutive rows are
    zero-copy slices, scattered rows are taken. `finish` turns each piece into what is written."""
    fin = finish or (lambda piece, start, stop: piece)
    if not len(rows):
        writer.write_table(fin(table.slice(0, 0), 0, 0))
        return
    breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
    starts, ends = np.r_[0, breaks], np.r_[breaks, len(rows)]
    if len(rows) / len(starts) < 64:  # short runs: a gather per row group is cheaper than many slices
        for start in range(0, len(rows), ROW_GROUP):
            stop = min(start + ROW_GROUP, len(rows))
            writer.write_table(fin(table.take(pa.array(rows[start:stop])), start, stop), row_group_size=ROW_GROUP)
        return
    pieces: list[pa.Table] = []
    n = done = 0
    for a, b in zip(starts, ends, strict=True):
        pieces.append(table.slice(int(rows[a]), int(b - a)))
        n += int(b - a)
        if n >= ROW_GROUP:
            writer.write_table(fin(pa.concat_tables(pieces), done, done + n), row_group_size=ROW_GROUP)
            done += n
            pieces, n = [], 0
    if pieces:
        writer.write_table(fin(pa.concat_tables(pieces), done, done + n), row_group_size=ROW_GROUP)


class _Publisher:
    """Writes a release's data files and collects their manifest entries.

    Local store with background=True: each `put` returns at once, and one worker thread encodes the tables
    into hidden temp files in the order they were put, hashes them (sha256), fsyncs them and links each to
    its content name, while the caller reads and filters the next table (Parquet encoding, sha256 and
    fsync all release the GIL). A file gets its final name only once it is durable, and `entries()` waits
    for all of them (re-raising any error), so the manifest, written after it, still comes last.
    """

    def __init__(self, store: Store, prefix: str, *, background: bool = True):
        self.store, self.prefix = store, prefix
        self.local = isinstance(store, LocalStore)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="release-write") if self.local and background else None
        self._pending: dict[str, Any] = {}

    def __enter__(self) -> _Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # a failed build still removes its temp files

    def put(self, name: str, table: pa.Table, rows: np.ndarray | None = None, extra: pa.Table | None = None) -> None:
        """Publish `table` (its `rows`, if given) as release table `name`. `extra`: columns aligned with
        `rows` that replace or join the table's own, one row group at a time."""
        schema_name = RELEASE_TABLES[name]
        finish: Finish | None = None
        if extra is None or rows is None:
            # in the caller: a schema error surfaces where it happens
            table = validate(schema_name, _fill_nullable(schema_name, _combine(table, extra)))
        else:
            if len(extra) != len(rows):
                raise ValueError(f"{name}: {len(extra)} extra rows for {len(rows)} rows")
            validate(schema_name, _fill_nullable(schema_name, _combine(table.slice(0, 0), extra.slice(0, 0))))

            def finish(piece: pa.Table, start: int, stop: int) -> pa.Table:
                return validate(schema_name, _fill_nullable(schema_name, _combine(piece, extra.slice(start, stop - start))))
        if self._pool is None:
            self._pending[name] = self._write(name, table, rows, finish)
        else:
            self._pending[name] = self._pool.submit(self._write, name, table, rows, finish)

    def _write(self, name: str, table: pa.Table, rows: np.ndarray | None, finish: Finish | None) -> dict[str, Any]:
        facts = {"schema": RELEASE_TABLES[name], "schema_version": schema_version(RELEASE_TABLES[name])}
        schema = arrow_schema(RELEASE_TABLES[name])
        if not self.local:
            return {**_put_remote_file(self.store, self.prefix, name, table, rows, finish, schema), **facts}
        return {**_put_local_file(self.store, self.prefix, name, table, rows, finish, schema), **facts}

    def entries(self) -> dict[str, dict[str, Any]]:
        """Manifest entries of every file put, once each is durable under its content name."""
        return {name: p.result() if isinstance(p, Future) else p for name, p in self._pending.items()}


def _put_remote_file(store: Store, prefix: str, name: str, table: pa.Table, rows: np.ndarray | None,
                     finish: Finish | None = None, schema: pa.Schema | None = None) -> dict[str, Any]:
    buf, n_rows = _parquet_bytes(table, rows, finish, schema)
    digest = hashlib.sha256(memoryview(buf)).hexdigest()
    rel = f"data/{name}-{digest[:16]}.parquet"
    key = f"{prefix}/{rel}"
    if not store.exists(key):  # same name = same content: a resumed build skips it
        try:
            store.put(key, buf.to_pybytes(), exclusive=True)
        except KeyExists:
            pass  # a concurrent builder wrote the same content
    return {"key": rel, "sha256": digest, "n_bytes": buf.size, "rows": n_rows}


def _put_local_file(store: LocalStore, prefix: str, name: str, table: pa.Table, rows: np.ndarray | None,
                    finish: Finish | None = None, schema: pa.Schema | None = None) -> dict[str, Any]:
    """Local backend: stream the Parquet into a hidden temp file, hash it, then link it to its content name
    (the same atomic, exclusive create LocalStore.put does, without holding the file in memory)."""
    entry = _finish_local_file(store, prefix, name, _write_local_tmp(store, prefix, table, rows, finish, schema))
    return {**entry, "rows": table.num_rows if rows is None else len(rows)}


def _write_local_tmp(store: LocalStore, prefix: str, table: pa.Table, rows: np.ndarray | None,
                     finish: Finish | None = None, schema: pa.Schema | None = None) -> str:
    """Parquet (zstd) of `table` (or of its `rows`) streamed into a hidden temp file in the release's data
    folder; returns its path."""
    folder = store.path(f"{prefix}/data/x").parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".parquet")
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, schema if rows is not None and schema is not None else table.schema,
                              compression="zstd") as writer:
            if rows is None:
                writer.write_table(table, row_group_size=ROW_GROUP)
            else:
                _write_rows(writer, table, rows, finish)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _finish_local_file(store: LocalStore, prefix: str, name: str, tmp: str) -> dict[str, Any]:
    """Hash and fsync a written temp file, link it to its content name (exclusive, atomic), remove the temp.

    Hashing reads the file back from the page cache: measured no slower than hashing inside the Parquet
    writer's write calls (a Python callback per page), and it keeps the encoder in C++ only."""
    try:
        h = hashlib.sha256()
        with open(tmp, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
            os.fsync(fh.fileno())
        digest = h.hexdigest()
        rel = f"data/{name}-{digest[:16]}.parquet"
        n_bytes = os.path.getsize(tmp)
        try:
            os.link(tmp, store.path(f"{prefix}/{rel}"))
        except FileExistsError:
            pass  # same name = same content (a resumed or concurrent build)
    finally:
        os.unlink(tmp)
    return {"key": rel, "sha256": digest, "n_bytes": n_bytes}


@dataclass
class _Pin:
    """One state of an input table, so that several reads of it see the same rows: a legacy single-file table
    opened once (local), or a working table's version (any store: reads go through it, column by column)."""

    file: pa.NativeFile | None = None
    version: int | None = None


def _pin(store: Store, name: str) -> _Pin:
    if isinstance(store, LocalStore) and store.exists(f"tables/{name}.parquet"):
        return _Pin(file=pa.OSFile(str(store.path(f"tables/{name}.parquet"))))  # not mmap: mapped pages count as RSS
    return _Pin(version=store.table_version(name) if store.has_table(name) else None)


def _read_input(store: Store, name: str, columns: list[str] | None = None, *, have: pa.Table | None = None,
                source: _Pin | pa.NativeFile | None = None) -> pa.Table:
    """An input table, validated; with `columns` only those (row positions are the same as in the full table).
    `have`: columns already read from the same table, reused instead of read and decoded again. `source`: the
    table pinned once (`_pin`) for several reads (they then see the same rows even if the table changes in
    between). Working tables are read through the store with column selection, so only the columns asked for
    are fetched (from a folder or from S3 alike)."""
    pin = source if isinstance(source, _Pin) else _Pin(file=source) if source is not None else _pin(store, name)
    if pin.file is not None:
        if columns is not None:
            return pq.read_table(pin.file, columns=columns)
        if have is None:
            return validate(name, pq.read_table(pin.file))
        names = pq.read_schema(pin.file).names
        rest = pq.read_table(pin.file, columns=[c for c in names if c not in have.column_names])
        return validate(name, pa.Table.from_arrays(
            [have.column(c) if c in have.column_names else rest.column(c) for c in names], names=names))
    if have is None:
        return store.read_table(name, columns=columns, version=pin.version)
    names = arrow_schema(name).names
    rest = store.read_table(name, columns=[c for c in names if c not in have.column_names], version=pin.version)
    return validate(name, pa.Table.from_arrays(
        [have.column(c) if c in have.column_names else rest.column(c) for c in names], names=names))


def _input_batches(store: Store, name: str, columns: list[str]) -> Any:
    """Batches of `columns` of an input table, or None without the table. Local single-file table: a row group
    at a time (only what the caller keeps of each batch stays in memory); a working table: only those columns,
    read through the store."""
    if not store.has_table(name):
        return None
    if isinstance(store, LocalStore) and store.exists(f"tables/{name}.parquet"):
        return pq.ParquetFile(str(store.path(f"tables/{name}.parquet"))).iter_batches(batch_size=1 << 20,
                                                                                      columns=columns)
    return store.read_table(name, columns=columns).to_batches(max_chunksize=1 << 20)


def _read_optional(store: Store, name: str) -> pa.Table | None:
    return store.read_table(name) if store.has_table(name) else None


CANDIDATE_COLUMNS = ["url", "wnid", "rank", *ATTRIBUTION_COLUMNS]


def read_inputs(store: Store) -> Inputs:
    """The input tables in memory (boxes and candidates are optional: None when absent)."""
    return Inputs(**{name: store.read_table(name) for name in ("synsets", "images", "labels")},
                  boxes=_read_optional(store, "boxes"), candidates=_read_optional(store, "candidates"))


def parent_splits(store: Store, parent: str) -> pd.DataFrame:
    labels = read_release_table(store, parent, "labels")
    primary = labels.filter(labels["is_primary"]).select(["image_id", "split"])
    df = pd.DataFrame({"image_id": _col(primary, "image_id"), "split": _col(primary, "split")})
    return _with_hidden_test(store, parent, df)


def _return_freed_memory() -> None:
    """Hand memory freed by the previous stage back to the OS before the next big table is read: glibc keeps
    freed numpy temporaries in its heap and arenas (measured: peak RSS 1.31 GB -> 1.12 GB at 1.3M images)."""
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


@dataclass
class ReleasePlan:
    """What a build would publish, decided and not written: per-class splits (`class_splits`), totals, the
    classes left without a train or val image, and the QC methods of the labels it would release."""

    classes: pd.DataFrame
    splits: dict[str, int]
    neardup_dropped: int
    kept_from_parent: int
    short_classes: list[dict[str, Any]]
    qc_methods: list[str]
    policy: SplitPolicy


def _decide(store: Store, policy: SplitPolicy, parent_df: pd.DataFrame | None, *, neardup: bool,
            cross_duplicates: CrossDuplicates | None) -> tuple[pa.Table, pa.Table, _Pin, Plan]:
    """Read what the decision needs and make it: (sorted synsets, narrow images, the pinned images table, plan)."""
    synsets = sorted_synsets(_read_input(store, "synsets"))
    images_pin = _pin(store, "images")  # every image read below sees the same rows
    near = _stored_near_pairs(store, images_pin) if neardup and cross_duplicates is None else None
    # deciding needs only a few image columns (ids, status; fingerprints when the near-duplicate check must search);
    # the other columns are read afterwards, when labels and their temporaries are gone
    wide = {"storage_key", "first_url", "format", "reject_reason", "width", "height", "n_bytes", "fetched_at"}
    search = neardup and near is None
    cols = [c for c in arrow_schema("images").names if c not in wide] if search else ["image_id", "status"]
    narrow = _read_input(store, "images", cols, source=images_pin)

    def first_urls(rows: np.ndarray) -> pa.Array:
        return _read_input(store, "images", ["first_url"], source=images_pin)["first_url"].take(pa.array(rows))

    plan = plan_release(synsets, narrow, _read_input(store, "labels"), policy, parent_df, neardup=neardup,
                        cross_duplicates=cross_duplicates, near_pairs=near, first_urls=first_urls)
    return synsets, narrow, images_pin, plan


def _stored_near_pairs(store: Store, images: _Pin) -> pa.Table | None:
    """The ingest stage's near_pairs when they cover exactly this state of the images table (so the leakage check
    needs no search), else None."""
    if images.file is not None or images.version is None:
        return None
    try:
        from pipeline.ingest.stage import near_pairs_covering
    except ImportError:  # the ingest stage is not in this build: search
        return None
    return near_pairs_covering(store, images.version)


def plan_from_store(
    store: Store,
    *,
    parent: str | None = None,
    val_per_class: Quota = 50,
    test_per_class: Quota = 100,
    salt: str = "synsetforge",
    neardup: bool = True,
    cross_duplicates: CrossDuplicates | None = None,
    fresh_test: bool = False,
) -> ReleasePlan:
    """The split a build with these options would make, per class; writes nothing."""
    policy = SplitPolicy(val_per_class, test_per_class, salt)
    if parent is not None:
        read_manifest(store, parent)
    parent_df = parent_splits(store, parent) if parent else None
    if fresh_test:
        parent_df = fresh_test_splits(parent_df, published_labels(store))
    synsets, _, _, plan = _decide(store, policy, parent_df, neardup=neardup, cross_duplicates=cross_duplicates)
    classes = class_splits(plan, synsets)
    return ReleasePlan(classes, plan.splits, plan.neardup_dropped, plan.kept_from_parent,
                       check_splits(classes, policy, force=True), qc_methods(plan.labels), policy)


def _build_files(
    store: Store,
    pub: _Publisher,
    policy: SplitPolicy,
    parent_df: pd.DataFrame | None,
    *,
    neardup: bool,
    cross_duplicates: CrossDuplicates | None,
    inputs: Inputs | None,
    roots: Sequence[str],
    force: bool,
    what: str,
    guard: Callable[[pa.Table], None] | None = None,
) -> Assembled:
    """Decide the release, refuse it if a class would lack train or val images (unless `force`) or if `guard`
    refuses its labels (`HiddenLabelGuard`), and put its four data files; returns everything but the tables."""
    if inputs is not None:
        plan = plan_release(inputs.synsets, inputs.images, inputs.labels, policy, parent_df, neardup=neardup,
                            cross_duplicates=cross_duplicates)
        short = check_splits(class_splits(plan, inputs.synsets), policy, force=force, what=what)
        if guard is not None:
            guard(plan.labels)
        a = assemble(inputs, policy, plan=plan, roots=roots)
        for name in ("synsets", "images", "labels", "boxes"):
            pub.put(name, a.tables.pop(name))
        a.stats["short_classes"] = short
        return a
    # staged: each big table is read, filtered, written and released before the next one is read
    synsets, narrow, images_pin, plan = _decide(store, policy, parent_df, neardup=neardup,
                                                cross_duplicates=cross_duplicates)
    short = check_splits(class_splits(plan, synsets), policy, force=force, what=what)  # before any write
    if guard is not None:
        guard(plan.labels)
    methods = qc_methods(plan.labels)
    pub.put("labels", plan.labels)  # written in the background while boxes are read and filtered
    plan.labels = None
    _return_freed_memory()
    have_boxes = store.has_table("boxes")
    boxes, not_accepted = select_boxes(_read_input(store, "boxes") if have_boxes else empty_table("boxes"), plan)
    pub.put("boxes", boxes)
    classes = class_counts(plan, boxes)
    del boxes
    plan.image_ids = plan.image_keys = plan.primary_class = plan.other_pairs = None  # only image_rows is needed now
    _return_freed_memory()
    # attribution: the released rows' first URLs, matched against the candidates a row group at a time
    first_urls = _read_input(store, "images", ["first_url"], source=images_pin)["first_url"].take(
        pa.array(plan.image_rows))
    have_candidates = store.has_table("candidates")
    extra = image_extra(first_urls, _input_batches(store, "candidates", CANDIDATE_COLUMNS), roots)
    del first_urls
    images = _read_input(store, "images", have=narrow, source=images_pin)  # the plan's columns are not re-read
    del narrow, images_pin
    pub.put("images", images, rows=plan.image_rows, extra=extra)
    del images
    pub.put("synsets", synsets)
    stats = {**plan.stats, "boxes_not_accepted": not_accepted, "boxes_table": have_boxes,
             **_attribution_stats(extra, have_candidates), "short_classes": short}
    return Assembled({}, plan.splits, classes, plan.neardup_dropped, plan.kept_from_parent, stats, methods)


def collect_roots(store: Store, extra: Sequence[str] = ()) -> list[str]:
    """Local folders that file:// candidates are written relative to: `extra` (e.g. collect.local_dir) and the
    roots the collect runs recorded in the store, as absolute paths."""
    roots = [str(r) for r in extra if r]
    try:
        from pipeline.sources.collect import recorded_roots
    except ImportError:  # the collect stage is not in this build: only the roots given
        recorded: list[str] = []
    else:
        recorded = recorded_roots(store)["local_dir"]
    out = []
    for r in (*roots, *recorded):
        path = r[7:] if r.startswith("file://") else r
        out.append(str(Path(path).expanduser().resolve()))
    return list(dict.fromkeys(out))


def build_release(
    store: Store,
    version: str,
    *,
    parent: str | None = None,
    val_per_class: Quota = 50,
    test_per_class: Quota = 100,
    salt: str = "synsetforge",
    config_digest: str | None = None,
    created_at: datetime | None = None,
    neardup: bool = True,
    cross_duplicates: CrossDuplicates | None = None,
    inputs: Inputs | None = None,
    local_roots: Sequence[str] = (),
    force: bool = False,
    challenge: bool = False,
    fresh_test: bool = False,
) -> dict[str, Any]:
    """Build release `version` from the store's tables and publish it; return its manifest.

    `challenge`: keep every test label out of the public release (`HiddenTestPublisher` below). Any build is
    refused (HiddenLabelLeak, nothing written) when it would publish a label that a challenge release of the
    store hides, and a challenge build when it would hide as test images ones whose labels a release of the
    store already published (`HiddenLabelGuard`). `fresh_test` (challenge builds): draw test images only from
    images no release of the store has published with a label (`fresh_test_splits`).

    Quotas are counts or fractions in (0, 1) of each class's images. `local_roots`: collect roots that local
    file URLs are written relative to (else as file names). Raises ReleaseExists if the version is already
    published, ReleaseTooSmall if a class would have no train or no val image and not `force` (nothing is
    written then).
    """
    prefix = release_prefix(version)
    if release_exists(store, version):
        raise ReleaseExists(f"release {version!r} already exists in {store.url}; releases are immutable, "
                            "choose a new version (and pass --parent to keep splits stable)")
    if parent is not None:
        if parent == version:
            raise ReleaseError(f"release {version!r} cannot be its own parent")
        read_manifest(store, parent)  # clear error when the parent does not exist
    if fresh_test and not challenge:
        raise ReleaseInputError("fresh_test (--fresh-test) is for challenge builds (--challenge): only their test "
                                "images are hidden")
    policy = SplitPolicy(val_per_class, test_per_class, salt)
    parent_df = parent_splits(store, parent) if parent else None
    guard = HiddenLabelGuard(store, version, challenge=challenge)
    if fresh_test:
        parent_df = fresh_test_splits(parent_df, guard.published)
    with _Publisher(store, prefix) as pub:
        out = HiddenTestPublisher(pub, store, version) if challenge else pub
        a = _build_files(store, out, policy, parent_df, neardup=neardup, cross_duplicates=cross_duplicates,
                         inputs=inputs, roots=collect_roots(store, local_roots), force=force,
                         what=f"release {version!r}", guard=guard)
        files = out.entries()
    files = {k: files[k] for k in RELEASE_TABLES if k in files}
    if challenge:
        a.stats["challenge"] = {**out.stats, "fresh_test": fresh_test}
    splits, classes, dropped, kept, stats = a.splits, a.classes, a.neardup_dropped, a.kept_from_parent, a.stats
    created = (created_at or datetime.now(UTC)).astimezone(UTC)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "version": version,
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "parent": parent,
        "code_version": code_version(),
        "config_digest": config_digest or hashlib.sha256(json.dumps(policy.__dict__, sort_keys=True).encode()).hexdigest(),
        "files": files,
        "splits": splits,
        "classes": classes,
        "neardup_dropped": dropped,
        "qc_methods": a.qc_methods,
        "split_policy": {**policy.__dict__, "kept_from_parent": kept},
        "stats": {**stats, "neardup_checked": neardup},
    }
    validate_manifest(manifest)
    try:
        store.put(manifest_key(version), json.dumps(manifest, indent=1, sort_keys=True).encode(), exclusive=True)
    except KeyExists:
        raise ReleaseExists(f"release {version!r} was published by another build while this one ran; "
                            "nothing was overwritten") from None
    return manifest


# ------------------------------------------------------------------------------------------------------------
# Challenge builds: hidden test labels (`release build --challenge`, `build_release(..., challenge=True)`).
#
# The decision is the same as any build's; only what is published differs. Every test image's labels, boxes and
# identifying facts (URL, page, title, source) go under private/releases/<version>/ (content-addressed Parquet
# files and a private manifest, written before the public manifest), which only the challenge server reads and
# `release publish` never copies. The public release keeps train and val as usual and lists the test images in
# its `test_images` table, sorted by image_id, with devkit file names and nothing that names a class. The public
# manifest says where the private manifest is (stats.challenge), so the server can check its sha256.

PRIVATE_PREFIX = "private"
TEST_IMAGE_COLUMNS = ["image_id", "width", "height", "format", "n_bytes", "storage_key", "creator", "license",
                      "license_url"]


def private_release_prefix(version: str) -> str:
    """Where a challenge release keeps its test labels: private/releases/<version>."""
    return f"{PRIVATE_PREFIX}/{release_prefix(version)}"


def test_file_stem(version: str, position: int) -> str:
    """Devkit name of the test image at 1-based `position` (the export's naming)."""
    return f"{version}_test_{position:08d}"


def _put_private(store: Store, key: str, data: bytes) -> dict[str, Any]:
    if not store.exists(key):  # content-addressed: same key, same bytes (a resumed build)
        try:
            store.put(key, data, exclusive=True)
        except KeyExists:
            pass
    return {"key": key, "sha256": hashlib.sha256(data).hexdigest(), "n_bytes": len(data)}


class HiddenTestPublisher:
    """A `_Publisher` in front of which the test split is taken out of labels, boxes and images.

    Labels are put before boxes and images in a staged build, but after them for in-memory inputs: a table
    that arrives before the labels waits until they have said which images are test images."""

    def __init__(self, pub: _Publisher, store: Store, version: str):
        self.pub, self.store, self.version = pub, store, version
        self.test_ids: pa.Array | None = None
        self._waiting: list[tuple[str, pa.Table, np.ndarray | None, pa.Table | None]] = []
        self._private: dict[str, pa.Table] = {}
        self.stats: dict[str, Any] = {}

    def put(self, name: str, table: pa.Table, rows: np.ndarray | None = None, extra: pa.Table | None = None) -> None:
        if name == "labels":
            test = _mask(pc.equal(table["split"], "test"))
            self._private["test_labels"] = table.filter(pa.array(test))
            self.test_ids = pc.unique(self._private["test_labels"]["image_id"])
            self.pub.put("labels", table.filter(pa.array(~test)))
            waiting, self._waiting = self._waiting, []
            for args in waiting:
                self.put(*args)
        elif name in ("boxes", "images") and self.test_ids is None:
            self._waiting.append((name, table, rows, extra))
        elif name == "boxes":
            test = _mask(pc.is_in(table["image_id"], value_set=self.test_ids))
            self._private["test_boxes"] = table.filter(pa.array(test))
            self.pub.put("boxes", table.filter(pa.array(~test)))
        elif name == "images":
            ids = table["image_id"] if rows is None else table["image_id"].take(pa.array(rows))
            test = _mask(pc.is_in(ids, value_set=self.test_ids))
            if rows is None:
                self._private["test_images"] = table.filter(pa.array(test))
                self.pub.put("images", table.filter(pa.array(~test)))
            else:
                full = _combine(table.take(pa.array(rows[test])), extra.filter(pa.array(test)) if extra else None)
                self._private["test_images"] = validate("release_images", _fill_nullable("release_images", full))
                self.pub.put("images", table, rows=rows[~test],
                             extra=extra.filter(pa.array(~test)) if extra is not None else None)
        else:
            self.pub.put(name, table, rows, extra)

    def entries(self) -> dict[str, dict[str, Any]]:
        """Put the public test listing, write the private files and their manifest, then wait for the public
        files (as `_Publisher.entries`)."""
        if self._waiting or set(self._private) != {"test_labels", "test_boxes", "test_images"}:
            raise ReleaseError("challenge build: labels, boxes and images must all be put before entries()")
        images = self._private["test_images"]
        images = images.take(pc.sort_indices(images, [("image_id", "ascending")]))
        self._private["test_images"] = images
        listing = images.select(TEST_IMAGE_COLUMNS)
        files = pa.array([test_file_stem(self.version, k + 1) for k in range(listing.num_rows)], pa.string())
        self.pub.put("test_images", listing.add_column(1, "file", files))
        prefix = private_release_prefix(self.version)
        entries = {}
        for name, table in sorted(self._private.items()):
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd")
            data = sink.getvalue().to_pybytes()
            digest = hashlib.sha256(data).hexdigest()
            entries[name] = {**_put_private(self.store, f"{prefix}/data/{name}-{digest[:16]}.parquet", data),
                             "rows": table.num_rows}
        doc = json.dumps({"version": self.version, "files": entries}, indent=1, sort_keys=True).encode()
        digest = hashlib.sha256(doc).hexdigest()
        manifest = _put_private(self.store, f"{prefix}/manifest-{digest[:16]}.json", doc)
        self.stats = {"hidden_test_labels": True, "private_manifest": manifest["key"],
                      "private_manifest_sha256": manifest["sha256"], "test_images": images.num_rows}
        return self.pub.entries()


def _with_hidden_test(store: Store, version: str, df: pd.DataFrame) -> pd.DataFrame:
    """Parent splits plus a challenge parent's test images (listed without labels): they stay test images."""
    manifest = read_manifest(store, version)
    if "test_images" not in manifest["files"]:
        return df
    ids = read_release_table(store, version, "test_images", manifest=manifest).column("image_id").to_pylist()
    return pd.concat([df, pd.DataFrame({"image_id": ids, "split": ["test"] * len(ids)})], ignore_index=True)


# ------------------------------------------------------------------------------------------------------------
# No test label is ever published (ILSVRC never released its test labels, in any year's release). A store can
# hold open releases (every label public) and challenge releases (test labels under private/). Two rules keep a
# challenge's test labels out of every public file of the store, whatever order the releases are built in:
#   1. a challenge build refuses to hide, as test images, images whose labels (or boxes, or DET labels) some
#      release of the store already published: their labels are public, the challenge would not be blind;
#   2. every build refuses to publish a label of an image that a challenge release of the store hides.
# A challenge built on an open parent therefore needs test images the parent never published: build the open
# release without a test split (`--test-per-class 0`), or add new images and pass `fresh_test`, which moves
# published test images to val and draws the test split from the new ones only.


class HiddenLabelLeak(ReleaseInputError):
    """The build would put a hidden test label in a public file (or hide as test a label already public);
    `images` are the image ids concerned. Nothing was written."""

    def __init__(self, message: str, images: list[str]):
        super().__init__(message)
        self.images = images


def _label_files(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The files of a release that pair an image with a class (labels, boxes, DET labels, ...)."""
    out = []
    for name, entry in sorted(manifest["files"].items()):
        try:
            names = arrow_schema(entry["schema"]).names
        except (KeyError, FileNotFoundError, ValueError):  # a schema this code does not know: judge by the file
            names = ["image_id", "wnid"]
        if "image_id" in names and "wnid" in names:
            out.append((name, entry))
    return out


def _release_file_columns(store: Store, version: str, entry: dict[str, Any], wanted: Sequence[str]) -> pa.Table:
    source = pq.ParquetFile(release_file_source(store, version, entry))
    names = source.schema_arrow.names
    if "image_id" not in names or "wnid" not in names:
        return pa.table({c: pa.array([], pa.string()) for c in wanted})
    table = source.read(columns=[c for c in wanted if c in names])
    for c in wanted:
        if c not in table.column_names:
            table = table.append_column(c, pa.nulls(table.num_rows, pa.string()))
    return table.select(list(wanted))


def _releases(store: Store) -> list[tuple[str, dict[str, Any]]]:
    from pipeline.release.manifest import list_releases

    return [(v, read_manifest(store, v)) for v in list_releases(store)]


def published_labels(store: Store, releases: list[tuple[str, dict[str, Any]]] | None = None) -> pd.DataFrame:
    """Every image of the store whose class a release publishes: image_id, split (null where the file has
    none, e.g. boxes), release, file. A challenge release's hidden test labels are not among them."""
    parts = []
    for version, manifest in (_releases(store) if releases is None else releases):
        for name, entry in _label_files(manifest):
            t = _release_file_columns(store, version, entry, ["image_id", "split"])
            parts.append(pd.DataFrame({"image_id": _col(t, "image_id").astype(object),
                                       "split": t.column("split").to_pylist(), "release": version, "file": name}))
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in ("image_id", "split", "release", "file")})
    return pd.concat(parts, ignore_index=True)


def hidden_test_images(store: Store, releases: list[tuple[str, dict[str, Any]]] | None = None) -> pd.DataFrame:
    """The test images the store's challenge releases hide: image_id, release."""
    parts = []
    for version, manifest in (_releases(store) if releases is None else releases):
        if "test_images" in manifest["files"]:
            ids = read_release_table(store, version, "test_images", manifest=manifest).column("image_id")
            parts.append(pd.DataFrame({"image_id": ids.to_numpy(zero_copy_only=False).astype(object),
                                       "release": version}))
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in ("image_id", "release")})
    return pd.concat(parts, ignore_index=True)


def _overlap(ids: pa.Array | pa.ChunkedArray, others: pd.DataFrame) -> pd.DataFrame:
    """Rows of `others` whose image_id is among `ids`."""
    if not len(others) or not len(ids):
        return others.iloc[:0]
    hit = _mask(pc.is_in(pa.array(others.image_id.to_numpy(), pa.string()), value_set=pc.unique(ids)))
    return others[hit]


def _which(rows: pd.DataFrame) -> str:
    by = rows.groupby("release").image_id.nunique().sort_index()
    return ", ".join(f"{v!r} ({n})" for v, n in by.items())


class HiddenLabelGuard:
    """The two rules above, checked on a build's decided labels before anything is written."""

    def __init__(self, store: Store, version: str, *, challenge: bool):
        self.version, self.challenge = version, challenge
        releases = _releases(store)
        self.hidden = hidden_test_images(store, releases)
        self.published = published_labels(store, releases) if challenge else None

    def __call__(self, labels: pa.Table) -> None:
        test = _mask(pc.equal(labels["split"], "test"))
        public_ids = labels["image_id"].filter(pa.array(~test)) if self.challenge else labels["image_id"]
        leaked = _overlap(public_ids, self.hidden)
        if len(leaked):
            n = leaked.image_id.nunique()
            raise HiddenLabelLeak(
                f"release {self.version!r} would publish the labels of {n} image{'s' if n != 1 else ''} that a "
                f"challenge release hides as test images (hidden by {_which(leaked)}); build it with --challenge "
                f"--parent {sorted(set(leaked.release))[-1]} instead (they stay hidden test images). Nothing was "
                "written", sorted(set(leaked.image_id)))
        if not self.challenge:
            return
        if not test.any():
            raise ReleaseInputError(
                f"challenge release {self.version!r} would have no test image (--test-per-class 0, or with "
                "--fresh-test no image that no release of the store has published: collect new images first). "
                "Nothing was written")
        exposed = _overlap(labels["image_id"].filter(pa.array(test)), self.published)
        if len(exposed):
            n, n_test = exposed.image_id.nunique(), len(pc.unique(labels["image_id"].filter(pa.array(test))))
            raise HiddenLabelLeak(
                f"challenge release {self.version!r} would hide {n} of its {n_test} test images whose labels are "
                f"already public (published by {_which(exposed)}: labels, boxes or DET labels), so anyone could "
                "score themselves on the hidden test set. "
                "Draw the test images from images no release published: build the challenge release without an "
                "open --parent (its own public part publishes train and val), or from an open parent built with "
                "--test-per-class 0, or add new images and pass --fresh-test (published test images then become "
                "val images). Nothing was written", sorted(set(exposed.image_id)))


def fresh_test_splits(parent_df: pd.DataFrame | None, published: pd.DataFrame) -> pd.DataFrame:
    """Parent splits for a `fresh_test` challenge build: every image a release published with a label keeps a
    split that is not test (the parent's, else val if it was published in val or test or in a file without
    splits, else train; a published test image of the parent becomes a val image, whose label is public
    anyway), so only images no release published can be drawn for test. A challenge parent's hidden test
    images stay test (no release published their labels)."""
    known = published[published.split.notna()]
    held = set(known.image_id[known.split.isin(["val", "test"])])
    known_ids = set(known.image_id)
    ids = published.image_id.unique()
    pub = pd.DataFrame({"image_id": ids, "split": ["val" if i in held or i not in known_ids else "train" for i in ids]})
    base = parent_df if parent_df is not None else pd.DataFrame({"image_id": pd.Series(dtype=object),
                                                                 "split": pd.Series(dtype=object)})
    base = base.drop_duplicates("image_id")
    is_pub = base.image_id.isin(set(pub.image_id))
    base = base.assign(split=np.where(is_pub & (base.split == "test"), "val", base.split))
    rest = pub[~pub.image_id.isin(set(base.image_id))]
    return pd.concat([base, rest], ignore_index=True)
