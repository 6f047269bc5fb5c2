"""Near-duplicate detection: an exact Hamming-radius search over 64-bit hashes, then a cheap verification.

Two layers:

- :class:`HammingIndex`: finds *every* pair of 64-bit hashes within Hamming distance ``radius`` (default 6),
  exactly. Split the 64 bits into ``m`` chunks; two hashes within distance r differ in at most r chunks, so at
  least ``k = m - r`` chunks are equal. For each of the C(m, k) chunk combinations the distinct hashes are stored
  bit-permuted (that combination's chunks moved to the top bits, the other chunks after them) and sorted with
  numpy's SIMD sort: hashes equal on the combination form a run, and because a bit permutation keeps Hamming
  distances, candidates are compared on the permuted values themselves, d = 1, 2, ... places apart with a
  vectorised popcount: no gathers, no pair lists (for r = 6 at 1 M hashes: m = 8, 28 combinations of 16 bits,
  chosen by a measured cost model, see :func:`_plan`). A pair equal on several combinations is reported only by
  the first one, so no de-duplication pass is needed; entries sharing one hash value are kept once, with the list
  of their ids. The index is a list of sorted segments: adding a batch sorts only the batch (segments of similar
  size are merged, log-structured), so a new batch is looked up against an existing index without rebuilding it.
- :class:`NearDupIndex` / :func:`cross_duplicates`: image level. Every image has ``len(HASH_COLUMNS)`` hashes
  (whole image and centred regions, see :mod:`pipeline.ingest.fingerprint`); a pair is a candidate when any hash
  of one is within ``radius`` of any hash of the other (a border crop aligns with an inner hash, an overlay leaves
  the inner 70 % alone). Candidates are verified on the stored 8x8 thumbnails (trimmed mean absolute difference of
  z-scores, robust to an overlay covering a few cells), which removes pairs of distinct photos that merely share
  coarse structure. A NearDupIndex is a list of image segments (ids sorted, hashes, packed thumbnails, a
  HammingIndex segment over their hashes) that :class:`StoredIndex` writes as ``.npy`` files under the store and
  loads back (memory-mapped on a local store), so each ingest merge looks only its new images up against it.

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

import io
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.ingest.fingerprint import HASH_COLUMNS, HASH_PAIRS, THUMB_COLUMNS, fill_added_hashes, unpack_thumbs

DEFAULT_RADIUS = 6
# Verification: trimmed mean |z_a - z_b| over the 8x8 thumbnail, worst 20 % of cells dropped (overlays).
DEFAULT_MAX_THUMB_DIST = 0.5
THUMB_TRIM = 0.2
# Cost model of one chunk combination (measured on this machine, numpy 2.2 with AVX-512 sort): permuting and
# sorting the values costs ~_NS_PER_KEY per hash; every candidate pair (equal key) costs ~_NS_PER_CANDIDATE to
# check. The sorted values are kept (8 bytes per distinct hash and combination), so a plan's storage is capped by
# _KEY_BYTES_BUDGET (the cheapest plan in memory is used if none fits).
_NS_PER_KEY = 30.0
_NS_PER_CANDIDATE = 5.0
_MAX_COMBOS = 400
_KEY_BYTES_BUDGET = 1 << 30
LOOKUP_THREADS = max(1, min(8, os.cpu_count() or 1))  # threads a large batch's lookup runs its combinations on
PARALLEL_MIN_QUERIES = 20_000  # distinct query hashes below which threads cost more than they give
_U64 = np.uint64


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
    plans = []  # (fits the key budget, estimated ns, combos, m, k)
    for m in range(radius + 1, min(64, radius + 12) + 1):
        k = m - radius
        n_keys = math.comb(m, k)
        if n_keys > _MAX_COMBOS:
            continue
        bits = 64.0 * k / m
        cost = n_keys * (_NS_PER_KEY * n + _NS_PER_CANDIDATE * n * n / 2 / 2.0**bits)
        plans.append((8 * n * n_keys > _KEY_BYTES_BUDGET, cost, n_keys, m, k))
    if not plans:
        raise ValueError(f"radius {radius} is too large for an exact chunked search; use radius <= 16")
    # In budget: the fastest. Otherwise (huge n): balance time against key memory.
    _, _, _, m, k = min(plans, key=lambda p: (p[0], p[1] * (p[2] if p[0] else 1)))
    return m, k


# Storage a stored index's sorted values may take (plan_lookup): memory-mapped, a lookup touches all of them.
LOOKUP_BUDGET_BYTES = 16e9


def plan_lookup(radius: int, n_index: int, n_query: int, budget_bytes: float = LOOKUP_BUDGET_BYTES) -> tuple[int, int]:
    """(m, k) for an index of `n_index` hashes kept on disk and queried by batches of `n_query` hashes: the
    cheapest batch (per query hash and combination: a bucket lookup, ~50 ns, plus ~8 ns per candidate of the
    ~n_index / 2**bits sharing its key, measured at 1 M and 4 M hashes; plus sorting the batch into the index's
    log-structured segments) whose sorted values fit `budget_bytes` (8 bytes per hash and combination).

    >>> plan_lookup(6, 14_000_000, 600_000), plan_lookup(6, 6_000_000, 600_000), plan_lookup(6, 60_000, 60_000)
    ((9, 3), (9, 3), (8, 2))
    """
    best = None
    for m in range(radius + 1, min(64, radius + 12) + 1):
        k = m - radius
        n_keys = math.comb(m, k)
        if n_keys > _MAX_COMBOS or 8.0 * n_index * n_keys > budget_bytes:
            continue
        bits = 64.0 * k / m
        lookup = 50.0 + 8.0 * n_index / 2.0**bits
        build = _NS_PER_KEY * max(1.0, math.log2(max(n_index, 2) / max(n_query, 1)))
        cost = n_keys * n_query * (lookup + build)
        if best is None or cost < best[0]:
            best = (cost, m, k)
    return (best[1], best[2]) if best else _plan(radius, n_index)


def _shifted(x: np.ndarray, shift: int, out: np.ndarray | None = None) -> np.ndarray:
    if shift > 0:
        return np.left_shift(x, _U64(shift), out=out)
    if shift < 0:
        return np.right_shift(x, _U64(-shift), out=out)
    if out is not None and out is not x:
        out[...] = x
        return out
    return x


def _apply(h: np.ndarray, spans: list[tuple[np.uint64, int]]) -> np.ndarray:
    """Move bit fields: OR over spans of (h & mask) shifted left by `shift` (right when negative)."""
    h = np.asarray(h, dtype=np.uint64)
    if len(spans) == 1 and spans[0][1] == 0 and int(spans[0][0]) == (1 << 64) - 1:
        return h.copy()
    out = np.zeros_like(h)
    tmp = np.empty_like(h)
    for mask, shift in spans:
        np.bitwise_and(h, mask, out=tmp)
        _shifted(tmp, shift, out=tmp)
        out |= tmp
    return out


@dataclass
class _Segment:
    """One sorted batch of hashes.

    `hashes`: the distinct hash values, ascending; the entries holding hashes[u] are ids[ptr[u]:ptr[u + 1]].
    `values[c]`: the distinct hashes bit-permuted for combination c (its chunks on top), ascending."""

    hashes: np.ndarray  # (U,) uint64
    ptr: np.ndarray  # (U + 1,) int64
    ids: np.ndarray  # (E,) int64
    values: np.ndarray  # (C, U) uint64
    # dirs[c][t]: first position in values[c] whose top `dir_bits` bits are >= t (a lookup needs no binary search)
    dirs: np.ndarray | None = None  # (C, 2**dir_bits + 1) uint32 / uint64

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dir_bits(self) -> int:
        return (int(self.dirs.shape[1]) - 1).bit_length() - 1 if self.dirs is not None else 0

    def entry_hashes(self) -> np.ndarray:
        """The hash of every entry, in the order of `ids`."""
        return np.repeat(np.asarray(self.hashes), np.diff(np.asarray(self.ptr)))


class _Query:
    """A batch of query hashes prepared once for every segment: its distinct values (with the query positions
    holding each) and, per combination, their permuted values."""

    def __init__(self, index: HammingIndex, q: np.ndarray) -> None:
        self.q = np.ascontiguousarray(q, dtype=np.uint64)
        self.uq, inv = np.unique(self.q, return_inverse=True)
        inv = inv.reshape(-1)
        self.order = np.argsort(inv, kind="stable")  # query positions grouped by distinct value
        self.qptr = np.zeros(len(self.uq) + 1, dtype=np.int64)
        np.cumsum(np.bincount(inv, minlength=len(self.uq)), out=self.qptr[1:])
        self._index = index
        self._permuted: dict[int, np.ndarray] = {}

    def combo(self, ci: int) -> np.ndarray:
        got = self._permuted.get(ci)
        if got is None:
            got = self._permuted[ci] = _apply(self.uq, self._index._fwd[ci])
        return got


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
        self._masks = [_U64(((1 << w) - 1) << (64 - s - w)) for s, w in self._chunks]
        self.combos = list(combinations(range(self.m), self.k))
        self._fwd, self._inv, self._key_bits, self._low, self._pmasks = [], [], [], [], []
        for combo in self.combos:
            rest = [c for c in range(self.m) if c not in combo]
            fwd, inv = self._layout(list(combo) + rest)
            bits = sum(self._chunks[c][1] for c in combo)
            self._fwd.append(fwd)
            self._inv.append(inv)
            self._key_bits.append(bits)
            self._low.append(_U64((1 << (64 - bits)) - 1))
            # chunk masks where the permutation puts them (a bit permutation maps "chunk equal" to "field zero")
            self._pmasks.append([_apply(np.array([m], np.uint64), fwd)[0] for m in self._masks])
        self._segments: list[_Segment] = []
        self._next_id = 0

    def __len__(self) -> int:
        return sum(len(s) for s in self._segments)

    @property
    def n_combos(self) -> int:
        return len(self.combos)

    # -- permutations ------------------------------------------------------------------------------
    def _layout(self, order: list[int]) -> tuple[list[tuple[np.uint64, int]], list[tuple[np.uint64, int]]]:
        """Forward and inverse (mask, shift) spans putting the chunks in `order` from the top bit down."""
        spans: list[tuple[int, int, int]] = []  # (source start, width, target start), bit 0 = MSB
        target = 0
        for c in order:
            start, width = self._chunks[c]
            if spans and spans[-1][0] + spans[-1][1] == start and spans[-1][2] + spans[-1][1] == target:
                s, w, t = spans[-1]
                spans[-1] = (s, w + width, t)
            else:
                spans.append((start, width, target))
            target += width
        fwd = [(_U64(((1 << w) - 1) << (64 - s - w)), s - t) for s, w, t in spans]
        inv = [(_U64(((1 << w) - 1) << (64 - t - w)), t - s) for s, w, t in spans]
        return fwd, inv

    def _first_combo(self, xp: np.ndarray, ci: int) -> np.ndarray:
        """True where combo ci is the first (lexicographic) all-equal chunk combination for the permuted XORs xp,
        so a pair equal on several combinations is reported once."""
        combo = self.combos[ci]
        pm = self._pmasks[ci]
        ok = (xp & ~self._low[ci]) == 0
        eq = np.zeros(len(xp), dtype=np.int8)
        for c in range(combo[-1] + 1):
            eq += (xp & pm[c]) == 0
        return ok & (eq == self.k)

    def _build(self, hashes: np.ndarray, ids: np.ndarray) -> _Segment:
        """Group entries by hash value, then per combination sort the permuted distinct values (a plain SIMD
        sort of uint64, no argsort)."""
        h = np.ascontiguousarray(hashes, dtype=np.uint64)
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(h)
        hs = h[order]
        new = np.empty(len(hs), dtype=bool)
        new[:1] = True
        np.not_equal(hs[1:], hs[:-1], out=new[1:])
        starts = np.flatnonzero(new)
        distinct = hs[starts]
        ptr = np.append(starts, len(hs)).astype(np.int64)
        values = np.empty((len(self.combos), len(distinct)), dtype=np.uint64)
        for ci in range(len(self.combos)):
            values[ci] = _apply(distinct, self._fwd[ci])
            values[ci].sort()
        return _Segment(distinct, ptr, ids[order], values)

    def _value_index(self, seg: _Segment, ci: int, positions: np.ndarray) -> np.ndarray:
        """Positions in seg.values[ci] -> index of that hash in seg.hashes."""
        vals = np.asarray(seg.values[ci])[positions]
        return np.searchsorted(np.asarray(seg.hashes), _apply(vals, self._inv[ci]))

    # -- search ------------------------------------------------------------------------------------
    def _self_join(self, seg: _Segment) -> tuple[np.ndarray, np.ndarray]:
        """Every pair of entries of one segment within the radius (id pairs, each pair once)."""
        ptr, ids = np.asarray(seg.ptr), np.asarray(seg.ids)
        a0, b0 = _same_hash_pairs(ptr, ids)
        out_a, out_b = [a0], [b0]
        ua_parts, ub_parts = [], []
        for ci in range(len(self.combos)):
            v = np.asarray(seg.values[ci])
            for i, j in _close_in_runs(v, v, self._low[ci], self.radius):
                ok = self._first_combo(v[i] ^ v[j], ci)
                if ok.any():
                    ua_parts.append(self._value_index(seg, ci, i[ok]))
                    ub_parts.append(self._value_index(seg, ci, j[ok]))
        if ua_parts:
            a, b = _expand(ptr, ids, _cat(ua_parts), ptr, ids, _cat(ub_parts))
            out_a.append(a)
            out_b.append(b)
        return _cat(out_a), _cat(out_b)

    def _directory(self, seg: _Segment) -> np.ndarray:
        """Bucket offsets on the top bits of the sorted values: about two values per bucket (never more bits than
        the narrowest key), so a lookup is two gathers instead of two binary searches."""
        if seg.dirs is None:
            n = len(seg.hashes)
            bits = min(min(self._key_bits), max(1, (max(n, 2) - 1).bit_length() - 1), 30)
            dtype = np.uint32 if n < 2**32 else np.uint64
            dirs = np.zeros((len(self.combos), (1 << bits) + 1), dtype=dtype)
            for ci in range(len(self.combos)):
                top = np.asarray(seg.values[ci]) >> _U64(64 - bits)
                np.cumsum(np.bincount(top.astype(np.int64), minlength=1 << bits), out=dirs[ci, 1:])
            seg.dirs = dirs
        return seg.dirs

    def _cross(self, query: _Query, seg: _Segment) -> tuple[np.ndarray, np.ndarray]:
        """(query position, id in seg) for every query hash and entry of seg within the radius. Combinations are
        searched on `LOOKUP_THREADS` threads when the batch is large (numpy's array work releases the GIL; a
        batch of 100,000 images is 600,000 hashes x 84 combinations against a 14M-hash index)."""
        if not len(query.uq) or not len(seg.hashes):
            return np.empty(0, np.int64), np.empty(0, np.int64)
        dirs = self._directory(seg)
        for ci in range(len(self.combos)):
            query.combo(ci)  # permuted once per batch, before any thread reads the cache
        threads = min(LOOKUP_THREADS, len(self.combos)) if len(query.uq) >= PARALLEL_MIN_QUERIES else 1
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads, thread_name_prefix="neardup") as pool:
                found = list(pool.map(lambda ci: self._cross_combo(query, seg, dirs, ci), range(len(self.combos))))
        else:
            found = [self._cross_combo(query, seg, dirs, ci) for ci in range(len(self.combos))]
        hit_u = [u for part in found for u in part[0]]
        hit_v = [v for part in found for v in part[1]]
        if not hit_u:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return _expand(query.qptr, query.order, _cat(hit_u), np.asarray(seg.ptr), np.asarray(seg.ids), _cat(hit_v))

    def _cross_combo(self, query: _Query, seg: _Segment, dirs: np.ndarray, ci: int
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The hits of one chunk combination: (distinct query value rows, value indexes in seg)."""
        shift = _U64(64 - seg.dir_bits)
        hit_u: list[np.ndarray] = []
        hit_v: list[np.ndarray] = []
        pq = query.combo(ci)
        v = np.asarray(seg.values[ci])
        top = (pq >> shift).view(np.int64)  # < 2**30: the same bits either way
        d_ci = dirs[ci]
        lo = d_ci.take(top)
        cnt = d_ci[1:].take(top)  # bucket ends (the next bucket's start)
        cnt -= lo
        act = np.flatnonzero(cnt)
        if not len(act):
            return hit_u, hit_v
        # Pass d compares every query with the d-th value of its bucket (contiguous values, no hash gathers).
        lo, cnt, qv, d = lo[act].astype(np.int64), cnt[act], pq[act], 0
        while len(act):
            sp = lo + d
            x = qv ^ v[sp]
            close = np.flatnonzero(_popcount(x) <= self.radius)
            if len(close):
                ok = close[self._first_combo(x[close], ci)]
                if len(ok):
                    hit_u.append(act[ok])
                    hit_v.append(self._value_index(seg, ci, sp[ok]))
            d += 1
            more = cnt > d
            if not more.all():
                act, lo, cnt, qv = act[more], lo[more], cnt[more], qv[more]
        return hit_u, hit_v

    def query(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (query position, indexed id) with Hamming distance <= radius. The index is not modified."""
        prepared = _Query(self, hashes)
        parts = [self._cross(prepared, seg) for seg in self._segments]
        return _cat([p[0] for p in parts]), _cat([p[1] for p in parts])

    def self_pairs(self) -> np.ndarray:
        """Every pair (id_a, id_b), id_a != id_b, of indexed hashes within the radius, each pair once."""
        a_parts, b_parts = [], []
        for i, seg in enumerate(self._segments):
            a, b = self._self_join(seg)
            a_parts.append(a)
            b_parts.append(b)
            for later in self._segments[i + 1 :]:
                qi, ids = self._cross(_Query(self, later.entry_hashes()), seg)
                a_parts.append(np.asarray(later.ids)[qi])
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
        ids = np.asarray(seg.ids)
        self._next_id = max(self._next_id, int(ids.max()) + 1 if len(ids) else 0)
        self._segments.append(seg)
        # Log-structured merge: keep segment sizes roughly geometric, so total re-sorting stays O(n log n).
        while len(self._segments) > 1 and len(self._segments[-1]) * 2 >= len(self._segments[-2]):
            b, a = self._segments.pop(), self._segments.pop()
            self._segments.append(self._build(np.concatenate([a.entry_hashes(), b.entry_hashes()]),
                                              np.concatenate([np.asarray(a.ids), np.asarray(b.ids)])))

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


def _same_hash_pairs(ptr: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of entries holding the same hash value (distance 0), each pair once."""
    cnt = np.diff(ptr)
    groups = np.flatnonzero(cnt > 1)
    if not len(groups):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    lens = cnt[groups] - 1  # positions of a group that have a later partner
    pos = np.repeat(ptr[groups], lens) + (np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens))
    end = np.repeat(ptr[groups + 1], lens)
    a_parts, b_parts, d = [], [], 1
    while len(pos):
        a_parts.append(ids[pos])
        b_parts.append(ids[pos + d])
        keep = pos + d + 1 < end
        pos, end = pos[keep], end[keep]
        d += 1
    return np.concatenate(a_parts).astype(np.int64), np.concatenate(b_parts).astype(np.int64)


def _expand(ptr_a: np.ndarray, ids_a: np.ndarray, ua: np.ndarray, ptr_b: np.ndarray, ids_b: np.ndarray,
            ub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value pairs (ua[i], ub[i]) -> every (entry of ua[i], entry of ub[i]) pair, through the two CSR maps."""
    ca, cb = ptr_a[ua + 1] - ptr_a[ua], ptr_b[ub + 1] - ptr_b[ub]
    if (ca == 1).all() and (cb == 1).all():
        return np.asarray(ids_a[ptr_a[ua]], np.int64), np.asarray(ids_b[ptr_b[ub]], np.int64)
    n = ca * cb
    grp = np.repeat(np.arange(len(n)), n)
    off = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    return (np.asarray(ids_a[ptr_a[ua][grp] + off // cb[grp]], np.int64),
            np.asarray(ids_b[ptr_b[ub][grp] + off % cb[grp]], np.int64))


def _close_in_runs(p: np.ndarray, hs: np.ndarray, low: np.uint64, r: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Positions (i < j) in sorted values p with equal key bits (above `low`) and popcount(hs[i] ^ hs[j]) <= r.

    Compares every position with the one d places ahead, d = 1, 2, ...: while most positions still have a
    same-key partner d ahead, on the whole array (contiguous SIMD, no gathers); then only on the positions whose run
    continues (gathers on a shrinking set). Work ~ number of candidate pairs, no pair lists are materialised.
    """
    n = len(p)
    if n < 2:
        return
    same = (p[1:] ^ p[:-1]) <= low  # same[i]: i and i + 1 share the key
    eq, d = same, 1  # eq[i]: i and i + d share the key
    x, pc_, close = np.empty(n, np.uint64), np.empty(n, np.uint8), np.empty(n, bool)  # reused buffers
    while True:
        cnt = int(np.count_nonzero(eq))
        if cnt == 0:
            return
        if cnt * 8 < len(eq):
            break
        w = n - d
        np.bitwise_xor(hs[d:], hs[:-d], out=x[:w])
        np.less_equal(np.bitwise_count(x[:w], out=pc_[:w]), r, out=close[:w])
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
    images = fill_added_hashes(images)  # rows from before a hash column existed: the whole-image phash stands in
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
    if not len(df):
        return np.empty((0, len(HASH_COLUMNS)), np.uint64)
    return np.stack([df[c].to_numpy(dtype=np.uint64) for c in HASH_COLUMNS], axis=1)


def _thumb_words(df: pd.DataFrame) -> np.ndarray:
    if not len(df):
        return np.empty((0, len(THUMB_COLUMNS)), np.uint64)
    return np.stack([df[c].to_numpy(dtype=np.uint64) for c in THUMB_COLUMNS], axis=1)


def _thumbs(df: pd.DataFrame) -> np.ndarray:
    return unpack_thumbs(_thumb_words(df))


def thumb_distance(ta: np.ndarray, tb: np.ndarray) -> np.ndarray:
    """Trimmed mean |a - b| over thumbnail cells (rows are images), the worst THUMB_TRIM share dropped."""
    d = np.sort(np.abs(ta - tb), axis=1)
    keep = d.shape[1] - int(d.shape[1] * THUMB_TRIM)
    return d[:, :keep].mean(axis=1)


def best_hash_distance(ha: np.ndarray, hb: np.ndarray) -> np.ndarray:
    """Smallest Hamming distance over the compared (hash of a, hash of b) combinations (fingerprint.HASH_PAIRS:
    a shifted window is compared with the centred ones, not with another shifted one); ha, hb are (n, H) uint64."""
    d = _popcount(ha[:, :, None] ^ hb[:, None, :])
    if ha.shape[1] == hb.shape[1] == len(HASH_COLUMNS):
        d = np.where(np.asarray(HASH_PAIRS)[None], d, np.uint8(255))
    return d.reshape(len(ha), ha.shape[1] * hb.shape[1]).min(axis=1)


def _id_bytes(ids: Any) -> np.ndarray:
    """Image ids as a fixed-width bytes array (sortable, searchable and memory-mappable)."""
    encoded = [str(i).encode() for i in ids]
    return np.array(encoded, dtype=np.bytes_) if encoded else np.empty(0, dtype="S1")


@dataclass
class _ImageSegment:
    """Images indexed together: ids ascending, their hashes and packed thumbnails in the same row order, and a
    HammingIndex segment over the hashes (entry id = row * H + hash column)."""

    image_ids: np.ndarray  # (n,) fixed-width bytes
    hashes: np.ndarray  # (n, H) uint64
    thumbs: np.ndarray  # (n, T) uint64: packed thumbnail words
    index: _Segment
    name: str = ""  # set once the segment is written to a store

    def __len__(self) -> int:
        return len(self.image_ids)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id (a bytes array), -1 where absent."""
        n = len(self.image_ids)
        out = np.full(len(ids), -1, dtype=np.int64)
        if not n or not len(ids):
            return out
        width = self.image_ids.dtype.itemsize
        fits = np.char.str_len(ids) <= width  # a longer id cannot be here (casting would truncate it)
        needles = ids.astype(self.image_ids.dtype)
        pos = np.searchsorted(self.image_ids, needles)
        pos = np.minimum(pos, n - 1)
        found = fits & (np.asarray(self.image_ids[pos]) == needles)
        out[found] = pos[found]
        return out

    def id_strings(self, rows: np.ndarray) -> np.ndarray:
        return np.array([b.decode() for b in np.asarray(self.image_ids[rows]).tolist()], dtype=object)


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
                 n_hint: int = 1_000_000, *, chunks: int | None = None, max_merge: int | None = None) -> None:
        self.radius = radius
        self.max_thumb_dist = max_thumb_dist
        self._engine = HammingIndex(radius, n_hint=n_hint * len(HASH_COLUMNS), chunks=chunks)
        self.segments: list[_ImageSegment] = []
        # Segments are merged while sizes stay geometric; `max_merge` images caps a merged segment (so a merge
        # never re-sorts more than that many images at once; lookups then visit a few more segments).
        self.max_merge = max_merge

    @property
    def chunks(self) -> int:
        return self._engine.m

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)

    # -- segments ------------------------------------------------------------------------------------
    def _segment(self, ids: np.ndarray, hashes: np.ndarray, thumbs: np.ndarray) -> _ImageSegment:
        order = np.argsort(ids, kind="stable")
        ids, hashes, thumbs = ids[order], np.ascontiguousarray(hashes[order]), np.ascontiguousarray(thumbs[order])
        h = len(HASH_COLUMNS)
        index = self._engine._build(hashes.reshape(-1), np.arange(len(ids) * h, dtype=np.int64))
        return _ImageSegment(ids, hashes, thumbs, index)

    def _append(self, seg: _ImageSegment) -> list[_ImageSegment]:
        """Add a segment, merging geometric neighbours; returns the segments merged away."""
        self.segments.append(seg)
        gone: list[_ImageSegment] = []
        while len(self.segments) > 1 and len(self.segments[-1]) * 2 >= len(self.segments[-2]) and (
                self.max_merge is None or len(self.segments[-1]) + len(self.segments[-2]) <= self.max_merge):
            b, a = self.segments.pop(), self.segments.pop()
            gone += [s for s in (a, b) if s.name]
            self.segments.append(self._segment(
                np.concatenate([np.asarray(a.image_ids), np.asarray(b.image_ids)]),
                np.concatenate([np.asarray(a.hashes), np.asarray(b.hashes)]),
                np.concatenate([np.asarray(a.thumbs), np.asarray(b.thumbs)])))
        return gone

    def contains(self, image_ids: Any) -> np.ndarray:
        """Which of these image ids are indexed."""
        ids = _id_bytes(image_ids)
        out = np.zeros(len(ids), dtype=bool)
        for seg in self.segments:
            out |= seg.positions(ids) >= 0
        return out

    # -- search ----------------------------------------------------------------------------------------
    def _verified(self, hq: np.ndarray, tq: np.ndarray, hr: np.ndarray, tr: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = best_hash_distance(hq, hr)
        t = thumb_distance(unpack_thumbs(tq), unpack_thumbs(tr))
        return (d <= self.radius) & (t <= self.max_thumb_dist), d, t

    def _lookup(self, hq: np.ndarray, tq: np.ndarray) -> list[tuple[np.ndarray, _ImageSegment, np.ndarray, np.ndarray,
                                                                    np.ndarray]]:
        """Per segment: (query rows, segment, segment rows, hash distance, thumb distance) of verified pairs."""
        h = len(HASH_COLUMNS)
        out = []
        if not len(hq):
            return out
        prepared = _Query(self._engine, hq.reshape(-1))
        for seg in self.segments:
            qpos, ids = self._engine._cross(prepared, seg.index)
            if not len(qpos):
                continue
            n = len(seg) + 1
            pair = np.unique((qpos // h).astype(np.int64) * n + ids // h)
            qr, sr = pair // n, pair % n
            ok, d, t = self._verified(hq[qr], tq[qr], np.asarray(seg.hashes)[sr], np.asarray(seg.thumbs)[sr])
            out.append((qr[ok], seg, sr[ok], d[ok], t[ok]))
        return out

    def query(self, images: Any) -> pd.DataFrame:
        """Verified near-duplicates of `images` among the indexed images (identical images included).

        Returns columns query_image_id, reference_image_id, hash_distance, thumb_distance.
        """
        q = _frame(images, "query images")
        qids = q["image_id"].to_numpy(dtype=object)
        parts = [pd.DataFrame({"query_image_id": qids[qr], "reference_image_id": seg.id_strings(sr),
                               "hash_distance": d.astype(np.int32), "thumb_distance": t.astype(np.float32)})
                 for qr, seg, sr, d, t in self._lookup(_hash_matrix(q), _thumb_words(q))]
        return _pairs_frame(parts, ["query_image_id", "reference_image_id"])

    def add(self, images: Any) -> pd.DataFrame:
        """Add a batch; return the verified near-duplicate pairs it forms with earlier images and within itself.

        Rows whose image_id is already indexed are skipped. Columns: image_id, other_image_id, hash_distance,
        thumb_distance (image_id is from the new batch; inside the batch, image_id < other_image_id).
        """
        pairs, _ = self.add_batch(images)
        return pairs

    def add_batch(self, images: Any) -> tuple[pd.DataFrame, list[_ImageSegment]]:
        """`add`, also returning the segments merged away (a stored index deletes their files once committed)."""
        new = _frame(images, "images to index")
        if len(new) and self.segments:
            new = new[~self.contains(new["image_id"])].reset_index(drop=True)
        hq, tq = _hash_matrix(new), _thumb_words(new)
        ids = _id_bytes(new["image_id"])
        parts = []
        for qr, seg, sr, d, t in self._lookup(hq, tq):
            parts.append(pd.DataFrame({"image_id": new["image_id"].to_numpy(dtype=object)[qr],
                                       "other_image_id": seg.id_strings(sr), "hash_distance": d.astype(np.int32),
                                       "thumb_distance": t.astype(np.float32)}))
        if not len(new):
            return _pairs_frame(parts, ["image_id", "other_image_id"]), []
        seg = self._segment(ids, hq, tq)
        a, b = self._engine._self_join(seg.index)
        h = len(HASH_COLUMNS)
        ra, rb = a // h, b // h
        keep = ra != rb
        n = len(seg) + 1
        pair = np.unique(np.minimum(ra, rb)[keep] * n + np.maximum(ra, rb)[keep])
        ra, rb = pair // n, pair % n
        if len(ra):
            hs, ts = seg.hashes, seg.thumbs
            ok, d, t = self._verified(hs[ra], ts[ra], hs[rb], ts[rb])
            parts.append(pd.DataFrame({"image_id": seg.id_strings(ra[ok]), "other_image_id": seg.id_strings(rb[ok]),
                                       "hash_distance": d[ok].astype(np.int32),
                                       "thumb_distance": t[ok].astype(np.float32)}))
        gone = self._append(seg)
        out = _pairs_frame(parts, ["image_id", "other_image_id"])
        return out[out["image_id"] != out["other_image_id"]].reset_index(drop=True), gone


def _pairs_frame(parts: list[pd.DataFrame], names: list[str]) -> pd.DataFrame:
    parts = [p for p in parts if len(p)]
    if parts:
        return pd.concat(parts, ignore_index=True)
    return pd.DataFrame({names[0]: pd.Series(dtype=object), names[1]: pd.Series(dtype=object),
                         "hash_distance": pd.Series(dtype=np.int32), "thumb_distance": pd.Series(dtype=np.float32)})


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


# ---- persistence ---------------------------------------------------------------------------------------------

INDEX_PREFIX = "ingest/neardup/"
_SEGMENT_ARRAYS = ("image_ids", "hashes", "thumbs", "index_hashes", "index_ptr", "index_ids", "index_values",
                   "index_dirs")


class IndexMismatch(ValueError):
    """The stored index was built with other fingerprint columns or search parameters than this code uses."""


def _local_path(store: Any, key: str) -> str | None:
    from pipeline.store import LocalStore

    return str(store.path(key)) if isinstance(store, LocalStore) else None


def _put_array(store: Any, key: str, arr: np.ndarray) -> None:
    """Write one .npy object; on a local store straight to a temp file next to it (fsync, rename), so a
    multi-GB array is never copied into memory."""
    path = _local_path(store, key)
    if path is None:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
        store.put(key, buf.getvalue())
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".part")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _get_array(store: Any, key: str) -> np.ndarray:
    """Read one .npy object: memory-mapped on a local store (pages are read when a lookup touches them)."""
    path = _local_path(store, key)
    if path is not None:
        if not os.path.exists(path):
            from pipeline.store import MissingKey

            raise MissingKey(f"{store.url}/{key} does not exist")
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError:  # an empty array cannot be mapped
            return np.load(path, allow_pickle=False)
    return np.load(io.BytesIO(store.get(key)), allow_pickle=False)


def compatible(spec: dict[str, Any]) -> bool:
    """Was a stored index (and the pairs found with it) built the way this code fingerprints and verifies?"""
    return (list(spec.get("hash_columns", [])) == list(HASH_COLUMNS)
            and list(spec.get("thumb_columns", [])) == list(THUMB_COLUMNS)
            and spec.get("radius") == DEFAULT_RADIUS and spec.get("max_thumb_dist") == DEFAULT_MAX_THUMB_DIST
            and [list(r) for r in spec.get("hash_pairs", [])] == [list(r) for r in HASH_PAIRS])


class StoredIndex:
    """A NearDupIndex kept in a store: immutable segment folders (`segments/<name>/*.npy`) and numbered manifests
    (`manifests/<generation>.json`, each created with an exclusive put) naming the live segments.

    A new generation's segment files are written first and the manifest last, so a reader (or a crash) sees
    either the previous generation or the whole new one; files no manifest names are leftovers and are deleted
    by `cleanup`. The manifest also carries whatever the caller adds (the ingest merge records its bookkeeping
    there)."""

    KEEP_MANIFESTS = 3

    def __init__(self, store: Any, prefix: str = INDEX_PREFIX) -> None:
        self.store = store
        self.prefix = prefix

    def _manifest_key(self, gen: int) -> str:
        return f"{self.prefix}manifests/{gen:010d}.json"

    def generations(self) -> list[int]:
        out = []
        for key in self.store.list(f"{self.prefix}manifests/"):
            stem = key.rsplit("/", 1)[-1]
            if stem.endswith(".json") and stem[:-5].isdigit():
                out.append(int(stem[:-5]))
        return sorted(out)

    def latest(self) -> dict[str, Any] | None:
        """The newest manifest, or None when the store has no index."""
        gens = self.generations()
        return json.loads(self.store.get(self._manifest_key(gens[-1]))) if gens else None

    def load(self, manifest: dict[str, Any]) -> NearDupIndex:
        """The index a manifest names; IndexMismatch if this code fingerprints or searches differently."""
        spec = manifest["index"]
        if not compatible(spec):
            raise IndexMismatch(f"the stored near-duplicate index was built with {spec}; this code uses hash columns "
                                f"{list(HASH_COLUMNS)}, radius {DEFAULT_RADIUS}, thumbnail distance "
                                f"{DEFAULT_MAX_THUMB_DIST}")
        idx = NearDupIndex(int(spec["radius"]), float(spec["max_thumb_dist"]), chunks=int(spec["chunks"]),
                           max_merge=spec.get("max_merge"))
        for entry in manifest["segments"]:
            a = {n: _get_array(self.store, f"{self.prefix}segments/{entry['name']}/{n}.npy") for n in _SEGMENT_ARRAYS}
            index = _Segment(a["index_hashes"], a["index_ptr"], a["index_ids"], a["index_values"], a["index_dirs"])
            if a["index_values"].shape[0] != len(idx._engine.combos):
                raise IndexMismatch(f"segment {entry['name']} has {a['index_values'].shape[0]} chunk combinations, "
                                    f"the manifest's chunking has {len(idx._engine.combos)}")
            idx.segments.append(_ImageSegment(a["image_ids"], a["hashes"], a["thumbs"], index, entry["name"]))
        return idx

    def write_segments(self, index: NearDupIndex, generation: int) -> list[dict[str, Any]]:
        """Write the segments not stored yet (named after `generation`); returns the manifest's segment list."""
        entries = []
        for i, seg in enumerate(index.segments):
            if not seg.name:
                name = f"{generation:010d}-{i:03d}"
                index._engine._directory(seg.index)
                arrays = {"image_ids": seg.image_ids, "hashes": seg.hashes, "thumbs": seg.thumbs,
                          "index_hashes": seg.index.hashes, "index_ptr": seg.index.ptr, "index_ids": seg.index.ids,
                          "index_values": seg.index.values, "index_dirs": seg.index.dirs}
                for n in _SEGMENT_ARRAYS:
                    _put_array(self.store, f"{self.prefix}segments/{name}/{n}.npy", arrays[n])
                seg.name = name
            entries.append({"name": seg.name, "n_images": len(seg), "n_hashes": int(len(seg.index.hashes))})
        return entries

    @staticmethod
    def spec(index: NearDupIndex) -> dict[str, Any]:
        return {"radius": index.radius, "max_thumb_dist": index.max_thumb_dist, "chunks": index.chunks,
                "hash_columns": list(HASH_COLUMNS), "thumb_columns": list(THUMB_COLUMNS), "max_merge": index.max_merge,
                "hash_pairs": [list(row) for row in HASH_PAIRS]}

    def commit(self, manifest: dict[str, Any]) -> None:
        """Publish a generation: an exclusive put, so of two merges racing for one generation only one lands
        (the other gets pipeline.store.KeyExists and must start again from the new generation)."""
        self.store.put(self._manifest_key(int(manifest["generation"])),
                       json.dumps(manifest, indent=1, sort_keys=True, default=str).encode(), exclusive=True)

    def cleanup(self, manifest: dict[str, Any]) -> list[str]:
        """Delete segment files the committed `manifest` does not name (merged-away segments, a crashed attempt's
        files) and all but the last KEEP_MANIFESTS manifests; returns the deleted keys."""
        live = {e["name"] for e in manifest["segments"]}
        gone = []
        for key in self.store.list(f"{self.prefix}segments/"):
            name = key[len(f"{self.prefix}segments/"):].split("/", 1)[0]
            if name not in live:
                self.store.delete(key)
                gone.append(key)
        for gen in self.generations()[: -self.KEEP_MANIFESTS]:
            self.store.delete(self._manifest_key(gen))
            gone.append(self._manifest_key(gen))
        return gone
