"""Near-duplicate search: exactness against brute force, incremental add, edited copies vs distinct photos."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from pipeline.ingest.fingerprint import fingerprint
from pipeline.ingest.neardup import HammingIndex, NearDupIndex, cross_duplicates, near_duplicate_pairs


def _random_hashes(n: int, n_planted: int, radius: int, seed: int) -> tuple[np.ndarray, set[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    planted = set()
    for i in range(0, 2 * n_planted, 2):
        flips = rng.choice(64, int(rng.integers(0, radius + 1)), replace=False)
        h[i + 1] = h[i] ^ np.uint64(sum(1 << int(b) for b in flips))
        planted.add((i, i + 1))
    h[n - 5 :] = h[7]  # exact copies too
    return h, planted


def _brute(h: np.ndarray, radius: int) -> set[tuple[int, int]]:
    d = np.bitwise_count(h[:, None] ^ h[None, :])
    a, b = np.nonzero(np.triu(d <= radius, 1))
    return set(zip(a.tolist(), b.tolist(), strict=True))


@pytest.mark.parametrize("radius,n_hint", [(6, 2000), (6, 1_000_000), (3, 2000), (10, 2000)])
def test_self_pairs_exact_against_brute_force(radius: int, n_hint: int) -> None:
    h, planted = _random_hashes(2000, 300, radius, seed=radius)
    idx = HammingIndex(radius, n_hint=n_hint)
    idx.add(h)
    pairs = idx.self_pairs()
    got = set(map(tuple, pairs.tolist()))
    assert len(got) == len(pairs)  # each pair once
    assert got == _brute(h, radius)
    assert planted <= got


def _clustered_hashes(n: int, seed: int) -> np.ndarray:
    """Hashes sharing their top 24 bits in a few big groups (long runs of equal keys), with near copies."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    tops = rng.integers(0, 1 << 24, 6, dtype=np.uint64)
    h = (h & np.uint64((1 << 40) - 1)) | (tops[rng.integers(0, len(tops), n)] << np.uint64(40))
    for i in range(0, n // 3, 2):  # near copies at distance 0..8 around the radius
        flips = rng.choice(64, int(rng.integers(0, 9)), replace=False)
        h[i + 1] = h[i] ^ np.uint64(sum(1 << int(b) for b in flips))
    return h


@pytest.mark.parametrize("radius,chunks", [(6, 7), (6, 8), (6, 9), (6, 10), (2, 3), (2, 5), (0, None), (0, 4), (2, 13),
                                           (4, 5)])
def test_every_chunking_is_exact_on_clustered_hashes(radius: int, chunks: int | None) -> None:
    """Any chunking (and a key truncated to make room for positions, as radius 0's 64-bit key is) is exact:
    each pair within the radius once, none outside; long runs of equal keys go through the sparse passes."""
    h = _clustered_hashes(1500, seed=chunks or 0)
    h[-40:] = h[:40]  # exact copies: equal full keys
    idx = HammingIndex(radius, chunks=chunks)
    idx.add(h)
    pairs = idx.self_pairs()
    got = set(map(tuple, pairs.tolist()))
    assert len(got) == len(pairs)
    assert got == _brute(h, radius)
    # lookup of a batch against the index gives the same pairs (both gather modes: many and few candidates)
    for q in (h[:700], h[:3]):
        qi, ids = idx.query(q)
        found = set(zip(qi.tolist(), ids.tolist(), strict=True))
        assert len(found) == len(qi)
        d = np.bitwise_count(q[:, None] ^ h[None, :])
        assert found == set(zip(*map(np.ndarray.tolist, np.nonzero(d <= radius)), strict=True))


def test_bad_chunks_is_refused() -> None:
    with pytest.raises(ValueError, match="chunks must be in 7..64 for radius 6"):
        HammingIndex(6, chunks=6)


def test_incremental_add_equals_one_shot_and_keeps_segments() -> None:
    h, _ = _random_hashes(3000, 400, 6, seed=1)
    idx = HammingIndex(6, n_hint=3000)
    idx.add(h[:2500])
    before = [s.values for s in idx._segments]
    ids, old_pairs, inner = idx.add_and_query(h[2500:])
    assert ids.tolist() == list(range(2500, 3000))
    assert idx._segments[0].values is before[0]  # the 2500-hash segment was not rebuilt
    assert len(idx._segments) == 2
    expect = _brute(h, 6)
    cross = {tuple(sorted(p)) for p in old_pairs.tolist()}
    assert cross == {p for p in expect if p[0] < 2500 <= p[1]}
    assert {tuple(sorted(p)) for p in inner.tolist()} == {p for p in expect if p[0] >= 2500}
    assert set(map(tuple, idx.self_pairs().tolist())) == expect


def test_query_does_not_modify_index() -> None:
    h, _ = _random_hashes(500, 50, 6, seed=2)
    idx = HammingIndex(6)
    idx.add(h)
    q, ids = idx.query(h[:10])
    assert len(idx) == 500
    assert {(a, b) for a, b in zip(q.tolist(), ids.tolist(), strict=True) if a == b} == {(i, i) for i in range(10)}


def test_a_large_batch_searched_on_threads_finds_exactly_the_pairs_one_thread_finds(monkeypatch) -> None:
    """A batch above PARALLEL_MIN_QUERIES is searched one chunk combination per thread: the same pairs, in the
    same order, as one thread, and every planted near copy (Hamming distance <= radius) among them."""
    import pipeline.ingest.neardup as nd

    rng = np.random.default_rng(11)
    stored = rng.integers(0, 2**62, 60_000, dtype=np.uint64)
    index = HammingIndex(radius=6, n_hint=60_000, chunks=9)
    index.add(stored)
    flips = np.zeros(500, dtype=np.uint64)
    for _ in range(4):  # four flipped bits each: within radius 6
        flips |= np.uint64(1) << rng.integers(0, 64, 500).astype(np.uint64)
    query = np.concatenate([rng.integers(0, 2**62, nd.PARALLEL_MIN_QUERIES + 5_000, dtype=np.uint64),
                            stored[:500] ^ flips])
    found = {}
    for threads in (1, 2):
        monkeypatch.setattr(nd, "LOOKUP_THREADS", threads)
        found[threads] = index.query(query)
    assert all(np.array_equal(a, b) for a, b in zip(found[1], found[2], strict=True))
    q_pos, ids = found[2]
    planted = set(range(len(query) - 500, len(query)))
    assert planted <= set(q_pos.tolist())
    assert (np.bitwise_count(query[q_pos] ^ stored[ids]) <= 6).all()


def test_bad_radius_is_refused() -> None:
    with pytest.raises(ValueError, match="radius"):
        HammingIndex(40)


# ---- image level -----------------------------------------------------------------------------------------------


def _photo(seed: int, size: int = 256) -> Image.Image:
    """A photo-like image: smooth random field plus shapes, different for every seed."""
    rng = np.random.default_rng(seed)
    low = rng.normal(size=(6, 6, 3))
    base = np.asarray(Image.fromarray(((low - low.min()) / np.ptp(low) * 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    img = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(8, size // 4))
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def _jpeg(img: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _edits(img: Image.Image) -> dict[str, Image.Image]:
    w, h = img.size
    cap = img.copy()
    ImageDraw.Draw(cap).rectangle((0, int(h * 0.9), w, h), fill=(0, 0, 0))
    ImageDraw.Draw(cap).text((5, int(h * 0.91)), "(c) stock photo", fill=(255, 255, 255))
    return {
        "jpeg": _jpeg(img, 25),
        "downscale": img.resize((w // 3, h // 3), Image.Resampling.BILINEAR),
        "crop": img.crop((int(w * 0.04), int(h * 0.02), int(w * 0.97), int(h * 0.95))),
        "brightness": ImageEnhance.Brightness(img).enhance(1.3),
        "overlay": cap,
    }


def _rows(images: dict[str, Image.Image]) -> pd.DataFrame:
    return pd.DataFrame([{"image_id": k, **fingerprint(v)} for k, v in images.items()])


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {f"p{i}": _photo(i) for i in range(40)}


def test_edited_copies_found_and_distinct_photos_not_joined(photos: dict[str, Image.Image]) -> None:
    edited = {f"{k}_{kind}": im for k, img in list(photos.items())[:8] for kind, im in _edits(img).items()}
    pairs = near_duplicate_pairs(_rows({**photos, **edited}))
    found = {frozenset(p) for p in pairs[["image_id", "other_image_id"]].itertuples(index=False)}
    for name in edited:
        assert frozenset((name.split("_")[0], name)) in found, name
    originals = [p for p in found if all("_" not in x for x in p)]
    assert originals == []  # 40 distinct photos: no pair joined


def _asym_crop(img: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = img.size
    return _jpeg(img.crop((round(w * left), round(h * top), round(w * (1 - right)), round(h * (1 - bottom)))), 90)


ASYM_MARGINS = [(0.0, 0.05, 0.05, 0.0), (0.05, 0.0, 0.0, 0.05), (0.05, 0.05, 0.0, 0.0), (0.0, 0.0, 0.05, 0.05),
                (0.05, 0.02, 0.0, 0.04), (0.0, 0.04, 0.05, 0.01)]


def test_asymmetric_crops_are_joined_and_rows_without_the_newer_hash_still_match(photos) -> None:
    # Margins that differ from side to side move the picture's centre by up to 2.5 %: no centred window follows,
    # the shifted one does (on whichever image it lines up with).
    copies = {f"{k}_asym{j}": _asym_crop(img, *m) for k, img in list(photos.items())[:12]
              for j, m in enumerate(ASYM_MARGINS)}
    rows = _rows({**photos, **copies})
    pairs = near_duplicate_pairs(rows)
    found = {frozenset(p) for p in pairs[["image_id", "other_image_id"]].itertuples(index=False)}
    missed = [name for name in copies if frozenset((name.split("_")[0], name)) not in found]
    assert missed == []
    assert not [p for p in found if all("_" not in x for x in p)]  # distinct photos stay apart
    # A reference table written before the shifted hashes existed (columns absent, or null) is still searched.
    from pipeline.ingest.fingerprint import ADDED_HASH_COLUMNS

    old = _rows(photos).drop(columns=list(ADDED_HASH_COLUMNS))
    out = cross_duplicates(_rows({"q": photos["p4"], "q_jpeg": _edits(photos["p6"])["jpeg"]}), old)
    assert set(out[["query_image_id", "reference_image_id"]].itertuples(index=False, name=None)) == {("q", "p4"),
                                                                                                 ("q_jpeg", "p6")}
    nulls = pa.Table.from_pandas(_rows(photos))
    for col in ADDED_HASH_COLUMNS:
        nulls = nulls.set_column(nulls.column_names.index(col), col, pa.nulls(len(photos), pa.uint64()))
    assert len(cross_duplicates(_rows({"q": photos["p4"]}), nulls)) == 1


def test_cross_duplicates_release_contract(photos: dict[str, Image.Image]) -> None:
    train = _rows(photos)
    val = _rows({"v_crop": _edits(photos["p3"])["crop"], "v_new": _photo(999), "v_same": photos["p5"]})
    out = cross_duplicates(pa.Table.from_pandas(val), train)  # Arrow and pandas both accepted
    got = set(out[["query_image_id", "reference_image_id"]].itertuples(index=False, name=None))
    assert got == {("v_crop", "p3"), ("v_same", "p5")}
    assert list(out.columns[:2]) == ["query_image_id", "reference_image_id"]


def test_neardup_index_incremental_batches(photos: dict[str, Image.Image]) -> None:
    idx = NearDupIndex(n_hint=100)
    first = idx.add(_rows(dict(list(photos.items())[:20])))
    assert first.empty
    batch = {"late_jpeg": _edits(photos["p2"])["jpeg"], "late_photo": photos["p30"], "late_photo_small":
             photos["p30"].resize((100, 100))}
    pairs = idx.add(_rows(batch))
    got = {frozenset(p) for p in pairs[["image_id", "other_image_id"]].itertuples(index=False)}
    assert got == {frozenset(("late_jpeg", "p2")), frozenset(("late_photo", "late_photo_small"))}
    assert len(idx) == 23
    assert idx.add(_rows({"p2": photos["p2"]})).empty  # already indexed: skipped, not re-added
    assert len(idx) == 23


def test_missing_fingerprint_columns_error_names_the_fix() -> None:
    with pytest.raises(ValueError, match="phash_in94.*synsetforge ingest"):
        cross_duplicates(pd.DataFrame({"image_id": ["a"], "phash": [1]}), pd.DataFrame({"image_id": ["b"]}))


def test_cross_duplicates_on_images_table_with_rejected_rows_keeps_hashes_exact(photos) -> None:
    """The images table holds rejected rows with null hashes; converting that Arrow table naively to pandas would
    turn the uint64 hashes into float64 and lose their low bits."""
    from pipeline.schemas import arrow_schema, validate

    def images_table(named: dict[str, Image.Image]) -> pa.Table:
        rows = []
        for name, img in named.items():
            rows.append({"image_id": name, "width": 1, "height": 1, "format": "jpeg", "n_bytes": 1,
                         "storage_key": f"blobs/{name}", "first_url": f"u/{name}", "status": "accepted",
                         "reject_reason": None, **fingerprint(img)})
        rows.append({"first_url": "u/broken", "status": "rejected", "reject_reason": "truncated"})
        cols = {f.name: [r.get(f.name) for r in rows] for f in arrow_schema("images")}
        return validate("images", pa.table({k: pa.array(v, type=arrow_schema("images").field(k).type)
                                            for k, v in cols.items()}))

    train = images_table({k: photos[k] for k in ("p1", "p2", "p3")})
    assert max(train.column("phash").to_pylist()[:3]) > 2**53  # a hash float64 cannot hold exactly
    val = _rows({"v_same": photos["p2"]})  # exact hashes, as a fresh batch holds them
    out = cross_duplicates(val, train)
    assert list(out[["query_image_id", "reference_image_id"]].itertuples(index=False, name=None)) == [("v_same", "p2")]
    assert out["hash_distance"].tolist() == [0]  # the same photo: every bit of the stored hashes survived
