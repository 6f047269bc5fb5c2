"""Ingest at scale: shards read only their own work, merges append, the near-duplicate index persists.

Downloads are replaced by a table of outcomes (the fetch path has its own tests), so each round's URLs, bytes and
failures are chosen: a transient failure retried, exact copies whose canonical URL moves to a smaller one, near
copies arriving a round after their original (in the same synset and in another one), a URL found later for a
second synset."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import pipeline.ingest.stage as stage
from pipeline.config import load_settings
from pipeline.faults import FaultInjected
from pipeline.ingest.fingerprint import fingerprint
from pipeline.ingest.neardup import StoredIndex
from pipeline.ingest.stage import (
    IMAGE_COLUMNS,
    KEY_COLUMNS,
    merge_ingest,
    plan_shard,
    read_images,
    read_links,
    rows_frame,
    run_ingest,
    settled_urls,
)
from pipeline.store import LocalStore
from tests.test_neardup import _edits, _photo

A, B, C = "n00000001", "n00000002", "n00000003"
T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _id(prefix: str) -> str:
    """A fabricated sha256-like image id whose order we choose (the first characters)."""
    return (prefix + "0" * 64)[:64]


@pytest.fixture(scope="module")
def pics() -> dict[str, Image.Image]:
    p = {name: _photo(seed) for name, seed in (("a", 11), ("b", 12), ("c", 13), ("d", 14), ("x", 15))}
    p["a_small"] = p["a"].resize((90, 90))
    p["b_crop"] = _edits(p["b"])["crop"]
    p["b_jpeg"] = _edits(p["b"])["jpeg"]
    p["c_jpeg"] = _edits(p["c"])["jpeg"]
    return p


@pytest.fixture(scope="module")
def prints(pics) -> dict[str, dict[str, int]]:
    return {k: fingerprint(v) for k, v in pics.items()}


def accepted(prints: dict[str, dict[str, int]], pic: str, image_id: str) -> Callable[[str], dict]:
    def row(url: str) -> dict:
        return {**dict.fromkeys(IMAGE_COLUMNS), **prints[pic], "image_id": image_id, "width": 256, "height": 256,
                "format": "jpeg", "n_bytes": 1000 + len(pic), "storage_key": f"blobs/{image_id[:2]}/{image_id}.jpg",
                "first_url": url, "status": "accepted"}
    return row


def rejected(reason: str) -> Callable[[str], dict]:
    return lambda url: {**dict.fromkeys(IMAGE_COLUMNS), "first_url": url, "status": "rejected", "reject_reason": reason}


class FakeWeb:
    """Stands in for iter_rows: each URL answers its next scripted outcome, stamped with a steadily rising time."""

    def __init__(self, script: dict[str, list[Callable[[str], dict]]]):
        self.script = {u: list(v) for u, v in script.items()}
        self.fetched: list[str] = []
        self.clock = 0

    def __call__(self, urls, *_a, **_k):
        for url in urls:
            self.fetched.append(url)
            outcomes = self.script[url]
            row = (outcomes.pop(0) if len(outcomes) > 1 else outcomes[0])(url)
            self.clock += 1
            row["fetched_at"] = T0 + timedelta(seconds=self.clock)
            yield row


def candidates(pairs: list[tuple[str, str]]) -> pd.DataFrame:
    df = pd.DataFrame(pairs, columns=["wnid", "url"])
    return pd.DataFrame({"wnid": df["wnid"], "source": "test", "query": None, "url": df["url"], "page_url": None,
                         "title": None, "license": None, "license_url": None, "creator": None,
                         "rank": df.groupby("wnid").cumcount().astype("int32"), "found_at": T0})


def _u(host: str, name: str) -> str:
    return f"http://{host}.example/{name}.jpg"


def scenario(prints) -> tuple[dict, list[tuple[list, list]]]:
    """(fetch script, rounds of (candidate pairs, shards))."""
    ok = lambda pic, prefix: accepted(prints, pic, _id(prefix))  # noqa: E731
    script = {
        _u("m", "a"): [ok("a", "a1")], _u("m", "x"): [rejected("timeout"), ok("x", "e1")],
        _u("m", "b"): [ok("b", "b1")], _u("z", "b"): [ok("b", "b1")],  # exact copy, larger URL
        _u("m", "c"): [ok("c", "c1")], _u("m", "gone"): [rejected("http_404")],
        _u("m", "a-small"): [ok("a_small", "01")],  # near copy of a, later, with a smaller id: a becomes the copy
        _u("m", "b-crop"): [ok("b_crop", "b7")],  # near copy of b in another synset
        _u("a", "c-copy"): [ok("c", "c1")],  # exact copy of c at a smaller URL: c's own URL becomes the duplicate
        _u("m", "d"): [ok("d", "d1")],
        _u("m", "b-jpeg"): [ok("b_jpeg", "b3")],  # joins b and b-crop's group, in b's synset
        _u("m", "c-jpeg"): [ok("c_jpeg", "c5")],  # near copy of c, in a third synset
    }
    r1 = [(A, _u("m", "a")), (A, _u("m", "x")), (B, _u("m", "b")), (B, _u("z", "b")), (C, _u("m", "c")),
          (C, _u("m", "gone"))]
    r2 = r1 + [(A, _u("m", "a-small")), (C, _u("m", "b-crop")), (C, _u("a", "c-copy")), (C, _u("m", "a"))]
    r3 = r2 + [(B, _u("m", "d")), (B, _u("m", "b-jpeg")), (A, _u("m", "c-jpeg"))]
    return script, [(r1, [[A], [B], [C]]), (r2, [[A], [B, C]]), (r3, [[A, B, C]]), (r3, [[A], [B], [C]])]


def settings():
    return load_settings(env={})


def run_round(store, pairs, shards, n: int, collapse: float = 0, copy_to=None) -> dict:
    store.write_table("candidates", candidates(pairs))
    for i, wnids in enumerate(shards):
        run_ingest(store, settings(), wnids=wnids, merge=False, tag=f"round{n}-{i:04d}")
    if copy_to is not None:  # the same parts, kept for one merge of everything at the end
        for key in store.list(stage.PARTS_PREFIX):
            if not copy_to.exists(key):
                copy_to.put(key, store.get(key))
    return merge_ingest(store, collapse_factor=collapse)


def tables(store) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    images = read_images(store).sort_values("first_url").reset_index(drop=True)[IMAGE_COLUMNS]
    links = read_links(store).sort_values(["wnid", "image_id"]).reset_index(drop=True)
    pairs = store.read_table("near_pairs").to_pandas().drop(columns="found_at")
    return images, links, pairs.sort_values(["image_id_a", "image_id_b"]).reset_index(drop=True)


def test_rounds_of_merges_equal_one_merge_of_everything(store, tmp_path, prints, monkeypatch):
    script, rounds = scenario(prints)
    web = FakeWeb(script)
    monkeypatch.setattr(stage, "iter_rows", web)
    once = LocalStore(tmp_path / "once")
    summaries = [run_round(store, pairs, shards, n, copy_to=once) for n, (pairs, shards) in enumerate(rounds)]
    assert summaries[0]["rebuilt"] and all(s["rebuilt"] is None for s in summaries[1:])  # incremental after the first
    assert summaries[1]["status_changes"] == 1  # c's URL lost the accepted place to the smaller copy URL
    assert summaries[1]["near_pairs"] == 2 and summaries[2]["near_pairs"] >= 2
    once.write_table("candidates", candidates(rounds[-1][0]))
    assert merge_ingest(once)["rebuilt"]

    got, want = tables(store), tables(once)
    for g, w, name in zip(got, want, ("images", "image_links", "near_pairs"), strict=True):
        pd.testing.assert_frame_equal(g, w, obj=name, check_dtype=False)
    images, links, pairs = got
    by_url = images.set_index("first_url")
    assert by_url.loc[_u("m", "x"), "status"] == "accepted"  # the retry's outcome won
    assert by_url.loc[_u("m", "c"), "status"] == "duplicate" and by_url.loc[_u("a", "c-copy"), "status"] == "accepted"
    link = links.set_index(["wnid", "image_id"])
    assert link.loc[(A, _id("a1")), "near_duplicate_of"] == _id("01")  # the later copy is kept: it sorts first
    assert pd.isna(link.loc[(A, _id("01")), "near_duplicate_of"])
    assert link.loc[(B, _id("b1")), "multi_synset"]  # through its crop, found for C
    assert link.loc[(C, _id("a1")), "url"] == _u("m", "a") and link.loc[(A, _id("a1")), "n_synsets"] == 2
    assert link.loc[(B, _id("b3")), "near_duplicate_of"] == _id("b1") and link.loc[(B, _id("b1")), "n_urls"] == 2
    assert link.loc[(A, _id("c5")), "multi_synset"]
    # Only the URLs that were not settled were fetched again: x twice, every other URL once.
    assert sorted(u for u in set(web.fetched) if web.fetched.count(u) > 1) == [_u("m", "x")]
    # The incremental store kept superseded versions (readers settle them); the last round changed nothing.
    assert len(store.read_table("images")) > len(images) and len(store.read_table("image_links")) > len(links)
    assert summaries[3]["images_rows"] == 0 and summaries[3]["links"] == 0 and summaries[3]["near_pairs"] == 0


def test_a_rerun_finds_nothing_and_changes_nothing(tmp_path, prints, monkeypatch):
    script, rounds = scenario(prints)
    monkeypatch.setattr(stage, "iter_rows", FakeWeb(script))
    store = LocalStore(tmp_path / "s")
    for n, (pairs, shards) in enumerate(rounds[:2]):
        run_round(store, pairs, shards, n)
    versions = {t: store.table_version(t) for t in ("images", "image_links", "near_pairs")}
    segments = store.list("ingest/neardup/segments/")
    again = run_round(store, rounds[1][0], rounds[1][1], 9)
    assert again["images_rows"] == again["links"] == again["near_pairs"] == 0
    assert {t: store.table_version(t) for t in versions} == versions and store.list("ingest/neardup/segments/") == segments
    assert store.list(stage.PARTS_PREFIX) == []


def test_small_tables_are_collapsed_to_one_row_per_key(tmp_path, prints, monkeypatch):
    script, rounds = scenario(prints)
    monkeypatch.setattr(stage, "iter_rows", FakeWeb(script))
    store = LocalStore(tmp_path / "s")
    out = [run_round(store, pairs, shards, n, collapse=stage.COLLAPSE_FACTOR) for n, (pairs, shards)
           in enumerate(rounds[:2])]
    assert "images" in out[1]["collapsed"]
    raw = store.read_table("images").to_pandas()
    assert raw["first_url"].is_unique and len(raw) == len(read_images(store))
    raw_links = store.read_table("image_links").to_pandas()
    assert not raw_links.duplicated(["image_id", "wnid"]).any()


# --- shards ---------------------------------------------------------------------------------------------------


class Recorder:
    """A store wrapper that records what is read."""

    def __init__(self, store):
        self._store, self.reads, self.part_reads, self.lists = store, [], [], []

    def __getattr__(self, name):
        return getattr(self._store, name)

    def read_table(self, name, key=None, **kw):
        (self.part_reads if key else self.reads).append((name, key, kw.get("columns"), kw.get("filter")))
        return self._store.read_table(name, key=key, **kw)

    def list(self, prefix=""):
        self.lists.append(prefix)
        return self._store.list(prefix)


def old_todo(store, wnids, retry=()) -> list[str]:
    """The to-do list as it was computed before: every candidate, every images row, every part."""
    cands = store.read_table("candidates").to_pandas()
    cands = cands[cands["wnid"].isin(set(wnids))]
    frames = [stage.table_frame(store.read_table("images", missing_ok=True)),
              *[stage.table_frame(store.read_table("images", key=k)) for k in store.list(stage.PARTS_PREFIX)
                if k.endswith(".parquet")]]
    done = settled_urls(frames, retry=retry)
    ordered = cands.sort_values(["rank", "wnid"], kind="stable")["url"].drop_duplicates()
    return [u for u in ordered if u not in done]


def test_shard_todo_equals_the_old_one_reading_only_its_own_work(tmp_path, prints, monkeypatch):
    script, rounds = scenario(prints)
    monkeypatch.setattr(stage, "iter_rows", FakeWeb(script))
    store = LocalStore(tmp_path / "s")
    run_round(store, rounds[0][0], rounds[0][1], 0)
    store.write_table("candidates", candidates(rounds[2][0] + [(B, _u("m", f"more{i}")) for i in range(6)]))
    # an earlier attempt of B's task left a part (two URLs settled, one timed out); another shard's part (a timeout,
    # which settles nothing) is in flight
    stage._Checkpoint(store, 100, "run-0001").note({"wnids": [B]})
    part = rows_frame([accepted(prints, "d", _id("d1"))(_u("m", "d")), rejected("http_5xx")(_u("m", "more0")),
                       rejected("decode_error")(_u("m", "more1"))])
    part["fetched_at"] = T0 + timedelta(hours=1)
    store.write_table("images", part, key=f"{stage.PARTS_PREFIX}run-0001-dead0000-00000.parquet")
    store.write_table("images", rows_frame([rejected("timeout")(_u("m", "c-jpeg"))]),
                      key=f"{stage.PARTS_PREFIX}run-0002-live0000-00000.parquet")
    for wnids, retry in (([B], ()), ([B], ["decode_error"]), ([A, C], ()), ([A, B, C], True)):
        rec = Recorder(store)
        plan = plan_shard(rec, wnids=wnids, tag="run-0001", retry_rejected=retry)
        assert plan.todo == old_todo(store, wnids, retry), (wnids, retry)
        cand_reads = [r for r in rec.reads if r[0] == "candidates"]
        assert cand_reads and all(r[3] is not None and r[3][0][:2] == ("wnid", "in") and set(r[3][0][2]) <= set(wnids)
                                  for r in cand_reads)
        (img_read,) = [r for r in rec.reads if r[0] == "images"]
        assert img_read[2] == KEY_COLUMNS and img_read[3] is not None  # narrow, filtered on the shard's URLs
        assert {k for _, k, _, _ in rec.part_reads} <= {f"{stage.PARTS_PREFIX}run-0001-dead0000-00000.parquet"}
        assert all(p.startswith(f"{stage.PARTS_PREFIX}run-0001-") for p in rec.lists if p.startswith(stage.PARTS_PREFIX))
    assert _u("m", "more1") not in plan_shard(store, wnids=[B], tag="run-0001").todo  # settled in its own part
    assert _u("m", "more0") in plan_shard(store, wnids=[B], tag="run-0001").todo  # transient: again


def test_a_url_found_later_for_another_synset_is_linked_there(tmp_path, prints, monkeypatch):
    """The URL was ingested for A; collect finds it for C a round later: C's shard fetches nothing but its note
    names the stored image, and the merge links it to C (and A's row learns it is in two synsets)."""
    script, _ = scenario(prints)
    monkeypatch.setattr(stage, "iter_rows", FakeWeb(script))
    store = LocalStore(tmp_path / "s")
    run_round(store, [(A, _u("m", "a")), (C, _u("m", "c"))], [[A], [C]], 0)
    out = run_round(store, [(A, _u("m", "a")), (C, _u("m", "c")), (C, _u("m", "a"))], [[C]], 1)
    assert out["images_rows"] == 0 and out["links"] == 2
    links = read_links(store).set_index(["wnid", "image_id"])
    assert links.loc[(C, _id("a1")), "n_synsets"] == 2 and links.loc[(A, _id("a1")), "multi_synset"]


# --- the index: persistence, crashes, rebuilds ------------------------------------------------------------------


def _photo_files(root, names_imgs: dict[str, Image.Image]) -> list[str]:
    urls = []
    for name, img in names_imgs.items():
        path = root / A / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, "JPEG", quality=92)
        urls.append(path.resolve().as_uri())
    return sorted(urls)


def test_the_persisted_index_survives_a_process_restart(tmp_path, pics):
    """Round one runs in another process; this one loads the index from its files (memory-mapped, not rebuilt) and
    finds a new near copy of a round-one image."""
    root = tmp_path / "imgs"
    store = LocalStore(tmp_path / "s")
    first = _photo_files(root, {k: pics[k] for k in ("a", "b", "c")})
    store.write_table("candidates", candidates([(A, u) for u in first]))
    code = ("import json, sys; from pipeline.config import load_settings; from pipeline.ingest.stage import run_ingest;"
            "from pipeline.store import LocalStore;"
            f"s = run_ingest(LocalStore({str(tmp_path / 's')!r}), load_settings(env={{}}, overrides={{'collect': "
            f"{{'local_dir': {str(root)!r}}}}})); print(json.dumps(s, default=str))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["accepted"] == 3
    manifest = StoredIndex(store).latest()
    assert manifest["n_images"] == 3 and manifest["generation"] == 1
    loaded = StoredIndex(store).load(manifest)
    assert isinstance(loaded.segments[0].index.values, np.memmap)
    second = _photo_files(root, {"a_small": pics["a_small"]})
    store.write_table("candidates", candidates([(A, u) for u in first + second]))
    out = run_ingest(store, load_settings(env={}, overrides={"collect": {"local_dir": str(root)}}))
    assert out["fetched"] == 1 and out["rebuilt"] is None and out["near_pairs"] == 1
    assert out["index"]["images"] == 4 and out["index"]["generation"] == 2
    links = read_links(store)
    assert links["near_duplicate_of"].notna().sum() == 1


@pytest.mark.parametrize("point", ["ingest.index_written", "ingest.tables_written"])
def test_a_crash_between_index_files_and_commit_leaves_a_usable_store(tmp_path, prints, monkeypatch, point):
    script, rounds = scenario(prints)
    results = {}
    for name in ("clean", "crash"):
        monkeypatch.setattr(stage, "iter_rows", FakeWeb(script))
        store = LocalStore(tmp_path / name)
        run_round(store, rounds[0][0], rounds[0][1], 0)
        if name == "crash":
            monkeypatch.setenv("SYNSETFORGE_FAILPOINTS", f"{point}=raise")
            monkeypatch.setenv("SYNSETFORGE_FAILPOINT_DIR", str(tmp_path))
            with pytest.raises(FaultInjected):
                run_round(store, rounds[1][0], rounds[1][1], 1)
            monkeypatch.delenv("SYNSETFORGE_FAILPOINTS")
            # usable meanwhile: the last generation loads, readers see whole rows, a shard plans
            sidx = StoredIndex(store)
            assert sidx.latest()["generation"] == 1 and len(sidx.load(sidx.latest())) == 3
            assert read_images(store)["first_url"].is_unique
            assert store.list(stage.PARTS_PREFIX)  # the parts wait for the rerun
            assert merge_ingest(store, collapse_factor=0)["rebuilt"] is None
        else:
            run_round(store, rounds[1][0], rounds[1][1], 1)
        results[name] = tables(store)
        assert store.list(stage.PARTS_PREFIX) == [] and store.list(stage.PENDING_PREFIX) == []
    for g, w, what in zip(results["crash"], results["clean"], ("images", "image_links", "near_pairs"), strict=True):
        pd.testing.assert_frame_equal(g, w, obj=what, check_dtype=False)
    raw = LocalStore(tmp_path / "crash").read_table("near_pairs").to_pandas()
    assert not raw.duplicated(["image_id_a", "image_id_b"]).any()  # the rerun did not append the pairs twice


def test_rebuild_index_recovers_a_lost_index_and_a_foreign_write_forces_one(tmp_path, prints, monkeypatch, capsys):
    from pipeline.cli import main

    script, rounds = scenario(prints)
    monkeypatch.setattr(stage, "iter_rows", FakeWeb(script))
    store = LocalStore(tmp_path / "s")
    for n, (pairs, shards) in enumerate(rounds[:3]):
        run_round(store, pairs, shards, n)
    before = tables(store)
    for key in store.list("ingest/neardup/"):
        store.delete(key)  # the index is lost
    assert main(["--store", str(store.root), "ingest", "--rebuild-index", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rebuilt"] and out["index"]["images"] == len(StoredIndex(store).load(StoredIndex(store).latest()))
    for g, w in zip(tables(store), before, strict=True):
        pd.testing.assert_frame_equal(g, w, check_dtype=False)
    assert store.read_table("images").to_pandas()["first_url"].is_unique  # rewritten with one row per URL
    # Anything else writing a table makes the next merge rebuild instead of trusting the index.
    images = read_images(store)
    store.write_table("images", images[images["first_url"] != _u("m", "gone")])
    assert "outside the ingest merge" in merge_ingest(store)["rebuilt"]


def test_a_stale_part_does_not_undo_a_newer_outcome(tmp_path, prints, monkeypatch):
    script, rounds = scenario(prints)
    monkeypatch.setattr(stage, "iter_rows", FakeWeb(script))
    store = LocalStore(tmp_path / "s")
    run_round(store, rounds[0][0], rounds[0][1], 0)
    run_round(store, rounds[1][0], rounds[1][1], 1)
    zombie = rows_frame([rejected("timeout")(_u("m", "x"))])
    zombie["fetched_at"] = T0  # older than the accepted outcome merged in round 1
    store.write_table("images", zombie, key=f"{stage.PARTS_PREFIX}zombie-00000000-00000.parquet")
    out = merge_ingest(store, collapse_factor=0)
    assert out["images_rows"] == 0
    assert read_images(store).set_index("first_url").loc[_u("m", "x"), "status"] == "accepted"
