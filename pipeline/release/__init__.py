"""Versioned releases: plan, build (splits, manifest last), verify, diff, export (ILSVRC devkit, Parquet), publish,
report.html and the dataset card.

Modules: splits (pure: quotas as counts or fractions, salted ranking, parent stability, near-duplicate leakage),
build (assemble + immutable publish, the train/val check, plan_from_store), attribution (per-image credits, local
paths made portable), manifest (find, read, verify), diff, export (devkit with ATTRIBUTION files, Parquet,
publish), facts (what report and card show), plots (matplotlib), report and card, synthetic (fixture tables with
real image blobs), cli (`synsetforge release ...`).
"""
