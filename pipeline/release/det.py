"""DET releases: fully annotated images with a box around every instance of every present class (ILSVRC DET).

An image enters a DET release when the presence loop decided every DET class for it (`det_images.state == done`)
and the DET box loop finished every present class with its coverage confirmed (`det_coverage`: done and covered).
Any other class is absent from it, so a detection of a class on an image that does not list it is a false
positive, as in ILSVRC's DET evaluation. Images are split whole (one split per image, salted hash order; a parent
release's assignments are kept), by a count or a fraction of the eligible images.

Published like every release (pipeline.release.build): content-addressed Parquet files first, manifest.json last
with an exclusive put; the manifest says `task: det` and its split quotas are of images (`unit: image`). Tables:

    synsets        the DET classes (synsets schema), sorted by wnid
    images         file facts and attribution (release_images), as a classification release's
    det_images     image_id, split, n_present, n_boxes, n_questions, worker_seconds (release_det_images)
    det_labels     present (image, class) pairs with split, boxes and QC confidence (release_det_labels)
    boxes          the accepted boxes of the present classes (boxes)
    det_questions  the question tree the images were annotated with (det_questions)

Devkit layout (`export_det_devkit`, what `release export --format devkit` writes for a DET release), after
ILSVRC 2013-2015 DET:

    devkit/data/map_det.txt             "<wnid> <index> <name>"; index k = class k (1-based, wnid order)
    ImageSets/DET/<split>.txt           "<file stem> <position>" per image of the split, in devkit order
    ImageSets/DET/train_<k>.txt         "<file stem> 1" if class k is present in the train image, "-1" if absent
    Data/DET/<split>/<stem>.<ext>       the images, <stem> = <version>_<split>_<position> (test too: its labels are
                                        in no file of the export)
    Annotations/DET/<split>/<stem>.xml  PASCAL VOC XML for every train and val image (none when nothing is present)
    devkit/data/image_ids.txt           "<file stem> <image_id>"
    ATTRIBUTION.csv, ATTRIBUTION.txt    credits per image file, as the classification export

A detection submission for `synsetforge evaluate --task det` has one line per detection,
"<position in val.txt> <class index> <score> <x_min> <y_min> <x_max> <y_max>".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.release.build import (
    CANDIDATE_COLUMNS,
    HiddenLabelGuard,
    _put_local_file,
    _put_remote_file,
    code_version,
    collect_roots,
    release_images,
    sorted_synsets,
)
from pipeline.release.manifest import (
    ReleaseError,
    ReleaseExists,
    ReleaseInputError,
    manifest_key,
    read_manifest,
    read_release_table,
    release_exists,
    release_prefix,
    validate_manifest,
)
from pipeline.release.splits import argsort_stable, check_quota, split_keys
from pipeline.schemas import schema_version, validate
from pipeline.store import KeyExists, LocalStore, Store

TASK = "det"
DET_TABLES = {"synsets": "synsets", "images": "release_images", "det_images": "release_det_images",
              "det_labels": "release_det_labels", "boxes": "boxes", "det_questions": "det_questions"}
SPLIT_ORDER = ("train", "val", "test")


def is_det_release(manifest: dict[str, Any]) -> bool:
    return manifest.get("task") == TASK


# ------------------------------------------------------------------------------------------------- choose
def eligible_images(det_images: pd.DataFrame, coverage: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Fully annotated images whose every present class is boxed (box loop done and coverage confirmed); the counts
    of images left out and why."""
    done = det_images[det_images["state"] == "done"]
    cov = coverage.set_index(["image_id", "wnid"]) if len(coverage) else None
    ok, unboxed = [], 0
    for r in done.itertuples(index=False):
        good = True
        for w in r.present:
            if cov is None or (r.image_id, w) not in cov.index:
                good = False
                break
            c = cov.loc[(r.image_id, w)]
            if not (c["state"] == "done" and bool(c["covered"])):
                good = False
                break
        if good:
            ok.append(r.image_id)
        else:
            unboxed += 1
    out = done[done["image_id"].isin(set(ok))].reset_index(drop=True)
    return out, {"not_fully_annotated": int(len(det_images) - len(done)), "boxes_unfinished": unboxed}


def assign_splits(image_ids: Sequence[str], val: Any, test: Any, salt: str,
                  parent: dict[str, str] | None = None) -> dict[str, str]:
    """image_id -> train / val / test: images of the parent release keep their split; the others are ranked by a
    salted hash and the first go to val, then test, until each holds its quota (a count, or a fraction of all
    the images rounded half up), the rest to train.

        >>> s = assign_splits([f"i{k}" for k in range(10)], 0.2, 3, "x")
        >>> sorted(s.values()).count("val"), sorted(s.values()).count("test")
        (2, 3)
    """
    val, test = check_quota(val, "val"), check_quota(test, "test")
    ids = list(dict.fromkeys(image_ids))
    n = len(ids)

    def want(q: Any) -> int:
        return int(np.floor(q * n + 0.5)) if isinstance(q, float) else int(q)

    parent = parent or {}
    out = {i: parent[i] for i in ids if i in parent}
    quota = {"val": want(val), "test": want(test)}
    have = {s: sum(1 for v in out.values() if v == s) for s in ("val", "test")}
    rest = [i for i in ids if i not in out]
    order = argsort_stable(split_keys(rest, salt)) if rest else np.zeros(0, np.int64)
    for k in order:
        i = rest[int(k)]
        for s in ("val", "test"):
            if have[s] < quota[s]:
                out[i], have[s] = s, have[s] + 1
                break
        else:
            out[i] = "train"
    return out


# ------------------------------------------------------------------------------------------------- build
def _put(store: Store, prefix: str, name: str, table: pa.Table) -> dict[str, Any]:
    schema = DET_TABLES[name]
    table = validate(schema, table)
    entry = (_put_local_file(store, prefix, name, table, None) if isinstance(store, LocalStore)
             else _put_remote_file(store, prefix, name, table, None))
    return {**entry, "schema": schema, "schema_version": schema_version(schema)}


def build_det_release(store: Store, version: str, *, parent: str | None = None, val: Any = 0.2, test: Any = 0.2,
                      salt: str = "synsetforge", config_digest: str | None = None, created_at: datetime | None = None,
                      local_roots: Sequence[str] = ()) -> dict[str, Any]:
    """Build DET release `version` from the presence and DET box tables; return its manifest. Raises
    ReleaseExists for a published version, ReleaseInputError when no image is fully annotated and boxed."""
    prefix = release_prefix(version)
    if release_exists(store, version):
        raise ReleaseExists(f"release {version!r} already exists in {store.url}; releases are immutable, "
                            "choose a new version")
    for name in ("det_questions", "det_images", "images", "synsets"):
        if not store.has_table(name):
            raise ReleaseInputError(f"no {name} table in {store.url}: a DET release needs the DET vocabulary "
                                    "(vocab --det), ingest and the presence loop (det sync) first")
    parent_split: dict[str, str] = {}
    if parent is not None:
        pm = read_manifest(store, parent)
        if not is_det_release(pm):
            raise ReleaseInputError(f"parent {parent!r} is not a DET release; give a DET release or no parent")
        pd_ = read_release_table(store, parent, "det_images", manifest=pm).to_pandas()
        parent_split = dict(zip(pd_["image_id"], pd_["split"], strict=True))
    questions = store.read_table("det_questions").to_pandas()
    classes = sorted(questions.loc[questions["is_class"], "node_id"])
    det_images = store.read_table("det_images").to_pandas()
    coverage = store.read_table("det_coverage", missing_ok=True).to_pandas()
    chosen, left_out = eligible_images(det_images, coverage)
    if not len(chosen):
        raise ReleaseInputError(f"no image in {store.url} is fully annotated with every present class boxed "
                                f"({left_out['not_fully_annotated']} not fully annotated, {left_out['boxes_unfinished']} "
                                "with boxes unfinished); run the presence and DET box loops further")
    split = assign_splits(sorted(chosen["image_id"]), val, test, salt, parent_split)
    ids = sorted(split)
    # images: file facts + attribution, one row per image (its first images row), in image_id order
    images = store.read_table("images")
    img_ids = images.column("image_id").to_pylist()
    first_row: dict[str, int] = {}
    for k, (i, st) in enumerate(zip(img_ids, images.column("status").to_pylist(), strict=True)):
        if i in split and st == "accepted" and i not in first_row:
            first_row[i] = k
    missing = [i for i in ids if i not in first_row]
    if missing:
        raise ReleaseInputError(f"{len(missing)} annotated image(s) have no accepted row in the images table "
                                f"(first: {missing[:3]}); rerun ingest or drop them from det_images")
    candidates = store.read_table("candidates").select(CANDIDATE_COLUMNS) if store.has_table("candidates") else None
    rows = np.array([first_row[i] for i in ids], dtype=np.int64)
    order = np.argsort(rows)
    rel_images = release_images(images, rows[order], [candidates] if candidates is not None else None,
                                collect_roots(store, local_roots))
    # boxes of the present classes
    boxes = store.read_table("det_boxes", missing_ok=True).to_pandas()
    present = {(r.image_id, w) for r in chosen.itertuples(index=False) for w in r.present if r.image_id in split}
    if len(boxes):
        keep = [(i, w) in present for i, w in zip(boxes["image_id"], boxes["wnid"], strict=True)]
        boxes = boxes[np.array(keep, dtype=bool) & (boxes["verified"] == "accepted").to_numpy()]
    boxes = boxes.sort_values(["image_id", "wnid", "seq"], kind="stable").reset_index(drop=True)
    n_boxes = boxes.groupby(["image_id", "wnid"]).size().to_dict() if len(boxes) else {}
    labels = store.read_table("presence_labels", missing_ok=True).to_pandas()
    conf = {(r.image_id, r.node_id): r.confidence for r in labels.itertuples(index=False)
            if r.status == "accepted"} if len(labels) else {}
    det_labels = pd.DataFrame([{"image_id": i, "wnid": w, "split": split[i], "n_boxes": int(n_boxes.get((i, w), 0)),
                                "confidence": conf.get((i, w))} for i, w in sorted(present)],
                              columns=["image_id", "wnid", "split", "n_boxes", "confidence"])
    by_image = chosen.set_index("image_id")
    det_rel = pd.DataFrame([{"image_id": i, "split": split[i], "n_present": len(by_image.loc[i, "present"]),
                             "n_boxes": int(sum(n_boxes.get((i, w), 0) for w in by_image.loc[i, "present"])),
                             "n_questions": int(by_image.loc[i, "n_questions"]),
                             "worker_seconds": float(by_image.loc[i, "worker_seconds"])} for i in ids])
    synsets = store.read_table("synsets")
    unknown = sorted(set(classes) - set(synsets.column("wnid").to_pylist()))
    if unknown:
        raise ReleaseInputError(f"DET classes {unknown[:5]} are not in the synsets table; rerun `synsetforge vocab "
                                "--det` with the same classes")
    syn = sorted_synsets(synsets.filter(pa.compute.is_in(synsets["wnid"], value_set=pa.array(classes))))
    tables = {"synsets": syn, "images": rel_images,
              "det_images": pa.Table.from_pandas(det_rel, preserve_index=False),
              "det_labels": pa.Table.from_pandas(det_labels, preserve_index=False),
              "boxes": pa.Table.from_pandas(boxes, preserve_index=False),
              "det_questions": store.read_table("det_questions")}
    # no DET label of an image a challenge release hides as a test image (pipeline.release.build's rule 2)
    HiddenLabelGuard(store, version, challenge=False)(pa.table({
        "image_id": pa.array(det_labels["image_id"].tolist(), pa.string()),
        "split": pa.array(det_labels["split"].tolist(), pa.string())}))
    files = {name: _put(store, prefix, name, t) for name, t in tables.items()}
    splits = {s: sum(1 for v in split.values() if v == s) for s in SPLIT_ORDER}
    per_class: dict[str, dict[str, int]] = {w: {s: 0 for s in SPLIT_ORDER} | {"boxes": 0} for w in classes}
    for r in det_labels.itertuples(index=False):
        per_class[r.wnid][r.split] += 1
        per_class[r.wnid]["boxes"] += int(r.n_boxes)
    created = (created_at or datetime.now(UTC)).astimezone(UTC)
    policy = {"val_per_class": val, "test_per_class": test, "salt": salt, "unit": "image",
              "kept_from_parent": sum(1 for i in ids if i in parent_split)}
    manifest = {
        "manifest_version": 2, "task": TASK, "version": version,
        "created_at": created.isoformat().replace("+00:00", "Z"), "parent": parent, "code_version": code_version(),
        "config_digest": config_digest or hashlib.sha256(json.dumps(policy, sort_keys=True).encode()).hexdigest(),
        "files": files, "splits": splits, "classes": per_class, "neardup_dropped": 0,
        "qc_methods": sorted(set(labels["method"])) if len(labels) else [],
        "split_policy": policy,
        "stats": {**left_out, "images": len(ids), "present_pairs": len(det_labels), "boxes": len(boxes),
                  "box_kinds": sorted(_box_kinds(store)), "questions_per_image": float(det_rel["n_questions"].mean()),
                  "worker_seconds_per_image": float(det_rel["worker_seconds"].mean())},
    }
    validate_manifest(manifest)
    try:
        store.put(manifest_key(version), json.dumps(manifest, indent=1, sort_keys=True).encode(), exclusive=True)
    except KeyExists:
        raise ReleaseExists(f"release {version!r} was published by another build while this one ran; "
                            "nothing was overwritten") from None
    return manifest


def _box_kinds(store: Store) -> set[str]:
    tasks = store.read_table("det_box_tasks", columns=["kind"], missing_ok=True).to_pandas()
    return set(tasks["kind"]) - {"quality", "coverage"} if len(tasks) else set()


# ------------------------------------------------------------------------------------------------- read
def split_order(det_images: pa.Table | pd.DataFrame, split: str) -> list[str]:
    """Image ids of one split of a DET release in devkit order (sorted by image_id)."""
    df = det_images.to_pandas() if hasattr(det_images, "to_pandas") else det_images
    return sorted(df.loc[df["split"] == split, "image_id"])


def det_ground_truth(store: Store, version: str, split: str = "val") -> Any:
    """The evaluation ground truth of a DET release's split: its images in devkit order, every box of the split
    with its 1-based class index, the classes in wnid order."""
    from pipeline.evaluate import BOX, GroundTruth

    manifest = read_manifest(store, version)
    if not is_det_release(manifest):
        raise ReleaseInputError(f"release {version!r} is not a DET release")
    synsets = read_release_table(store, version, "synsets", manifest=manifest)
    wnids = sorted(synsets.column("wnid").to_pylist())
    index = {w: k + 1 for k, w in enumerate(wnids)}
    det_images = read_release_table(store, version, "det_images", manifest=manifest)
    order = split_order(det_images, split)
    boxes = read_release_table(store, version, "boxes", manifest=manifest).to_pandas()
    boxes = boxes[boxes["image_id"].isin(set(order))]
    gt = pd.DataFrame({"image_id": boxes["image_id"], "cls": boxes["wnid"].map(index), **{c: boxes[c] for c in BOX}})
    return GroundTruth(order, dict.fromkeys(order, 0), gt.reset_index(drop=True), wnids)


# ------------------------------------------------------------------------------------------------- export
def det_stem(version: str, split: str, position: int) -> str:
    """File stem of the `position`-th image (1-based, devkit order) of a DET split: <version>_<split>_00000001."""
    return f"{version}_{split}_{position:08d}"


def export_det_devkit(store: Store, version: str, out: str | Path, *, images: bool = True) -> dict[str, int]:
    """Write the DET devkit layout of DET release `version` into folder `out` (see the module docstring)."""
    from pipeline.release.export import (
        EXTENSIONS,
        _frame,
        _write,
        attribution_csv,
        attribution_text,
        voc_xml,
    )
    from pipeline.store import MissingKey

    out = Path(out)
    manifest = read_manifest(store, version)
    if not is_det_release(manifest):
        raise ReleaseInputError(f"release {version!r} is not a DET release")
    synsets = read_release_table(store, version, "synsets", manifest=manifest)
    wnids = sorted(synsets.column("wnid").to_pylist())
    lemmas = dict(zip(synsets.column("wnid").to_pylist(), synsets.column("lemmas").to_pylist(), strict=True))
    index = {w: k + 1 for k, w in enumerate(wnids)}
    _write(out / "devkit" / "data" / "map_det.txt",
           "".join(f"{w} {k} {(lemmas[w] or [w])[0].replace(' ', '_')}\n" for w, k in index.items()))
    det_images = read_release_table(store, version, "det_images", manifest=manifest).to_pandas()
    imgs = _frame(read_release_table(store, version, "images", manifest=manifest),
                  ["image_id", "width", "height", "format", "storage_key", "first_url", "title", "creator", "license",
                   "license_url", "page_url", "source"]).set_index("image_id")
    labels = read_release_table(store, version, "det_labels", manifest=manifest).to_pandas()
    present = labels.groupby("image_id")["wnid"].apply(set).to_dict() if len(labels) else {}
    boxes = _frame(read_release_table(store, version, "boxes", manifest=manifest),
                   ["image_id", "wnid", "x_min", "y_min", "x_max", "y_max"])
    boxes_by_image = dict(tuple(boxes.groupby("image_id"))) if len(boxes) else {}
    counts = {s: 0 for s in SPLIT_ORDER} | {"xml": 0}
    id_lines, credits = [], []
    stems: dict[str, list[tuple[str, str]]] = {}
    database = f"synsetforge {version} DET"
    for split in SPLIT_ORDER:
        lines = []
        for pos, image_id in enumerate(split_order(det_images, split), start=1):
            stem = det_stem(version, split, pos)
            row = imgs.loc[image_id]
            ext = EXTENSIONS.get(str(row.format).upper(), "bin")
            rel = f"Data/DET/{split}/{stem}.{ext}"
            credits.append({"file": rel, "image_id": image_id, "title": row.title, "creator": row.creator,
                            "license": row.license, "license_url": row.license_url, "source_page": row.page_url,
                            "source": row.source, "url": row.first_url})
            if images:
                try:
                    data = store.get(row.storage_key)
                except MissingKey:
                    raise ReleaseError(f"image {image_id} of release {version!r} is missing from the store "
                                       f"({row.storage_key}); restore the blob or rebuild the release") from None
                _write(out / rel, data)
            if split != "test":
                b = boxes_by_image.get(image_id, pd.DataFrame(columns=boxes.columns))
                _write(out / "Annotations" / "DET" / split / f"{stem}.xml",
                       voc_xml(split, stem, int(row.width), int(row.height), b, database))
                counts["xml"] += 1
            lines.append(f"{stem} {pos}\n")
            id_lines.append(f"{stem} {image_id}\n")
            stems.setdefault(split, []).append((stem, image_id))
            counts[split] += 1
        _write(out / "ImageSets" / "DET" / f"{split}.txt", "".join(lines))
    for w, k in index.items():  # per-class positive / negative lists of the (fully annotated) train images
        _write(out / "ImageSets" / "DET" / f"train_{k}.txt",
               "".join(f"{stem} {1 if w in present.get(i, set()) else -1}\n" for stem, i in stems.get("train", [])))
    _write(out / "devkit" / "data" / "image_ids.txt", "".join(id_lines))
    _write(out / "ATTRIBUTION.csv", attribution_csv(credits))
    _write(out / "ATTRIBUTION.txt", attribution_text(credits, version))
    counts["attribution"] = len(credits)
    return counts
