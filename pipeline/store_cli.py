"""`synsetforge store compact|vacuum|migrate|history [TABLE]`: maintenance of the store's working tables.

    synsetforge store compact votes --order-by wnid   # few large files, rows sorted by synset
    synsetforge store vacuum --retention-days 30       # drop files no version of the last 30 days needs
    synsetforge store migrate                          # tables/<name>.parquet -> Delta tables/<name>/

Each runs while stages append: compaction is one commit that changes no rows, vacuum only deletes files no
recent version names. Without TABLE a command covers every working table in the store.
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta
from typing import Any

from pipeline.errors import UserError
from pipeline.store import MIN_RETENTION, store_from_settings


def _tables(store: Any, table: str | None) -> list[str]:
    names = store.working_tables()
    if table is None:
        return names
    if table not in names:
        raise UserError(f"no working table {table!r} in {store.url}; tables there: {names or 'none'}")
    return [table]


def _cmd(args: argparse.Namespace, settings: Any) -> int:
    store = store_from_settings(settings)
    out: list[dict[str, Any]] = []
    if args.action == "migrate":
        done = store.migrate(args.table)
        out = [{"table": n, "migrated": True} for n in done]
        if not done:
            print(f"nothing to migrate in {store.url}")
    elif args.action == "compact":
        order = [c.strip() for c in args.order_by.split(",")] if args.order_by else None
        out = [store.compact(n, order_by=order) for n in _tables(store, args.table)]
    elif args.action == "vacuum":
        retention = timedelta(days=args.retention_days)
        if retention < MIN_RETENTION:
            raise UserError(f"--retention-days {args.retention_days} is shorter than {MIN_RETENTION}")
        for n in _tables(store, args.table):
            if store.exists(f"tables/{n}.parquet"):
                continue  # a legacy table has no history to vacuum
            removed = store.vacuum(n, retention, dry_run=args.dry_run)
            out.append({"table": n, "files_removed" if not args.dry_run else "files_to_remove": len(removed)})
    else:  # history
        for n in _tables(store, args.table):
            out += [{"table": n, **{k: h.get(k) for k in ("version", "timestamp", "operation",
                                                              "synsetforge.operation", "synsetforge.writer")}}
                    for h in store.table_history(n, args.limit)]
    for row in out:
        print(json.dumps(row, default=str, sort_keys=True))
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("store", help="maintain working tables: compact, vacuum, migrate, history",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["compact", "vacuum", "migrate", "history"])
    p.add_argument("table", nargs="?", help="one working table (default: all)")
    p.add_argument("--order-by", help="compact: sort rows by these comma-separated columns (e.g. wnid)")
    p.add_argument("--retention-days", type=float, default=30.0,
                   help="vacuum: keep every version this recent readable (default 30, at least 1 hour)")
    p.add_argument("--dry-run", action="store_true", help="vacuum: list, delete nothing")
    p.add_argument("--limit", type=int, default=20, help="history: commits per table (default 20)")
    p.set_defaults(func=_cmd)
