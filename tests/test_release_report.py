"""report.html and card.md: content, "no data" sections, determinism, and rendering in headless Chromium."""

from __future__ import annotations

import re

import pytest

from pipeline.release.build import build_release
from pipeline.release.manifest import ReleaseError
from pipeline.release.report import build_report, collect, render_html
from pipeline.release.synthetic import make_fixture
from pipeline.store import LocalStore


@pytest.fixture
def built(tmp_path):
    store = LocalStore(tmp_path / "store")
    make_fixture(store, n_classes=3, per_class=8, box_fraction=0.5, seed=4)
    build_release(store, "v1", val_per_class=2, test_per_class=1, neardup=False)
    return store


def test_report_sections_numbers_and_card(built):
    store = built
    keys = build_report(store, "v1", thumbs_per_class=4)
    page = store.get(keys["report"]).decode()
    for anchor in ("splits", "classes", "precision", "cost", "workers", "rejected", "thumbnails"):
        assert f"id='{anchor}'" in page
    assert "<script" not in page and "http://" not in page.split("<body>")[1].replace("http://www.w3.org", "")
    assert len(re.findall(r"class='thumb'", page)) == 3 * 4
    assert page.count("data:image/svg+xml;base64,") >= 4  # plots are embedded images
    d = collect(store, "v1", thumbs_per_class=0)
    votes = store.read_table("votes")
    assert d.cost["votes"]["n_votes"] == votes.num_rows
    n_img = sum(d.manifest["splits"].values())
    assert d.cost["votes"]["votes_per_image"] == pytest.approx(votes.num_rows / n_img)
    answers = store.read_table("box_answers").to_pandas()
    assert d.cost["boxes"]["seconds_per_box"] == pytest.approx(answers.lead_time_s.sum() / d.manifest["files"]["boxes"]["rows"])
    # the planted bad worker (55 % skill) is the least agreeing one
    w = d.workers.sort_values("agreement")
    assert w.worker.iloc[0] == "worker05" and w.agreement.iloc[0] < w.agreement.iloc[-1]
    reasons = dict(zip(d.rejected.reason, d.rejected["count"], strict=True))
    assert reasons["download/ingest: rejected (too_small)"] == 3 and reasons["crowd: label pending"] == 3
    prim = d.classes.set_index("wnid")
    assert (prim.precision > 0.9).all() and (prim.images == prim.train + prim.val + prim.test).all()
    card = store.get(keys["card"]).decode()
    assert "## Provenance" in card and "## Known limitations" in card and "CC BY 2.0" in card
    assert "near-duplicate check was SKIPPED" in card
    # deterministic: writing again is a no-op; other content for the same key is refused
    assert build_report(store, "v1", thumbs_per_class=4) == keys
    with pytest.raises(ReleaseError, match="immutable"):
        build_report(store, "v1", thumbs_per_class=2)


def test_report_says_no_data_without_crowd_tables(built):
    store = built
    for name in ("votes", "tasks", "box_answers"):
        store.delete(f"tables/{name}.parquet")
    page = render_html(collect(store, "v1", thumbs_per_class=1))
    assert "Verification cost: no data" in page and "Box cost: no data" in page
    assert "No data (no workers or votes table" in page


def test_report_survives_an_undecodable_image(built):
    store = built
    from pipeline.release.manifest import read_release_table

    key = read_release_table(store, "v1", "images").column("storage_key")[0].as_py()
    store.put(key, b"not a jpeg")
    d = collect(store, "v1", thumbs_per_class=50)
    assert sum(len(v) for v in d.thumbs.values()) == sum(d.manifest["splits"].values()) - 1


@pytest.mark.slow
def test_report_renders_in_headless_chromium(built, browser, artifacts_dir, tmp_path):
    store = built
    keys = build_report(store, "v1", thumbs_per_class=6)
    path = tmp_path / "report.html"
    path.write_bytes(store.get(keys["report"]))
    browser.get(path.as_uri())
    assert browser.title == "synsetforge release v1"
    assert browser.find_element("css selector", "h1").text == "Release v1"
    # every embedded image (plots and thumbnails) decoded to a real bitmap
    sizes = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
    assert len(sizes) >= 4 + 3 * 6
    assert all(c and w > 0 and h > 0 for c, w, h in sizes), sizes
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1280, min(int(height) + 50, 6000))
    shot = artifacts_dir / "release-report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    browser.set_window_size(1280, 1500)  # the top of the page for the README: facts, splits, classes, precision
    browser.save_screenshot(str(artifacts_dir / "docs" / "release-report.png"))  # `make screenshots` copies docs/
