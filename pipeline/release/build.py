"""Assemble a release from the store's tables and publish it immutably (manifest last).

Pure core: `plan_release` decides (accepted labels of accepted images, one primary class per image,
splits, near-duplicate leakage) on integer codes; `select_boxes` and `assemble` finish the tables.
I/O shell: `build_release(store, version, ...)` runs the same steps staged, so that about one big table is
in memory at a time (images are read narrow for the decision and in full only to be written), writes
releases/<version>/data/<table>-<sha256[:16]>.parquet, then manifest.json with an exclusive put.

    >>> import tempfile
    >>> from pipeline.store import open_store
    >>> from pipeline.release.synthetic import make_fixture
    >>> store = open_store(tempfile.mkdtemp())
    >>> _ = make_fixture(store, n_classes=2, per_class=6, seed=3)
    >>> m = build_release(store, "v1", val_per_class=1, test_per_class=1, neardup=False)
    >>> sorted(m["files"]), m["splits"]["val"]
    (['boxes', 'images', 'labels', 'synsets'], 2)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.release.manifest import (
    ReleaseError,
    ReleaseExists,
    manifest_key,
    read_manifest,
    read_release_table,
    release_exists,
    release_prefix,
    validate_manifest,
)
from pipeline.release.splits import (
    SPLITS,
    TRAIN,
    CrossDuplicates,
    class_then_key_order,
    split_codes,
    split_keys,
    train_near_duplicates_rows,
)
from pipeline.schemas import arrow_schema, schema_version, validate
from pipeline.store import KeyExists, LocalStore, Store

# table in the release -> schema it is validated against
RELEASE_TABLES = {"synsets": "synsets", "images": "images", "labels": "release_labels", "boxes": "boxes"}


@dataclass
class SplitPolicy:
    val_per_class: int = 50
    test_per_class: int = 100
    salt: str = "synsetforge"


@dataclass
class Inputs:
    synsets: pa.Table
    images: pa.Table
    labels: pa.Table
    boxes: pa.Table


@dataclass
class Plan:
    """What goes into a release, decided from synsets, images and labels (boxes are filtered afterwards).

    Images are handled as integer codes (positions in `image_ids`), classes as positions in `wnids`
    (sorted), so every join, sort and group below is numpy on integers, not on 1M+ strings.
    """

    image_rows: np.ndarray  # rows of the images table to publish, ascending (images keep their input order)
    labels: pa.Table | None  # the release_labels table
    image_ids: pa.Array  # distinct accepted image ids; an image's code is its position here
    wnids: pa.Array  # sorted vocabulary; a class code is a position here
    image_keys: np.ndarray  # salted split key per image code (0 for images without a released label)
    released_pairs: np.ndarray  # image_code * n_classes + class_code of every released label
    split_counts: np.ndarray  # n_classes x 3 (train, val, test) primary images
    splits: dict[str, int]
    neardup_dropped: int
    kept_from_parent: int
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Assembled:
    tables: dict[str, pa.Table]
    splits: dict[str, int]
    classes: dict[str, dict[str, int]]
    neardup_dropped: int
    kept_from_parent: int
    stats: dict[str, Any] = field(default_factory=dict)


def _col(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy(zero_copy_only=False)


def _codes(values: Any, value_set: pa.Array) -> np.ndarray:
    """Position of each value in value_set, -1 where absent (or null)."""
    return pc.fill_null(pc.index_in(values, value_set=value_set), -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _mask(expr: Any) -> np.ndarray:
    return pc.fill_null(expr, False).to_numpy(zero_copy_only=False).astype(bool)


def plan_release(
    synsets: pa.Table,
    images: pa.Table,
    labels: pa.Table,
    policy: SplitPolicy,
    parent_splits: pd.DataFrame | None = None,
    *,
    neardup: bool = True,
    cross_duplicates: CrossDuplicates | None = None,
) -> Plan:
    """Decide the release: accepted labels of accepted images, one primary class per image, splits."""
    stats: dict[str, Any] = {"input_labels": labels.num_rows, "input_images": images.num_rows}
    ok_rows = np.nonzero(_mask(pc.and_(pc.equal(images["status"], "accepted"), pc.is_valid(images["image_id"]))))[0]
    ok_ids = images["image_id"].take(ok_rows)
    image_ids = pc.unique(ok_ids)  # an Array, in first-appearance order
    # several URLs can resolve to one stored image: publish its first row
    _, first = np.unique(_codes(ok_ids, image_ids), return_index=True)
    image_row = ok_rows[first]
    del ok_ids
    wnids = pa.array(sorted(synsets["wnid"].to_pylist()), pa.string())
    n_cls = len(wnids)
    status = pc.value_counts(labels["status"]).to_pylist()
    stats["label_status"] = {d["values"]: int(d["counts"]) for d in sorted(status, key=lambda d: d["values"])}

    acc_rows = np.nonzero(_mask(pc.equal(labels["status"], "accepted")))[0]
    lab_img = _codes(labels["image_id"], image_ids)[acc_rows]  # index_in on the whole column: no string copy
    lab_cls = _codes(labels["wnid"], wnids)[acc_rows]
    stats["labels_without_image"] = int((lab_img < 0).sum())
    stats["labels_outside_vocabulary"] = int(((lab_img >= 0) & (lab_cls < 0)).sum())
    keep = (lab_img >= 0) & (lab_cls >= 0)
    rows, lab_img, lab_cls = acc_rows[keep], lab_img[keep], lab_cls[keep]
    conf = _col(labels, "confidence")[rows]

    # the primary class of an image: highest confidence, then smallest wnid; only multi-label images are sorted
    multi = np.bincount(lab_img, minlength=len(image_ids))[lab_img] > 1
    is_primary = ~multi
    m = np.nonzero(multi)[0]
    if len(m):
        order = m[np.lexsort((lab_cls[m], -conf[m], lab_img[m]))]
        is_primary[order[np.r_[True, lab_img[order][1:] != lab_img[order][:-1]]]] = True
    prim = np.nonzero(is_primary)[0]
    prim_img, prim_cls = lab_img[prim], lab_cls[prim]
    keys = split_keys(image_ids.take(pa.array(prim_img)), policy.salt)

    parent_codes = np.full(len(prim), -1, dtype=np.int8)
    if parent_splits is not None and len(parent_splits):
        by_code = np.full(len(image_ids), -1, dtype=np.int8)
        pc_img = _codes(pa.array(parent_splits.image_id, pa.string()), image_ids)
        psplit = parent_splits.split.map({s: k for k, s in enumerate(SPLITS)}).to_numpy()
        if pd.isna(psplit).any():
            raise ValueError(f"parent release has unknown split values; expected {SPLITS}")
        by_code[pc_img[pc_img >= 0]] = psplit[pc_img >= 0].astype(np.int8)
        parent_codes = by_code[prim_img]
    split = split_codes(prim_cls, keys, parent_codes, val_per_class=policy.val_per_class,
                        test_per_class=policy.test_per_class)

    kept = np.ones(len(prim), dtype=bool)
    if neardup:
        wide = [c for c in ("storage_key", "first_url") if c in images.column_names]
        slim = images.drop_columns(wide)
        train, held = split == TRAIN, split != TRAIN
        dropped_ids = train_near_duplicates_rows(slim, image_row[prim_img[train]], image_row[prim_img[held]],
                                                 cross_duplicates)
        if dropped_ids:
            dropped = _codes(pa.array(sorted(dropped_ids), pa.string()), image_ids)
            kept[np.isin(prim_img, dropped[dropped >= 0])] = False
    n_dropped = int((~kept).sum())

    split_by_code = np.full(len(image_ids), -1, dtype=np.int8)
    split_by_code[prim_img[kept]] = split[kept]
    key_by_code = np.zeros(len(image_ids), dtype=np.uint64)
    key_by_code[prim_img] = keys
    lab_split = split_by_code[lab_img]
    sel = np.nonzero(lab_split >= 0)[0]
    # output order: class, then salted key (independent of input row order; equal keys keep input order)
    sel = sel[class_then_key_order(lab_cls[sel], key_by_code[lab_img[sel]])]
    out = labels.take(pa.array(rows[sel])).select(["image_id", "wnid", "confidence", "n_votes", "n_yes", "method"])
    out = out.append_column("split", pa.array(np.asarray(SPLITS, dtype=object)[lab_split[sel]], pa.string()))
    out = out.append_column("is_primary", pa.array(is_primary[sel]))
    out_labels = validate("release_labels", out)

    pk = np.nonzero(kept)[0]
    counts = np.zeros((max(n_cls, 1), 3), dtype=np.int64)
    np.add.at(counts, (prim_cls[kept], split[kept].astype(np.int64)), 1)
    return Plan(
        image_rows=np.sort(image_row[prim_img[pk]]),  # input order: a sequential take is much cheaper
        labels=out_labels,
        image_ids=image_ids,
        wnids=wnids,
        image_keys=key_by_code,
        released_pairs=np.unique(lab_img[sel] * n_cls + lab_cls[sel]),
        split_counts=counts,
        splits={s: int(counts[:, k].sum()) for k, s in enumerate(SPLITS)},
        neardup_dropped=n_dropped,
        kept_from_parent=int(((parent_codes >= 0) & kept).sum()),
        stats=stats,
    )


def select_boxes(boxes: pa.Table, plan: Plan) -> tuple[pa.Table, int]:
    """Accepted boxes of released (image, wnid) pairs, in (class, image key) order; plus how many input
    boxes were not accepted."""
    accepted = _mask(pc.equal(boxes["verified"], "accepted"))
    b_img = _codes(boxes["image_id"], plan.image_ids)
    b_cls = _codes(boxes["wnid"], plan.wnids)
    pair = np.where((b_img >= 0) & (b_cls >= 0), b_img * len(plan.wnids) + b_cls, -1)
    rows = np.nonzero(accepted & np.isin(pair, plan.released_pairs))[0]
    rows = rows[class_then_key_order(b_cls[rows], plan.image_keys[b_img[rows]])]
    return boxes.take(pa.array(rows)), int((~accepted).sum())


def sorted_synsets(synsets: pa.Table) -> pa.Table:
    return synsets.take(pc.sort_indices(synsets, [("wnid", "ascending")]))


def class_counts(plan: Plan, boxes: pa.Table) -> dict[str, dict[str, int]]:
    box_cls = _codes(boxes["wnid"], plan.wnids)
    per_box = np.bincount(box_cls[box_cls >= 0], minlength=len(plan.wnids))
    return {w: {"train": int(plan.split_counts[k, 0]), "val": int(plan.split_counts[k, 1]),
                "test": int(plan.split_counts[k, 2]), "boxes": int(per_box[k])}
            for k, w in enumerate(plan.wnids.to_pylist())}


def assemble(
    inputs: Inputs,
    policy: SplitPolicy,
    parent_splits: pd.DataFrame | None = None,
    *,
    neardup: bool = True,
    cross_duplicates: CrossDuplicates | None = None,
) -> Assembled:
    """The release tables from in-memory input tables (the pure core; build_release stages the same steps
    so that only about one big table is in memory at a time)."""
    plan = plan_release(inputs.synsets, inputs.images, inputs.labels, policy, parent_splits, neardup=neardup,
                        cross_duplicates=cross_duplicates)
    boxes, not_accepted = select_boxes(inputs.boxes, plan)
    return Assembled(
        tables={"synsets": sorted_synsets(inputs.synsets), "images": inputs.images.take(pa.array(plan.image_rows)),
                "labels": plan.labels, "boxes": boxes},
        splits=plan.splits, classes=class_counts(plan, boxes),
        neardup_dropped=plan.neardup_dropped, kept_from_parent=plan.kept_from_parent,
        stats={**plan.stats, "boxes_not_accepted": not_accepted},
    )


def code_version() -> str:
    """Package version plus the git commit of the working tree, read from .git without running git."""
    from pipeline import __version__

    root = Path(__file__).resolve().parents[2] / ".git"
    commit = ""
    try:
        head = (root / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            ref_file = root / ref
            if ref_file.exists():
                commit = ref_file.read_text().strip()
            elif (root / "packed-refs").exists():
                for line in (root / "packed-refs").read_text().splitlines():
                    if line.endswith(" " + ref):
                        commit = line.split()[0]
        else:
            commit = head
    except OSError:
        pass
    return f"synsetforge {__version__}" + (f"+g{commit[:12]}" if commit else "")


ROW_GROUP = 1 << 20  # pyarrow's default row group size


def _parquet_bytes(table: pa.Table, rows: np.ndarray | None = None) -> tuple[pa.Buffer, int]:
    """Parquet (zstd) of `table`, or of its `rows` in that order, taken one row group at a time so the
    selected copy never exists in full."""
    sink = pa.BufferOutputStream()
    schema = table.schema
    if rows is None:
        pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP)
        return sink.getvalue(), table.num_rows
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        _write_rows(writer, table, rows)
    return sink.getvalue(), len(rows)


def _write_rows(writer: pq.ParquetWriter, table: pa.Table, rows: np.ndarray) -> None:
    """Write `table` rows `rows` (ascending) one row group at a time: long runs of consecutive rows are
    zero-copy slices, scattered rows are taken."""
    if not len(rows):
        writer.write_table(table.schema.empty_table())
        return
    breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
    starts, ends = np.r_[0, breaks], np.r_[breaks, len(rows)]
    if len(rows) / len(starts) < 64:  # short runs: a gather per row group is cheaper than many slices
        for start in range(0, len(rows), ROW_GROUP):
            writer.write_table(table.take(pa.array(rows[start:start + ROW_GROUP])), row_group_size=ROW_GROUP)
        return
    pieces: list[pa.Table] = []
    n = 0
    for a, b in zip(starts, ends, strict=True):
        pieces.append(table.slice(int(rows[a]), int(b - a)))
        n += int(b - a)
        if n >= ROW_GROUP:
            writer.write_table(pa.concat_tables(pieces), row_group_size=ROW_GROUP)
            pieces, n = [], 0
    if pieces:
        writer.write_table(pa.concat_tables(pieces), row_group_size=ROW_GROUP)


def _put_data_file(store: Store, prefix: str, name: str, table: pa.Table, rows: np.ndarray | None = None
                   ) -> dict[str, Any]:
    """Write one table as content-addressed Parquet under the release prefix; return its manifest entry."""
    table = validate(RELEASE_TABLES[name], table)
    facts = {"schema": RELEASE_TABLES[name], "schema_version": schema_version(RELEASE_TABLES[name])}
    if isinstance(store, LocalStore):
        return {**_put_local_file(store, prefix, name, table, rows), **facts}
    buf, n_rows = _parquet_bytes(table, rows)
    digest = hashlib.sha256(memoryview(buf)).hexdigest()
    rel = f"data/{name}-{digest[:16]}.parquet"
    key = f"{prefix}/{rel}"
    if not store.exists(key):  # same name = same content: a resumed build skips it
        try:
            store.put(key, buf.to_pybytes(), exclusive=True)
        except KeyExists:
            pass  # a concurrent builder wrote the same content
    return {"key": rel, "sha256": digest, "n_bytes": buf.size, "rows": n_rows, **facts}


def _put_local_file(store: LocalStore, prefix: str, name: str, table: pa.Table, rows: np.ndarray | None
                    ) -> dict[str, Any]:
    """Local backend: stream the Parquet into a hidden temp file, hash it, then link it to its content name
    (the same atomic, exclusive create LocalStore.put does, without holding the file in memory)."""
    folder = store.path(f"{prefix}/data/x").parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".parquet")
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, table.schema, compression="zstd") as writer:
            if rows is None:
                writer.write_table(table, row_group_size=ROW_GROUP)
            else:
                _write_rows(writer, table, rows)
        n_rows = table.num_rows if rows is None else len(rows)
        h = hashlib.sha256()
        with open(tmp, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
            os.fsync(fh.fileno())
        digest = h.hexdigest()
        rel = f"data/{name}-{digest[:16]}.parquet"
        n_bytes = os.path.getsize(tmp)
        try:
            os.link(tmp, store.path(f"{prefix}/{rel}"))
        except FileExistsError:
            pass  # same name = same content (a resumed or concurrent build)
    finally:
        os.unlink(tmp)
    return {"key": rel, "sha256": digest, "n_bytes": n_bytes, "rows": n_rows}


def _read_input(store: Store, name: str, columns: list[str] | None = None) -> pa.Table:
    """An input table, validated; with `columns` only those (row positions are the same as in the full table)."""
    if isinstance(store, LocalStore) and store.exists(f"tables/{name}.parquet"):
        path = store.path(f"tables/{name}.parquet")
        if columns is not None:
            return pq.read_table(path, columns=columns)
        return validate(name, pq.read_table(path, memory_map=True))
    table = store.read_table(name)
    return table.select(columns) if columns is not None else table


def read_inputs(store: Store) -> Inputs:
    return Inputs(**{name: store.read_table(name) for name in ("synsets", "images", "labels", "boxes")})


def parent_splits(store: Store, parent: str) -> pd.DataFrame:
    labels = read_release_table(store, parent, "labels")
    primary = labels.filter(labels["is_primary"]).select(["image_id", "split"])
    return pd.DataFrame({"image_id": _col(primary, "image_id"), "split": _col(primary, "split")})


def build_release(
    store: Store,
    version: str,
    *,
    parent: str | None = None,
    val_per_class: int = 50,
    test_per_class: int = 100,
    salt: str = "synsetforge",
    config_digest: str | None = None,
    created_at: datetime | None = None,
    neardup: bool = True,
    cross_duplicates: CrossDuplicates | None = None,
    inputs: Inputs | None = None,
) -> dict[str, Any]:
    """Build release `version` from the store's tables and publish it; return its manifest.

    Raises ReleaseExists if the version is already published (nothing is written then).
    """
    prefix = release_prefix(version)
    if release_exists(store, version):
        raise ReleaseExists(f"release {version!r} already exists in {store.url}; releases are immutable, "
                            "choose a new version (and pass --parent to keep splits stable)")
    if parent is not None:
        if parent == version:
            raise ReleaseError(f"release {version!r} cannot be its own parent")
        read_manifest(store, parent)  # clear error when the parent does not exist
    policy = SplitPolicy(val_per_class, test_per_class, salt)
    parent_df = parent_splits(store, parent) if parent else None
    files: dict[str, Any] = {}
    if inputs is not None:
        a = assemble(inputs, policy, parent_df, neardup=neardup, cross_duplicates=cross_duplicates)
        for name in ("synsets", "images", "labels", "boxes"):
            files[name] = _put_data_file(store, prefix, name, a.tables.pop(name))
        splits, classes, dropped, kept, stats = a.splits, a.classes, a.neardup_dropped, a.kept_from_parent, a.stats
    else:
        # staged: each big table is read, filtered, written and released before the next one is read
        synsets = sorted_synsets(_read_input(store, "synsets"))
        # deciding needs only a few image columns (ids, status, fingerprints for the near-duplicate search);
        # the full table is read afterwards, when labels and their temporaries are gone
        wide = {"storage_key", "first_url", "format", "reject_reason", "width", "height", "n_bytes"}
        cols = [c for c in arrow_schema("images").names if c not in wide] if neardup else ["image_id", "status"]
        plan = plan_release(synsets, _read_input(store, "images", cols), _read_input(store, "labels"), policy,
                            parent_df, neardup=neardup, cross_duplicates=cross_duplicates)
        files["labels"] = _put_data_file(store, prefix, "labels", plan.labels)
        plan.labels = None
        boxes, not_accepted = select_boxes(_read_input(store, "boxes"), plan)
        files["boxes"] = _put_data_file(store, prefix, "boxes", boxes)
        classes = class_counts(plan, boxes)
        del boxes
        plan.image_ids = plan.image_keys = plan.released_pairs = None  # only image_rows is needed from here
        images = _read_input(store, "images")
        files["images"] = _put_data_file(store, prefix, "images", images, rows=plan.image_rows)
        del images
        files["synsets"] = _put_data_file(store, prefix, "synsets", synsets)
        files = {k: files[k] for k in ("synsets", "images", "labels", "boxes")}
        splits, dropped, kept = plan.splits, plan.neardup_dropped, plan.kept_from_parent
        stats = {**plan.stats, "boxes_not_accepted": not_accepted}
    created = (created_at or datetime.now(UTC)).astimezone(UTC)
    manifest = {
        "manifest_version": 1,
        "version": version,
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "parent": parent,
        "code_version": code_version(),
        "config_digest": config_digest or hashlib.sha256(json.dumps(policy.__dict__, sort_keys=True).encode()).hexdigest(),
        "files": files,
        "splits": splits,
        "classes": classes,
        "neardup_dropped": dropped,
        "split_policy": {**policy.__dict__, "kept_from_parent": kept},
        "stats": {**stats, "neardup_checked": neardup},
    }
    validate_manifest(manifest)
    try:
        store.put(manifest_key(version), json.dumps(manifest, indent=1, sort_keys=True).encode(), exclusive=True)
    except KeyExists:
        raise ReleaseExists(f"release {version!r} was published by another build while this one ran; "
                            "nothing was overwritten") from None
    return manifest
