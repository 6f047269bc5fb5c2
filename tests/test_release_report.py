"""report.html and card.md: content, matplotlib plots inline, synset names beside wnids, "no data" in words
instead of empty plots, determinism, the card <-> report import circle, and rendering in headless Chromium
(every plot has visible marks inside its axes)."""

from __future__ import annotations

import ast
import io
import re
from pathlib import Path

import pytest

from pipeline.release.build import build_release
from pipeline.release.manifest import ReleaseError, read_release_table
from pipeline.release.report import build_report, collect, render_html
from pipeline.release.synthetic import fill_schema, make_fixture
from pipeline.store import LocalStore

RELEASE_DIR = Path(__file__).resolve().parent.parent / "pipeline" / "release"


def write_workers(store, gold: list[float | None]) -> None:
    """A QC workers table: estimated accuracy for every worker, gold accuracy as given (None: no gold)."""
    n = len(gold)
    store.write_table("workers", fill_schema("workers", {
        "worker": [f"worker{k:02d}" for k in range(n)], "n_votes": [40] * n, "n_yes": [20] * n,
        "yes_rate": [0.5] * n, "gold_n": [0 if g is None else 10 for g in gold],
        "gold_correct": [0 if g is None else round(10 * g) for g in gold], "gold_accuracy": gold,
        "estimated_accuracy": [0.6 + 0.05 * k for k in range(n)], "sensitivity": [0.9] * n,
        "specificity": [0.9] * n, "spammer_score": [0.8] * n, "flagged": [False] * n, "votes_used": [True] * n}, n))


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
    for anchor in ("splits", "classes", "precision", "cost", "workers", "licenses", "rejected", "thumbnails"):
        assert f"id='{anchor}'" in page
    assert "<script" not in page and "http://" not in page.split("<body>")[1].replace("http://www.w3.org", "")
    assert len(re.findall(r"class='thumb'", page)) == 3 * 4
    # plots are matplotlib SVG inlined in the page, each with its data marks counted
    figures = re.findall(r"<figure class='plot' id='plot-([\w-]+)' data-marks='(\d+)'>", page)
    assert {f for f, _ in figures} >= {"splits", "classes", "precision", "workers-agreement"}
    assert all(int(n) > 0 for _, n in figures)
    assert 'id="splits-mark-2"' in page and "data:image/svg+xml" not in page
    assert "1e-09" not in page
    # synset names beside wnids: in the class plot's labels, the table and the thumbnail headings
    for k in range(3):
        label = f"n9000000{k} thing{k}.n.01"
        assert page.count(label) >= 2, label
        assert f"<h3>{label}</h3>" in page
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
    # licenses per image come from the release's own images table
    images = read_release_table(store, "v1", "images").to_pandas()
    assert dict(zip(d.licenses.license, d.licenses.images, strict=True)) == images.license.value_counts().to_dict()
    card = store.get(keys["card"]).decode()
    assert "## Provenance" in card and "## Known limitations" in card and "CC BY 2.0" in card
    assert "near-duplicate check was SKIPPED" in card and "aggregated by confidence_table" in card
    # deterministic: writing again is a no-op; other content for the same key is refused
    assert build_report(store, "v1", thumbs_per_class=4) == keys
    with pytest.raises(ReleaseError, match="immutable"):
        build_report(store, "v1", thumbs_per_class=2)


def test_report_says_no_data_without_crowd_tables(tmp_path):
    store = LocalStore(tmp_path / "store")
    make_fixture(store, n_classes=3, per_class=8, seed=4, without={"votes", "tasks", "box_answers"})
    assert not store.has_table("votes")
    build_release(store, "v1", val_per_class=2, test_per_class=1, neardup=False)
    page = render_html(collect(store, "v1", thumbs_per_class=1))
    assert "Verification cost: no data" in page and "Box cost: no data" in page
    assert "No data (no workers or votes table" in page
    assert "plot-workers" not in page


def test_worker_plot_without_gold_says_so_in_words(built):
    """The bug this replaces: no worker had gold accuracy and the report drew an empty plot with a 1e-09 axis."""
    store = built
    write_workers(store, [None] * 5)
    page = render_html(collect(store, "v1", thumbs_per_class=0))
    assert "No worker has a gold accuracy yet (no gold answers)" in page
    assert "plot-workers-gold-accuracy" not in page and "1e-09" not in page
    marks = re.search(r"id='plot-workers-estimated-accuracy' data-marks='(\d+)'", page)
    assert marks and int(marks.group(1)) > 0
    # with gold answers the plot is drawn, and its bars hold every worker
    write_workers(store, [0.9, 0.8, None, 1.0, 0.5])
    page = render_html(collect(store, "v1", thumbs_per_class=0))
    assert "id='plot-workers-gold-accuracy'" in page and "Gold accuracy known for 4 of 5 workers" in page


def test_many_classes_plot_a_histogram_and_empty_releases_say_so(tmp_path):
    from pipeline.release import plots

    labels = [f"n{k:08d} c{k}.n.01" for k in range(60)]
    p = plots.class_plot("classes", labels, {"train": list(range(60)), "val": [1] * 60, "test": [0] * 60},
                         title="images per class")
    assert p is not None and "classes by number of images" in p.title and p.marks > 0
    assert plots.class_plot("classes", labels[:2], {"train": [0, 0], "val": [0, 0]}, title="x") is None
    assert plots.histogram_plot("h", [float("nan")], title="x", xlabel="y") is None
    # a precision below the default range still lands in a bar (the range widens)
    h = plots.histogram_plot("h", [0.5, 0.99], title="x", xlabel="y", lo=0.8, hi=1.0)
    assert h.marks == 2


def test_card_and_report_do_not_import_each_other():
    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    assert "pipeline.release.report" not in imported(RELEASE_DIR / "card.py")
    assert "pipeline.release.facts" in imported(RELEASE_DIR / "card.py")
    assert "pipeline.release.report" not in imported(RELEASE_DIR / "facts.py")
    # the hand-written SVG drawing is gone: plots come from matplotlib
    report_src = (RELEASE_DIR / "report.py").read_text()
    assert "<rect" not in report_src and "def bar_chart" not in report_src
    assert "matplotlib" in (RELEASE_DIR / "plots.py").read_text()


def test_report_survives_an_undecodable_image(built):
    store = built

    key = read_release_table(store, "v1", "images").column("storage_key")[0].as_py()
    store.put(key, b"not a jpeg")
    d = collect(store, "v1", thumbs_per_class=50)
    assert sum(len(v) for v in d.thumbs.values()) == sum(d.manifest["splits"].values()) - 1


# in the page: per plot, its id, how many marks lie inside the axes background with nonzero size, and the
# figure's on-screen rectangle
MARKS_JS = """
return Array.from(document.querySelectorAll('figure.plot')).map(fig => {
  const svg = fig.querySelector('svg');
  const axes = svg.querySelector('g[id$="-axes_1"]');
  const bg = axes.querySelector('g[id*="-patch_"]').getBoundingClientRect();
  const marks = Array.from(axes.querySelectorAll('g[id*="-mark-"]'));
  const inside = marks.filter(m => {
    const r = m.getBoundingClientRect();
    return r.width > 0.5 && r.height > 0.5 && r.left >= bg.left - 1 && r.right <= bg.right + 1
      && r.top >= bg.top - 1 && r.bottom <= bg.bottom + 1;
  });
  return [fig.id, marks.length, inside.length, Number(fig.dataset.marks)];
});
"""


def coloured_pixels(png: bytes) -> int:
    """Pixels of a screenshot that are clearly coloured (bars), not white, grey or black (axes, text)."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("HSV")
    return sum(1 for _, s, v in img.getdata() if s > 80 and v > 60)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(built, browser, artifacts_dir, tmp_path):
    store = built
    write_workers(store, [None] * 6)  # QC's view without gold: one plot, and words for the other
    keys = build_report(store, "v1", thumbs_per_class=6)
    path = tmp_path / "report.html"
    path.write_bytes(store.get(keys["report"]))
    browser.get(path.as_uri())
    assert browser.title == "synsetforge release v1"
    assert browser.find_element("css selector", "h1").text == "Release v1"
    # every plot has marks of nonzero size inside its axes, as many as the report says it drew
    plots = browser.execute_script(MARKS_JS)
    assert {p[0] for p in plots} == {"plot-splits", "plot-classes", "plot-precision", "plot-workers-estimated-accuracy"}
    for fig_id, n_marks, inside, declared in plots:
        assert inside > 0 and inside == n_marks == declared, (fig_id, n_marks, inside, declared)
    assert dict((p[0], p[1]) for p in plots)["plot-splits"] == 3
    # ... and they paint: each plot's own screenshot has coloured (bar) pixels
    for fig_id, *_ in plots:
        fig = browser.find_element("id", fig_id)
        browser.execute_script("arguments[0].scrollIntoView()", fig)
        assert coloured_pixels(fig.screenshot_as_png) > 200, fig_id
    body = browser.find_element("tag name", "body").text
    assert "No worker has a gold accuracy yet" in body
    assert "n90000001 thing1.n.01" in body  # synset names beside wnids, as rendered text
    # every embedded thumbnail decoded to a real bitmap
    sizes = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
    assert len(sizes) == 3 * 6
    assert all(c and w > 0 and h > 0 for c, w, h in sizes), sizes
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    browser.execute_script("window.scrollTo(0, 0)")
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1280, min(int(height) + 50, 6000))
    shot = artifacts_dir / "release-report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    browser.set_window_size(1280, 1500)  # the top of the page for the README: facts, splits, classes, precision
    browser.save_screenshot(str(artifacts_dir / "docs" / "release-report.png"))  # `make screenshots` copies docs/
