"""Exports of a release: the ILSVRC devkit layout, plain Parquet for datasets/pandas/DuckDB, and publishing.

Devkit layout (folder `out`), following the ILSVRC-2012 devkit and its 2015 successor:

    LOC_synset_mapping.txt                 "<wnid> <lemma>, <lemma>"; line k = class index k (1-based)
    devkit/data/map_clsloc.txt             "<wnid> <index> <first lemma>"
    devkit/data/<P>_validation_ground_truth.txt   one class index per line, in val file order
    devkit/data/<P>_test_images.txt        test file names in order (labels withheld)
    devkit/data/image_ids.txt              "<file stem> <image_id>" for every exported image
    train/<wnid>/<wnid>_<image_id[:16]>.<ext>
    val/<P>_val_00000001.<ext> ...         sorted by image_id: the order of the ground-truth file
    test/<P>_test_00000001.<ext> ...
    bbox/train/<wnid>/<stem>.xml, bbox/val/<stem>.xml   PASCAL VOC XML, one file per image with boxes
    ATTRIBUTION.csv                        per image file: title, creator, license, license URL, source page
    ATTRIBUTION.txt                        the same as text, one paragraph per image

Class indices are 1-based in wnid order (as in the devkit files); the Parquet export's `label` column is
0-based (datasets' ClassLabel convention) and its rows carry the same attribution columns. `<P>` is the
release version. Attribution is the candidate record of the URL each image was first fetched from (an image
found at several URLs is credited as its first URL's record); it is what the source reported, not checked by
hand. A release without boxes (classification only) simply has no bbox/ folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.release.manifest import (
    MANIFEST,
    ReleaseError,
    ReleaseExists,
    read_manifest,
    read_release_table,
    release_prefix,
    verify_release,
)
from pipeline.store import KeyExists, MissingKey, Store, open_store

ATTRIBUTION_FIELDS = ("title", "creator", "license", "license_url", "page_url", "source", "first_url")
ATTRIBUTION_HEADER = ("file", "image_id", "title", "creator", "license", "license_url", "source_page", "source", "url")
EXTENSIONS = {"JPEG": "JPEG", "JPG": "JPEG", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}
REPORT_FILES = ("report.html", "card.md")


def class_index(synsets: pa.Table) -> dict[str, int]:
    """wnid -> 1-based class index, in wnid order (the devkit numbering)."""
    return {w: k + 1 for k, w in enumerate(sorted(synsets.column("wnid").to_pylist()))}


def split_order(labels: pa.Table, split: str) -> list[str]:
    """Image ids of one split in devkit file order (sorted by image_id)."""
    t = labels.filter(pc.and_(labels["is_primary"], pc.equal(labels["split"], split)))
    return sorted(t.column("image_id").to_pylist())


def hidden_test_images(store: Store, version: str, manifest: dict[str, Any]) -> pa.Table | None:
    """The test listing of a challenge release (`release build --challenge`), or None for other releases."""
    if "test_images" not in manifest["files"]:
        return None
    return read_release_table(store, version, "test_images", manifest=manifest)


def devkit_stem(version: str, split: str, position: int, wnid: str | None = None, image_id: str = "") -> str:
    if split == "train":
        return f"{wnid}_{image_id[:16]}"
    return f"{version}_{split}_{position:08d}"


def voc_xml(folder: str, stem: str, width: int, height: int, boxes: pd.DataFrame, database: str) -> str:
    """PASCAL VOC annotation for one image; coordinates are the release's pixel boxes, rounded."""
    objs = []
    for b in boxes.itertuples():
        objs.append(
            "  <object>\n"
            f"    <name>{escape(b.wnid)}</name>\n    <pose>Unspecified</pose>\n"
            "    <truncated>0</truncated>\n    <difficult>0</difficult>\n"
            "    <bndbox>\n"
            f"      <xmin>{round(b.x_min)}</xmin>\n      <ymin>{round(b.y_min)}</ymin>\n"
            f"      <xmax>{round(b.x_max)}</xmax>\n      <ymax>{round(b.y_max)}</ymax>\n"
            "    </bndbox>\n  </object>\n"
        )
    return (
        "<annotation>\n"
        f"  <folder>{escape(folder)}</folder>\n  <filename>{escape(stem)}</filename>\n"
        f"  <source>\n    <database>{escape(database)}</database>\n  </source>\n"
        f"  <size>\n    <width>{width}</width>\n    <height>{height}</height>\n    <depth>3</depth>\n  </size>\n"
        "  <segmented>0</segmented>\n" + "".join(objs) + "</annotation>\n"
    )


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _frame(table: pa.Table, columns: list[str]) -> pd.DataFrame:
    """`columns` of `table` as a frame; a column the table lacks (a release published before it existed) is
    all None."""
    return pd.DataFrame({c: table.column(c).to_numpy(zero_copy_only=False) if c in table.column_names
                         else np.full(table.num_rows, None, dtype=object) for c in columns})


def _text(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)


def attribution_csv(rows: list[dict[str, Any]]) -> str:
    """ATTRIBUTION.csv: one row per exported file (ATTRIBUTION_HEADER), empty cells where the source said nothing."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(ATTRIBUTION_HEADER)
    for r in rows:
        w.writerow([_text(r.get(k)) for k in ATTRIBUTION_HEADER])
    return buf.getvalue()


def attribution_text(rows: list[dict[str, Any]], version: str) -> str:
    """ATTRIBUTION.txt: a paragraph per file ("title" by creator, license (URL), source page)."""
    out = [f"Image credits for synsetforge release {version}.",
           "Each image is credited as the source reported it for the URL it was first fetched from (an image",
           "found at several URLs takes its first URL's record). Unknown fields are left out; an image without a",
           "license is marked so. Check each license before redistributing.", ""]
    for r in rows:
        title, creator = _text(r.get("title")), _text(r.get("creator"))
        line = f'"{title}"' if title else "untitled"
        if creator:
            line += f" by {creator}"
        lic = _text(r.get("license"))
        lic_url = _text(r.get("license_url"))
        line += f", {lic}" if lic else ", license unknown"
        if lic_url:
            line += f" ({lic_url})"
        out.append(f"{r['file']}\n  {line}")
        page = _text(r.get("source_page")) or _text(r.get("url"))
        if page:
            out.append(f"  source: {page}" + (f" via {_text(r.get('source'))}" if _text(r.get("source")) else ""))
        out.append("")
    return "\n".join(out)


def export_devkit(store: Store, version: str, out: str | os.PathLike[str], *, images: bool = True) -> dict[str, int]:
    """Write the devkit layout of release `version` to folder `out`; return counts of what was written."""
    out = Path(out)
    manifest = read_manifest(store, version)
    if manifest.get("task") == "det":  # a DET release has its own layout (pipeline.release.det)
        from pipeline.release.det import export_det_devkit

        return export_det_devkit(store, version, out, images=images)
    synsets = read_release_table(store, version, "synsets", manifest=manifest)
    labels = read_release_table(store, version, "labels", manifest=manifest)
    imgs = _frame(read_release_table(store, version, "images", manifest=manifest),
                  ["image_id", "width", "height", "format", "storage_key", *ATTRIBUTION_FIELDS]).set_index("image_id")
    hidden = hidden_test_images(store, version, manifest)
    if hidden is not None:  # a challenge release: its test images are listed without labels
        imgs = pd.concat([imgs, _frame(hidden, list(imgs.reset_index().columns)).set_index("image_id")])
    boxes = _frame(read_release_table(store, version, "boxes", manifest=manifest),
                   ["image_id", "wnid", "x_min", "y_min", "x_max", "y_max"])
    index = class_index(synsets)
    lemmas = dict(zip(synsets.column("wnid").to_pylist(), synsets.column("lemmas").to_pylist(), strict=True))
    _write(out / "LOC_synset_mapping.txt", "".join(f"{w} {', '.join(lemmas[w])}\n" for w in index))
    _write(out / "devkit" / "data" / "map_clsloc.txt",
           "".join(f"{w} {k} {(lemmas[w] or [w])[0].replace(' ', '_')}\n" for w, k in index.items()))

    prim = _frame(labels.filter(labels["is_primary"]), ["image_id", "wnid", "split"]).set_index("image_id")
    boxes_by_image = dict(tuple(boxes.groupby("image_id"))) if len(boxes) else {}
    counts = {"train": 0, "val": 0, "test": 0, "xml": 0}
    id_lines: list[str] = []
    credits: list[dict[str, Any]] = []
    database = f"synsetforge {version}"

    def emit(image_id: str, split: str, rel_dir: str, stem: str, box_dir: str) -> None:
        row = imgs.loc[image_id]
        ext = EXTENSIONS.get(str(row.format).upper(), "bin")
        credits.append({"file": f"{rel_dir}/{stem}.{ext}", "image_id": image_id, "title": row.title,
                        "creator": row.creator, "license": row.license, "license_url": row.license_url,
                        "source_page": row.page_url, "source": row.source, "url": row.first_url})
        if images:
            try:
                data = store.get(row.storage_key)
            except MissingKey:
                raise ReleaseError(f"image {image_id} of release {version!r} is missing from the store "
                                   f"({row.storage_key}); restore the blob or rebuild the release") from None
            _write(out / rel_dir / f"{stem}.{ext}", data)
        id_lines.append(f"{stem} {image_id}\n")
        counts[split] += 1
        b = boxes_by_image.get(image_id)
        if b is not None and split != "test":
            _write(out / "bbox" / box_dir / f"{stem}.xml",
                   voc_xml(rel_dir.split("/")[-1], stem, int(row.width), int(row.height), b, database))
            counts["xml"] += 1

    train = prim[prim.split == "train"].reset_index().sort_values(["wnid", "image_id"])
    for r in train.itertuples():
        emit(r.image_id, "train", f"train/{r.wnid}", devkit_stem(version, "train", 0, r.wnid, r.image_id),
             f"train/{r.wnid}")
    gt_lines = []
    for pos, image_id in enumerate(split_order(labels, "val"), start=1):
        emit(image_id, "val", "val", devkit_stem(version, "val", pos), "val")
        gt_lines.append(f"{index[prim.loc[image_id, 'wnid']]}\n")
    _write(out / "devkit" / "data" / f"{version}_validation_ground_truth.txt", "".join(gt_lines))
    test_names = []
    test_ids = split_order(labels, "test") if hidden is None else hidden.column("image_id").to_pylist()
    for pos, image_id in enumerate(test_ids, start=1):
        stem = devkit_stem(version, "test", pos)
        emit(image_id, "test", "test", stem, "test")
        test_names.append(stem + "\n")
    _write(out / "devkit" / "data" / f"{version}_test_images.txt", "".join(test_names))
    _write(out / "devkit" / "data" / "image_ids.txt", "".join(id_lines))
    _write(out / "ATTRIBUTION.csv", attribution_csv(credits))
    _write(out / "ATTRIBUTION.txt", attribution_text(credits, version))
    counts["attribution"] = len(credits)
    return counts


# Parquet export column -> release images column
PARQUET_ATTRIBUTION = {"title": "title", "creator": "creator", "license": "license", "license_url": "license_url",
                       "page_url": "page_url", "source": "source", "url": "first_url"}


def _hf_features(class_names: list[str], with_images: bool) -> dict[str, Any]:
    value = {"_type": "Value"}
    box = {k: {**value, "dtype": "float64"} for k in ("x_min", "y_min", "x_max", "y_max")}
    feats: dict[str, Any] = {
        "image_id": {**value, "dtype": "string"},
        "label": {"_type": "ClassLabel", "names": class_names},
        "wnid": {**value, "dtype": "string"},
        "width": {**value, "dtype": "int32"},
        "height": {**value, "dtype": "int32"},
        "storage_key": {**value, "dtype": "string"},
        "boxes": {"_type": "List", "feature": box},
        **{c: {**value, "dtype": "string"} for c in PARQUET_ATTRIBUTION},
    }
    if with_images:
        feats["image"] = {"_type": "Image"}
    return {"info": {"features": feats}}


def export_parquet(
    store: Store,
    version: str,
    out: str | os.PathLike[str],
    *,
    with_images: bool = False,
    test_labels: bool = False,
    rows_per_file: int = 500_000,
) -> dict[str, list[str]]:
    """Write data/<split>-NNNNN-of-MMMMM.parquet (one row per image) and a README with dataset configs.

    Columns: image_id, label (0-based class index, -1 for withheld test labels), wnid, width, height,
    storage_key, boxes (list of x_min/y_min/x_max/y_max), the attribution (title, creator, license,
    license_url, page_url, source, url: the image's first URL), and with_images an `image` struct
    {bytes, path} that `datasets` decodes as an Image feature.
    """
    out = Path(out)
    manifest = read_manifest(store, version)
    synsets = read_release_table(store, version, "synsets", manifest=manifest)
    labels = read_release_table(store, version, "labels", manifest=manifest)
    images = read_release_table(store, version, "images", manifest=manifest)
    boxes = read_release_table(store, version, "boxes", manifest=manifest)
    index = class_index(synsets)
    names = list(index)
    prim = _frame(labels.filter(labels["is_primary"]), ["image_id", "wnid", "split"])
    imgs = _frame(images, ["image_id", "width", "height", "storage_key", "format", *ATTRIBUTION_FIELDS])
    hidden = hidden_test_images(store, version, manifest)
    if hidden is not None:  # a challenge release: test images without labels
        ids = hidden.column("image_id").to_pylist()
        prim = pd.concat([prim, pd.DataFrame({"image_id": ids, "wnid": [None] * len(ids), "split": ["test"] * len(ids)})],
                         ignore_index=True)
        imgs = pd.concat([imgs, _frame(hidden, list(imgs.columns))], ignore_index=True)
    df = prim.merge(imgs, on="image_id", how="left").sort_values(["split", "image_id"], kind="stable")
    bx = _frame(boxes, ["image_id", "x_min", "y_min", "x_max", "y_max"])
    box_lists = {k: g[["x_min", "y_min", "x_max", "y_max"]].to_dict("records") for k, g in bx.groupby("image_id")}
    meta = {b"huggingface": json.dumps(_hf_features(names, with_images)).encode()}
    written: dict[str, list[str]] = {}
    for split, hf_name in SPLIT_NAMES.items():
        part = df[df.split == split]
        hide = split == "test" and (not test_labels or hidden is not None)
        n_files = max(1, -(-len(part) // rows_per_file))
        written[hf_name] = []
        for f in range(n_files):
            chunk = part.iloc[f * rows_per_file:(f + 1) * rows_per_file]
            cols: dict[str, pa.Array] = {
                "image_id": pa.array(chunk.image_id.tolist(), pa.string()),
                "label": pa.array([-1 if hide else index[w] - 1 for w in chunk.wnid], pa.int64()),
                "wnid": pa.array([None if hide else w for w in chunk.wnid], pa.string()),
                "width": pa.array(chunk.width.tolist(), pa.int32()),
                "height": pa.array(chunk.height.tolist(), pa.int32()),
                "storage_key": pa.array(chunk.storage_key.tolist(), pa.string()),
                "boxes": pa.array([[] if hide else box_lists.get(i, []) for i in chunk.image_id],
                                  pa.list_(pa.struct([(c, pa.float64()) for c in ("x_min", "y_min", "x_max", "y_max")]))),
                **{c: pa.array([None if pd.isna(v) else str(v) for v in chunk[src]], pa.string())
                   for c, src in PARQUET_ATTRIBUTION.items()},
            }
            if with_images:
                cols["image"] = pa.array(
                    [{"bytes": store.get(k), "path": f"{i}.{EXTENSIONS.get(str(fmt).upper(), 'bin')}"}
                     for i, k, fmt in zip(chunk.image_id, chunk.storage_key, chunk.format, strict=True)],
                    pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
            table = pa.table(cols).replace_schema_metadata(meta)
            rel = f"data/{hf_name}-{f:05d}-of-{n_files:05d}.parquet"
            (out / "data").mkdir(parents=True, exist_ok=True)
            pq.write_table(table, out / rel, compression="zstd")
            written[hf_name].append(rel)
    configs = "\n".join(f"  - split: {s}\n    path: data/{s}-*" for s in SPLIT_NAMES.values())
    _write(out / "README.md", f"---\nconfigs:\n- config_name: default\n  data_files:\n{configs}\n---\n\n"
           f"# synsetforge release {version}\n\nOne row per image; `label` indexes `classes.txt` (0-based).\n\n"
           "Each row credits its image: `title`, `creator`, `license`, `license_url`, `page_url` and `source` as the "
           "source reported them for `url`, the URL the image was first fetched from (an image found at several "
           "URLs takes its first URL's record). Check each image's license before redistributing it.\n")
    _write(out / "classes.txt", "".join(f"{w}\n" for w in names))
    return written


def publish_release(
    store: Store, version: str, target: str | os.PathLike[str] | Store, *, endpoint_url: str | None = None
) -> dict[str, Any]:
    """Copy a verified release to another store (a folder or s3://bucket/prefix), manifest last and exclusive.

    Files already at the target with the same bytes are skipped, so an interrupted publish can be re-run;
    a target that already has this version's manifest is never overwritten (ReleaseExists).
    """
    dest = target if isinstance(target, Store) else open_store(target, endpoint_url=endpoint_url)
    prefix = release_prefix(version)
    manifest_key = f"{prefix}/{MANIFEST}"
    if dest.exists(manifest_key):
        raise ReleaseExists(f"release {version!r} is already published at {dest.url}; releases are immutable")
    check = verify_release(store, version)
    if not check.ok:
        raise ReleaseError(f"release {version!r} failed verification, not publishing: {'; '.join(check.problems)}")
    manifest = read_manifest(store, version)
    keys = [f"{prefix}/{e['key']}" for e in manifest["files"].values()]
    keys += [f"{prefix}/{name}" for name in REPORT_FILES if store.exists(f"{prefix}/{name}")]
    copied = 0
    for key in keys:
        data = store.get(key)
        if dest.exists(key):
            if dest.get(key) != data:
                raise ReleaseError(f"{dest.url}/{key} exists with other content; remove the unpublished folder "
                                   f"{dest.url}/{prefix} (it has no manifest) and publish again")
            continue
        dest.put(key, data, exclusive=True)
        copied += 1
    try:
        dest.put(manifest_key, store.get(manifest_key), exclusive=True)
    except KeyExists:
        raise ReleaseExists(f"release {version!r} was published at {dest.url} by someone else meanwhile") from None
    return {"target": dest.url, "files": len(keys), "copied": copied}
