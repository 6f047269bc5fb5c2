"""The same cases on both backends: a temp folder and a real moto S3 server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os

import pandas as pd
import pyarrow as pa
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
    assert key == "tables/synsets.parquet"
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
    assert store.list() == ["tables/synsets.parquet"]
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
