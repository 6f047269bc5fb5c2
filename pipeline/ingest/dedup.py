"""De-duplication on tables (pure functions): exact (sha256 image_id) and near, within and across synsets.

Inputs are rows of the images table (image_id + fingerprint columns) and candidate links, a frame with columns
``image_id`` and ``wnid`` (one row per (image, synset) the image was found for).

>>> import pandas as pd
>>> links = pd.DataFrame({"image_id": ["a", "a", "b"], "wnid": ["n1", "n2", "n1"]})
>>> multi_synset_images(links).to_dict("records")
[{'image_id': 'a', 'wnids': ['n1', 'n2'], 'n_synsets': 2}]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.ingest.neardup import DEFAULT_MAX_THUMB_DIST, DEFAULT_RADIUS, near_duplicate_pairs


def _df(data: Any, what: str, need: list[str]) -> pd.DataFrame:
    if isinstance(data, pa.Table):
        data = data.to_pandas()
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"{what}: expected a pandas DataFrame or Arrow Table, got {type(data)}")
    missing = [c for c in need if c not in data.columns]
    if missing:
        raise ValueError(f"{what}: missing columns {missing}; pass rows of the images table / candidate links")
    return data


def exact_duplicates(images: Any) -> pd.DataFrame:
    """Accepted rows whose bytes (sha256 image_id) were already stored from another URL.

    Returns DataFrame[first_url, image_id, canonical_url]; the canonical URL is the smallest first_url of the
    group, so the answer does not depend on download order.
    """
    df = _df(images, "images", ["image_id", "first_url"])
    df = df[df["image_id"].notna()]
    canon = df.groupby("image_id")["first_url"].transform("min")
    out = df.assign(canonical_url=canon)
    out = out[out["first_url"] != out["canonical_url"]]
    return out[["first_url", "image_id", "canonical_url"]].sort_values("first_url").reset_index(drop=True)


def groups_from_pairs(image_ids: Any, pairs: Any) -> pd.DataFrame:
    """Connected components of `pairs` (columns image_id_a / image_id_b, or image_id / other_image_id) over the
    images `image_ids`: DataFrame[image_id, group_id], group_id = the smallest image_id of the component; an image
    in no pair is its own group. Pairs naming an image outside `image_ids` add it.

    >>> groups_from_pairs(["c", "a", "b", "d"], pd.DataFrame({"image_id_a": ["b", "c"], "image_id_b": ["c", "d"]})
    ...                   ).values.tolist()
    [['a', 'a'], ['b', 'b'], ['c', 'b'], ['d', 'b']]
    """
    if isinstance(pairs, pa.Table):
        pairs = pairs.to_pandas()
    cols = ["image_id_a", "image_id_b"] if "image_id_a" in pairs.columns else ["image_id", "other_image_id"]
    a = pairs[cols[0]].to_numpy(dtype=object)
    b = pairs[cols[1]].to_numpy(dtype=object)
    given = pd.Series(image_ids, dtype=object).dropna().to_numpy(dtype=object)
    ids = np.unique(np.concatenate([given, a, b])) if len(a) else np.unique(given)
    if not len(ids):
        return pd.DataFrame({"image_id": pd.Series(dtype=object), "group_id": pd.Series(dtype=object)})
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ia, ib = np.searchsorted(ids, a), np.searchsorted(ids, b)
    graph = coo_matrix((np.ones(len(ia), dtype=np.int8), (ia, ib)), shape=(len(ids), len(ids)))
    _, label = connected_components(graph, directed=False)
    # ids are sorted, so a component's first position is its smallest id
    first = np.full(label.max() + 1 if len(label) else 0, len(ids), dtype=np.int64)
    np.minimum.at(first, label, np.arange(len(ids)))
    return pd.DataFrame({"image_id": ids, "group_id": ids[first[label]]})


def near_duplicate_groups(images: Any, radius: int = DEFAULT_RADIUS,
                          max_thumb_dist: float = DEFAULT_MAX_THUMB_DIST) -> pd.DataFrame:
    """Connected components of verified near-duplicate pairs: DataFrame[image_id, group_id].

    group_id is the smallest image_id of the component; images without a near-duplicate are their own group.
    """
    df = _df(images, "images", ["image_id"])
    return groups_from_pairs(df["image_id"].dropna().unique(), near_duplicate_pairs(df, radius, max_thumb_dist))


def dedup_within_synset(links: Any, images: Any, radius: int = DEFAULT_RADIUS,
                        max_thumb_dist: float = DEFAULT_MAX_THUMB_DIST, *, groups: pd.DataFrame | None = None
                        ) -> pd.DataFrame:
    """Per synset, near-duplicate images after the first of their group: DataFrame[wnid, image_id, duplicate_of].

    Keep the group's smallest image_id in that synset; the rows returned are the ones to mark as duplicates.
    `groups`: near_duplicate_groups(images) when the caller already has it (the search is the costly part).
    """
    lk = _df(links, "links", ["image_id", "wnid"])[["image_id", "wnid"]].drop_duplicates()
    if groups is None:
        groups = near_duplicate_groups(images, radius, max_thumb_dist)
    m = lk.merge(groups, on="image_id", how="left")
    m["group_id"] = m["group_id"].fillna(m["image_id"])
    m = m.sort_values(["wnid", "group_id", "image_id"])
    m["duplicate_of"] = m.groupby(["wnid", "group_id"])["image_id"].transform("first")
    out = m[m["image_id"] != m["duplicate_of"]]
    return out[["wnid", "image_id", "duplicate_of"]].reset_index(drop=True)


def multi_synset_images(links: Any, images: Any | None = None, radius: int = DEFAULT_RADIUS,
                        max_thumb_dist: float = DEFAULT_MAX_THUMB_DIST, *, groups: pd.DataFrame | None = None
                        ) -> pd.DataFrame:
    """Images that are candidates for several synsets: DataFrame[image_id, wnids, n_synsets].

    With `images`, near-duplicates count as the same image (a resized copy found for another synset is flagged
    too): every member of a group is listed with the union of the group's synsets. `groups` as in
    dedup_within_synset.
    """
    lk = _df(links, "links", ["image_id", "wnid"])[["image_id", "wnid"]].drop_duplicates()
    if groups is None and images is not None:
        groups = near_duplicate_groups(images, radius, max_thumb_dist)
    if groups is not None:
        lk = lk.merge(groups, on="image_id", how="left")
        lk["group_id"] = lk["group_id"].fillna(lk["image_id"])
    else:
        lk = lk.assign(group_id=lk["image_id"])
    wn = lk.groupby("group_id")["wnid"].agg(lambda s: sorted(set(s))).rename("wnids")
    out = lk[["image_id", "group_id"]].drop_duplicates().merge(wn, left_on="group_id", right_index=True)
    out["n_synsets"] = out["wnids"].map(len)
    out = out[out["n_synsets"] > 1]
    return out[["image_id", "wnids", "n_synsets"]].sort_values("image_id").reset_index(drop=True)
