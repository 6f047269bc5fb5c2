"""Versioned releases: build (splits, manifest last), verify, diff, export (ILSVRC devkit, Parquet), publish,
report.html and the dataset card.

Modules: splits (pure: quotas, salted ranking, parent stability, near-duplicate leakage), build (assemble +
immutable publish), manifest (find, read, verify), diff, export (devkit, Parquet, publish), report and card,
synthetic (fixture tables with real image blobs), cli (`synsetforge release ...`).
"""
