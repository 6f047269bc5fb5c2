"""`synsetforge release build|verify|diff|export|publish|report|list`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipeline.config import Settings
from pipeline.store import store_from_settings


def cmd_build(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.release.build import build_release
    from pipeline.release.report import build_report_from_settings

    rs = settings.release
    store = store_from_settings(settings)
    m = build_release(
        store, args.version, parent=args.parent,
        val_per_class=rs.val_per_class if args.val_per_class is None else args.val_per_class,
        test_per_class=rs.test_per_class if args.test_per_class is None else args.test_per_class,
        salt=rs.split_salt, config_digest=settings.digest(), neardup=rs.neardup_check and not args.no_neardup,
    )
    print(f"release {m['version']} built in {store.url}: " + ", ".join(f"{k} {v}" for k, v in m["splits"].items())
          + f"; {m['neardup_dropped']} train near-duplicates dropped")
    if not args.no_report:
        keys = build_report_from_settings(store, args.version, rs)
        print(f"report: {store.url}/{keys['report']}")
    return 0


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.release.manifest import verify_release

    res = verify_release(store_from_settings(settings), args.version)
    for p in res.problems:
        print(f"FAIL {p}")
    print(f"release {args.version}: {res.checked} files re-hashed, " + ("OK" if res.ok else f"{len(res.problems)} problems"))
    return 0 if res.ok else 1


def cmd_diff(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.release.diff import diff_releases

    d = diff_releases(store_from_settings(settings), args.a, args.b)
    if args.json:
        print(json.dumps(d.to_dict("index"), indent=1))
    else:
        cols = ["wnid", *d.columns]
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for wnid, row in d.iterrows():
            print("| " + " | ".join([str(wnid), *map(str, row.tolist())]) + " |")
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.release.export import export_devkit, export_parquet

    store = store_from_settings(settings)
    if args.format == "devkit":
        counts = export_devkit(store, args.version, args.out, images=not args.no_images)
        print(f"devkit layout of {args.version} in {args.out}: {counts}")
    else:
        files = export_parquet(store, args.version, args.out, with_images=args.with_images)
        print(f"Parquet export of {args.version} in {args.out}: " + ", ".join(f"{k}: {len(v)} file(s)"
                                                                             for k, v in files.items()))
    return 0


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.release.export import publish_release

    res = publish_release(store_from_settings(settings), args.version, args.to, endpoint_url=args.endpoint_url)
    print(f"release {args.version} published to {res['target']}: {res['copied']} of {res['files']} files copied")
    return 0


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.release.report import build_report_from_settings

    store = store_from_settings(settings)
    keys = build_report_from_settings(store, args.version, settings.release)
    print(f"{store.url}/{keys['report']}\n{store.url}/{keys['card']}")
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.release.manifest import list_releases, read_manifest

    store = store_from_settings(settings)
    for v in list_releases(store):
        m = read_manifest(store, v)
        print(f"{v}\t{m['created_at']}\tparent={m['parent'] or '-'}\t" + " ".join(f"{k}={n}" for k, n in m["splits"].items()))
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("release", help="build, verify, diff, export and publish versioned releases")
    sub = p.add_subparsers(dest="release_command", metavar="ACTION", required=True)

    b = sub.add_parser("build", help="assemble releases/<version>/ from the store's tables (manifest last)")
    b.add_argument("--version", required=True, help="new, never used version name, e.g. 2026.1")
    b.add_argument("--parent", help="previous release: its images keep their splits")
    b.add_argument("--val-per-class", type=int, help="override release.val_per_class")
    b.add_argument("--test-per-class", type=int, help="override release.test_per_class")
    b.add_argument("--no-neardup", action="store_true", help="skip the train/val near-duplicate check")
    b.add_argument("--no-report", action="store_true", help="do not write report.html and card.md")
    b.set_defaults(func=cmd_build)

    v = sub.add_parser("verify", help="re-hash every file of a release against its manifest")
    v.add_argument("version")
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser("diff", help="per-class changes from release A to release B")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_diff)

    e = sub.add_parser("export", help="write the ILSVRC devkit layout or Parquet for datasets/pandas/DuckDB")
    e.add_argument("version")
    e.add_argument("--format", choices=["devkit", "parquet"], required=True)
    e.add_argument("--out", required=True, help="local output folder")
    e.add_argument("--no-images", action="store_true", help="devkit: write the text files and XML only")
    e.add_argument("--with-images", action="store_true", help="parquet: embed image bytes")
    e.set_defaults(func=cmd_export)

    u = sub.add_parser("publish", help="copy a verified release to a folder or s3://bucket/prefix (immutable)")
    u.add_argument("version")
    u.add_argument("--to", required=True, help="folder, file:// URL or s3://bucket/prefix")
    u.add_argument("--endpoint-url", help="S3 endpoint for the target (MinIO, moto)")
    u.set_defaults(func=cmd_publish)

    r = sub.add_parser("report", help="(re)write report.html and card.md of a release")
    r.add_argument("version")
    r.set_defaults(func=cmd_report)

    ls = sub.add_parser("list", help="complete releases (those with a manifest)")
    ls.set_defaults(func=cmd_list)
