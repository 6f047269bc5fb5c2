"""What a release's report and dataset card show, gathered once (`collect` -> `ReportData`).

Read from the release itself (manifest, synsets, labels, images with their attribution, boxes) and from the
store's optional crowd tables (votes, box_answers, workers, worker_gold, images, labels); a table that is
absent leaves its part empty (None), and the report and card say "no data" for it. Votes are counted as QC counts
them (`pipeline.qc.team.vote_accounting`: one per worker and pair); repeats QC ignores are counted apart. report.py renders HTML
from this, card.py Markdown; neither imports the other's renderer.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.qc.team import counted_votes, vote_accounting
from pipeline.release.manifest import read_manifest, read_release_table
from pipeline.store import MissingKey, Store

ILSVRC_SECONDS_PER_BOX = 35.0  # Su, Deng, Fei-Fei 2012: about 35 s of worker time per good box
WORKER_MEASURES = {  # column -> what it is, in the order the report shows them
    "gold_accuracy": "gold accuracy (share of known answers a worker got right)",
    "estimated_accuracy": "estimated accuracy (Dawid-Skene posterior)",
    "agreement": "agreement with the final labels",
}


@dataclass
class ReportData:
    manifest: dict[str, Any]
    classes: pd.DataFrame  # per wnid: name, train, val, test, boxes, images, precision, votes/s per image
    cost: dict[str, Any]
    workers: pd.DataFrame | None  # one row per worker: worker + any of WORKER_MEASURES
    rejected: pd.DataFrame  # reason, count
    thumbs: dict[str, list[str]] = field(default_factory=dict)  # wnid -> data URIs
    licenses: pd.DataFrame | None = None  # license, images
    sources: pd.DataFrame | None = None  # source, images
    attribution: dict[str, int] | None = None  # images, with_license, with_creator, with_page
    vote_counts: pd.DataFrame | None = None  # per worker: n_votes (QC counts), n_repeats, n_pulled (qc.team)

    def class_label(self, wnid: str) -> str:
        """'<wnid> <synset name>' (the wnid alone when the name is unknown)."""
        names = dict(zip(self.classes.wnid, self.classes.name, strict=True))
        name = names.get(wnid)
        return f"{wnid} {name}" if isinstance(name, str) and name else wnid

    @property
    def has_boxes_table(self) -> bool:
        return bool(self.manifest.get("stats", {}).get("boxes_table", True))


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
    if per.empty:
        per = pd.DataFrame(columns=["train", "val", "test", "boxes"], dtype=np.int64)
    per.index.name = "wnid"
    per["name"] = synsets.set_index("wnid").reindex(per.index)["name"]
    per["precision"] = prim.groupby("wnid").confidence.mean().reindex(per.index)
    per["images"] = per[["train", "val", "test"]].sum(axis=1)

    cost: dict[str, Any] = {"votes": None, "boxes": None}
    votes = _optional(store, "votes")
    accepted_ids = set(prim.image_id)
    vote_counts = None
    if votes is not None and votes.num_rows:
        # Votes as QC counts them (one per worker and pair, `pipeline.qc.team`): a repeat is paid for but not used,
        # so it is shown apart and left out of votes per image; worker-seconds are every pulled vote's time.
        v = votes.select(["annotation_id", "image_id", "wnid", "worker", "answer", "lead_time_s",
                          "submitted_at"]).to_pandas()
        used = counted_votes(v)
        vote_counts = vote_accounting(v)
        per_wnid = used.groupby("wnid").agg(n_votes=("answer", "size"))
        seconds = v.groupby("wnid").lead_time_s.sum()
        n_acc = per["images"].replace(0, np.nan)
        per["votes_per_image"] = per_wnid.n_votes.reindex(per.index) / n_acc
        per["seconds_per_image"] = seconds.reindex(per.index) / n_acc
        repeats = vote_counts[vote_counts.n_repeats > 0]
        cost["votes"] = {"n_votes": len(used), "n_pulled": len(v), "n_repeats": len(v) - len(used),
                         "workers_with_repeats": len(repeats),
                         "repeat_seconds": float(v.lead_time_s.sum() - used.lead_time_s.sum()),
                         "worker_seconds": float(v.lead_time_s.sum()),
                         "accepted_images": len(accepted_ids),
                         "votes_per_image": len(used) / max(len(accepted_ids), 1),
                         "seconds_per_image": float(v.lead_time_s.sum()) / max(len(accepted_ids), 1),
                         "share_on_released_images": float(used.image_id.isin(accepted_ids).mean())}
    answers = _optional(store, "box_answers")
    if answers is not None and answers.num_rows and len(boxes):
        a = answers.select(["kind", "lead_time_s"]).to_pandas()
        secs = float(a.lead_time_s.sum())
        cost["boxes"] = {"n_answers": len(a), "worker_seconds": secs, "accepted_boxes": len(boxes),
                         "seconds_per_box": secs / len(boxes),
                         "by_kind": a.groupby("kind").lead_time_s.agg(["size", "sum"]).round(1).to_dict("index"),
                         "ilsvrc_seconds_per_box": ILSVRC_SECONDS_PER_BOX}

    rejected = _rejections(store, manifest)
    thumbs = _thumbnails(store, prim, images, thumbs_per_class, max_thumb_classes)
    licenses, sources, attribution = _provenance(store, images)
    return ReportData(manifest, per.reset_index(), cost, _workers(store, votes), rejected, thumbs, licenses,
                      sources, attribution, vote_counts)


def _workers(store: Store, votes: pa.Table | None) -> pd.DataFrame | None:
    """Worker quality: QC's workers table (gold accuracy from the crowd side's worker_gold where QC has none),
    else each worker's agreement with the final labels, computed from the votes."""
    wt = _optional(store, "workers")
    if wt is not None and wt.num_rows:
        workers = wt.to_pandas()
        gold = _optional(store, "worker_gold")
        if gold is not None and gold.num_rows and not workers.gold_accuracy.notna().any():
            g = gold.select(["worker", "gold_accuracy"]).to_pandas().set_index("worker").gold_accuracy
            workers["gold_accuracy"] = workers.worker.map(g)
        return workers
    if votes is not None and votes.num_rows and store.has_table("labels"):
        # agreement of each worker with the final label (accepted -> yes, rejected -> no)
        lab = store.read_table("labels").select(["image_id", "wnid", "status"]).to_pandas()
        lab = lab[lab.status.isin(["accepted", "rejected"])]
        v = counted_votes(votes.select(["annotation_id", "image_id", "wnid", "worker", "answer",
                                        "submitted_at"]).to_pandas()).merge(lab, on=["image_id", "wnid"])
        v["agree"] = (v.answer == "yes") == (v.status == "accepted")
        return v.groupby("worker").agg(n_votes=("agree", "size"), agreement=("agree", "mean")).reset_index()
    return None


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


def _provenance(store: Store, images: pa.Table
                ) -> tuple[pd.DataFrame | None, pd.DataFrame | None, dict[str, int] | None]:
    """Images per license and per source, and how many carry attribution. From the release's own images
    table when it has the attribution columns; for a release published before them, from the store's
    candidates table joined on first_url."""
    if "license" in images.column_names:
        m = images.select(["source", "license", "creator", "page_url"]).to_pandas()
    else:
        cands = _optional(store, "candidates")
        if cands is None or not cands.num_rows:
            return None, None, None
        c = cands.select(["url", "source", "license", "creator", "page_url"]).to_pandas().drop_duplicates("url")
        m = pd.DataFrame({"url": images.column("first_url").to_pylist()}).merge(c, on="url", how="left")
    attribution = {"images": len(m), "with_license": int(m.license.notna().sum()),
                   "with_creator": int(m.creator.notna().sum()), "with_page": int(m.page_url.notna().sum())}
    licenses = m.fillna({"license": "unknown"}).groupby("license").size().rename("images").reset_index()
    sources = m.fillna({"source": "unknown"}).groupby("source").size().rename("images").reset_index()
    return (licenses.sort_values(["images", "license"], ascending=[False, True]),
            sources.sort_values(["images", "source"], ascending=[False, True]), attribution)
