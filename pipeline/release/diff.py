"""What changed between two releases, per class: images added, removed, relabelled; boxes added, removed, changed.

An image is "relabelled" when it is in both releases with a different primary class; it counts as
relabelled_in for its new class and relabelled_out for its old one. A box is matched by box_id; the
same id with other coordinates or another class is "changed".

    >>> import pandas as pd
    >>> a = pd.DataFrame({"image_id": ["i1", "i2"], "wnid": ["n1", "n1"]})
    >>> b = pd.DataFrame({"image_id": ["i2", "i3"], "wnid": ["n2", "n1"]})
    >>> d = diff_labels(a, b)
    >>> d.loc["n1", ["added", "removed", "relabelled_out"]].tolist(), int(d.loc["n2", "relabelled_in"])
    ([1, 1, 1], 1)
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from pipeline.release.manifest import read_manifest, read_release_table
from pipeline.store import Store

COLUMNS = ["added", "removed", "relabelled_in", "relabelled_out", "split_changed",
           "boxes_added", "boxes_removed", "boxes_changed"]
BOX_COORDS = ["x_min", "y_min", "x_max", "y_max"]


def diff_labels(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Per-class image changes between primary labels `a` and `b` (columns image_id, wnid[, split])."""
    m = a.merge(b, on="image_id", how="outer", suffixes=("_a", "_b"), indicator=True)
    parts = {
        "added": m[m._merge == "right_only"].groupby("wnid_b").size(),
        "removed": m[m._merge == "left_only"].groupby("wnid_a").size(),
    }
    both = m[m._merge == "both"]
    moved = both[both.wnid_a != both.wnid_b]
    parts["relabelled_in"] = moved.groupby("wnid_b").size()
    parts["relabelled_out"] = moved.groupby("wnid_a").size()
    if "split_a" in both and "split_b" in both:
        parts["split_changed"] = both[both.split_a != both.split_b].groupby("wnid_b").size()
    out = pd.DataFrame(parts).fillna(0).astype(int)
    out.index.name = "wnid"
    return out


def diff_boxes(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Per-class box changes, boxes matched by box_id."""
    m = a.merge(b, on="box_id", how="outer", suffixes=("_a", "_b"), indicator=True)
    both = m[m._merge == "both"]
    changed = both[(both.wnid_a != both.wnid_b) |
                   (sum((both[f"{c}_a"] - both[f"{c}_b"]).abs() for c in BOX_COORDS) > 1e-9)]
    out = pd.DataFrame({
        "boxes_added": m[m._merge == "right_only"].groupby("wnid_b").size(),
        "boxes_removed": m[m._merge == "left_only"].groupby("wnid_a").size(),
        "boxes_changed": changed.groupby("wnid_b").size(),
    }).fillna(0).astype(int)
    out.index.name = "wnid"
    return out


def _frame(table: pa.Table, columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: table.column(c).to_numpy(zero_copy_only=False) for c in columns})


def diff_releases(store: Store, a: str, b: str) -> pd.DataFrame:
    """Per-class changes from release `a` to release `b`, with a final row "TOTAL"."""
    ma, mb = read_manifest(store, a), read_manifest(store, b)
    la, lb = (read_release_table(store, v, "labels", manifest=m) for v, m in ((a, ma), (b, mb)))
    la, lb = (t.filter(t["is_primary"]) for t in (la, lb))
    labels = diff_labels(_frame(la, ["image_id", "wnid", "split"]), _frame(lb, ["image_id", "wnid", "split"]))
    ba, bb = (read_release_table(store, v, "boxes", manifest=m) for v, m in ((a, ma), (b, mb)))
    cols = ["box_id", "wnid", *BOX_COORDS]
    boxes = diff_boxes(_frame(ba, cols), _frame(bb, cols))
    out = labels.join(boxes, how="outer").reindex(columns=COLUMNS).fillna(0).astype(int)
    out = out[(out != 0).any(axis=1)].sort_index()
    out.loc["TOTAL"] = out.sum()
    return out
