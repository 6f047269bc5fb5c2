"""Near-duplicate quality on real photos: synsetforge's detector vs imagededup 0.3.3 PHash / DHash (4-12).

    .venv/bin/python -m benchmarks.neardup_quality [--seed 0]

Data: benchmarks/neardup_data.py (>= 500 distinct originals cut from offline photos, one edited copy each,
five edit kinds, plus one asymmetric crop of each original: margins of 0-5 % drawn per side). All originals and
copies go into one set; a method is scored on recall = share of edited copies joined to their own original
(overall and per kind), and false pairs = pairs joined between images of two different originals (originals with
each other, and a copy with another original/copy).
imagededup runs in its own venv (.venv-bench-neardup, it pulls torch), created with
`python3.11 -m venv .venv-bench-neardup && .venv-bench-neardup/bin/pip install imagededup==0.3.3`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.neardup_data import ASYM_KIND, CACHE, EDIT_KINDS, build, build_asym
from pipeline.ingest.fingerprint import decode_for_fingerprint, fingerprint
from pipeline.ingest.neardup import DEFAULT_MAX_THUMB_DIST, DEFAULT_RADIUS, NearDupIndex

ROOT = Path(__file__).resolve().parent.parent
BENCH_PY = ROOT / ".venv-bench-neardup" / "bin" / "python"
IMAGEDEDUP = """
import json, sys, time, logging
logging.disable(logging.WARNING)
# imagededup.methods/__init__ also imports the CNN module, which downloads MobileNet weights at import time
# (no network here, and not allowed); register the package without running __init__ and load the real hashing
# module only.
import importlib.util, types, imagededup
pkg = types.ModuleType("imagededup.methods")
pkg.__path__ = [imagededup.__path__[0] + "/methods"]
sys.modules["imagededup.methods"] = pkg
from imagededup.methods.hashing import PHash, DHash
out = {}
for name, cls in (("PHash", PHash), ("DHash", DHash)):
    m = cls(verbose=False)
    t = time.perf_counter()
    enc = m.encode_images(image_dir=sys.argv[1])
    enc_s = time.perf_counter() - t
    for thr in range(4, 13):
        d = m.find_duplicates(encoding_map=enc, max_distance_threshold=thr)
        out[f"{name}@{thr}"] = {"pairs": sorted({tuple(sorted((a, b))) for a, v in d.items() for b in v}),
                                "encode_s": enc_s}
print(json.dumps(out))
"""


KINDS = (*EDIT_KINDS, ASYM_KIND)


def score(pairs: set[tuple[str, str]], kinds: dict[str, str]) -> dict:
    """kinds: copy name -> edit kind. Names: o<i> original i, e<i> its edited copy, a<i> its asymmetric crop."""
    def orig(name: str) -> int:
        return int(name[1:].split(".")[0])

    joined = {b if a[0] == "o" else a for a, b in pairs if orig(a) == orig(b) and "o" in (a[0], b[0]) and a[0] != b[0]}
    false = [(a, b) for a, b in pairs if orig(a) != orig(b)]
    row = {"recall": len(joined) / len(kinds),
           "false_orig": sum(1 for a, b in false if a[0] == "o" and b[0] == "o"), "false_all": len(false)}
    for k in KINDS:
        names = [n for n, kk in kinds.items() if kk == k]
        row[k] = sum(n in joined for n in names) / len(names)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pairs = build(seed=args.seed)
    asym = build_asym(pairs, seed=args.seed)
    n_orig = len(pairs)
    flat = CACHE / f"flat-{args.seed}"  # one folder with every image for imagededup; names o<i> / e<i> / a<i>
    flat.mkdir(exist_ok=True)
    files, kinds = [], {}
    for i, (p, a) in enumerate(zip(pairs, asym, strict=True)):
        for tag, src, kind in (("o", p.original, None), ("e", p.edited, p.kind), ("a", a.edited, a.kind)):
            dst = flat / f"{tag}{i:05d}{src.suffix}"
            if not dst.exists():
                dst.symlink_to(src)
            files.append(dst)
            if kind:
                kinds[dst.name] = kind

    results = []
    t = time.perf_counter()
    rows = [{"image_id": f.name, **fingerprint(decode_for_fingerprint(f.read_bytes()))} for f in files]
    fp_s = time.perf_counter() - t
    t = time.perf_counter()
    found = NearDupIndex(DEFAULT_RADIUS, DEFAULT_MAX_THUMB_DIST, n_hint=len(rows)).add(pd.DataFrame(rows))
    search_s = time.perf_counter() - t
    ours = {tuple(sorted(x)) for x in found[["image_id", "other_image_id"]].itertuples(index=False, name=None)}
    results.append({"method": f"synsetforge (r={DEFAULT_RADIUS}, thumb<={DEFAULT_MAX_THUMB_DIST})",
                    **score(ours, kinds), "seconds": fp_s + search_s})
    no_verify = NearDupIndex(DEFAULT_RADIUS, 99.0, n_hint=len(rows)).add(pd.DataFrame(rows))
    results.append({"method": "synsetforge, candidate search only (no verification)",
                    **score({tuple(sorted(x)) for x in no_verify[["image_id", "other_image_id"]].itertuples(
                        index=False, name=None)}, kinds), "seconds": float("nan")})
    phash_only = pd.DataFrame(rows)
    for thr in (6, 10):  # a single pHash at a fixed threshold, as the issue describes the naive detector
        h = phash_only["phash"].to_numpy(dtype=np.uint64)
        d = np.bitwise_count(h[:, None] ^ h[None, :])
        a, b = np.nonzero(np.triu(d <= thr, 1))
        names = phash_only["image_id"].to_numpy()
        results.append({"method": f"single pHash (ours) @ {thr}",
                        **score({tuple(sorted((names[x], names[y]))) for x, y in zip(a, b, strict=True)}, kinds),
                        "seconds": float("nan")})
    if BENCH_PY.exists():
        r = subprocess.run([str(BENCH_PY), "-c", IMAGEDEDUP, str(flat)], capture_output=True, text=True, timeout=3600)
        if r.returncode == 0:
            for key, v in json.loads(r.stdout.strip().splitlines()[-1]).items():
                results.append({"method": f"imagededup 0.3.3 {key.replace('@', ' @ ')}",
                                **score({tuple(p) for p in v["pairs"]}, kinds), "seconds": v["encode_s"]})
        else:
            print("imagededup failed:", r.stderr[-2000:])
    else:
        print(f"imagededup skipped: {BENCH_PY} missing (see the module docstring)")

    counts = {k: sum(v == k for v in kinds.values()) for k in KINDS}
    print(f"\n{n_orig} originals + {len(kinds)} copies ({', '.join(f'{k} {n}' for k, n in counts.items())}; "
          f"seed {args.seed}); {n_orig * (n_orig - 1) // 2:,} pairs of distinct originals\n")
    print("| method | recall (all copies) | " + " | ".join(KINDS) + " | false pairs (originals) | false pairs (all) |")
    print("|---|---|" + "---|" * len(KINDS) + "---|---|")
    for r in results:
        print(f"| {r['method']} | {100 * r['recall']:.2f} % | "
              + " | ".join(f"{100 * r[k]:.1f}" for k in KINDS) + f" | {r['false_orig']} | {r['false_all']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
