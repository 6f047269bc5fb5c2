"""Attribution in releases: each released image carries its first URL's candidate record (creator, title,
license, license URL, source page) into the release's images table, the devkit export's ATTRIBUTION files
and the Parquet export; local file URLs never reach a release as absolute paths."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.release.attribution import attribution_for, portable_url, portable_urls
from pipeline.release.build import build_release, collect_roots
from pipeline.release.export import export_devkit, export_parquet
from pipeline.release.manifest import read_release_table
from pipeline.release.report import build_report
from pipeline.release.synthetic import make_fixture
from pipeline.store import LocalStore

CC_BY = "https://creativecommons.org/licenses/by/4.0/"


def test_portable_url_never_keeps_an_absolute_local_path():
    roots = ["/data/photos", "/mnt/other"]
    assert portable_url("file:///data/photos/n01/a%20b.jpg", roots) == "n01/a b.jpg"
    assert portable_url("file:///mnt/other/x/y.png", roots) == "x/y.png"
    assert portable_url("file:///home/ann/z.jpg", roots) == "z.jpg"  # outside every root: the file name
    assert portable_url("/data/photos/n01/c.jpg", roots) == "n01/c.jpg"  # a bare path too
    assert portable_url("file:///data/photos/../secret/k.jpg", roots) == "k.jpg"  # no climbing out of a root
    assert portable_url("file:///data/photosX/q.jpg", roots) == "q.jpg"  # a sibling folder is not under the root
    assert portable_url("C:\\Users\\ann\\p.jpg") == "p.jpg"
    for kept in ("https://example.test/a.jpg", "s3://bucket/k.jpg", None):
        assert portable_url(kept, roots) == kept
    column = pa.array(["https://e.test/1.jpg", "file:///data/photos/n01/2.jpg", None, "FILE:///tmp/3.jpg"])
    assert portable_urls(column, roots).to_pylist() == ["https://e.test/1.jpg", "n01/2.jpg", None, "3.jpg"]


def test_a_url_found_twice_is_credited_with_its_most_complete_record():
    cands = pa.table({
        "url": ["http://a.test/1.jpg", "http://a.test/1.jpg", "http://a.test/2.jpg"],
        "wnid": ["n00000001", "n00000002", "n00000001"],
        "rank": pa.array([0, 5, 1], pa.int32()),
        "source": ["openverse", "wikimedia", "openverse"],
        "page_url": [None, "http://a.test/page1", None],
        "title": ["one", "one (commons)", "two"],
        "creator": [None, "Ann", "Bo"],
        "license": ["cc-by-4.0", "cc-by-4.0", None],
        "license_url": [None, CC_BY, None]})
    urls = pa.array(["http://a.test/2.jpg", "http://a.test/1.jpg", "http://a.test/none.jpg"])
    # in any row order, and split over batches, the same record wins: the one with more fields set
    for batches in ([cands], [cands.slice(2), cands.slice(0, 2).take([1, 0])]):
        got = attribution_for(urls, batches).to_pylist()
        assert got[1] == {"source": "wikimedia", "page_url": "http://a.test/page1", "title": "one (commons)",
                          "creator": "Ann", "license": "cc-by-4.0", "license_url": CC_BY}
        assert got[0]["creator"] == "Bo" and got[0]["license"] is None
        assert set(got[2].values()) == {None}


def test_collect_roots_come_from_the_settings_and_the_collect_runs(tmp_path):
    store = LocalStore(tmp_path / "store")
    assert collect_roots(store, [str(tmp_path / "given")]) == [str((tmp_path / "given").resolve())]
    store.put("collect/roots.json", json.dumps({"local_dir": [str(tmp_path / "recorded")]}).encode())
    assert collect_roots(store, ["file://" + str(tmp_path / "given")]) == [
        str((tmp_path / "given").resolve()), str((tmp_path / "recorded").resolve())]


def strings_in_parquet(path: Path) -> list[str]:
    table = pq.read_table(path)
    out = []
    for col in table.columns:
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out += [v for v in col.to_pylist() if v]
    return out


def texts_of_folder(folder: Path) -> dict[str, str]:
    """Every file under `folder` as text: Parquet files as their string values, images skipped."""
    out = {}
    for p in folder.rglob("*"):
        if not p.is_file() or p.suffix.lower() in (".jpeg", ".jpg", ".png"):
            continue
        out[str(p)] = "\n".join(strings_in_parquet(p)) if p.suffix == ".parquet" else p.read_text(errors="replace")
    return out


@pytest.fixture
def local_world(tmp_path):
    """A fixture store whose first class came from a local folder: file:// URLs under the collect root (one
    CC BY image with a creator), one file outside it, and one image found at two URLs."""
    store = LocalStore(tmp_path / "store")
    fx = make_fixture(store, n_classes=2, per_class=6, seed=5, near_dups_per_class=0)
    root = tmp_path / "home" / "ann" / "photos"
    wnid = fx.wnids[0]
    images = store.read_table("images").to_pandas()
    cands = store.read_table("candidates").to_pandas()
    ids = fx.image_ids[wnid]
    new_url = {
        ids[0]: (root / wnid / "rex on grass.jpg").as_uri(),
        ids[1]: (tmp_path / "elsewhere" / "stray.jpg").as_uri(),
    }
    for image_id, url in new_url.items():
        old = images.loc[images.image_id == image_id, "first_url"].iloc[0]
        images.loc[images.image_id == image_id, "first_url"] = url
        cands.loc[cands.url == old, "url"] = url
    rex = cands.url == new_url[ids[0]]
    cands.loc[rex, ["title", "creator", "license", "license_url", "page_url", "source"]] = [
        "Rex on grass", "Ann Example", "CC BY 4.0", CC_BY, (root / wnid / "rex.html").as_uri(), "local_dir"]
    # ids[2] was fetched again from a mirror after its first URL: the first URL's record is the one credited
    first = images[images.image_id == ids[2]].iloc[0]
    mirror = first.copy()
    mirror["first_url"] = "http://mirror.test/copy.jpg"
    cands.loc[cands.url == first.first_url, "creator"] = "First Creator"
    extra = cands[cands.url == first.first_url].copy()
    extra[["url", "creator", "title"]] = ["http://mirror.test/copy.jpg", "Mirror Creator", "mirrored"]
    import pandas as pd

    store.write_table("images", pd.concat([images, mirror.to_frame().T], ignore_index=True))
    store.write_table("candidates", pd.concat([cands, extra], ignore_index=True))
    # the collect run recorded its root (as the collect stage does); the build finds it there
    store.put("collect/roots.json", json.dumps({"local_dir": [str(root)]}).encode())
    return store, fx, ids, tmp_path


def test_release_and_exports_credit_images_and_hold_no_local_path(local_world):
    store, fx, ids, tmp_path = local_world
    assert any(str(tmp_path) in u for u in store.read_table("images").column("first_url").to_pylist())
    m = build_release(store, "v1", val_per_class=1, test_per_class=1, neardup=False)
    assert m["files"]["images"]["schema"] == "release_images" and m["stats"]["images_with_creator"] > 0
    images = read_release_table(store, "v1", "images").to_pandas().set_index("image_id")
    wnid = fx.wnids[0]
    rex = images.loc[ids[0]]
    assert rex.first_url == f"{wnid}/rex on grass.jpg" and rex.page_url == f"{wnid}/rex.html"
    assert (rex.creator, rex.license, rex.license_url, rex.title, rex.source) == (
        "Ann Example", "CC BY 4.0", CC_BY, "Rex on grass", "local_dir")
    assert images.loc[ids[1], "first_url"] == "stray.jpg"  # outside the collect root: the file name only
    assert images.loc[ids[2], "creator"] == "First Creator"  # first URL's record, not the mirror's
    # every other image keeps its web URL and its own record
    other = images.loc[fx.image_ids[fx.wnids[1]][0]]
    assert other.first_url.startswith("http://example.test/") and other.creator.startswith("creator")

    build_report(store, "v1", thumbs_per_class=2)
    dk, pqo = tmp_path / "devkit", tmp_path / "parquet"
    counts = export_devkit(store, "v1", dk)
    files = export_parquet(store, "v1", pqo)
    # ATTRIBUTION.csv: one row per exported image file, naming the file as it is on disk
    with open(dk / "ATTRIBUTION.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == counts["train"] + counts["val"] + counts["test"] == counts["attribution"]
    assert all((dk / r["file"]).is_file() for r in rows)
    ids_txt = dict(line.split() for line in (dk / "devkit/data/image_ids.txt").read_text().splitlines())
    by_id = {r["image_id"]: r for r in rows}
    assert set(by_id) == set(ids_txt.values())
    r = by_id[ids[0]]
    assert (r["creator"], r["license"], r["license_url"], r["title"], r["source_page"]) == (
        "Ann Example", "CC BY 4.0", CC_BY, "Rex on grass", f"{wnid}/rex.html")
    assert Path(r["file"]).stem in ids_txt
    text = (dk / "ATTRIBUTION.txt").read_text()
    assert f'{r["file"]}\n  "Rex on grass" by Ann Example, CC BY 4.0 ({CC_BY})' in text
    assert "first URL" in text
    # the Parquet export carries the same columns per row
    import pandas as pd

    exported = pd.concat(pd.read_parquet(pqo / f) for fs in files.values() for f in fs).set_index("image_id")
    assert tuple(exported.loc[ids[0], ["creator", "license", "license_url", "url"]]) == (
        "Ann Example", "CC BY 4.0", CC_BY, f"{wnid}/rex on grass.jpg")
    # nothing that leaves this machine names a local folder: release files, report, card, both exports
    texts = {**texts_of_folder(store.path("releases/v1")), **texts_of_folder(dk), **texts_of_folder(pqo)}
    assert any(p.endswith("report.html") for p in texts) and any(p.endswith("ATTRIBUTION.csv") for p in texts)
    leaks = {p: t for p, t in texts.items() if str(tmp_path) in t or "file:/" in t.lower() or "/home/ann" in t}
    assert not leaks, list(leaks)


def test_staged_and_in_memory_builds_agree_on_attribution(local_world):
    from pipeline.release.build import read_inputs

    store, _, _, _ = local_world
    staged = build_release(store, "a", val_per_class=1, test_per_class=1, neardup=False)
    memory = build_release(store, "b", val_per_class=1, test_per_class=1, neardup=False, inputs=read_inputs(store),
                           local_roots=collect_roots(store))
    assert staged["files"]["images"]["sha256"] == memory["files"]["images"]["sha256"]


def test_release_without_candidates_has_null_attribution(tmp_path):
    store = LocalStore(tmp_path / "store")
    make_fixture(store, n_classes=2, per_class=5, seed=2, without={"candidates"})
    m = build_release(store, "v1", val_per_class=1, test_per_class=1, neardup=False)
    assert m["stats"]["candidates_table"] is False and m["stats"]["images_with_license"] == 0
    images = read_release_table(store, "v1", "images")
    assert images.num_rows > 0 and pc.count(images["license"]).as_py() == 0
    build_report(store, "v1", thumbs_per_class=0)
    assert "images carry no attribution" in store.get("releases/v1/card.md").decode()
