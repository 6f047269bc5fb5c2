"""`synsetforge qc`: one QC round: aggregate the votes, print per-synset precision and the next push list.

A round re-decides only the synsets that changed since the last one (new votes, gold tasks, ingest links or
controls); `--full` refits every synset from all votes (streamed in batches of synsets). `--method` picks how votes
become labels (default: the `qc.method` setting): adaptive-ds, ds, mv or confidence-table (see
`pipeline.qc.stage`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd


def _read_pairs(path: str) -> pd.DataFrame:
    from pipeline.errors import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--pairs {p}: no such file; give a CSV or Parquet file with columns image_id, wnid")
    try:
        df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p, dtype=str)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise UserError(f"--pairs {p}: cannot read it ({exc}); give a CSV or Parquet file with image_id, wnid") from None
    return df


def _cmd(args: argparse.Namespace, settings: Any) -> int:
    from pipeline.errors import UserError
    from pipeline.qc.base import QCInputError
    from pipeline.qc.stage import run_qc
    from pipeline.store import store_from_settings

    store = store_from_settings(settings)
    pairs = _read_pairs(args.pairs) if args.pairs else None
    try:
        summary = run_qc(store, settings, pairs=pairs, method=args.method, full=args.full)
    except QCInputError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(f"{summary['method']}: {summary['votes']} votes, {summary['pairs']} (image, wnid) pairs: "
          f"{summary['accepted']} accepted, {summary['rejected']} rejected, {summary['pending']} pending; "
          f"{summary['flagged_workers']} of {summary['workers']} workers flagged")
    r = summary["qc_round"]
    what = {"full": "full refit", "incremental": f"incremental: {r['synsets']} synset(s) re-decided",
            "unchanged": "unchanged"}[r["mode"]]
    print(f"QC round {r['round']}: {what} ({r['reason']}), {r['seconds']:.1f} s")
    print(summary["gold_note"])
    if summary.get("team_note"):
        print(summary["team_note"])
    per = pd.DataFrame(summary["per_synset"])
    if len(per):
        print("\nper synset (est_precision = mean posterior of the accepted images):")
        print(per.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    plan = store.read_table("push_plan").to_pandas()
    plan = plan[plan["n_more"] > 0]  # rows with n_more 0: pairs that need a new annotator (see the team note)
    print(f"\nnext push: {len(plan)} pair(s), {int(plan['n_more'].sum()) if len(plan) else 0} vote(s)"
          f" (table push_plan in {store.url})")
    if len(plan) and args.top:
        print(plan.head(args.top).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("qc", help="aggregate votes into labels; write workers and the next push plan",
                              description=__doc__)
    from pipeline.qc.stage import METHODS

    p.add_argument("--method", choices=METHODS, help="QC method (default: the qc.method setting)")
    p.add_argument("--pairs", help="CSV/Parquet of (image_id, wnid) to plan even without votes yet")
    p.add_argument("--full", action="store_true",
                   help="refit every synset from all votes instead of re-deciding the synsets that changed")
    p.add_argument("--top", type=int, default=20, help="rows of the push plan to print (default 20)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd)
