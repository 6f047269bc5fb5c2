"""Near-duplicate detection: an exact Hamming-radius search over 64-bit hashes, then a cheap verification.

Two layers:

- :class:`HammingIndex`: finds *every* pair of 64-bit hashes within Hamming distance ``radius`` (default 6),
  exactly. Split the 64 bits into ``m`` chunks; two hashes within distance r differ in at most r chunks, so at
  least ``k = m - r`` chunks are equal. Each of the C(m, k) chunk combinations is a sort key (for r = 6 at 1 M
  hashes: m = 8, 28 keys of 16 bits, chosen by a measured cost model, see :func:`_plan`). The key and the row
  position are packed in one uint64 and sorted with numpy's SIMD sort (no argsort); pairs in a run of equal keys
  are candidates, compared d = 1, 2, ... places apart with a vectorised popcount (no pair lists). A pair equal on
  several combinations is reported only by the first one (its k lowest equal chunks), so no de-duplication pass
  is needed. The index is a list of sorted segments: adding a batch sorts only the batch (segments of similar size
  are merged, log-structured), so a new batch is looked up against an existing index without rebuilding it.
- :class:`NearDupIndex` / :func:`cross_duplicates`: image level. Every image has four hashes (whole image and
  centred 94 / 88 / 70 % regions, see :mod:`pipeline.ingest.fingerprint`); a pair is a candidate when any hash
  of one is within ``radius`` of any hash of the other (a border crop aligns with an inner hash, an overlay
  leaves the inner 70 % alone). Candidates are verified on the stored 8x8 thumbnails (trimmed mean absolute
  difference of z-scores, robust to an overlay covering a few cells), which removes pairs of distinct photos
  that merely share coarse structure.

>>> import numpy as np
>>> idx = HammingIndex(radius=2)
>>> far = 1 << 40 | 1 << 50 | 1 << 60
>>> idx.add(np.array([0b1111, 0, far], dtype=np.uint64)).tolist()
[0, 1, 2]
>>> sorted(map(tuple, idx.self_pairs().tolist()))
[]
>>> q, ids = idx.query(np.array([0b0111, far | 1], dtype=np.uint64)); sorted(zip(q.tolist(), ids.tolist()))
[(0, 0), (1, 2)]
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.ingest.fingerprint import HASH_COLUMNS, THUMB_COLUMNS, unpack_thumbs

DEFAULT_RADIUS = 6
# Verification: trimmed mean |z_a - z_b| over the 8x8 thumbnail, worst 20 % of cells dropped (overlays).
DEFAULT_MAX_THUMB_DIST = 0.5
THUMB_TRIM = 0.2
# Cost model of one chunk combination (measured on this machine, numpy 2.2 with AVX-512 sort): building the packed
# keys, sorting them and gathering the hashes costs ~_NS_PER_KEY per hash; every candidate pair (equal key)
# costs ~_NS_PER_CANDIDATE to check. The sorted keys are kept (8 bytes per hash and combination), so a plan's key
# storage is capped by _KEY_BYTES_BUDGET (the cheapest plan in memory is used if none fits).
_NS_PER_KEY = 30.0
_NS_PER_CANDIDATE = 5.0
_MAX_COMBOS = 400
_KEY_BYTES_BUDGET = 1 << 30


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x)


def _plan(radius: int, n_hint: int) -> tuple[int, int]:
    """Choose (m chunks, k equal chunks) minimising the estimated sort + candidate cost for n_hint hashes.

    At r = 6 and 1,000,000 hashes: 8 chunks, 2 equal (28 sorts of 16-bit keys, ~7.6 M candidates each) beats 9
    chunks, 3 equal (84 sorts of ~21-bit keys, ~0.2 M candidates each): measured 1.9 vs 3.2 CPU s. Small sets
    take fewer, narrower keys (7 chunks, one equal: 7 sorts).

    >>> _plan(6, 2000), _plan(6, 1_000_000), _plan(6, 4_000_000), _plan(3, 1_000_000), _plan(0, 10)
    ((7, 1), (8, 2), (8, 2), (4, 1), (1, 1))
    """
    n = max(int(n_hint), 2)
    idx_bits = (n - 1).bit_length()
    plans = []  # (fits the key budget, estimated ns, combos, m, k)
    for m in range(radius + 1, min(64, radius + 12) + 1):
        k = m - radius
        n_keys = math.comb(m, k)
        if n_keys > _MAX_COMBOS:
            continue
        bits = min(64.0 * k / m, 64.0 - idx_bits)
        cost = n_keys * (_NS_PER_KEY * n + _NS_PER_CANDIDATE * n * n / 2 / 2.0**bits)
        plans.append((8 * n * n_keys > _KEY_BYTES_BUDGET, cost, n_keys, m, k))
    if not plans:
        raise ValueError(f"radius {radius} is too large for an exact chunked search; use radius <= 16")
    # In budget: the fastest. Otherwise (huge n): balance time against key memory.
    _, _, _, m, k = min(plans, key=lambda p: (p[0], p[1] * (p[2] if p[0] else 1)))
    return m, k


@dataclass
class _Segment:
    hashes: np.ndarray  # uint64
    ids: np.ndarray  # int64
    low: np.uint64 = np.uint64(0)  # mask of the position bits at the bottom of every packed key
    keys: list[np.ndarray] = field(default_factory=list)  # per combination: sorted (key bits | position) uint64


class HammingIndex:
    """Exact all-pairs / lookup search for 64-bit hashes within a Hamming radius; extendable by batches.

    ``n_hint`` (expected final size) picks the chunking; ``chunks`` forces the number of chunks m (>= radius + 1).
    Results are exact for any size and any chunking.
    """

    def __init__(self, radius: int = DEFAULT_RADIUS, n_hint: int = 1_000_000, chunks: int | None = None) -> None:
        if not 0 <= radius <= 16:
            raise ValueError(f"radius must be in 0..16, got {radius}")
        self.radius = radius
        if chunks is None:
            self.m, self.k = _plan(radius, n_hint)
        elif radius + 1 <= chunks <= 64 and math.comb(chunks, chunks - radius) <= 5000:
            self.m, self.k = chunks, chunks - radius
        else:
            raise ValueError(f"chunks must be in {radius + 1}..64 for radius {radius} (and C(chunks, chunks - radius)"
                             f" <= 5000), got {chunks}")
        edges = np.linspace(0, 64, self.m + 1).round().astype(int)
        self._chunks = [(int(edges[i]), int(edges[i + 1] - edges[i])) for i in range(self.m)]
        # Mask of chunk c inside the hash (chunk 0 = most significant bits).
        self._masks = [np.uint64(((1 << w) - 1) << (64 - s - w)) for s, w in self._chunks]
        self.combos = list(combinations(range(self.m), self.k))
        self._spans = [self._key_spans(combo) for combo in self.combos]
        self._combo_masks = [np.uint64(sum(int(self._masks[c]) for c in combo)) for combo in self.combos]
        self._segments: list[_Segment] = []
        self._next_id = 0

    def __len__(self) -> int:
        return sum(len(s.hashes) for s in self._segments)

    # -- keys --------------------------------------------------------------------------------------
    def _key_spans(self, combo: tuple[int, ...]) -> list[tuple[np.uint64, int]]:
        """(mask, left shift) per run of adjacent chunks: moves the combo's chunks to the top bits, in order."""
        spans: list[tuple[int, int, int]] = []  # (source start, width, target start), bit 0 = MSB
        target = 0
        for c in combo:
            start, width = self._chunks[c]
            if spans and spans[-1][0] + spans[-1][1] == start:
                s, w, t = spans[-1]
                spans[-1] = (s, w + width, t)
            else:
                spans.append((start, width, target))
            target += width
        return [(np.uint64(((1 << w) - 1) << (64 - s - w)), s - t) for s, w, t in spans]

    def _key(self, h: np.ndarray, ci: int) -> np.ndarray:
        """The combo's chunks concatenated in the top bits of a uint64 (lower bits zero)."""
        spans = self._spans[ci]
        key = h & spans[0][0]
        if spans[0][1]:
            key <<= np.uint64(spans[0][1])
        if len(spans) > 1:
            tmp = np.empty_like(key)
            for mask, shift in spans[1:]:
                np.bitwise_and(h, mask, out=tmp)
                if shift:
                    tmp <<= np.uint64(shift)
                key |= tmp
        return key

    def _first_combo(self, x: np.ndarray, ci: int) -> np.ndarray:
        """True where combo ci is the first (lexicographic) all-equal chunk combination for XORs x.

        A pair equal on several combinations is then reported once. The key may be truncated to make room for the
        position bits, so the combo's chunks are checked too.
        """
        combo = self.combos[ci]
        ok = (x & self._combo_masks[ci]) == 0
        eq = np.zeros(len(x), dtype=np.int8)
        for c in range(combo[-1] + 1):
            eq += (x & self._masks[c]) == 0
        return ok & (eq == self.k)

    def _build(self, hashes: np.ndarray, ids: np.ndarray) -> _Segment:
        """Per combination, sort (key | position) packed in one uint64: a plain SIMD sort, no argsort."""
        n = len(hashes)
        low = np.uint64((1 << max(1, (n - 1).bit_length())) - 1)
        seg = _Segment(hashes, ids, low)
        pos = np.arange(n, dtype=np.uint64)
        for ci in range(len(self.combos)):
            p = self._key(hashes, ci)
            p &= ~low  # drops the key's lowest bits if they overlap the positions: still a superset of candidates
            p |= pos
            p.sort()
            seg.keys.append(p)
        return seg

    # -- search ------------------------------------------------------------------------------------
    def _self_join(self, seg: _Segment) -> tuple[np.ndarray, np.ndarray]:
        out_a, out_b = [], []
        r = self.radius
        for ci, p in enumerate(seg.keys):
            order = (p & seg.low).view(np.int64)
            hs = seg.hashes[order]
            for i, j in _close_in_runs(p, hs, seg.low, r):
                ok = self._first_combo(hs[i] ^ hs[j], ci)
                out_a.append(seg.ids[order[i[ok]]])
                out_b.append(seg.ids[order[j[ok]]])
        return _cat(out_a), _cat(out_b)

    def _cross(self, q: np.ndarray, seg: _Segment) -> tuple[np.ndarray, np.ndarray]:
        """(query position, id in seg) for hashes q against one segment."""
        out_q, out_id = [], []
        for ci, p in enumerate(seg.keys):
            qk = self._key(q, ci)
            qk &= ~seg.low
            qorder = np.argsort(qk)  # sorted needles: searchsorted walks the segment forward, cache-friendly
            qk = qk[qorder]
            lo = np.searchsorted(p, qk, side="left")
            cnt = np.searchsorted(p, qk | seg.low, side="right") - lo
            hit = np.flatnonzero(cnt)
            if len(hit) == 0:
                continue
            lo, cnt, qh = lo[hit], cnt[hit], q[qorder[hit]]
            # Many candidates: gather the segment's hashes into key order once (then reads are sequential);
            # a few: gather just those.
            order = (p & seg.low).view(np.int64)
            hs = seg.hashes[order] if int(cnt.sum()) * 4 > len(p) else None
            # Pass d compares every query with the d-th entry of its key's range: work ~ candidates, no pair lists.
            act, d = np.arange(len(hit)), 0
            while len(act):
                sp = lo[act] + d
                x = qh[act] ^ (hs[sp] if hs is not None else seg.hashes[order[sp]])
                close = np.flatnonzero(_popcount(x) <= self.radius)
                if len(close):
                    ok = close[self._first_combo(x[close], ci)]
                    out_q.append(qorder[hit[act[ok]]])
                    out_id.append(seg.ids[order[sp[ok]]])
                d += 1
                act = act[cnt[act] > d]
        return _cat(out_q), _cat(out_id)

    def query(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (query position, indexed id) with Hamming distance <= radius. The index is not modified."""
        q = np.ascontiguousarray(hashes, dtype=np.uint64)
        parts = [self._cross(q, seg) for seg in self._segments]
        return _cat([p[0] for p in parts]), _cat([p[1] for p in parts])

    def self_pairs(self) -> np.ndarray:
        """Every pair (id_a, id_b), id_a != id_b, of indexed hashes within the radius, each pair once."""
        a_parts, b_parts = [], []
        for i, seg in enumerate(self._segments):
            a, b = self._self_join(seg)
            a_parts.append(a)
            b_parts.append(b)
            for later in self._segments[i + 1 :]:
                qi, ids = self._cross(later.hashes, seg)
                a_parts.append(later.ids[qi])
                b_parts.append(ids)
        a, b = _cat(a_parts), _cat(b_parts)
        return np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1) if len(a) else np.empty((0, 2), np.int64)

    def _batch(self, hashes: np.ndarray, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        h = np.ascontiguousarray(hashes, dtype=np.uint64)
        if ids is None:
            ids = np.arange(self._next_id, self._next_id + len(h), dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) != len(h):
            raise ValueError(f"{len(h)} hashes but {len(ids)} ids")
        return h, ids

    def _append(self, seg: _Segment) -> None:
        ids = seg.ids
        self._next_id = max(self._next_id, int(ids.max()) + 1 if len(ids) else 0)
        self._segments.append(seg)
        # Log-structured merge: keep segment sizes roughly geometric, so total re-sorting stays O(n log n).
        while len(self._segments) > 1 and len(self._segments[-1].hashes) * 2 >= len(self._segments[-2].hashes):
            b, a = self._segments.pop(), self._segments.pop()
            self._segments.append(self._build(np.concatenate([a.hashes, b.hashes]), np.concatenate([a.ids, b.ids])))

    def add(self, hashes: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Add a batch (sorted on its own, then merged with segments of similar size); returns the batch's ids."""
        h, ids = self._batch(hashes, ids)
        self._append(self._build(h, ids))
        return ids

    def pairs_within(self, hashes: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Pairs (id_a, id_b) within the radius inside one batch, without touching the index."""
        h = np.ascontiguousarray(hashes, dtype=np.uint64)
        ids = np.arange(len(h), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        a, b = self._self_join(self._build(h, ids))
        return np.stack([a, b], axis=1) if len(a) else np.empty((0, 2), np.int64)

    def add_and_query(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Look a new batch up against the index and within itself, then add it.

        Returns (ids assigned to the batch, pairs (batch id, earlier id), pairs inside the batch (id_a, id_b)).
        The batch is sorted once: its segment serves the self-join and is then appended.
        """
        h, ids = self._batch(hashes, None)
        qi, old = self.query(h)
        seg = self._build(h, ids)
        a, b = self._self_join(seg)
        self._append(seg)
        inner = np.stack([a, b], axis=1) if len(a) else np.empty((0, 2), np.int64)
        return ids, np.stack([ids[qi], old], axis=1), inner


def _close_in_runs(p: np.ndarray, hs: np.ndarray, low: np.uint64, r: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Positions (i < j) in sorted packed keys p with equal key bits and popcount(hs[i] ^ hs[j]) <= r.

    Compares every position with the one d places ahead, d = 1, 2, ...: while most positions still have a
    same-key partner d ahead, on the whole array (contiguous SIMD, no gathers); then only on the positions whose run
    continues (gathers on a shrinking set). Work ~ number of candidate pairs, no pair lists are materialised.
    """
    n = len(p)
    if n < 2:
        return
    same = (p[1:] ^ p[:-1]) <= low  # same[i]: i and i + 1 share the key
    eq, d = same, 1  # eq[i]: i and i + d share the key
    x, pc, close = np.empty(n, np.uint64), np.empty(n, np.uint8), np.empty(n, bool)  # reused buffers
    while True:
        cnt = int(np.count_nonzero(eq))
        if cnt == 0:
            return
        if cnt * 8 < len(eq):
            break
        w = n - d
        np.bitwise_xor(hs[d:], hs[:-d], out=x[:w])
        np.less_equal(np.bitwise_count(x[:w], out=pc[:w]), r, out=close[:w])
        i = np.flatnonzero(close[:w])  # close pairs are rare: filter them by key afterwards
        i = i[eq[i]]
        if len(i):
            yield i, i + d
        d += 1
        eq = np.logical_and(eq[:-1], same[d - 1 :], out=None if eq is same else eq[:-1])
    act = np.flatnonzero(eq)
    same = np.append(same, False)
    while len(act):
        j = act + d
        ok = _popcount(hs[act] ^ hs[j]) <= r
        if ok.any():
            yield act[ok], j[ok]
        act = act[same[j]]
        d += 1


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if len(p)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


# ---- image level ----------------------------------------------------------------------------------------


def _frame(images: Any, what: str) -> pd.DataFrame:
    if isinstance(images, pa.Table):
        # Drop rows without hashes (rejected downloads) while still in Arrow: a uint64 column with nulls would
        # become float64 in pandas and lose the low bits of every hash.
        present = [c for c in ("image_id", *HASH_COLUMNS, *THUMB_COLUMNS) if c in images.column_names]
        for column in present:
            images = images.filter(pc.is_valid(images.column(column)))
        images = images.to_pandas()
    if not isinstance(images, pd.DataFrame):
        raise TypeError(f"{what}: expected rows of the images table (pandas DataFrame or Arrow Table), got {type(images)}")
    need = ["image_id", *HASH_COLUMNS, *THUMB_COLUMNS]
    missing = [c for c in need if c not in images.columns]
    if missing:
        raise ValueError(
            f"{what}: columns {missing} are missing; these are written by pipeline.ingest.fingerprint at ingest "
            "(re-run `synsetforge ingest` on a store made before fingerprints existed)"
        )
    rows = images[images["image_id"].notna()]
    rows = rows.dropna(subset=list(HASH_COLUMNS) + list(THUMB_COLUMNS))
    return rows.drop_duplicates("image_id").reset_index(drop=True)


def _hash_matrix(df: pd.DataFrame) -> np.ndarray:
    return np.stack([df[c].to_numpy(dtype=np.uint64) for c in HASH_COLUMNS], axis=1)


def _thumbs(df: pd.DataFrame) -> np.ndarray:
    return unpack_thumbs(np.stack([df[c].to_numpy(dtype=np.uint64) for c in THUMB_COLUMNS], axis=1))


def thumb_distance(ta: np.ndarray, tb: np.ndarray) -> np.ndarray:
    """Trimmed mean |a - b| over thumbnail cells (rows are images), the worst THUMB_TRIM share dropped."""
    d = np.sort(np.abs(ta - tb), axis=1)
    keep = d.shape[1] - int(d.shape[1] * THUMB_TRIM)
    return d[:, :keep].mean(axis=1)


def best_hash_distance(ha: np.ndarray, hb: np.ndarray) -> np.ndarray:
    """Smallest Hamming distance over all (hash of a, hash of b) combinations; ha, hb are (n, 4) uint64."""
    return _popcount(ha[:, :, None] ^ hb[:, None, :]).reshape(len(ha), ha.shape[1] * hb.shape[1]).min(axis=1)


class NearDupIndex:
    """Near-duplicate index over rows of the images table; extendable with new batches.

    >>> from PIL import Image
    >>> from pipeline.ingest.fingerprint import fingerprint
    >>> rows = [{"image_id": f"img{i}", **fingerprint(Image.effect_mandelbrot((96, 96), (-2 + i, -1.5, 1, 1.5), 60))}
    ...         for i in range(2)]
    >>> idx = NearDupIndex(); idx.add(pd.DataFrame(rows)).empty
    True
    >>> idx.query(pd.DataFrame(rows[:1]))[["query_image_id", "reference_image_id"]].values.tolist()
    [['img0', 'img0']]
    """

    def __init__(self, radius: int = DEFAULT_RADIUS, max_thumb_dist: float = DEFAULT_MAX_THUMB_DIST,
                 n_hint: int = 1_000_000) -> None:
        self.radius = radius
        self.max_thumb_dist = max_thumb_dist
        self._index = HammingIndex(radius, n_hint=n_hint * len(HASH_COLUMNS))
        self._ids: list[np.ndarray] = []
        self._hashes: list[np.ndarray] = []
        self._thumbs: list[np.ndarray] = []
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(self._ids) > 1:  # compact lazily; row order = insertion order
            self._ids = [np.concatenate(self._ids)]
            self._hashes = [np.concatenate(self._hashes)]
            self._thumbs = [np.concatenate(self._thumbs)]
        if not self._ids:
            return np.empty(0, object), np.empty((0, 4), np.uint64), np.empty((0, 64), np.float32)
        return self._ids[0], self._hashes[0], self._thumbs[0]

    def _candidates(self, hq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query row, indexed row) pairs where any hash of one is within radius of any hash of the other."""
        k = len(HASH_COLUMNS)
        qpos, ids = self._index.query(hq.reshape(-1))
        if len(qpos) == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        pair = np.unique((qpos // k).astype(np.int64) * (self._n + 1) + ids // k)
        return pair // (self._n + 1), pair % (self._n + 1)

    def _verified(self, qrows: np.ndarray, rrows: np.ndarray, hq: np.ndarray, tq: np.ndarray,
                  hr: np.ndarray, tr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = best_hash_distance(hq[qrows], hr[rrows])
        t = thumb_distance(tq[qrows], tr[rrows])
        ok = (d <= self.radius) & (t <= self.max_thumb_dist)
        return ok, d, t

    def query(self, images: Any) -> pd.DataFrame:
        """Verified near-duplicates of `images` among the indexed images (identical images included).

        Returns columns query_image_id, reference_image_id, hash_distance, thumb_distance.
        """
        q = _frame(images, "query images")
        ids, h, t = self._all()
        hq, tq = _hash_matrix(q), _thumbs(q)
        qr, rr = self._candidates(hq)
        ok, d, td = self._verified(qr, rr, hq, tq, h, t)
        return pd.DataFrame({"query_image_id": q["image_id"].to_numpy()[qr[ok]],
                             "reference_image_id": ids[rr[ok]], "hash_distance": d[ok].astype(np.int32),
                             "thumb_distance": td[ok].astype(np.float32)})

    def add(self, images: Any) -> pd.DataFrame:
        """Add a batch; return the verified near-duplicate pairs it forms with earlier images and within itself.

        Rows whose image_id is already indexed are skipped. Columns: image_id, other_image_id, hash_distance,
        thumb_distance (image_id is from the new batch).
        """
        new = _frame(images, "images to index")
        known, _, _ = self._all()
        if len(known):
            new = new[~new["image_id"].isin(known)].reset_index(drop=True)
        hq, tq = _hash_matrix(new), _thumbs(new)
        k = len(HASH_COLUMNS)
        pairs = [self.query(new).rename(columns={"query_image_id": "image_id", "reference_image_id": "other_image_id"})]
        base = self._n
        inner = np.empty((0, 2), np.int64)
        if len(new):
            ids = self._index.add(hq.reshape(-1))
            inner = self._index.pairs_within(hq.reshape(-1), ids)
        self._ids.append(new["image_id"].to_numpy(dtype=object))
        self._hashes.append(hq)
        self._thumbs.append(tq)
        self._n += len(new)
        if len(inner):
            a, b = (inner[:, 0] // k - base).astype(np.int64), (inner[:, 1] // k - base).astype(np.int64)
            keep = a != b
            pair = np.unique(np.minimum(a, b)[keep] * (len(new) + 1) + np.maximum(a, b)[keep])
            a, b = pair // (len(new) + 1), pair % (len(new) + 1)
            ok, d, td = self._verified(a, b, hq, tq, hq, tq)
            ids_new = new["image_id"].to_numpy(dtype=object)
            pairs.append(pd.DataFrame({"image_id": ids_new[a[ok]], "other_image_id": ids_new[b[ok]],
                                       "hash_distance": d[ok].astype(np.int32),
                                       "thumb_distance": td[ok].astype(np.float32)}))
        out = pd.concat([p for p in pairs if len(p)], ignore_index=True) if any(len(p) for p in pairs) else pairs[0]
        return out[out["image_id"] != out["other_image_id"]].reset_index(drop=True)


def near_duplicate_pairs(images: Any, radius: int = DEFAULT_RADIUS,
                         max_thumb_dist: float = DEFAULT_MAX_THUMB_DIST) -> pd.DataFrame:
    """All verified near-duplicate pairs inside one set of image rows (each unordered pair once)."""
    df = _frame(images, "images")
    return NearDupIndex(radius, max_thumb_dist, n_hint=max(len(df), 1)).add(df)


def cross_duplicates(query_images: Any, reference_images: Any, radius: int = DEFAULT_RADIUS,
                     max_thumb_dist: float = DEFAULT_MAX_THUMB_DIST) -> pd.DataFrame:
    """Near-duplicates (and identical images) of `query_images` inside `reference_images`.

    Both are rows of the images table (pandas or Arrow) with the fingerprint columns. Used by the release to keep
    val/test images (queries) out of train (reference). Returns a DataFrame[query_image_id, reference_image_id]
    (plus hash_distance and thumb_distance), one row per matching pair.
    """
    ref = _frame(reference_images, "reference images")
    idx = NearDupIndex(radius, max_thumb_dist, n_hint=max(len(ref), 1))
    idx.add(ref)
    return idx.query(query_images)
