"""Release build: manifest contents, immutability (local and S3 on moto), invisibility without a manifest,
verify, splits (deterministic, quotas, stable across versions), near-duplicate leakage, CLI and bad input."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipeline.release.build import build_release
from pipeline.release.manifest import (
    ReleaseError,
    ReleaseExists,
    list_releases,
    manifest_key,
    read_manifest,
    read_release_table,
    verify_release,
)
from pipeline.release.splits import assign_splits, split_keys
from pipeline.release.synthetic import make_fixture
from pipeline.store import KeyExists, LocalStore, MissingKey

Q = {"val_per_class": 3, "test_per_class": 2}


@pytest.fixture
def local(tmp_path):
    store = LocalStore(tmp_path / "store")
    fx = make_fixture(store, n_classes=3, per_class=12, seed=7)
    return store, fx


def test_manifest_records_files_counts_and_hashes(local):
    store, fx = local
    m = build_release(store, "v1", neardup=False, **Q)
    assert read_manifest(store, "v1") == m
    assert m["parent"] is None and m["code_version"].startswith("synsetforge ")
    assert len(m["config_digest"]) == 64
    for name, entry in m["files"].items():
        data = store.get(f"releases/v1/{entry['key']}")
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert read_release_table(store, "v1", name).num_rows == entry["rows"]
    labels = read_release_table(store, "v1", "labels")
    prim = labels.filter(labels["is_primary"]).to_pandas()
    assert prim.image_id.is_unique
    assert m["splits"] == prim.split.value_counts().reindex(["train", "val", "test"], fill_value=0).to_dict()
    for wnid in fx.wnids:
        c = m["classes"][wnid]
        assert (c["val"], c["test"]) == (3, 2)  # quotas met: every class has >= 5 accepted images
        assert c["train"] == int(((prim.wnid == wnid) & (prim.split == "train")).sum())
    # only accepted labels of accepted images; pending and rejected labels stay out
    src = store.read_table("labels").to_pandas()
    accepted = src[src.status == "accepted"]
    assert len(labels) == len(accepted)
    assert m["stats"]["label_status"]["pending"] == 3
    # the image accepted in two classes has two rows, one of them primary: the more confident one
    rows = labels.filter(pc.equal(labels["image_id"], fx.multi_label_image)).to_pandas()
    assert len(rows) == 2 and rows.is_primary.sum() == 1
    assert rows[rows.is_primary].confidence.iloc[0] == rows.confidence.max()
    assert rows.split.nunique() == 1
    # boxes: only accepted boxes, only for released (image, wnid) pairs
    boxes = read_release_table(store, "v1", "boxes")
    assert set(pc.unique(boxes["verified"]).to_pylist()) == {"accepted"}
    assert boxes.num_rows == sum(c["boxes"] for c in m["classes"].values())
    assert m["files"]["boxes"]["schema_version"] >= 1


def test_rebuild_of_same_inputs_is_byte_identical(tmp_path, local):
    store, _ = local
    m1 = build_release(store, "v1", neardup=False, **Q)
    m2 = build_release(store, "v2", neardup=False, **Q)
    assert {k: v["sha256"] for k, v in m1["files"].items()} == {k: v["sha256"] for k, v in m2["files"].items()}


@pytest.mark.slow
def test_published_version_is_never_overwritten(store):
    """Local: exclusive link; S3 (moto server): conditional put with If-None-Match."""
    make_fixture(store, n_classes=2, per_class=6, seed=1)
    build_release(store, "v1", neardup=False, **Q)
    before = store.get(manifest_key("v1"))
    with pytest.raises(ReleaseExists):
        build_release(store, "v1", neardup=False, val_per_class=1, test_per_class=1)
    with pytest.raises(KeyExists):  # the storage primitive itself refuses, not only our pre-check
        store.put(manifest_key("v1"), b"{}", exclusive=True)
    assert store.get(manifest_key("v1")) == before
    assert list_releases(store) == ["v1"]
    assert verify_release(store, "v1").ok


def test_folder_without_manifest_is_invisible_and_build_resumes(local, monkeypatch):
    store, _ = local
    real_put = store.put

    def crash_on_manifest(key, data, *, exclusive=False):
        if key.endswith("manifest.json"):
            raise OSError("disk full (simulated crash before the manifest)")
        return real_put(key, data, exclusive=exclusive)

    monkeypatch.setattr(store, "put", crash_on_manifest)
    with pytest.raises(OSError):
        build_release(store, "v1", neardup=False, **Q)
    monkeypatch.undo()
    assert store.list("releases/v1/")  # data files are there ...
    assert list_releases(store) == []  # ... but without a manifest the release does not exist
    with pytest.raises(ReleaseError, match="not found"):
        read_manifest(store, "v1")
    m = build_release(store, "v1", neardup=False, **Q)  # re-running finishes it
    assert list_releases(store) == ["v1"] and verify_release(store, "v1").ok
    assert len(store.list("releases/v1/data/")) == len(m["files"])


def test_verify_detects_a_changed_file(local):
    store, _ = local
    m = build_release(store, "v1", neardup=False, **Q)
    key = f"releases/v1/{m['files']['labels']['key']}"
    store.put(key, store.get(key) + b"x")
    res = verify_release(store, "v1")
    assert not res.ok and "labels" in res.problems[0] and "sha256" in res.problems[0]
    store.delete(f"releases/v1/{m['files']['boxes']['key']}")
    assert any("missing" in p for p in verify_release(store, "v1").problems)


def test_assign_splits_is_deterministic_and_meets_quotas():
    ids = [hashlib.sha256(str(k).encode()).hexdigest() for k in range(200)]
    df = pd.DataFrame({"image_id": ids, "wnid": ["n00000001"] * 120 + ["n00000002"] * 80})
    a = assign_splits(df, val_per_class=10, test_per_class=5, salt="s1")
    b = assign_splits(df.sample(frac=1, random_state=3), val_per_class=10, test_per_class=5, salt="s1")
    assert a.set_index("image_id").split.to_dict() == b.set_index("image_id").split.to_dict()
    counts = a.groupby(["wnid", "split"]).size()
    assert counts["n00000001"]["val"] == 10 and counts["n00000002"]["test"] == 5
    # the chosen val images are exactly the lowest salted keys of their class
    c1 = df[df.wnid == "n00000001"].copy()
    c1["key"] = split_keys(c1.image_id.tolist(), "s1")
    expected_val = set(c1.nsmallest(10, "key").image_id)
    assert set(a[(a.wnid == "n00000001") & (a.split == "val")].image_id) == expected_val
    other = assign_splits(df, val_per_class=10, test_per_class=5, salt="s2")
    assert set(other[other.split == "val"].image_id) != set(a[a.split == "val"].image_id)
    # a class smaller than its quotas gives all its images to val first, then test
    small = assign_splits(df.head(4), val_per_class=3, test_per_class=3, salt="s1")
    assert sorted(small.split) == ["test", "val", "val", "val"]


def test_assign_splits_keeps_parent_splits_and_tops_up():
    ids = [f"img{k:03d}" for k in range(30)]
    df = pd.DataFrame({"image_id": ids, "wnid": "n00000001"})
    first = assign_splits(df.head(20), val_per_class=4, test_per_class=2, salt="s")
    # v2: a new salt would reshuffle everything, but the parent's splits win; quotas are already met
    second = assign_splits(df, first[["image_id", "split"]], val_per_class=4, test_per_class=2, salt="other")
    merged = first.merge(second, on="image_id", suffixes=("_1", "_2"))
    assert (merged.split_1 == merged.split_2).all() and merged.from_parent_2.all()
    assert set(second[~second.from_parent].split) == {"train"}
    # raising the val quota tops up from new images only
    third = assign_splits(df, first[["image_id", "split"]], val_per_class=6, test_per_class=2, salt="s")
    assert (third.split == "val").sum() == 6
    assert set(third[(third.split == "val") & ~third.from_parent].image_id) <= set(ids[20:])
    with pytest.raises(ValueError, match="one row per image"):
        assign_splits(pd.concat([df, df.head(1)]), val_per_class=1, test_per_class=1, salt="s")


def test_second_release_keeps_splits_of_the_first(local):
    store, fx = local
    build_release(store, "v1", neardup=False, **Q)
    labels = store.read_table("labels").to_pandas()
    labels.loc[labels.status == "pending", ["status", "confidence"]] = ["accepted", 0.97]  # QC decided more
    store.write_table("labels", labels)
    m2 = build_release(store, "v2", parent="v1", neardup=False, val_per_class=4, test_per_class=2, salt="new-salt")
    s1 = read_release_table(store, "v1", "labels").to_pandas().set_index(["image_id", "wnid"]).split
    s2 = read_release_table(store, "v2", "labels").to_pandas().set_index(["image_id", "wnid"]).split
    common = s1.index.intersection(s2.index)
    assert len(common) == len(s1) and (s1[common] == s2[common]).all()
    assert m2["parent"] == "v1" and m2["split_policy"]["kept_from_parent"] == m2["splits"]["train"] + \
        m2["splits"]["val"] + m2["splits"]["test"] - 3
    assert all(c["val"] == 4 for c in m2["classes"].values())
    with pytest.raises(ReleaseError, match="known releases"):
        build_release(store, "v3", parent="nope", neardup=False, **Q)


def test_near_duplicates_of_val_test_images_are_dropped_from_train(tmp_path):
    import pipeline.ingest.neardup as neardup
    store = LocalStore(tmp_path / "s")
    fx = make_fixture(store, n_classes=3, per_class=10, near_dups_per_class=4, seed=11)
    m = build_release(store, "v1", val_per_class=3, test_per_class=2, cross_duplicates=neardup.cross_duplicates)
    unchecked = build_release(store, "v0", neardup=False, val_per_class=3, test_per_class=2)
    split = read_release_table(store, "v0", "labels").to_pandas().query("is_primary").set_index("image_id").split
    # planted pairs that straddle train and val/test: the train side must go
    expected = {a if split[a] == "train" else b for a, b in fx.near_dup_pairs
                if a in split and b in split and (split[a] == "train") != (split[b] == "train")}
    assert expected, "fixture should plant at least one straddling pair"
    kept = set(read_release_table(store, "v1", "labels").column("image_id").to_pylist())
    assert not expected & kept
    assert m["neardup_dropped"] >= len(expected) and m["stats"]["neardup_checked"] is True
    assert sum(m["splits"].values()) == sum(unchecked["splits"].values()) - m["neardup_dropped"]


def test_bad_input_is_refused_with_a_clear_message(tmp_path, local):
    store, _ = local
    with pytest.raises(ReleaseError, match="not valid"):
        build_release(store, "../evil", neardup=False, **Q)
    with pytest.raises(ReleaseError, match="own parent"):
        build_release(store, "v1", parent="v1", neardup=False, **Q)
    empty = LocalStore(tmp_path / "empty")
    with pytest.raises(MissingKey, match="run the stage that writes it"):
        build_release(empty, "v1", neardup=False, **Q)
    assert empty.list() == []  # nothing written
    bad = store.read_table("labels").to_pandas()
    bad.loc[0, "wnid"] = "n12345678"  # a label outside the vocabulary is counted and left out
    store.write_table("labels", bad)
    m = build_release(store, "v1", neardup=False, **Q)
    assert m["stats"]["labels_outside_vocabulary"] == 1
    manifest = json.loads(store.get(manifest_key("v1")))
    assert "n12345678" not in manifest["classes"]


def test_cli_build_verify_list_and_errors(tmp_path, local, capsys):
    from pipeline.cli import main

    store, _ = local
    root = str(store.root)
    args = ["--store", root, "release", "build", "--version", "r1", "--val-per-class", "2", "--test-per-class", "1",
            "--no-neardup"]
    assert main(args) == 0
    assert "release r1 built" in capsys.readouterr().out
    assert store.exists("releases/r1/report.html") and store.exists("releases/r1/card.md")
    assert main(["--store", root, "release", "verify", "r1"]) == 0
    assert main(["--store", root, "release", "list"]) == 0
    assert "r1" in capsys.readouterr().out
    assert main(args) == 2  # exists: refused, exit code 2, a message instead of a traceback
    assert "immutable" in capsys.readouterr().err
    assert main(["--store", root, "release", "verify", "nope"]) == 2
    key = f"releases/r1/{read_manifest(store, 'r1')['files']['images']['key']}"
    store.put(key, b"tampered")
    assert main(["--store", root, "release", "verify", "r1"]) == 1


def test_release_tables_match_their_schemas(local):
    store, _ = local
    build_release(store, "v1", neardup=False, **Q)
    from pipeline.schemas import arrow_schema

    labels = read_release_table(store, "v1", "labels")
    assert labels.schema.equals(arrow_schema("release_labels"), check_metadata=False)
    assert labels.column("split").type == pa.string()


def test_two_urls_for_one_image_give_one_release_row(local):
    store, fx = local
    images = store.read_table("images")
    first = images.filter(pc.equal(images["status"], "accepted")).slice(0, 1)
    i = first.schema.get_field_index("first_url")
    copy = first.set_column(i, first.schema.field(i), pa.array(["http://mirror.test/x.jpg"]))
    store.write_table("images", pa.concat_tables([images, copy]))
    build_release(store, "v1", neardup=False, **Q)
    out = read_release_table(store, "v1", "images")
    assert pc.count_distinct(out["image_id"]).as_py() == out.num_rows
    assert first["first_url"][0].as_py() in out["first_url"].to_pylist()  # the first row wins


def test_row_selection_writer_slices_and_takes_the_same_rows(tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.release.build import _write_rows

    table = pa.table({"k": pa.array(range(400)), "s": pa.array([f"v{i}" for i in range(400)])})
    rng = np.random.default_rng(0)
    for rows in (np.r_[0:100, 200:300, 350:351], np.sort(rng.choice(400, 50, replace=False)), np.array([], int)):
        with pq.ParquetWriter(tmp_path / "x.parquet", table.schema) as w:
            _write_rows(w, table, rows)
        assert pq.read_table(tmp_path / "x.parquet").equals(table.take(pa.array(rows, pa.int64())))


# ---------------------------------------------------------------- small datasets (fractions, plan, checks)


def test_fractional_quotas_scale_with_each_class(tmp_path):
    import numpy as np

    from pipeline.release.splits import class_quotas

    store = LocalStore(tmp_path / "s")
    fx = make_fixture(store, n_classes=3, per_class=12, near_dups_per_class=0, seed=3)
    labels = store.read_table("labels").to_pandas()  # shrink one class so the classes differ in size
    small = set(fx.image_ids[fx.wnids[2]][:7])
    labels.loc[labels.image_id.isin(small) & (labels.wnid == fx.wnids[2]), "status"] = "rejected"
    store.write_table("labels", labels)
    m = build_release(store, "v1", val_per_class=0.25, test_per_class=0.2, neardup=False)
    assert m["split_policy"]["val_per_class"] == 0.25 and m["split_policy"]["test_per_class"] == 0.2
    sizes = {w: c["train"] + c["val"] + c["test"] for w, c in m["classes"].items()}
    assert len(set(sizes.values())) > 1
    for w, c in m["classes"].items():
        n = sizes[w]
        assert c["val"] == int(np.floor(0.25 * n + 0.5)) and c["test"] == int(np.floor(0.2 * n + 0.5)), (w, n, c)
    assert class_quotas(0.5, np.array([1, 2, 3])).tolist() == [1, 1, 2]  # halves round up
    # the same fractions through assign_splits (the pandas entry point)
    df = pd.DataFrame({"image_id": [f"i{k}" for k in range(30)], "wnid": ["n00000001"] * 20 + ["n00000002"] * 10})
    got = assign_splits(df, val_per_class=0.1, test_per_class=0.3, salt="s").groupby(["wnid", "split"]).size()
    assert (got["n00000001"]["val"], got["n00000001"]["test"], got["n00000002"]["val"]) == (2, 6, 1)


def test_quota_settings_accept_counts_and_fractions_only():
    from pipeline.config import ConfigError, load_settings
    from pipeline.release.build import SplitPolicy
    from pipeline.release.cli import quota_arg
    from pipeline.release.manifest import ReleaseInputError

    s = load_settings(env={"SYNSETFORGE__RELEASE__VAL_PER_CLASS": "0.1", "SYNSETFORGE__RELEASE__TEST_PER_CLASS": "7"})
    assert (s.release.val_per_class, s.release.test_per_class) == (0.1, 7)
    assert isinstance(s.release.test_per_class, int)
    for bad in ("1.5", "-1", "0.0001x"):
        with pytest.raises(ConfigError, match="val_per_class"):
            load_settings(env={"SYNSETFORGE__RELEASE__VAL_PER_CLASS": bad})
    assert (quota_arg("0.2"), quota_arg("3"), quota_arg("4.0")) == (0.2, 3, 4)
    import argparse

    for bad in ("1.5", "-2", "lots"):
        with pytest.raises(argparse.ArgumentTypeError):
            quota_arg(bad)
    with pytest.raises(ReleaseInputError, match="strictly between 0 and 1"):
        SplitPolicy(1.5, 1)


def test_a_class_without_train_or_val_images_stops_the_build(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.release.manifest import ReleaseTooSmall
    from pipeline.release.synthetic import fill_schema

    store = LocalStore(tmp_path / "s")
    fx = make_fixture(store, n_classes=3, per_class=6, near_dups_per_class=0, seed=8)
    syn = store.read_table("synsets").to_pandas()  # a fourth class in the vocabulary with no image at all
    extra = fill_schema("synsets", {"wnid": ["n95555555"], "name": ["ghost.n.01"], "lemmas": [["ghost"]],
                                    "gloss": ["no pictures"], "depth": [5], "parent_wnids": [["n90000000"]],
                                    "lexname": ["noun.artifact"], "is_leaf": [True], "queries": [["ghost"]]}, 1)
    store.write_table("synsets", pa.concat_tables([pa.Table.from_pandas(syn, preserve_index=False).cast(extra.schema),
                                                   extra]))
    n = {w: len(ids) - 1 - sum(1 for j in range(len(ids)) if j % 7 == 6) for w, ids in fx.image_ids.items()}
    with pytest.raises(ReleaseTooSmall) as err:  # val + test take every image of the real classes
        build_release(store, "v1", val_per_class=3, test_per_class=max(n.values()), neardup=False)
    msg = str(err.value)
    for k, w in enumerate(fx.wnids):
        assert f"{w} thing{k}.n.01: 0 train" in msg
    assert "n95555555 ghost.n.01: 0 train, 0 val, 0 test" in msg
    assert "vocabulary.exclude" in msg and "release.test_per_class" in msg and "--force" in msg
    assert {c["wnid"] for c in err.value.classes} == {*fx.wnids, "n95555555"}
    assert store.list("releases") == []  # refused before anything was written
    # no val image because the val quota is 0: the message says which setting does it
    with pytest.raises(ReleaseTooSmall, match="The setting release.val_per_class is 0"):
        build_release(store, "v1", val_per_class=0, test_per_class=1, neardup=False)
    # --force builds it and the manifest, report and card say which classes are short
    m = build_release(store, "v1", val_per_class=1, test_per_class=1, neardup=False, force=True)
    assert [c["wnid"] for c in m["stats"]["short_classes"]] == ["n95555555"]
    # the CLI: a message without a traceback (exit 2), then --force
    args = ["--store", str(store.root), "release", "build", "--version", "v2", "--val-per-class", "1",
            "--test-per-class", "1", "--no-neardup", "--no-report"]
    assert main(args) == 2
    err_text = capsys.readouterr().err
    assert "n95555555 ghost.n.01" in err_text and "Traceback" not in err_text
    assert main([*args, "--force"]) == 0
    assert "--force: 1 class without a train or a val image: n95555555 ghost.n.01" in capsys.readouterr().out


def test_plan_shows_the_split_per_class_and_writes_nothing(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.release.build import plan_from_store

    store = LocalStore(tmp_path / "s")
    make_fixture(store, n_classes=3, per_class=10, seed=12)
    before = {k: store.get(k) for k in store.list()}
    plan = plan_from_store(store, val_per_class=0.2, test_per_class=2, neardup=False)
    root = str(store.root)
    assert main(["--store", root, "release", "plan", "--val-per-class", "0.2", "--test-per-class", "2",
                 "--no-neardup"]) == 0
    out = capsys.readouterr().out
    assert main(["--store", root, "release", "build", "--version", "v1", "--dry-run", "--val-per-class", "0.2",
                 "--test-per-class", "2", "--no-neardup"]) == 0
    dry = capsys.readouterr().out
    assert "was not written" in dry
    assert {k: store.get(k) for k in store.list()} == before  # plan and dry run wrote nothing
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| n9")]
    printed = {r[0].strip(): (r[1].strip(), *map(int, r[2:6])) for r in rows}
    m = build_release(store, "v1", val_per_class=0.2, test_per_class=2, neardup=False)
    assert printed == {w: (f"thing{k}.n.01", c["train"], c["val"], c["test"], c["train"] + c["val"] + c["test"])
                       for k, (w, c) in enumerate(sorted(m["classes"].items()))}
    assert plan.splits == m["splits"] and plan.qc_methods == m["qc_methods"] and not plan.short_classes
    assert dry.split("dry run")[0] == out.split("nothing was written")[0]
    # a dry run of a build that would be refused says why, and still writes nothing
    assert main(["--store", root, "release", "build", "--version", "v2", "--dry-run", "--val-per-class", "50",
                 "--no-neardup"]) == 2
    assert "without a train or a val image" in capsys.readouterr().err and not store.exists("releases/v2/manifest.json")


def test_build_without_a_boxes_table_is_classification_only(tmp_path):
    from pipeline.release.export import export_devkit, export_parquet
    from pipeline.release.report import build_report

    store = LocalStore(tmp_path / "s")
    make_fixture(store, n_classes=2, per_class=6, seed=4, without={"boxes", "box_answers"})
    assert not store.has_table("boxes")
    m = build_release(store, "v1", val_per_class=1, test_per_class=1, neardup=False)
    assert m["files"]["boxes"]["rows"] == 0 and m["stats"]["boxes_table"] is False
    assert all(c["boxes"] == 0 for c in m["classes"].values()) and sum(m["splits"].values()) > 0
    keys = build_report(store, "v1", thumbs_per_class=1)
    assert "classification only" in store.get(keys["report"]).decode()
    assert "classification-only release" in store.get(keys["card"]).decode()
    counts = export_devkit(store, "v1", tmp_path / "dk")
    assert counts["xml"] == 0 and not (tmp_path / "dk" / "bbox").exists() and counts["train"] > 0
    files = export_parquet(store, "v1", tmp_path / "pq")
    assert sum(len(pd.read_parquet(tmp_path / "pq" / f)) for fs in files.values() for f in fs) == \
        sum(m["splits"].values())


def test_manifest_records_the_qc_methods_of_the_released_labels(local):
    from pipeline.release.manifest import validate_manifest

    store, fx = local
    labels = store.read_table("labels").to_pandas()
    labels.loc[labels.wnid == fx.wnids[1], "method"] = "dawid_skene"
    labels.loc[labels.status == "rejected", "method"] = "majority_vote"  # not released: not recorded
    store.write_table("labels", labels)
    m = build_release(store, "v1", neardup=False, **Q)
    assert m["manifest_version"] == 2 and m["qc_methods"] == ["confidence_table", "dawid_skene"]
    released = read_release_table(store, "v1", "labels").to_pandas()
    assert sorted(released.method.unique()) == m["qc_methods"]
    # manifests of the first version (no qc_methods) still read; a second-version one must have them
    old = {k: v for k, v in m.items() if k != "qc_methods"}
    validate_manifest({**old, "manifest_version": 1})
    with pytest.raises(ReleaseError, match="qc_methods"):
        validate_manifest(old)


def test_release_images_schema_is_the_images_schema_plus_attribution():
    """The release's images table is versioned on its own (schemas/release_images.json); it must keep every
    column of the ingest images table, with the same type, and add the attribution columns."""
    from pipeline.release.attribution import ATTRIBUTION_COLUMNS
    from pipeline.schemas import arrow_schema

    images, release = arrow_schema("images"), arrow_schema("release_images")
    missing = [f.name for f in images if f.name not in release.names]
    assert not missing, f"add {missing} to schemas/release_images.json (and bump its version)"
    assert all(release.field(f.name).type == f.type for f in images)
    assert [n for n in release.names if n not in images.names] == list(ATTRIBUTION_COLUMNS)
    assert not release.field("image_id").nullable and not release.field("first_url").nullable


def _pinned_versions_missing_or_broken(store):
    """A build pins each input table to a version (`_pin`) and reads it there. A version the store does not hold
    (never written, or its commit gone) is a MissingKey; a version whose commit is there but whose log is broken
    (here: an earlier commit deleted) is the store failing, a StoreError, not a missing version, although delta-rs
    words both alike ("... version ...")."""
    from pipeline.release.build import _Pin, _read_input
    from pipeline.store import StoreError

    make_fixture(store, n_classes=2, per_class=6, seed=1)
    synsets = store.read_table("synsets").to_pandas()
    for _ in range(2):
        store.write_table("synsets", synsets)
    last = store.table_version("synsets")
    assert last >= 2 and _read_input(store, "synsets", source=_Pin(version=last)).num_rows == len(synsets)
    with pytest.raises(MissingKey, match=f"has no version {last + 5}"):
        _read_input(store, "synsets", source=_Pin(version=last + 5))  # never written
    store.delete(f"tables/synsets/_delta_log/{last - 1:020d}.json")
    with pytest.raises(MissingKey, match=f"has no version {last - 1}"):
        _read_input(store, "synsets", source=_Pin(version=last - 1))  # its commit is gone
    with pytest.raises(StoreError, match="opening table 'synsets'") as broken:
        _read_input(store, "synsets", source=_Pin(version=last))  # there, but the log before it has a gap
    assert not isinstance(broken.value, MissingKey)


def test_a_pinned_version_that_is_gone_is_missing_and_a_broken_log_is_a_store_error(tmp_path):
    _pinned_versions_missing_or_broken(LocalStore(tmp_path / "store"))


@pytest.mark.slow
def test_pinned_versions_missing_or_broken_on_both_backends(store):
    """The same on S3 (moto server): the commit file is looked up with the store's own exists()."""
    _pinned_versions_missing_or_broken(store)
