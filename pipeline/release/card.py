"""Dataset card (Markdown) for a release: provenance, licenses, splits, and known limitations.

Limitations are partly computed (classes short of their val/test quota, classes whose estimated
precision is low, share of images with boxes, a skipped near-duplicate check) and partly standing facts
about how ImageNet-style data is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from pipeline.release.report import ReportData

LOW_PRECISION = 0.95


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def limitations(d: ReportData) -> list[str]:
    m, c = d.manifest, d.classes
    pol = m["split_policy"]
    out = []
    short = c[(c.val < pol["val_per_class"]) | (c.test < pol["test_per_class"])]
    if len(short):
        out.append(f"{len(short)} of {len(c)} classes have fewer val/test images than the quota "
                   f"({pol['val_per_class']}/{pol['test_per_class']}): " + ", ".join(short.wnid.head(10))
                   + (" ..." if len(short) > 10 else "") + ".")
    empty = c[c.images == 0]
    if len(empty):
        out.append(f"{len(empty)} classes have no images at all.")
    low = c[c.precision < LOW_PRECISION]
    if len(low):
        out.append(f"{len(low)} classes have an estimated precision below {LOW_PRECISION:.0%}.")
    n_img = sum(m["splits"].values())
    boxed = c.boxes.sum()
    out.append(f"Boxes: {boxed} accepted boxes; not every image is boxed, so localization is scored on the "
               "boxed subset only.")
    if not m.get("stats", {}).get("neardup_checked"):
        out.append("The train/val near-duplicate check was SKIPPED for this release.")
    out += [
        f"Labels come from crowd votes aggregated per image ({n_img} images); estimated precision is the mean "
        "posterior, not a re-annotation. ImageNet reported 99.7 % precision over 80 synsets.",
        "Candidates come from web search and similar sources; they inherit those sources' biases (what is "
        "photographed, by whom, where) and the vocabulary inherits WordNet's, including problematic synsets in "
        "the person subtree (Yang et al., FAT* 2020). Review the vocabulary before publishing.",
        "Images are single-label for classification (the most confident accepted class); images that show "
        "several classes carry extra rows in the labels table with is_primary = false.",
        "Licenses are those the source reported for the candidate URL; they were not verified by hand.",
    ]
    return out


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
        f"- Splits: per class {m['split_policy']['val_per_class']} val and {m['split_policy']['test_per_class']} "
        f"test images chosen by sha256(salt, image_id), salt `{m['split_policy']['salt']}`; "
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
    if d.sources is not None:
        lines += [_md_table(d.sources), "", _md_table(d.licenses), ""]
    else:
        lines += ["No candidates table in the store: sources and licenses unknown.", ""]
    lines += ["## Known limitations", *[f"- {x}" for x in limitations(d)], "",
              "## Citation", "Deng et al., ImageNet: A Large-Scale Hierarchical Image Database, CVPR 2009; "
              "Russakovsky et al., ImageNet Large Scale Visual Recognition Challenge, IJCV 2015.", ""]
    return "\n".join(lines)
