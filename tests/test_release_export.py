"""Diff between releases, devkit and Parquet exports (read by datasets, pandas and DuckDB), publishing to a
folder and to S3 on a real moto server."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pandas as pd
import pytest

from pipeline.release.build import build_release
from pipeline.release.diff import diff_boxes, diff_labels, diff_releases
from pipeline.release.export import export_devkit, export_parquet, publish_release
from pipeline.release.manifest import ReleaseError, ReleaseExists, list_releases, read_release_table, verify_release
from pipeline.release.synthetic import make_fixture
from pipeline.store import LocalStore, S3Store


@pytest.fixture
def built(tmp_path):
    store = LocalStore(tmp_path / "store")
    fx = make_fixture(store, n_classes=3, per_class=9, box_fraction=0.5, seed=2)
    build_release(store, "v1", val_per_class=2, test_per_class=2, neardup=False)
    return store, fx


def test_diff_by_hand():
    a = pd.DataFrame({"image_id": ["i1", "i2", "i3"], "wnid": ["n1", "n1", "n2"], "split": ["train"] * 3})
    b = pd.DataFrame({"image_id": ["i2", "i3", "i4"], "wnid": ["n2", "n2", "n1"], "split": ["train", "val", "val"]})
    d = diff_labels(a, b)
    assert d.loc["n1"].to_dict() == {"added": 1, "removed": 1, "relabelled_in": 0, "relabelled_out": 1,
                                     "split_changed": 0}
    assert d.loc["n2", "relabelled_in"] == 1 and d.loc["n2", "split_changed"] == 1
    ba = pd.DataFrame({"box_id": ["b1", "b2", "b3"], "wnid": ["n1", "n1", "n2"], "x_min": [0.0, 0, 0],
                       "y_min": [0.0, 0, 0], "x_max": [5.0, 5, 5], "y_max": [5.0, 5, 5]})
    bb = ba.iloc[1:].copy()
    bb.loc[bb.box_id == "b2", "x_max"] = 6.0
    bb = pd.concat([bb, pd.DataFrame({"box_id": ["b4"], "wnid": ["n2"], "x_min": [1.0], "y_min": [1.0],
                                      "x_max": [2.0], "y_max": [2.0]})])
    db = diff_boxes(ba, bb)
    assert db.loc["n1"].to_dict() == {"boxes_added": 0, "boxes_removed": 1, "boxes_changed": 1}
    assert db.loc["n2"].to_dict() == {"boxes_added": 1, "boxes_removed": 0, "boxes_changed": 0}


def test_diff_between_two_releases(built, capsys):
    store, fx = built
    labels = store.read_table("labels").to_pandas()
    moved = fx.image_ids[fx.wnids[0]][2]
    labels.loc[(labels.image_id == moved) & (labels.wnid == fx.wnids[0]), "wnid"] = fx.wnids[2]
    removed = fx.image_ids[fx.wnids[1]][3]
    labels.loc[labels.image_id == removed, "status"] = "rejected"
    labels.loc[labels.status == "pending", ["status", "confidence"]] = ["accepted", 0.99]
    store.write_table("labels", labels)
    boxes = store.read_table("boxes").to_pandas()
    boxes.loc[0, "x_max"] += 3.0
    store.write_table("boxes", boxes)
    build_release(store, "v2", parent="v1", val_per_class=2, test_per_class=2, neardup=False)
    d = diff_releases(store, "v1", "v2")
    assert d.loc["TOTAL", "added"] == 3  # the three pending images, now accepted
    assert d.loc[fx.wnids[1], "removed"] >= 1
    assert d.loc[fx.wnids[2], "relabelled_in"] == 1 and d.loc[fx.wnids[0], "relabelled_out"] == 1
    assert d.loc["TOTAL", "split_changed"] == 0  # parent splits are kept
    assert d.loc["TOTAL", "boxes_changed"] + d.loc["TOTAL", "boxes_removed"] >= 1
    from pipeline.cli import main

    assert main(["--store", str(store.root), "release", "diff", "v1", "v2"]) == 0
    assert "| TOTAL |" in capsys.readouterr().out


def test_devkit_layout(built, tmp_path):
    store, _ = built
    out = tmp_path / "dk"
    counts = export_devkit(store, "v1", out)
    labels = read_release_table(store, "v1", "labels").to_pandas().query("is_primary")
    mapping = (out / "devkit/data/map_clsloc.txt").read_text().splitlines()
    index = {line.split()[0]: int(line.split()[1]) for line in mapping}
    assert sorted(index.values()) == list(range(1, 4)) and list(index) == sorted(index)
    assert (out / "LOC_synset_mapping.txt").read_text().splitlines()[0].startswith(f"{mapping[0].split()[0]} thing 0")
    # a folder per wnid for train, holding exactly that class's train images, bytes as stored
    for wnid, g in labels[labels.split == "train"].groupby("wnid"):
        files = sorted((out / "train" / wnid).iterdir())
        assert len(files) == len(g)
        images = read_release_table(store, "v1", "images").to_pandas().set_index("image_id")
        first = g.image_id.sort_values().iloc[0]
        assert (out / "train" / wnid / f"{wnid}_{first[:16]}.JPEG").read_bytes() == \
            store.get(images.loc[first, "storage_key"])
    gt = [int(x) for x in (out / "devkit/data/v1_validation_ground_truth.txt").read_text().split()]
    val = labels[labels.split == "val"].sort_values("image_id")
    assert gt == [index[w] for w in val.wnid]
    assert len(list((out / "val").iterdir())) == len(val) == counts["val"]
    assert (out / "val" / "v1_val_00000001.JPEG").exists()
    assert len((out / "devkit/data/v1_test_images.txt").read_text().split()) == counts["test"]
    # VOC XML for every train/val image with boxes, coordinates from the boxes table
    boxes = read_release_table(store, "v1", "boxes").to_pandas()
    xmls = list((out / "bbox").rglob("*.xml"))
    held = set(labels[labels.split == "test"].image_id)
    assert len(xmls) == counts["xml"] == boxes[~boxes.image_id.isin(held)].image_id.nunique()
    root = ET.parse(xmls[0]).getroot()
    assert root.tag == "annotation" and root.find("size/width") is not None
    obj = root.find("object")
    assert obj.find("name").text in index and int(obj.find("bndbox/xmax").text) > int(obj.find("bndbox/xmin").text)


def test_parquet_export_reads_with_datasets_pandas_duckdb(built, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local files only; never the Hub
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets
    import duckdb
    store, _ = built
    out = tmp_path / "pq"
    files = export_parquet(store, "v1", out, with_images=True)
    labels = read_release_table(store, "v1", "labels").to_pandas().query("is_primary")
    n = labels.split.value_counts().to_dict()

    frames = {s: pd.concat(pd.read_parquet(out / f) for f in fs) for s, fs in files.items()}
    assert len(frames["train"]) == n["train"] and len(frames["validation"]) == n["val"]
    assert (frames["test"].label == -1).all() and frames["train"].label.between(0, 2).all()

    con = duckdb.connect()
    got = con.execute(f"select count(*), count(distinct label) from read_parquet('{out}/data/train-*.parquet')").fetchone()
    assert got == (n["train"], 3)
    n_boxes = con.execute(f"select sum(len(boxes)) from read_parquet('{out}/data/*.parquet') "
                          "where label >= 0").fetchone()[0]
    boxes = read_release_table(store, "v1", "boxes").to_pandas()
    held = set(labels[labels.split == "test"].image_id)
    assert n_boxes == len(boxes[~boxes.image_id.isin(held)])

    ds = datasets.load_dataset("parquet", data_files={s: [str(out / f) for f in fs] for s, fs in files.items()},
                               cache_dir=str(tmp_path / "hf-cache"))
    assert ds["validation"].num_rows == n["val"]
    assert ds["train"].features["label"].names == sorted(labels.wnid.unique())
    row = ds["train"][0]
    assert row["image"].size[0] > 0  # decoded as a PIL image by the Image feature
    assert row["wnid"] == ds["train"].features["label"].names[row["label"]]


def test_publish_to_local_folder(built, tmp_path):
    store, _ = built
    target = tmp_path / "published"
    res = publish_release(store, "v1", target)
    dest = LocalStore(target)
    assert list_releases(dest) == ["v1"] and verify_release(dest, "v1").ok
    assert res["copied"] == res["files"]
    with pytest.raises(ReleaseExists):
        publish_release(store, "v1", target)


@pytest.mark.slow
def test_publish_to_s3_on_moto(built, s3_bucket, moto_server):
    store, _ = built
    client, bucket = s3_bucket
    res = publish_release(store, "v1", f"s3://{bucket}/datasets", endpoint_url=moto_server)
    dest = S3Store(bucket, "datasets", client=client)
    assert list_releases(dest) == ["v1"] and verify_release(dest, "v1").ok
    assert res["target"] == f"s3://{bucket}/datasets"
    with pytest.raises(ReleaseExists):  # immutable at the target too
        publish_release(store, "v1", dest)
    # a tampered source is refused before anything is copied
    m_key = next(k for k in store.list("releases/v1/data/") if "labels" in k)
    store.put(m_key, b"garbage")
    with pytest.raises(ReleaseError, match="failed verification"):
        publish_release(store, "v1", S3Store(bucket, "other", client=client))
    assert S3Store(bucket, "other", client=client).list() == []
