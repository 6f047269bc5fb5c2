"""Dataset card (Markdown) for a release: provenance, licenses, splits, and known limitations.

Limitations are partly computed (classes short of their val/test quota or without train or val images,
classes whose estimated precision is low, share of images with boxes, a skipped near-duplicate check,
images without a known license) and partly standing facts about how ImageNet-style data is made. Classes
are named by wnid and synset name. Reads only `pipeline.release.facts` (the report's renderer is not needed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline.release.facts import ReportData

LOW_PRECISION = 0.95


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _quota(q: Any, sizes: pd.Series) -> np.ndarray:
    """Per-class count a quota asked for (a fraction of each class's images, rounded half up, or a count)."""
    if isinstance(q, float) and 0 < q < 1:
        return np.floor(sizes.to_numpy(dtype=float) * q + 0.5 + 1e-9).astype(int)
    return np.full(len(sizes), int(q))


def _names(d: ReportData, wnids: pd.Series, limit: int = 10) -> str:
    listed = [d.class_label(w) for w in wnids.head(limit)]
    return ", ".join(listed) + (" ..." if len(wnids) > limit else "")


def limitations(d: ReportData) -> list[str]:
    m, c = d.manifest, d.classes
    pol = m["split_policy"]
    stats = m.get("stats", {})
    out = []
    val_q, test_q = _quota(pol["val_per_class"], c.images), _quota(pol["test_per_class"], c.images)
    short = c[(c.val.to_numpy() < val_q) | (c.test.to_numpy() < test_q)]
    if len(short):
        out.append(f"{len(short)} of {len(c)} classes have fewer val/test images than the quota "
                   f"({pol['val_per_class']}/{pol['test_per_class']} per class): {_names(d, short.wnid)}.")
    empty = c[c.images == 0]
    if len(empty):
        out.append(f"{len(empty)} classes have no images at all: {_names(d, empty.wnid)}.")
    no_split = c[(c.images > 0) & ((c.train == 0) | (c.val == 0))]
    if len(no_split):
        out.append(f"{len(no_split)} classes have no train or no val image (built with --force): "
                   f"{_names(d, no_split.wnid)}.")
    low = c[c.precision < LOW_PRECISION]
    if len(low):
        out.append(f"{len(low)} classes have an estimated precision below {LOW_PRECISION:.0%}: {_names(d, low.wnid)}.")
    n_img = sum(m["splits"].values())
    boxed = c.boxes.sum()
    if not d.has_boxes_table:
        out.append("No boxes: a classification-only release (the store had no boxes table); localization and "
                   "detection cannot be scored on it.")
    else:
        out.append(f"Boxes: {boxed} accepted boxes; not every image is boxed, so localization is scored on the "
                   "boxed subset only.")
    if d.attribution and d.attribution["images"]:
        a = d.attribution
        unknown = a["images"] - a["with_license"]
        if unknown:
            out.append(f"{unknown} of {a['images']} images have no license recorded; do not redistribute them "
                       "before their license is known.")
        if not stats.get("candidates_table", True):
            out.append("The store had no candidates table when this release was built: images carry no attribution.")
    if not stats.get("neardup_checked"):
        out.append("The train/val near-duplicate check was SKIPPED for this release.")
    out += [
        f"Labels come from crowd votes aggregated per image ({n_img} images); estimated precision is the mean "
        "posterior, not a re-annotation. ImageNet reported 99.7 % precision over 80 synsets.",
        "Candidates come from web search and similar sources; they inherit those sources' biases (what is "
        "photographed, by whom, where) and the vocabulary inherits WordNet's, including problematic synsets in "
        "the person subtree (Yang et al., FAT* 2020). Review the vocabulary before publishing.",
        "Images are single-label for classification (the most confident accepted class); images that show "
        "several classes carry extra rows in the labels table with is_primary = false.",
        "Licenses, creators and titles are those the source reported for each image's first URL (an image found "
        "at several URLs is credited as its first URL's record); they were not verified by hand.",
    ]
    return out


def _quota_words(q: Any) -> str:
    return f"{q:.0%} of the class's images" if isinstance(q, float) and 0 < q < 1 else str(q)


def render_card(d: ReportData) -> str:
    m = d.manifest
    c = d.classes
    lines = [
        f"# Dataset card: synsetforge release {m['version']}",
        "",
        "## Provenance",
        f"- Created {m['created_at']} by {m['code_version']}; configuration digest `{m['config_digest']}`.",
        f"- Parent release: {m['parent'] or 'none (first release)'}; "
        f"{m['split_policy'].get('kept_from_parent', 0)} images kept their split from it.",
        "- Pipeline: WordNet synsets -> candidate images from search sources -> crowd verification "
        "(Label Studio) -> QC'd labels -> boxes (draw / quality / coverage micro-tasks) -> this release.",
        f"- Labels: crowd votes aggregated by {', '.join(m.get('qc_methods', [])) or 'an unrecorded QC method'}.",
        f"- Splits: per class {_quota_words(m['split_policy']['val_per_class'])} val and "
        f"{_quota_words(m['split_policy']['test_per_class'])} test images chosen by a salted hash of the image id, "
        f"salt `{m['split_policy']['salt']}`; "
        f"{m['neardup_dropped']} train images dropped as near-duplicates of val/test images.",
        "- Files (Parquet, sha256 in manifest.json): " + ", ".join(
            f"{k} ({v['rows']} rows, schema v{v['schema_version']})" for k, v in sorted(m["files"].items())) + ".",
        "",
        "## Contents",
        _md_table(pd.DataFrame([(k, v) for k, v in m["splits"].items()], columns=["split", "images"])),
        "",
        f"{len(c)} classes, {int(c.images.sum())} images, {int(c.boxes.sum())} boxes. "
        f"Estimated precision (mean over classes): {c.precision.mean():.4f}.",
        "",
        "## Sources and licenses",
    ]
    if d.sources is not None and d.licenses is not None:
        lines += ["Per image in the images table (source, page_url, title, creator, license, license_url) and in "
                  "the devkit export's ATTRIBUTION.csv / ATTRIBUTION.txt.", "",
                  _md_table(d.sources), "", _md_table(d.licenses), ""]
    else:
        lines += ["No candidates table in the store: sources and licenses unknown.", ""]
    lines += ["## Known limitations", *[f"- {x}" for x in limitations(d)], "",
              "## Citation", "Deng et al., ImageNet: A Large-Scale Hierarchical Image Database, CVPR 2009; "
              "Russakovsky et al., ImageNet Large Scale Visual Recognition Challenge, IJCV 2015.", ""]
    return "\n".join(lines)
