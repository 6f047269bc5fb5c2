"""Run every benchmark once at full size, one after another (the machine has 2 cores: never two at once).

    make bench                      # set-up, peer venvs, then this
    .venv/bin/python benchmarks/run_all.py --only vocabulary qc_speed

Each benchmark prints its own Markdown table comparing against its peer tool in the same run; copy the tables
with the date into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BENCHMARKS = {
    "vocabulary": [PY, "benchmarks/vocabulary_bench.py"],
    "crowd_cost": [PY, "benchmarks/crowd_cost.py", "--accept-at", "0.995", "--block-below", "0.75"],
    "calibration": [PY, "benchmarks/calibration.py"],
    "qc_speed": [PY, "benchmarks/qc_speed.py", "compare", "--votes", "1000000"],
    "qc_stream": ["/usr/bin/time", "-v", PY, "benchmarks/qc_speed.py", "stream", "--votes", "100000000"],
    "neardup_speed": [PY, "-m", "benchmarks.neardup_speed"],
    "neardup_quality": [PY, "-m", "benchmarks.neardup_quality"],
    "neardup_index": [PY, "-m", "benchmarks.neardup_index"],
    "ingest": [PY, "benchmarks/ingest_vs_img2dataset.py"],
    "crowd_throughput": [PY, "benchmarks/crowd_throughput.py", "--tasks", "5000"],
    "crowd_pull": [PY, "benchmarks/crowd_pull.py"],
    "boxes_inprocess": [PY, "benchmarks/boxes_sim.py", "--images", "10000"],
    "boxes_server": [PY, "benchmarks/boxes_sim.py", "--images", "0", "--server", "8"],
    "release_write": [PY, "benchmarks/release_write.py"],
    "scale": [PY, "benchmarks/scale.py"],
    "celery_scale": [PY, "benchmarks/celery_scale.py"],  # 10,000 URLs, 10 shards: Local, Celery x1, Celery x2
    "qc_scale": [PY, "benchmarks/qc_scale.py", "--root", "/tmp/qcscale", "--images", "128000,1280000", "--clean"],
    "challenge": [PY, "benchmarks/challenge.py"],
    "presence": [PY, "benchmarks/presence_sim.py"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    args = ap.parse_args()
    failed = []
    for name in args.only or BENCHMARKS:
        print(f"\n### {name}: {' '.join(BENCHMARKS[name][1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(BENCHMARKS[name], cwd=ROOT)
        print(f"({name}: exit {rc}, {time.perf_counter() - t0:.0f}s)", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
