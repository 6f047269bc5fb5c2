"""report.html for a release: one self-contained file (inline CSS, inline SVG plots drawn by matplotlib,
JPEG thumbnails as data URIs; no script, nothing fetched).

Sections: release facts, split sizes, images per class (by split) and estimated precision, label cost (votes QC
counted and worker-seconds per accepted image, repeats QC ignored apart, and per box), worker quality (with votes
per worker as QC counts them), sources and licenses, rejected
candidates by reason, and a thumbnail grid per class; the dataset card (card.md) is written beside it.
Classes are always shown as their wnid with the synset name. The facts come from `pipeline.release.facts`;
a table the store lacks, or a plot with nothing to draw, is said in words instead ("no data").

The report is deterministic for a release (dates come from the manifest, plots have fixed ids), so writing
it again gives the same bytes; it is put with an exclusive create and a re-run with identical content is a
no-op.

    >>> import pandas as pd
    >>> m = {"version": "v1", "created_at": "2026-01-01T00:00:00Z", "parent": None, "code_version": "x",
    ...      "config_digest": "0" * 64, "classes": {}, "splits": {"train": 0, "val": 0, "test": 0},
    ...      "files": {"boxes": {"rows": 0}}, "split_policy": {}, "neardup_dropped": 0}
    >>> classes = pd.DataFrame(columns=["wnid", "name", "train", "val", "test", "boxes", "images", "precision"])
    >>> page = render_html(ReportData(m, classes, {"votes": None, "boxes": None}, None, pd.DataFrame(
    ...     columns=["reason", "count"])))
    >>> "No images in this release" in page and "<svg" not in page
    True
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd

from pipeline.release import plots
from pipeline.release.facts import WORKER_MEASURES, ReportData, collect
from pipeline.release.manifest import ReleaseError, release_prefix
from pipeline.store import KeyExists, Store

SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
__all__ = ["ReportData", "build_report", "build_report_from_settings", "collect", "render_html"]

CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#eef}td:first-child,th:first-child{text-align:left}.grid img{margin:2px;border:1px solid #ddd}
.nodata{color:#a33;font-style:italic}h2{border-bottom:2px solid #4a78b5}
figure.plot{margin:.5em 0}figure.plot svg{max-width:100%;height:auto}
figcaption{font-size:.85em;color:#555}"""


def _table(df: pd.DataFrame, floats: str = "{:.3f}") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float | np.floating):
                text = "" if not np.isfinite(v) else (f"{int(v)}" if float(v).is_integer() else floats.format(v))
            elif v is None or v is pd.NA:
                text = ""
            else:
                text = str(v)
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _plot(plot: plots.Plot | None, no_data: str, caption: str = "") -> str:
    """The plot inline, or the sentence saying why there is none."""
    if plot is None:
        return f"<p class='nodata plot-missing'>{html.escape(no_data)}</p>"
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f"<figure class='plot' id='plot-{plot.id}' data-marks='{plot.marks}'>{plot.svg}{cap}</figure>"


def _label(wnid: str, name: Any) -> str:
    return f"{wnid} {name}" if isinstance(name, str) and name else wnid


def _workers_section(d: ReportData) -> list[str]:
    s = []
    w = d.workers
    if w is None or not len(w):
        return ["<p class='nodata'>No data (no workers or votes table in the store).</p>"]
    measures = [c for c in WORKER_MEASURES if c in w]
    s.append(f"<p>{len(w)} workers.</p>")
    counts = d.vote_counts
    if counts is not None and len(counts):
        q = counts[["n_votes", "n_repeats"]].describe().loc[["count", "mean", "min", "50%", "max"]]
        s.append("<p>Votes per worker, as QC counts them (the same numbers as the QC <code>workers</code> table and "
                 f"<code>synsetforge crowd status</code>): {int(counts.n_votes.sum())} counted, "
                 f"{int(counts.n_repeats.sum())} repeats ignored.</p>")
        s.append(_table(q.reset_index().rename(columns={"index": "statistic", "n_votes": "votes counted",
                                                        "n_repeats": "repeats ignored"})))
    stats = []
    for col in measures:
        values = pd.to_numeric(w[col], errors="coerce").to_numpy(dtype=float)
        n = int(np.isfinite(values).sum())
        what = WORKER_MEASURES[col]
        s.append(_plot(plots.histogram_plot(f"workers-{col.replace('_', '-')}", values, title=f"workers by {what}",
                                            xlabel=col.replace("_", " "), lo=0.0, hi=1.0, colour="#b5784a"),
                       f"No worker has a {what.split(' (')[0]} yet ({'no gold answers' if col == 'gold_accuracy' else 'no values'}), "
                       "so there is nothing to plot.",
                       f"{col.replace('_', ' ').capitalize()} known for {n} of {len(w)} workers."))
        if n:
            q = pd.Series(values[np.isfinite(values)]).describe()[["count", "mean", "min", "25%", "50%", "75%", "max"]]
            stats.append(q.rename(col))
    if stats:
        s.append(_table(pd.concat(stats, axis=1).reset_index().rename(columns={"index": "statistic"})))
    return s


def render_html(d: ReportData) -> str:
    m = d.manifest
    stats = m.get("stats", {})
    s: list[str] = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                    f"<title>synsetforge release {html.escape(m['version'])}</title><style>{CSS}</style></head><body>"]
    s.append(f"<h1>Release {html.escape(m['version'])}</h1>")
    boxes_fact = m["files"]["boxes"]["rows"] if d.has_boxes_table else "none (classification only: no boxes table)"
    facts = [("created", m["created_at"]), ("parent", m["parent"] or "none"),
             ("code", m["code_version"]), ("configuration digest", m["config_digest"][:16]),
             ("classes", len(m["classes"])), ("images", sum(m["splits"].values())),
             ("boxes", boxes_fact),
             ("QC methods", ", ".join(m.get("qc_methods", [])) or "not recorded"),
             ("split quotas (val / test per class)",
              f"{m['split_policy'].get('val_per_class', '?')} / {m['split_policy'].get('test_per_class', '?')}"),
             ("kept split from parent", m["split_policy"].get("kept_from_parent", 0)),
             ("near-duplicate check", "yes" if stats.get("neardup_checked") else "SKIPPED")]
    if d.attribution:
        a = d.attribution
        facts.append(("attribution", f"{a['with_license']} of {a['images']} images with a license, "
                                     f"{a['with_creator']} with a creator"))
    s.append(_table(pd.DataFrame(facts, columns=["fact", "value"])))
    short = stats.get("short_classes") or []
    if short:
        s.append(f"<p class='nodata'>Built with --force: {len(short)} classes have no train or no val image: "
                 + html.escape(", ".join(_label(r["wnid"], r.get("name")) for r in short[:20]))
                 + (" ..." if len(short) > 20 else "") + ".</p>")

    s.append("<h2 id='splits'>Split sizes</h2>")
    splits = {k: m["splits"][k] for k in sorted(m["splits"], key=lambda k: (SPLIT_ORDER.get(k, 9), k))}
    s.append(_table(pd.DataFrame(list(splits.items()), columns=["split", "images"])))
    s.append(_plot(plots.bar_plot("splits", list(splits), list(splits.values()), title="images per split",
                                  colours=[plots.COLOURS.get(k, plots.BAR) for k in splits]),
                   "No images in this release, so there is nothing to plot."))

    c = d.classes.sort_values("wnid")
    labels = [_label(w, n) for w, n in zip(c.wnid, c.name, strict=True)]
    s.append("<h2 id='classes'>Images per class</h2>")
    s.append(_plot(plots.class_plot("classes", labels, {k: c[k].tolist() for k in ("train", "val", "test")},
                                    title="images per class"),
                   "No class has images in this release, so there is nothing to plot."))
    s.append("<h2 id='precision'>Estimated precision per class</h2><p>Mean posterior P(image shows the synset) "
             "of the accepted labels (the QC stage's confidence); ImageNet reported 99.7 % over 80 synsets.</p>")
    s.append(_plot(plots.histogram_plot("precision", c.precision.to_numpy(dtype=float), lo=0.8, hi=1.0,
                                        title="classes by estimated precision", xlabel="estimated precision",
                                        colour="#5a9e6f"),
                   "No class has an accepted label, so there is no precision to plot."))
    cols = ["wnid", "name", "train", "val", "test", "boxes", "precision"]
    cols += [x for x in ("votes_per_image", "seconds_per_image") if x in c]
    s.append(_table(c[cols]))

    s.append("<h2 id='cost'>Label cost</h2>")
    if d.cost["votes"]:
        v = d.cost["votes"]
        s.append("<p>Votes are counted as QC counts them: one per worker and (image, synset) pair, the latest "
                 "answer. A repeat (a worker answering a pair again) was paid for but is not used; it is shown apart "
                 "and left out of the votes per image. Worker-seconds are every pulled answer's time.</p>")
        s.append(_table(pd.DataFrame([
            ("verification votes QC counted", v["n_votes"]),
            ("repeats QC ignored", v.get("n_repeats", 0)),
            ("workers with repeats", v.get("workers_with_repeats", 0)),
            ("votes pulled (counted + repeats)", v.get("n_pulled", v["n_votes"])),
            ("worker-seconds", round(v["worker_seconds"], 1)),
            ("of which on repeats", round(v.get("repeat_seconds", 0.0), 1)),
            ("accepted images in release", v["accepted_images"]),
            ("votes per accepted image", round(v["votes_per_image"], 3)),
            ("worker-seconds per accepted image", round(v["seconds_per_image"], 2)),
            ("share of counted votes on released images", round(v["share_on_released_images"], 3))],
            columns=["verification", "value"])))
    else:
        s.append("<p class='nodata'>Verification cost: no data (no votes table in the store).</p>")
    if d.cost["boxes"]:
        b = d.cost["boxes"]
        s.append(_table(pd.DataFrame([
            ("box micro-task answers", b["n_answers"]), ("worker-seconds", round(b["worker_seconds"], 1)),
            ("accepted boxes in release", b["accepted_boxes"]), ("worker-seconds per box", round(b["seconds_per_box"], 2)),
            ("ILSVRC 2012 (Su et al.)", b["ilsvrc_seconds_per_box"])], columns=["boxes", "value"])))
    else:
        s.append("<p class='nodata'>Box cost: no data (no box_answers table, or no boxes).</p>")

    s.append("<h2 id='workers'>Worker quality</h2>")
    s.extend(_workers_section(d))

    s.append("<h2 id='licenses'>Sources and licenses</h2>")
    if d.licenses is not None and d.sources is not None:
        s.append("<p>As the sources reported them for each image's first URL; the release's images table and "
                 "the devkit export's ATTRIBUTION files carry them per image.</p>")
        s.append(_table(d.sources))
        s.append(_table(d.licenses))
    else:
        s.append("<p class='nodata'>No data (no candidates table in the store).</p>")

    s.append("<h2 id='rejected'>Rejected candidates by reason</h2>")
    s.append(_table(d.rejected))

    s.append("<h2 id='thumbnails'>Thumbnails per class</h2>")
    if not d.thumbs:
        s.append("<p class='nodata'>No thumbnails (disabled).</p>")
    names = dict(zip(c.wnid, c.name, strict=True))
    for wnid, uris in d.thumbs.items():
        s.append(f"<h3>{html.escape(_label(wnid, names.get(wnid)))}</h3><div class='grid'>")
        s.extend(f"<img class='thumb' alt='{html.escape(wnid)}' src='{u}'>" for u in uris)
        if not uris:
            s.append("<span class='nodata'>no decodable images</span>")
        s.append("</div>")
    s.append("</body></html>")
    return "\n".join(s)


def _put_idempotent(store: Store, key: str, data: bytes) -> None:
    try:
        store.put(key, data, exclusive=True)
    except KeyExists:
        if store.get(key) != data:
            raise ReleaseError(f"{store.url}/{key} already exists with other content; reports of a published "
                               "release are immutable") from None


def build_report(store: Store, version: str, *, thumbs_per_class: int = 8, max_thumb_classes: int = 200
                 ) -> dict[str, str]:
    """Write releases/<version>/report.html and card.md; return their keys."""
    from pipeline.release.card import render_card

    data = collect(store, version, thumbs_per_class=thumbs_per_class, max_thumb_classes=max_thumb_classes)
    prefix = release_prefix(version)
    keys = {"report": f"{prefix}/report.html", "card": f"{prefix}/card.md"}
    _put_idempotent(store, keys["report"], render_html(data).encode())
    _put_idempotent(store, keys["card"], render_card(data).encode())
    return keys


def build_report_from_settings(store: Store, version: str, release_settings: Any) -> dict[str, str]:
    """build_report with the thumbnail limits of the configuration's release section (CLI and DAG share it)."""
    return build_report(store, version, thumbs_per_class=release_settings.report_thumbs_per_class,
                        max_thumb_classes=release_settings.report_max_thumb_classes)
