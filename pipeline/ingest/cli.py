"""`synsetforge ingest`: download, validate and store every unsettled candidate; print what this run merged
(accepted / rejected by reason / duplicates, links written, near-duplicate pairs found). Interrupt it at any time:
rerunning the same command resumes. `--rebuild-index` rebuilds the near-duplicate index and the images, near_pairs and
image_links tables from everything stored (recovery; nothing is fetched)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def summary_rows(summary: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = [
        ["fetched this run", summary.get("fetched", 0)],
        ["skipped (already settled)", summary.get("skipped_settled", 0)],
        ["accepted", summary.get("accepted", 0)],
        ["duplicates (exact)", summary.get("duplicates", 0)],
        ["near duplicates", summary.get("near_duplicates", 0)],
        ["near-duplicate pairs found", summary.get("near_pairs", 0)],
        ["images in several synsets", summary.get("multi_synset_images", 0)],
        ["rejected", sum(summary.get("rejected", {}).values())],
    ]
    rows += [[f"  {reason}", n] for reason, n in sorted(summary.get("rejected", {}).items(), key=lambda kv: -kv[1])]
    return rows


def cmd_ingest(args: argparse.Namespace, settings: Any) -> int:
    from tabulate import tabulate
    from tqdm import tqdm

    from pipeline.ingest.stage import run_ingest
    from pipeline.store import store_from_settings

    for key in ("concurrency", "per_host", "processes"):
        if getattr(args, key):
            setattr(settings.ingest, key, getattr(args, key))
    if args.local_dir:  # file:// candidates are read only under this root
        settings.collect.local_dir = args.local_dir
    store = store_from_settings(settings)
    if args.rebuild_index:
        from pipeline.ingest.stage import merge_ingest

        summary = merge_ingest(store, rebuild=True)
        if args.json:
            print(json.dumps(summary, indent=2, default=str))
        else:
            print(tabulate(summary_rows(summary), headers=["rebuilt", "count"], tablefmt="github"))
            index = summary["index"]
            print(f"near-duplicate index generation {index['generation']}: {index['images']} images in "
                  f"{index['segments']} segment(s)")
        return 0
    bar = tqdm(desc="ingest", unit="url", disable=args.no_progress or not sys.stderr.isatty(), file=sys.stderr)
    stats = {"ok": 0, "bad": 0}

    def on_result(row: dict[str, Any]) -> None:
        stats["ok" if row["status"] != "rejected" else "bad"] += 1
        bar.update(1)
        bar.set_postfix(accepted=stats["ok"], rejected=stats["bad"], refresh=False)

    try:
        given = args.retry_rejected  # None: not asked; [] or ["all"]: every rejection; else these reasons
        retry = () if given is None else (True if given in ([], ["all"]) else given)
        summary = run_ingest(store, settings, wnids=args.wnid, limit=args.limit, on_result=on_result,
                             on_start=lambda n: setattr(bar, "total", n), retry_rejected=retry)
    finally:
        bar.close()
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(tabulate(summary_rows(summary), headers=["ingest", "count"], tablefmt="github"))
        print(f"{summary['fetched']} URLs in {summary['seconds']:.1f}s")
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("ingest", help="download + validate candidates (writes images, image_links, blobs)",
                              description=__doc__)
    p.add_argument("--wnid", action="append", help="only candidates of this synset (repeatable)")
    p.add_argument("--limit", type=int, help="fetch at most N URLs this run")
    p.add_argument("--concurrency", type=int, help="downloads in flight (ingest.concurrency)")
    p.add_argument("--per-host", type=int, dest="per_host", help="downloads in flight per host (ingest.per_host)")
    p.add_argument("--processes", type=int, help="worker processes, each with its share of the threads (ingest.processes)")
    p.add_argument("--local-dir", help="root of file:// candidates (default: collect.local_dir and the roots "
                   "the collect runs recorded); files elsewhere are refused as outside_local_root")
    p.add_argument("--retry-rejected", nargs="*", metavar="REASON",
                   help="fetch again URLs rejected before: all of them, or only these reasons (e.g. decode_error); "
                   "refusals by the configuration (outside_local_root, blocked_address, ...) are always retried")
    p.add_argument("--rebuild-index", action="store_true", dest="rebuild_index",
                   help="rebuild the near-duplicate index, near_pairs and image_links (and settle images to one row "
                   "per URL) from everything stored, fetching nothing: recovery after a lost or damaged index")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_ingest)
