"""`synsetforge collect`: search the configured sources for every synset and write the candidates table."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _wnids(args: argparse.Namespace) -> list[str] | None:
    from pipeline.errors import UserError

    wnids = list(args.wnid or [])
    if args.wnid_file:
        try:
            with open(args.wnid_file) as fh:
                wnids += [line.split()[0] for line in fh if line.strip() and not line.startswith("#")]
        except OSError as exc:
            raise UserError(f"--wnid-file {args.wnid_file}: {exc}") from None
    return wnids or None


def cmd_collect(args: argparse.Namespace, settings: Any) -> int:
    from tabulate import tabulate
    from tqdm import tqdm

    from pipeline.errors import UserError
    from pipeline.sources.base import SourceError
    from pipeline.sources.collect import run_collect
    from pipeline.store import store_from_settings

    overrides: dict[str, Any] = {}
    if args.licenses is not None:
        overrides["allowed_licenses"] = [x.strip() for x in args.licenses.split(",") if x.strip()] or None
    for key, value in (("local_dir", args.local_dir), ("url_list", args.url_list), ("s3_prefix", args.s3_prefix),
                       ("local_license", args.license), ("local_creator", args.creator)):
        if value:
            overrides[key] = value
    for key, value in overrides.items():
        setattr(settings.collect, key, value)
    sources = [s.strip() for s in args.sources.split(",")] if args.sources else None
    store = store_from_settings(settings)
    bar = tqdm(desc="collect", unit="synset", disable=args.no_progress or not sys.stderr.isatty(), file=sys.stderr)
    try:
        summary = run_collect(store, settings, wnids=_wnids(args), source_names=sources, budget=args.budget,
                              on_synset=lambda wnid, n: (bar.update(1), bar.set_postfix_str(f"{wnid}: {n}")))
    except SourceError as exc:
        raise UserError(str(exc)) from None
    finally:
        bar.close()
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    rows = [["synsets", summary["synsets"]], ["candidates", summary["candidates"]],
            ["synsets without candidates", summary["synsets_without_candidates"]]]
    rows += [[f"  from {k}", v] for k, v in sorted(summary["by_source"].items())]
    rows += [["source errors", len(summary["errors"])]]
    print(tabulate(rows, headers=["collect", "count"], tablefmt="github"))
    for err in summary["errors"][:10]:
        print(f"error: {err['wnid']} {err['source']} {err['query']!r}: {err['error']}", file=sys.stderr)
    return 1 if summary["errors"] and not summary["candidates"] else 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("collect", help="find candidate image URLs per synset (writes the candidates table)",
                              description="Run each synset's queries against the sources up to the per-synset budget.")
    p.add_argument("--sources", help="comma list: openverse,wikimedia,flickr,url_list,local_dir,s3_prefix")
    p.add_argument("--budget", type=int, help="candidates per synset (collect.per_synset_budget)")
    p.add_argument("--licenses", help="keep only these license families, e.g. cc0,pdm,cc-by,cc-by-sa ('' = all)")
    p.add_argument("--wnid", action="append", help="only this synset (repeatable)")
    p.add_argument("--wnid-file", help="file with one wnid per line")
    p.add_argument("--local-dir", help="folder with one sub-folder per wnid (collect.local_dir)")
    p.add_argument("--license", help="license of local_dir photos no attribution sidecar describes, e.g. cc-by-4.0 "
                   "(collect.local_license)")
    p.add_argument("--creator", help="creator of local_dir photos no sidecar describes (collect.local_creator)")
    p.add_argument("--url-list", help="txt/csv/parquet URL list (collect.url_list)")
    p.add_argument("--s3-prefix", help="s3://bucket/prefix with one sub-prefix per wnid (collect.s3_prefix)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_collect)
