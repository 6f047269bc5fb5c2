"""Train / val / test splits: per-class quotas as ILSVRC had them, deterministic, stable across versions.

Rules, in order:
1. An image that was in the parent release keeps the split it had there (stability: a val image never
   leaks into a later train set, and results on val stay comparable between versions).
2. Each class's val and test quotas are topped up from its new images, ranked by a salted 64-bit hash of
   the image id (FNV-1a over salt NUL image_id, finalised with splitmix64; `split_key_reference`): the same
   inputs and salt always give the same split, whatever order the rows come in. A quota is a count, or a
   fraction in (0, 1) of the class's images (parent images included), rounded half up (`class_quotas`).
3. Everything else is train; then train images that are near-duplicates of a val or test image are
   dropped, so an edited copy of a val image cannot be trained on: from the ingest stage's near_pairs table when
   it covers the images (`near_pair_drops`), else by a search (pipeline.ingest.neardup.cross_duplicates).

    >>> import pandas as pd
    >>> primary = pd.DataFrame({"image_id": [f"i{k}" for k in range(6)], "wnid": ["n00000001"] * 6})
    >>> s = assign_splits(primary, val_per_class=1, test_per_class=2, salt="x")
    >>> s.split.value_counts().sort_index().to_dict()
    {'test': 2, 'train': 3, 'val': 1}
    >>> import numpy as np
    >>> class_quotas(0.2, np.array([10, 3, 0])).tolist(), class_quotas(4, np.array([10, 3, 0])).tolist()
    ([2, 1, 0], [4, 4, 4])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

SPLITS = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2
CrossDuplicates = Callable[[Any, Any], pd.DataFrame]
Quota = int | float  # images per class, or a fraction in (0, 1) of each class's images

_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_key_reference(image_id: str, salt: str) -> int:
    """The salted key of one image, in plain Python: FNV-1a 64 over salt NUL image_id, then splitmix64."""
    h = int(_FNV_OFFSET)
    for b in salt.encode() + b"\0" + image_id.encode():
        h = ((h ^ b) * int(_FNV_PRIME)) & 0xFFFFFFFFFFFFFFFF
    return int(_splitmix64(np.array([h], dtype=np.uint64))[0])


def split_keys(image_ids: Any, salt: str) -> np.ndarray:
    """Salted 64-bit key per image id (vectorised `split_key_reference`): an image's rank within its class.

    Vectorised over the bytes of all ids at once, because a Python loop over 1.3M ids costs seconds.
    """
    arr = pa.array(image_ids, pa.string()) if not isinstance(image_ids, pa.Array | pa.ChunkedArray) else image_ids
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.string())
    n = len(arr)
    if arr.null_count:
        raise ValueError("split_keys: image ids must not be null")
    h0 = int(_FNV_OFFSET)
    for b in salt.encode() + b"\0":
        h0 = ((h0 ^ b) * int(_FNV_PRIME)) & 0xFFFFFFFFFFFFFFFF
    h = np.full(n, h0, dtype=np.uint64)
    if n == 0:
        return h
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset:arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    starts = offsets[:-1]
    with np.errstate(over="ignore"):
        if (lengths == lengths[0]).all():  # the usual case (sha256 hex ids): a dense n x L byte matrix
            length = int(lengths[0])
            mat = data[starts[0]:starts[0] + n * length].reshape(n, length) if length else np.zeros((n, 0), np.uint8)
            return _splitmix64(_fnv_rows(mat, h))
        for j in range(int(lengths.max())):
            active = np.nonzero(lengths > j)[0]
            h[active] = (h[active] ^ data[starts[active] + j].astype(np.uint64)) * _FNV_PRIME
        return _splitmix64(h)


_FNV_BLOCK = 2048  # rows per block: a block's byte columns (L x 2048 x 8 bytes) stay in cache


def _fnv_rows(mat: np.ndarray, h: np.ndarray) -> np.ndarray:
    """FNV-1a over each row of an n x L byte matrix, from start values h (updated in place).

    Blocks of rows are transposed once, so each of the L steps is two in-place ufuncs on a contiguous
    cached vector (a strided column per step over all n rows took twice as long)."""
    for a in range(0, len(mat), _FNV_BLOCK):
        cols = mat[a:a + _FNV_BLOCK].T.astype(np.uint64)  # L x block, C-contiguous
        hb = h[a:a + _FNV_BLOCK]
        for col in cols:
            np.bitwise_xor(hb, col, out=hb)
            np.multiply(hb, _FNV_PRIME, out=hb)
    return h


def check_quota(value: Any, name: str = "quota") -> Quota:
    """`value` as a quota: a whole count >= 0 (int), or a fraction strictly between 0 and 1 (float). Raises
    ValueError saying which forms are allowed."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a count (e.g. 50) or a fraction in (0, 1) (e.g. 0.1), got {value!r}")
    if isinstance(value, int | np.integer):
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value}")
        return int(value)
    if not np.isfinite(value) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name}: a fraction must lie strictly between 0 and 1 (e.g. 0.1); write a count as a "
                         f"whole number (e.g. 50); got {value!r}")
    return float(value)


def is_fraction(quota: Quota) -> bool:
    return isinstance(quota, float)


def class_quotas(quota: Quota, class_sizes: np.ndarray) -> np.ndarray:
    """Images each class puts in a split: a count as is for every class, a fraction of each class's images
    rounded half up (0.2 of 3 images is 1, of 2 images 0)."""
    sizes = np.asarray(class_sizes, dtype=np.int64)
    quota = check_quota(quota)
    if is_fraction(quota):
        return np.floor(sizes * quota + 0.5 + 1e-9).astype(np.int64)
    return np.full(len(sizes), quota, dtype=np.int64)


def argsort_stable(keys: np.ndarray) -> np.ndarray:
    """Same result as np.argsort(keys, kind="stable"), faster for 64-bit keys: numpy's unstable sort is
    SIMD (6x faster than its stable timsort on 1.3M random uint64), and ties, rare for hash keys, are then
    put back in input order."""
    order = np.argsort(keys)
    if len(order) < 2:
        return order
    sk = keys[order]
    tie = sk[1:] == sk[:-1]
    if tie.any():
        pos = np.nonzero(np.r_[tie, False] | np.r_[False, tie])[0]  # positions inside runs of equal keys
        run = np.cumsum(np.r_[True, ~tie])[pos]
        sub = order[pos]
        order[pos] = sub[np.lexsort((sub, run))]
    return order


def class_then_key_order(class_codes: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Indices ordering rows by class code, then key; ties keep input order. Two stable single-key sorts
    (the class pass is a radix sort when codes fit 16 bits) instead of a multi-key lexsort."""
    by_key = argsort_stable(keys)
    cls = class_codes[by_key]
    if len(cls) and cls.max() < 2**15:
        cls = cls.astype(np.int16)
    return by_key[np.argsort(cls, kind="stable")]


def split_codes(
    class_codes: np.ndarray, keys: np.ndarray, parent: np.ndarray, *, val_per_class: int | np.ndarray,
    test_per_class: int | np.ndarray
) -> np.ndarray:
    """Vectorised core: split code (TRAIN/VAL/TEST) per image from its class code, salted key and parent
    split code (-1 = new image). A quota is one count for every class or an array of counts by class code
    (`class_quotas`)."""
    n = len(class_codes)
    out = np.full(n, TRAIN, dtype=np.int8)
    from_parent = parent >= 0
    out[from_parent] = parent[from_parent]
    if n == 0:
        return out
    n_classes = int(class_codes.max()) + 1
    have_val = np.bincount(class_codes[from_parent & (parent == VAL)], minlength=n_classes)
    have_test = np.bincount(class_codes[from_parent & (parent == TEST)], minlength=n_classes)
    new = np.nonzero(~from_parent)[0]
    order = new[class_then_key_order(class_codes[new], keys[new])]
    cls = class_codes[order]
    group_start = np.r_[0, np.nonzero(cls[1:] != cls[:-1])[0] + 1]
    sizes = np.diff(np.r_[group_start, len(cls)])
    rank = np.arange(len(cls)) - np.repeat(group_start, sizes)
    val_q = _per_class(val_per_class, n_classes)
    test_q = _per_class(test_per_class, n_classes)
    need_val = np.maximum(val_q[cls] - have_val[cls], 0)
    need_test = np.maximum(test_q[cls] - have_test[cls], 0)
    out[order] = np.where(rank < need_val, VAL, np.where(rank < need_val + need_test, TEST, TRAIN))
    return out


def _per_class(quota: int | np.ndarray, n_classes: int) -> np.ndarray:
    q = np.asarray(quota, dtype=np.int64)
    if q.ndim == 0:
        return np.full(n_classes, int(q), dtype=np.int64)
    if len(q) < n_classes:
        raise ValueError(f"a quota per class needs {n_classes} values, got {len(q)}")
    return q


def assign_splits(
    primary: pd.DataFrame,
    parent: pd.DataFrame | None = None,
    *,
    val_per_class: Quota,
    test_per_class: Quota,
    salt: str,
) -> pd.DataFrame:
    """Give each (image_id, wnid) row of `primary` (one row per image) a split.

    `parent` has image_id and split from the parent release (None for a first release). Quotas are counts
    or fractions of each class's images (`class_quotas`). Returns columns image_id, wnid, split, from_parent.
    """
    df = primary[["image_id", "wnid"]].reset_index(drop=True)
    if df.image_id.duplicated().any():
        dup = df.image_id[df.image_id.duplicated()].iloc[0]
        raise ValueError(f"assign_splits needs one row per image; image {dup} appears more than once")
    parent_codes = np.full(len(df), -1, dtype=np.int8)
    if parent is not None and len(parent):
        bad = set(parent.split.unique()) - set(SPLITS)
        if bad:
            raise ValueError(f"parent release has unknown split values {sorted(bad)}; expected {SPLITS}")
        p = parent.drop_duplicates("image_id")
        ids = pa.array(df.image_id, pa.string())
        pos = pc.index_in(ids, value_set=pa.array(p.image_id, pa.string())).to_numpy(zero_copy_only=False)
        found = ~np.isnan(pos.astype(np.float64))
        pcodes = p.split.map({s: k for k, s in enumerate(SPLITS)}).to_numpy(dtype=np.int8)
        parent_codes[found] = pcodes[pos[found].astype(np.int64)]
    class_codes, classes = pd.factorize(df.wnid, sort=True)
    class_codes = class_codes.astype(np.int64)
    sizes = np.bincount(class_codes, minlength=len(classes))
    codes = split_codes(class_codes, split_keys(pa.array(df.image_id, pa.string()), salt), parent_codes,
                        val_per_class=class_quotas(val_per_class, sizes),
                        test_per_class=class_quotas(test_per_class, sizes))
    df["split"] = np.asarray(SPLITS, dtype=object)[codes]
    df["from_parent"] = parent_codes >= 0
    return df


def _default_cross_duplicates() -> CrossDuplicates:
    try:
        from pipeline.ingest.neardup import cross_duplicates
    except ImportError as exc:
        from pipeline.release.manifest import ReleaseError

        raise ReleaseError(
            "near-duplicate search (pipeline.ingest.neardup.cross_duplicates) is not available, so train/val "
            f"leakage cannot be checked ({exc}); install the ingest stage or pass neardup=False to skip the check"
        ) from exc
    return cross_duplicates


def train_near_duplicates_rows(
    images: pa.Table, train_rows: np.ndarray, held_rows: np.ndarray, cross_duplicates: CrossDuplicates | None = None
) -> set[str]:
    """Image ids among `images` rows `train_rows` that are near-duplicates of rows `held_rows` (val/test).

    Rows go to the search as Arrow (pandas would turn nullable uint64 hashes into floats).
    """
    if not len(train_rows) or not len(held_rows):
        return set()
    search = cross_duplicates or _default_cross_duplicates()
    pairs = search(images.take(pa.array(train_rows)), images.take(pa.array(held_rows)))
    if pairs is None or not len(pairs):
        return set()
    return set(pd.Series(pairs["query_image_id"]).astype(str))


def near_pair_drops(code_a: np.ndarray, code_b: np.ndarray, split_of: np.ndarray) -> np.ndarray:
    """Image codes of train images that a near-duplicate pair joins to a val or test image.

    `code_a`, `code_b`: the pairs as image codes (-1: not a released image); `split_of`: split code per image code
    (-1: no primary label). The same answer as `train_near_duplicates_rows` searching train against val/test, from
    pairs already found (pipeline.ingest's near_pairs table).

    >>> near_pair_drops(np.array([0, 1, 2, -1]), np.array([1, 2, 3, 0]), np.array([TRAIN, VAL, TRAIN, TEST])).tolist()
    [0, 2]
    """
    ok = (code_a >= 0) & (code_b >= 0)
    a, b = code_a[ok], code_b[ok]
    sa, sb = split_of[a], split_of[b]
    return np.unique(np.concatenate([a[(sa == TRAIN) & (sb > TRAIN)], b[(sb == TRAIN) & (sa > TRAIN)]]))
