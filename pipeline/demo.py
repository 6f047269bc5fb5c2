"""`make demo`: run the pipeline end to end on the embedded, offline default and say where the outputs are.

Everything happens under ./demo-output (a local store), with WordNet from the project's .nltk_data.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from pipeline.config import load_settings
from pipeline.store import open_store
from pipeline.vocabulary import run_vocabulary

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-output"
# A small ILSVRC-like vocabulary: leaf classes under "domestic cat" and a few other leaves.
DEMO_ROOTS = ["n02121808"]  # domestic_cat.n.01


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def main() -> int:
    t0 = time.perf_counter()
    if OUT.exists():
        shutil.rmtree(OUT)
    store_dir = OUT / "store"
    settings = load_settings(overrides={"store": {"url": str(store_dir)},
                                        "vocabulary": {"roots": DEMO_ROOTS, "leaves_only": True}})
    store = open_store(settings.store.url)

    step("vocabulary: WordNet 3.0 leaves under domestic_cat.n.01")
    summary = run_vocabulary(settings, store)
    synsets = store.read_table("synsets").to_pandas()
    for r in synsets.head(8).itertuples():
        print(f"  {r.wnid}  {', '.join(r.lemmas)[:40]:40s}  queries: {'; '.join(r.queries[:3])}")

    step("done")
    print(f"synsets table: {summary['synsets_table']} ({summary['synsets']} synsets)")
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
