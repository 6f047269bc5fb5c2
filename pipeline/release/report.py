"""report.html for a release: one self-contained file (inline CSS, SVG plots and JPEG thumbnails as data URIs).

Sections: release facts, split sizes, per-class counts and estimated precision, label cost (votes and
worker-seconds per accepted image and per box), worker quality, rejected candidates by reason, and a
thumbnail grid per class; the dataset card (card.md) is written beside it. Tables the release does not
contain (votes, tasks, box_answers, workers) are read from the store if present, else the section says
"no data".

The report is deterministic for a release (dates come from the manifest), so writing it again gives the
same bytes; it is put with an exclusive create and a re-run with identical content is a no-op.

    >>> svg = bar_chart(["a", "b"], [3, 5], title="demo")
    >>> svg.startswith("<svg") and "demo" in svg
    True
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.release.manifest import ReleaseError, read_manifest, read_release_table, release_prefix
from pipeline.store import KeyExists, MissingKey, Store

ILSVRC_SECONDS_PER_BOX = 35.0  # Su, Deng, Fei-Fei 2012: about 35 s of worker time per good box


# ---------------------------------------------------------------- plots (SVG, no plotting library)


def bar_chart(labels: list[str], values: list[float], *, title: str, width: int = 760, height: int = 240,
              colour: str = "#4a78b5", value_format: str = "{:g}") -> str:
    """A vertical bar chart as an SVG document (labels shown when there is room)."""
    n = max(len(values), 1)
    top = max([float(v) for v in values] + [1e-9])
    left, bottom, plot_h = 50, 40, height - 70
    bw = (width - left - 10) / n
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - 5}" y2="{height - bottom}" stroke="#333"/>',
             f'<text x="{left - 4}" y="{height - bottom - plot_h + 4}" text-anchor="end">'
             f'{html.escape(value_format.format(top))}</text>',
             f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">0</text>']
    for k, (label, v) in enumerate(zip(labels, values, strict=True)):
        h = plot_h * float(v) / top
        x = left + k * bw
        parts.append(f'<rect x="{x + bw * 0.1:.2f}" y="{height - bottom - h:.2f}" width="{max(bw * 0.8, 0.5):.2f}" '
                     f'height="{h:.2f}" fill="{colour}"><title>{html.escape(str(label))}: {v}</title></rect>')
        if n <= 30:
            parts.append(f'<text x="{x + bw / 2:.2f}" y="{height - bottom + 14}" text-anchor="middle" '
                         f'font-size="9">{html.escape(str(label)[:12])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram(values: np.ndarray, *, bins: int, lo: float, hi: float, title: str, colour: str = "#5a9e6f") -> str:
    values = np.asarray(values, dtype=np.float64)
    counts, edges = np.histogram(values[np.isfinite(values)], bins=bins, range=(lo, hi))
    labels = [f"{edges[k]:.2f}" for k in range(bins)]
    return bar_chart(labels, counts.tolist(), title=title, colour=colour)


def data_uri(data: bytes | str, mime: str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def thumbnail(data: bytes, side: int = 96) -> bytes | None:
    """A small JPEG of an image blob; None when it does not decode (shown as a gap, never a failure)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (side * 2, side * 2))
            img = img.convert("RGB")
            img.thumbnail((side, side))
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=80)
            return out.getvalue()
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes
        return None


# ---------------------------------------------------------------- facts


@dataclass
class ReportData:
    manifest: dict[str, Any]
    classes: pd.DataFrame  # per wnid: name, train, val, test, boxes, precision, votes/s per image
    cost: dict[str, Any]
    workers: pd.DataFrame | None
    rejected: pd.DataFrame  # reason, count
    thumbs: dict[str, list[str]] = field(default_factory=dict)  # wnid -> data URIs
    licenses: pd.DataFrame | None = None
    sources: pd.DataFrame | None = None


def _optional(store: Store, name: str) -> pa.Table | None:
    from pipeline.schemas import SchemaError

    try:
        return store.read_table(name) if store.has_table(name) else None
    except (SchemaError, MissingKey):
        return None


def collect(store: Store, version: str, *, thumbs_per_class: int = 8, max_thumb_classes: int = 200) -> ReportData:
    """Everything the report and card show, from the release and the store's optional crowd tables."""
    manifest = read_manifest(store, version)
    synsets = read_release_table(store, version, "synsets", manifest=manifest).to_pandas()
    labels = read_release_table(store, version, "labels", manifest=manifest).to_pandas()
    images = read_release_table(store, version, "images", manifest=manifest)
    boxes = read_release_table(store, version, "boxes", manifest=manifest).to_pandas()
    prim = labels[labels.is_primary]

    per = pd.DataFrame.from_dict(manifest["classes"], orient="index")
    per.index.name = "wnid"
    per["name"] = synsets.set_index("wnid").reindex(per.index)["name"]
    per["precision"] = prim.groupby("wnid").confidence.mean().reindex(per.index)
    per["images"] = per[["train", "val", "test"]].sum(axis=1)

    cost: dict[str, Any] = {"votes": None, "boxes": None}
    votes = _optional(store, "votes")
    accepted_ids = set(prim.image_id)
    if votes is not None and votes.num_rows:
        v = votes.select(["image_id", "wnid", "worker", "answer", "lead_time_s"]).to_pandas()
        per_wnid = v.groupby("wnid").agg(n_votes=("answer", "size"), seconds=("lead_time_s", "sum"))
        n_acc = per["images"].replace(0, np.nan)
        per["votes_per_image"] = per_wnid.n_votes.reindex(per.index) / n_acc
        per["seconds_per_image"] = per_wnid.seconds.reindex(per.index) / n_acc
        cost["votes"] = {"n_votes": len(v), "worker_seconds": float(v.lead_time_s.sum()),
                         "accepted_images": len(accepted_ids),
                         "votes_per_image": len(v) / max(len(accepted_ids), 1),
                         "seconds_per_image": float(v.lead_time_s.sum()) / max(len(accepted_ids), 1),
                         "share_on_released_images": float(v.image_id.isin(accepted_ids).mean())}
    answers = _optional(store, "box_answers")
    if answers is not None and answers.num_rows and len(boxes):
        a = answers.select(["kind", "lead_time_s"]).to_pandas()
        secs = float(a.lead_time_s.sum())
        cost["boxes"] = {"n_answers": len(a), "worker_seconds": secs, "accepted_boxes": len(boxes),
                         "seconds_per_box": secs / len(boxes),
                         "by_kind": a.groupby("kind").lead_time_s.agg(["size", "sum"]).round(1).to_dict("index"),
                         "ilsvrc_seconds_per_box": ILSVRC_SECONDS_PER_BOX}

    workers = None
    wt = _optional(store, "workers")
    if wt is not None and wt.num_rows:
        workers = wt.to_pandas()
    elif votes is not None and votes.num_rows:
        # agreement of each worker with the final label (accepted -> yes, rejected -> no)
        lab = store.read_table("labels").select(["image_id", "wnid", "status"]).to_pandas()
        lab = lab[lab.status.isin(["accepted", "rejected"])]
        v = votes.select(["image_id", "wnid", "worker", "answer"]).to_pandas().merge(lab, on=["image_id", "wnid"])
        v["agree"] = (v.answer == "yes") == (v.status == "accepted")
        workers = v.groupby("worker").agg(n_votes=("agree", "size"), agreement=("agree", "mean")).reset_index()

    rejected = _rejections(store, manifest)
    thumbs = _thumbnails(store, prim, images, thumbs_per_class, max_thumb_classes)
    licenses, sources = _provenance(store, images)
    return ReportData(manifest, per.reset_index(), cost, workers, rejected, thumbs, licenses, sources)


def _rejections(store: Store, manifest: dict[str, Any]) -> pd.DataFrame:
    rows: list[tuple[str, int]] = []
    imgs = _optional(store, "images")
    if imgs is not None:
        df = imgs.select(["status", "reject_reason"]).to_pandas()
        bad = df[df.status != "accepted"]
        for (status, reason), n in bad.fillna({"reject_reason": "unspecified"}).groupby(
                ["status", "reject_reason"]).size().items():
            rows.append((f"download/ingest: {status} ({reason})" if status != "duplicate" else
                         "ingest: exact duplicate of another URL", int(n)))
    for status, n in manifest.get("stats", {}).get("label_status", {}).items():
        if status != "accepted":
            rows.append((f"crowd: label {status}", int(n)))
    stats = manifest.get("stats", {})
    for key, text in (("labels_without_image", "release: accepted label without an accepted image"),
                      ("labels_outside_vocabulary", "release: label outside the vocabulary"),
                      ("boxes_not_accepted", "boxes: not accepted by quality verification")):
        if stats.get(key):
            rows.append((text, int(stats[key])))
    rows.append(("release: train near-duplicate of a val/test image", int(manifest["neardup_dropped"])))
    return pd.DataFrame(rows, columns=["reason", "count"])


def _thumbnails(store: Store, prim: pd.DataFrame, images: pa.Table, per_class: int, max_classes: int
                ) -> dict[str, list[str]]:
    if per_class <= 0:
        return {}
    keys = dict(zip(images.column("image_id").to_pylist(), images.column("storage_key").to_pylist(), strict=True))
    out: dict[str, list[str]] = {}
    for wnid, g in list(prim.sort_values(["wnid", "image_id"]).groupby("wnid"))[:max_classes]:
        uris = []
        for image_id in g.image_id.head(per_class):
            try:
                thumb = thumbnail(store.get(keys[image_id]))
            except (MissingKey, KeyError):
                thumb = None
            if thumb:
                uris.append(data_uri(thumb, "image/jpeg"))
        out[wnid] = uris
    return out


def _provenance(store: Store, images: pa.Table) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    cands = _optional(store, "candidates")
    if cands is None or not cands.num_rows:
        return None, None
    c = cands.select(["url", "source", "license"]).to_pandas().drop_duplicates("url")
    urls = pd.DataFrame({"url": images.column("first_url").to_pylist()})
    m = urls.merge(c, on="url", how="left")
    licenses = m.fillna({"license": "unknown"}).groupby("license").size().rename("images").reset_index()
    sources = m.fillna({"source": "unknown"}).groupby("source").size().rename("images").reset_index()
    return licenses.sort_values("images", ascending=False), sources.sort_values("images", ascending=False)


# ---------------------------------------------------------------- HTML


CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#eef}td:first-child,th:first-child{text-align:left}.grid img{margin:2px;border:1px solid #ddd}
.nodata{color:#a33;font-style:italic}h2{border-bottom:2px solid #4a78b5}"""


def _table(df: pd.DataFrame, floats: str = "{:.3f}") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float | np.floating):
                text = "" if not np.isfinite(v) else (f"{int(v)}" if float(v).is_integer() else floats.format(v))
            else:
                text = str(v)
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _img(svg: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{data_uri(svg, "image/svg+xml")}">'


def render_html(d: ReportData) -> str:
    m = d.manifest
    s: list[str] = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                    f"<title>synsetforge release {html.escape(m['version'])}</title><style>{CSS}</style></head><body>"]
    s.append(f"<h1>Release {html.escape(m['version'])}</h1>")
    facts = pd.DataFrame([("created", m["created_at"]), ("parent", m["parent"] or "none"),
                          ("code", m["code_version"]), ("configuration digest", m["config_digest"][:16]),
                          ("classes", len(m["classes"])), ("images", sum(m["splits"].values())),
                          ("boxes", m["files"]["boxes"]["rows"]),
                          ("kept split from parent", m["split_policy"].get("kept_from_parent", 0)),
                          ("near-duplicate check", "yes" if m.get("stats", {}).get("neardup_checked") else "SKIPPED")],
                         columns=["fact", "value"])
    s.append(_table(facts))

    s.append("<h2 id='splits'>Split sizes</h2>")
    s.append(_table(pd.DataFrame([(k, v) for k, v in m["splits"].items()], columns=["split", "images"])))
    s.append(_img(bar_chart(list(m["splits"]), list(m["splits"].values()), title="images per split", width=360),
                  "images per split"))

    c = d.classes.sort_values("wnid")
    s.append("<h2 id='classes'>Images per class</h2>")
    s.append(_img(bar_chart(c.wnid.tolist(), c.images.tolist(), title="images per class (train+val+test)"),
                  "images per class"))
    s.append("<h2 id='precision'>Estimated precision per class</h2><p>Mean posterior P(image shows the synset) "
             "of the accepted labels (the QC stage's confidence); ImageNet reported 99.7 % over 80 synsets.</p>")
    s.append(_img(histogram(c.precision.to_numpy(), bins=20, lo=0.8, hi=1.0,
                            title="classes by estimated precision"), "precision histogram"))
    cols = ["wnid", "name", "train", "val", "test", "boxes", "precision"]
    cols += [x for x in ("votes_per_image", "seconds_per_image") if x in c]
    s.append(_table(c[cols]))

    s.append("<h2 id='cost'>Label cost</h2>")
    if d.cost["votes"]:
        v = d.cost["votes"]
        s.append(_table(pd.DataFrame([
            ("verification votes", v["n_votes"]), ("worker-seconds", round(v["worker_seconds"], 1)),
            ("accepted images in release", v["accepted_images"]),
            ("votes per accepted image", round(v["votes_per_image"], 3)),
            ("worker-seconds per accepted image", round(v["seconds_per_image"], 2)),
            ("share of votes on released images", round(v["share_on_released_images"], 3))],
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
    if d.workers is not None and len(d.workers):
        col = next((x for x in ("gold_accuracy", "estimated_accuracy", "agreement") if x in d.workers), None)
        if col:
            s.append(f"<p>Distribution of <code>{col}</code> over {len(d.workers)} workers.</p>")
            s.append(_img(histogram(d.workers[col].to_numpy(dtype=float), bins=20, lo=0.0, hi=1.0,
                                    title=f"workers by {col}", colour="#b5784a"), "worker quality"))
        q = d.workers[col].describe()[["count", "mean", "min", "25%", "50%", "75%", "max"]] if col else None
        if q is not None:
            s.append(_table(q.rename("value").reset_index().rename(columns={"index": "statistic"})))
    else:
        s.append("<p class='nodata'>No data (no workers or votes table in the store).</p>")

    s.append("<h2 id='rejected'>Rejected candidates by reason</h2>")
    s.append(_table(d.rejected))

    s.append("<h2 id='thumbnails'>Thumbnails per class</h2>")
    if not d.thumbs:
        s.append("<p class='nodata'>No thumbnails (disabled).</p>")
    names = dict(zip(c.wnid, c.name, strict=True))
    for wnid, uris in d.thumbs.items():
        s.append(f"<h3>{html.escape(wnid)} {html.escape(str(names.get(wnid, '')))}</h3><div class='grid'>")
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
