"""The same cases on both backends: a temp folder and a real moto S3 server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.schemas import SchemaError
from pipeline.store import KeyExists, LocalStore, MissingKey, StoreError, open_store

pytestmark = pytest.mark.slow  # the s3 half starts a moto server


def synsets_frame(n: int = 3) -> pd.DataFrame:
    return pd.DataFrame({
        "wnid": [f"n{i:08d}" for i in range(n)],
        "name": [f"x{i}.n.01" for i in range(n)],
        "lemmas": [[f"x{i}", f"y {i}"] for i in range(n)],
        "gloss": ["g"] * n,
        "depth": [1] * n,
        "parent_wnids": [[]] * n,
        "lexname": ["noun.Tops"] * n,
        "is_leaf": [True] * n,
        "queries": [[f"x{i}"] for i in range(n)],
    })


def test_blob_roundtrip_exists_list_delete(store):
    assert not store.exists("a/b.txt")
    store.put("a/b.txt", b"one")
    store.put("a/c.txt", b"two")
    store.put("z.txt", b"three")
    assert store.get("a/b.txt") == b"one"
    assert store.exists("a/b.txt")
    assert store.list("a/") == ["a/b.txt", "a/c.txt"]
    assert store.list() == ["a/b.txt", "a/c.txt", "z.txt"]
    store.put("a/b.txt", b"replaced")
    assert store.get("a/b.txt") == b"replaced"
    store.delete("a/b.txt")
    assert not store.exists("a/b.txt")
    with pytest.raises(MissingKey):
        store.get("a/b.txt")


def test_content_addressed_put_is_sha256_and_idempotent(store):
    data = b"\xff\xd8 not really a jpeg"
    key = store.put_content(data, ".jpg")
    digest = hashlib.sha256(data).hexdigest()
    assert key == f"blobs/{digest[:2]}/{digest}.jpg"
    assert store.put_content(data, ".jpg") == key
    assert store.list("blobs/") == [key]
    assert store.get(key) == data


def test_exclusive_put_never_overwrites(store):
    store.put("releases/v1/manifest.json", b"{}", exclusive=True)
    with pytest.raises(KeyExists):
        store.put("releases/v1/manifest.json", b'{"evil": 1}', exclusive=True)
    assert store.get("releases/v1/manifest.json") == b"{}"


def test_table_roundtrip_keeps_schema_and_values(store):
    key = store.write_table("synsets", synsets_frame())
    assert key == "tables/synsets/"
    table = store.read_table("synsets")
    assert table.schema.metadata[b"synsetforge.schema_version"] == b"1"
    assert table.column("lemmas").to_pylist()[2] == ["x2", "y 2"]
    assert table.schema.field("depth").type == pa.int32()


def test_write_rejects_table_that_breaks_its_schema_and_keeps_old_one(store):
    store.write_table("synsets", synsets_frame(2))
    bad = synsets_frame(2).drop(columns=["gloss"])
    with pytest.raises(SchemaError, match="missing columns \\['gloss'\\]"):
        store.write_table("synsets", bad)
    nulls = synsets_frame(2)
    nulls.loc[0, "wnid"] = None
    with pytest.raises(SchemaError, match="wnid.*null"):
        store.write_table("synsets", nulls)
    extra = synsets_frame(2).assign(surprise=1)
    with pytest.raises(SchemaError, match="unexpected columns \\['surprise'\\]"):
        store.write_table("synsets", extra)
    assert store.read_table("synsets").num_rows == 2  # the good table is untouched


def test_missing_table_is_clear_or_empty(store):
    with pytest.raises(MissingKey, match="run the stage"):
        store.read_table("labels")
    empty = store.read_table("labels", missing_ok=True)
    assert empty.num_rows == 0 and "confidence" in empty.column_names


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./x"])
def test_hostile_keys_are_refused(store, key):
    with pytest.raises(StoreError):
        store.put(key, b"x")


def test_local_crash_mid_write_leaves_old_table_and_no_visible_partial(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    store.write_table("synsets", synsets_frame(2))

    def crash(*_a, **_k):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.write_table("synsets", synsets_frame(5))
    monkeypatch.undo()
    assert store.read_table("synsets").num_rows == 2
    assert store.table_version("synsets") == 0
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]


def test_open_store_urls(tmp_path, moto_server):
    assert isinstance(open_store(tmp_path / "x"), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}/y"), LocalStore)
    with pytest.raises(StoreError, match="unsupported scheme"):
        open_store("ftp://host/x")
    with pytest.raises(StoreError, match="no bucket"):
        open_store("s3:///prefix")
    s3 = open_store("s3://some-bucket/pre", endpoint_url=moto_server)
    assert s3.url == "s3://some-bucket/pre"


# -- working tables (Delta) ---------------------------------------------------------------------------------
def votes_frame(ids, wnid: str = "n00000001") -> pd.DataFrame:
    ids = list(ids)
    return pd.DataFrame({
        "annotation_id": ids, "task_id": [i // 3 for i in ids], "image_id": [f"img{i % 50:04d}" for i in ids],
        "wnid": [wnid] * len(ids), "worker": [f"w-{i % 7}" for i in ids], "answer": ["yes" if i % 2 else "no" for i in ids],
        "is_gold": [False] * len(ids), "lead_time_s": [1.5] * len(ids),
        "submitted_at": pd.to_datetime([1_700_000_000 + i for i in ids], unit="s", utc=True),
    })


def data_files(store, name):
    return [k for k in store.list(f"tables/{name}/") if k.endswith(".parquet")]


def test_append_adds_one_file_and_keeps_rows_in_write_order(store):
    store.append_table("votes", votes_frame(range(0, 10)))
    first_files = {k: store.get(k) for k in data_files(store, "votes")}
    store.append_table("votes", votes_frame(range(20, 25)))
    store.append_table("votes", votes_frame(range(10, 20)))
    files = data_files(store, "votes")
    assert len(files) == 3 and all(store.get(k) == v for k, v in first_files.items())  # old files untouched
    ids = store.read_table("votes").column("annotation_id").to_pylist()
    assert ids == [*range(0, 10), *range(20, 25), *range(10, 20)]
    assert store.table_version("votes") == 2
    assert [h["operation"] for h in store.table_history("votes")][:1] == ["WRITE"]


def test_filtered_read_skips_row_groups_and_keeps_exactly_the_rows_the_filter_keeps(tmp_path, monkeypatch):
    """A wnid filter reads only the row groups whose statistics can hold its values (pyarrow's scan alone reads
    them all for an isin of strings), and returns the same rows, in the same order, as filtering a full read."""
    import pipeline.store as store_mod

    monkeypatch.setattr(store_mod, "ROW_GROUP_ROWS", 100)
    store = LocalStore(tmp_path / "s")
    frames = [votes_frame(range(i * 250, (i + 1) * 250), wnid=f"n{i:08d}") for i in range(12)]
    store.append_table("votes", pd.concat(frames[:6], ignore_index=True))  # one file of 15 row groups
    store.append_table("votes", pd.concat(frames[6:], ignore_index=True))
    whole = store.read_table("votes").to_pandas()
    for flt in ([("wnid", "in", ["n00000002", "n00000009"])], [("wnid", "=", "n00000011")],
                [[("wnid", "in", {"n00000000"})], [("annotation_id", "in", [2999, 1500])]],
                [("wnid", "in", ["n00000003"]), ("annotation_id", ">", 800)], [("wnid", "in", ["n99999999"])]):
        got = store.read_table("votes", filter=flt).to_pandas()
        expect = pa.Table.from_pandas(whole, preserve_index=False).filter(store_mod._expression(flt)).to_pandas()
        pd.testing.assert_frame_equal(got.reset_index(drop=True), expect.reset_index(drop=True))
    import pyarrow.dataset as pads

    files = sorted(str(p) for p in (tmp_path / "s" / "tables" / "votes").glob("*.parquet"))
    fragments = list(pads.dataset(files).get_fragments())
    total = sum(f.num_row_groups for f in fragments)
    kept = store_mod._pruned_fragments(fragments, [("wnid", "in", ["n00000002", "n00000009"])])
    assert total == 30 and sum(f.num_row_groups for f in kept) == 6  # 250 rows of a synset: 3 groups of 100
    assert store_mod._pruned_fragments(fragments, [("annotation_id", ">", 5)]) == fragments  # no = / in: all


def test_append_unique_by_drops_known_and_repeated_keys(store):
    store.append_table("votes", votes_frame(range(0, 10)))
    added = store.append_table("votes", pd.concat([votes_frame([5, 10, 11]), votes_frame([11, 12])]),
                               unique_by=["annotation_id", "image_id"])
    assert added.column("annotation_id").to_pylist() == [10, 11, 12]
    assert store.append_table("votes", votes_frame([1, 2]), unique_by="annotation_id").num_rows == 0
    ids = store.read_table("votes").column("annotation_id").to_pylist()
    assert sorted(ids) == list(range(13)) and len(ids) == 13
    assert store.table_version("votes") == 1  # the all-known append committed nothing


def test_append_is_validated_and_a_bad_batch_writes_nothing(store):
    store.append_table("votes", votes_frame(range(3)))
    with pytest.raises(SchemaError, match="missing columns"):
        store.append_table("votes", votes_frame(range(3, 6)).drop(columns=["answer"]))
    assert store.read_table("votes").num_rows == 3 and len(data_files(store, "votes")) == 1


def test_read_selects_columns_and_filters_rows(store):
    for i, wnid in enumerate(["n00000001", "n00000002", "n00000003"]):
        store.append_table("votes", votes_frame(range(i * 10, i * 10 + 10), wnid))
    only = store.read_table("votes", columns=["wnid", "annotation_id"], filter=[("wnid", "in", {"n00000002", "n00000003"})])
    assert only.column_names == ["wnid", "annotation_id"] and only.num_rows == 20
    assert set(only.column("wnid").to_pylist()) == {"n00000002", "n00000003"}
    expr = store.read_table("votes", filter=pc.field("annotation_id") >= 25)
    assert expr.column("annotation_id").to_pylist() == list(range(25, 30))
    assert expr.schema.field("submitted_at").type == pa.timestamp("us", tz="UTC")
    with pytest.raises(SchemaError, match="no column"):
        store.read_table("votes", columns=["nope"])


def test_filter_skips_files_by_their_statistics(tmp_path):
    store = LocalStore(tmp_path)
    store.append_table("votes", votes_frame(range(10), "n00000001"))
    store.append_table("votes", votes_frame(range(10, 20), "n00000002"))
    other = [k for k in data_files(store, "votes") if b"n00000002" not in pq_column_bytes(store, k)]
    assert len(other) == 1
    store.path(other[0]).write_bytes(b"not parquet")  # a file the filter must never open
    wanted = store.read_table("votes", filter=[("wnid", "=", "n00000002")])
    assert wanted.column("annotation_id").to_pylist() == list(range(10, 20))
    with pytest.raises(Exception):  # noqa: B017 - the unfiltered read does open it
        store.read_table("votes")


def pq_column_bytes(store, key):
    import pyarrow.parquet as pq

    return "".join(pq.read_table(store.path(key)).column("wnid").to_pylist()).encode()


def test_overwrite_after_a_concurrent_append_fails_loudly_and_keeps_both(store):
    from pipeline.store import TableConflict

    store.append_table("votes", votes_frame(range(5)))
    reader = open_store(store.url) if isinstance(store, LocalStore) else type(store)(store.bucket, store.prefix, client=store.client)
    seen = reader.read_table("votes").to_pandas()
    store.append_table("votes", votes_frame(range(5, 8)))  # another writer, after the read
    with pytest.raises(TableConflict, match="changed after this step read it"):
        reader.write_table("votes", pd.concat([seen, votes_frame([100])]))
    assert sorted(store.read_table("votes").column("annotation_id").to_pylist()) == list(range(8))
    # compaction changes no rows: a read-modify-write across it goes through
    again = reader.read_table("votes").to_pandas()
    store.compact("votes")
    reader.write_table("votes", pd.concat([again, votes_frame([100])]))
    assert sorted(store.read_table("votes").column("annotation_id").to_pylist()) == [*range(8), 100]


def test_time_travel_and_exclusive_create(store):
    store.write_table("synsets", synsets_frame(2))
    store.write_table("synsets", synsets_frame(4))
    assert store.read_table("synsets").num_rows == 4
    assert store.read_table("synsets", version=0).num_rows == 2
    with pytest.raises(MissingKey):
        store.read_table("synsets", version=7)
    with pytest.raises(KeyExists):
        store.write_table("synsets", synsets_frame(1), exclusive=True)
    assert store.read_table("synsets").num_rows == 4


def test_uint64_hashes_survive_delta_bit_for_bit(store):
    from pipeline.schemas import arrow_schema

    schema = arrow_schema("images")
    big = [2**64 - 1, 2**63 + 5, 7]
    columns = {}
    for f in schema:
        if f.type == pa.uint64():
            columns[f.name] = pa.array(big, pa.uint64())
        else:
            columns[f.name] = pa.nulls(3, f.type) if f.nullable else pa.array(sample_values(f.type, 3), f.type)
    store.write_table("images", pa.table(columns))
    back = store.read_table("images")
    assert back.column("phash").to_pylist() == big and back.schema.field("phash").type == pa.uint64()


def sample_values(t, n):
    if pa.types.is_string(t):
        return [f"s{i}" for i in range(n)]
    if pa.types.is_boolean(t):
        return [True] * n
    if pa.types.is_timestamp(t):
        return [0] * n
    return list(range(n))


def test_legacy_single_object_table_is_read_then_converted(store):
    from pipeline.store import table_key

    store.write_table("votes", votes_frame(range(4)), key=table_key("votes"))  # a store from before Delta
    assert store.has_table("votes") and store.working_tables() == ["votes"]
    assert store.read_table("votes").num_rows == 4
    store.append_table("votes", votes_frame(range(4, 6)))
    assert not store.exists(table_key("votes"))
    assert store.read_table("votes").column("annotation_id").to_pylist() == list(range(6))
    store.write_table("synsets", synsets_frame(3), key=table_key("synsets"))
    assert store.migrate() == ["synsets"] and not store.exists(table_key("synsets"))
    assert store.read_table("synsets").num_rows == 3 and store.table_version("synsets") == 0


def test_release_style_keys_stay_plain_parquet(store):
    import pyarrow.parquet as pq

    key = store.write_table("synsets", synsets_frame(2), key="releases/v1/synsets.parquet", exclusive=True)
    assert pq.read_table(pa.BufferReader(store.get(key))).num_rows == 2
    assert store.read_table("synsets", key=key, columns=["wnid"]).column_names == ["wnid"]
    assert not store.has_table("synsets")


def test_compact_merges_files_keeps_order_and_history(store):
    for start in range(0, 30, 5):
        store.append_table("votes", votes_frame(range(start, start + 5)))
    before = store.read_table("votes")
    out = store.compact("votes")
    assert out["files_removed"] == 6 and out["files_added"] == 1
    assert store.read_table("votes").equals(before)
    assert store.read_table("votes", version=3).num_rows == 20  # history readable until vacuumed
    assert store.vacuum("votes") == []  # default retention keeps every recent version's files
    assert store.read_table("votes", version=3).num_rows == 20
    with pytest.raises(StoreError, match="shorter than"):
        store.vacuum("votes", retention=__import__("datetime").timedelta(minutes=5))
    ordered = store.compact("votes", order_by=["wnid", "annotation_id"])
    assert ordered["rows"] == 30


def test_vacuum_removes_old_unreferenced_files_only(tmp_path):
    import time as _t

    store = LocalStore(tmp_path)
    store.append_table("votes", votes_frame(range(5)))
    store.put("tables/votes/part-00000000000000000001-dead-00000.zstd.parquet", b"a killed writer's file")
    store.put("tables/votes/part-00000000000000000002-live-00000.zstd.parquet", b"a writer about to commit")
    old = _t.time() - 40 * 86400
    os.utime(store.path("tables/votes/part-00000000000000000001-dead-00000.zstd.parquet"), (old, old))
    removed = store.vacuum("votes")
    assert [r.rsplit("/", 1)[-1] for r in removed] == ["part-00000000000000000001-dead-00000.zstd.parquet"]
    assert store.exists("tables/votes/part-00000000000000000002-live-00000.zstd.parquet")
    assert store.read_table("votes").num_rows == 5


def test_local_list_walks_only_the_prefix_folder(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    store.put("a/b/c.txt", b"1")
    store.put("a/bc.txt", b"2")
    store.put("z/y.txt", b"3")
    walked = []
    real = os.walk
    monkeypatch.setattr(os, "walk", lambda top, *a, **k: walked.append(str(top)) or real(top, *a, **k))
    assert store.list("a/b") == ["a/b/c.txt", "a/bc.txt"]
    assert store.list("a/b/") == ["a/b/c.txt"]
    assert store.list("nothing/here") == []
    assert walked == [str(tmp_path / "a"), str(tmp_path / "a" / "b"), str(tmp_path / "nothing")]


def test_local_files_are_readable_by_others(tmp_path):
    store = LocalStore(tmp_path)
    store.put("releases/v1/x.bin", b"x")
    store.append_table("votes", votes_frame(range(2)))
    assert os.stat(store.path("releases/v1/x.bin")).st_mode & 0o777 == 0o644
    assert all(os.stat(store.path(k)).st_mode & 0o777 == 0o644 for k in data_files(store, "votes"))


def test_delete_table_removes_history(store):
    store.append_table("votes", votes_frame(range(3)))
    store.delete_table("votes")
    assert not store.has_table("votes") and store.list("tables/votes/") == []
    assert store.read_table("votes", missing_ok=True).num_rows == 0
