"""Vocabulary stage speed: every noun synset under entity.n.01 into the synsets table, and a 21,000-wnid list.

Run: .venv/bin/python benchmarks/vocabulary_bench.py   (prints a Markdown table; peak RSS from getrusage)
"""

from __future__ import annotations

import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.store import LocalStore  # noqa: E402
from pipeline.vocabulary import build_edges, build_synsets, load_wordnet, select, wnid_of  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(label: str, fn, rows: list) -> object:
    t = time.perf_counter()
    out = fn()
    rows.append((label, time.perf_counter() - t, peak_mb()))
    return out


def main() -> None:
    rows: list = []
    wn = timed("load WordNet 3.0 (nltk)", load_wordnet, rows)
    everything = timed("select all nouns under entity.n.01", lambda: select(wn, roots=["entity.n.01"]), rows)
    table = timed(f"build synsets table ({len(everything):,} rows, queries expanded)",
                  lambda: build_synsets(wn, everything), rows)
    edges = timed("build is-a edges", lambda: build_edges(everything), rows)
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(tmp)
        timed("write both tables (Parquet, validated)",
              lambda: (store.write_table("synsets", table), store.write_table("synset_edges", edges)), rows)
        ids = [wnid_of(s) for s in everything]
        random.Random(0).shuffle(ids)
        wnid_file = Path(tmp) / "wnids.txt"
        wnid_file.write_text("\n".join(ids[:21_000]) + "\n")
        wn2 = load_wordnet()  # a fresh reader: nothing cached from the full walk
        picked = timed("resolve a 21,000-wnid list (fresh reader)", lambda: select(wn2, wnid_file=wnid_file), rows)
        timed("build its synsets table", lambda: build_synsets(wn2, picked), rows)
    assert table.num_rows == 82_115, table.num_rows
    print("| step | seconds | peak RSS MB (process so far) |\n|---|---:|---:|")
    for label, sec, mb in rows:
        print(f"| {label} | {sec:.1f} | {mb:.0f} |")
    print(f"\nsynsets: {table.num_rows:,}, edges: {edges.num_rows:,}, "
          f"queries: {sum(len(q) for q in table.column('queries').to_pylist()):,}")


if __name__ == "__main__":
    main()
