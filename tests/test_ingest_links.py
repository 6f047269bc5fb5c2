"""image_links: (image_id, wnid) pairs for the crowd, exact copies folded, near copies flagged within a synset and
across synsets (through pipeline.ingest.dedup)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config import load_settings
from pipeline.ingest.stage import IMAGE_COLUMNS, build_links, rows_frame, run_ingest, settle_images
from pipeline.store import LocalStore

A, B, C = "n00000001", "n00000002", "n00000003"


def photo(seed: int, size=(320, 240)) -> Image.Image:
    """A smooth, photo-like image: low-frequency noise upsampled, plus some shapes."""
    rng = np.random.default_rng(seed)
    small = rng.random((6, 8, 3)) * 255
    img = Image.fromarray(small.astype("uint8")).resize(size, Image.Resampling.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 4, (size[1], size[0], 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype("uint8"))


def save(img: Image.Image, path, quality=92):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=quality)


def test_links_flag_exact_and_near_copies(tmp_path):
    root = tmp_path / "imgs"
    p0, p1, p2 = photo(0), photo(1), photo(2)
    save(p0, root / A / "orig.jpg")
    save(p0.resize((240, 180), Image.Resampling.LANCZOS), root / A / "small-copy.jpg", quality=70)  # near copy
    save(p1, root / A / "other.jpg")
    save(p1, root / B / "same-bytes.jpg")  # exact copy of A/other.jpg in another synset
    save(p2, root / C / "c.jpg")
    store = LocalStore(tmp_path / "store")
    urls = sorted(p.as_uri() for p in root.rglob("*.jpg"))
    wnid_of = {u: u.split("/")[-2] for u in urls}
    store.write_table("candidates", pd.DataFrame({
        "wnid": [wnid_of[u] for u in urls], "source": "local_dir", "query": None, "url": urls, "page_url": None,
        "title": None, "license": None, "license_url": None, "creator": None,
        "rank": np.arange(len(urls), dtype="int32"), "found_at": datetime.now(UTC)}))
    settings = load_settings(env={}, overrides={"collect": {"local_dir": str(root)}})
    summary = run_ingest(store, settings)
    assert summary["accepted"] == 4 and summary["duplicates"] == 1  # same bytes -> one stored image
    links = store.read_table("image_links").to_pandas()
    assert len(links) == 5 and not links.duplicated(["image_id", "wnid"]).any()
    by = {(r.wnid, r.url.rsplit("/", 1)[1]): r for r in links.itertuples()}
    copy, orig = by[(A, "small-copy.jpg")], by[(A, "orig.jpg")]
    marks = {x for x in (copy.near_duplicate_of, orig.near_duplicate_of) if isinstance(x, str)}
    assert marks == {min(copy.image_id, orig.image_id)}  # one of the pair is kept, the other points at it
    assert by[(A, "other.jpg")].multi_synset and by[(B, "same-bytes.jpg")].multi_synset
    assert by[(A, "other.jpg")].n_synsets == 2 and not by[(C, "c.jpg")].multi_synset
    assert summary["near_duplicates"] == 1 and summary["multi_synset_images"] == 1


def test_settle_images_is_order_independent_and_keeps_hashes_exact():
    from pipeline.ingest.stage import IMAGE_COLUMNS, rows_frame

    big = 2**64 - 5
    base = dict.fromkeys(IMAGE_COLUMNS)
    rows = [
        {**base, "image_id": "x", "first_url": "http://b", "status": "accepted", "phash": big, "width": 1},
        {**base, "image_id": "x", "first_url": "http://a", "status": "accepted", "phash": big, "width": 1},
        {**base, "first_url": "http://c", "status": "rejected", "reject_reason": "http_404"},
    ]
    one = settle_images([rows_frame(rows)])
    two = settle_images([rows_frame(rows[::-1])])
    assert one.equals(two)
    assert one.set_index("first_url").loc["http://a", "status"] == "accepted"
    assert one.set_index("first_url").loc["http://b", "status"] == "duplicate"
    assert int(one["phash"].dropna().iloc[0]) == big  # no float64 round trip


def test_build_links_best_rank_per_pair():
    cands = pd.DataFrame({"wnid": [A, A, B], "url": ["u1", "u2", "u3"], "source": ["s", "t", "s"], "rank": [3, 1, 0]})
    images = pd.DataFrame({"first_url": ["u1", "u2", "u3"], "image_id": ["i", "i", "i"]})
    links = build_links(cands, images)
    a = links[links.wnid == A].iloc[0]
    assert len(links) == 2 and a.url == "u2" and a["rank"] == 1 and a.n_urls == 2 and a.n_synsets == 2




def test_settling_keeps_the_latest_outcome_by_time_not_by_part_order():
    """A killed attempt's `timeout` row can sit in a part whose key (random attempt id) sorts after its retry's part:
    the retry's `accepted` row is newer and must win, or the image drops out of `images`."""
    base = dict.fromkeys(IMAGE_COLUMNS)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    retry = {**base, "image_id": "x", "first_url": "http://a", "status": "accepted", "width": 1,
             "fetched_at": t0.replace(minute=5)}
    killed = {**base, "first_url": "http://a", "status": "rejected", "reject_reason": "timeout", "fetched_at": t0}
    old = {**base, "first_url": "http://b", "status": "rejected", "reject_reason": "http_404"}  # before version 2
    newer_b = {**base, "image_id": "y", "first_url": "http://b", "status": "accepted", "width": 1, "fetched_at": t0}
    for frames in ([[retry], [killed]], [[killed], [retry]]):
        out = settle_images([rows_frame(f) for f in frames]).set_index("first_url")
        assert out.loc["http://a", "status"] == "accepted"
    out = settle_images([rows_frame([newer_b]), rows_frame([old])]).set_index("first_url")
    assert out.loc["http://b", "status"] == "accepted"  # a row without a time counts as the oldest
