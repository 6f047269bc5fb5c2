"""`synsetforge release plan|build|verify|diff|export|publish|report|list`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipeline.config import Settings
from pipeline.store import store_from_settings


def quota_arg(text: str) -> int | float:
    """--val-per-class / --test-per-class: a count (50) or a fraction in (0, 1) (0.1)."""
    from pipeline.release.splits import check_quota

    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither a count (e.g. 50) nor a fraction (e.g. 0.1)") from None
        if value.is_integer():
            value = int(value)
    try:
        return check_quota(value, "the quota")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _split_options(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    rs = settings.release
    return {"parent": args.parent,
            "val_per_class": rs.val_per_class if args.val_per_class is None else args.val_per_class,
            "test_per_class": rs.test_per_class if args.test_per_class is None else args.test_per_class,
            "salt": rs.split_salt, "neardup": rs.neardup_check and not args.no_neardup,
            **({"fresh_test": True} if getattr(args, "fresh_test", False) else {})}


def print_plan(plan: Any) -> None:
    """Per class train / val / test as a Markdown table, totals, and the classes a build would refuse."""
    c = plan.classes
    pol = plan.policy
    print("| wnid | name | train | val | test | images |\n|---|---|---|---|---|---|")
    for r in c.itertuples():
        flag = " (!)" if r.train == 0 or r.val == 0 else ""
        print(f"| {r.wnid} | {r.name}{flag} | {r.train} | {r.val} | {r.test} | {r.images} |")
    print(f"| TOTAL | {len(c)} classes | {plan.splits['train']} | {plan.splits['val']} | {plan.splits['test']} | "
          f"{sum(plan.splits.values())} |")
    print(f"quotas: val {pol.val_per_class}, test {pol.test_per_class} per class; "
          f"{plan.neardup_dropped} train near-duplicates dropped; {plan.kept_from_parent} kept their parent split; "
          f"QC methods: {', '.join(plan.qc_methods) or 'none'}")
    if plan.short_classes:
        print(f"{len(plan.short_classes)} classes (!) have no train or no val image: `release build` refuses "
              "them unless --force; lower the quotas (or use fractions such as 0.1), get more images accepted, "
              "or exclude those classes")


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.release.build import plan_from_store

    plan = plan_from_store(store_from_settings(settings), **_split_options(args, settings))
    print_plan(plan)
    print("nothing was written")
    return 0


def cmd_build(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.release.build import build_release, check_splits
    from pipeline.release.manifest import ReleaseExists, release_exists
    from pipeline.release.report import build_report_from_settings

    if args.dry_run:
        from pipeline.release.build import plan_from_store

        store = store_from_settings(settings)
        if release_exists(store, args.version):
            raise ReleaseExists(f"release {args.version!r} already exists in {store.url}; releases are immutable, "
                                "choose a new version")
        plan = plan_from_store(store, **_split_options(args, settings))
        print_plan(plan)
        if plan.short_classes and not args.force:
            check_splits(plan.classes, plan.policy, what=f"release {args.version!r}")  # raises, saying what to do
        print(f"dry run: release {args.version} was not written")
        return 0
    store = store_from_settings(settings)
    m = build_release(
        store, args.version, **_split_options(args, settings), config_digest=settings.digest(),
        local_roots=[settings.collect.local_dir] if settings.collect.local_dir else [], force=args.force,
        challenge=args.challenge,
    )
    print(f"release {m['version']} built in {store.url}: " + ", ".join(f"{k} {v}" for k, v in m["splits"].items())
          + f"; {m['neardup_dropped']} train near-duplicates dropped; QC methods: "
          + (", ".join(m["qc_methods"]) or "none"))
    short = m["stats"].get("short_classes") or []
    if short:
        print(f"--force: {len(short)} class{'es' if len(short) != 1 else ''} without a train or a val image: "
              + ", ".join(f"{r['wnid']} {r['name']}" for r in short[:20]) + (" ..." if len(short) > 20 else ""))
    if not args.no_report:
        keys = build_report_from_settings(store, args.version, settings.release)
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

    def split_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--parent", help="previous release: its images keep their splits")
        q.add_argument("--val-per-class", type=quota_arg,
                       help="override release.val_per_class: a count (50) or a fraction of each class (0.1)")
        q.add_argument("--test-per-class", type=quota_arg,
                       help="override release.test_per_class: a count (100) or a fraction of each class (0.1)")
        q.add_argument("--no-neardup", action="store_true", help="skip the train/val near-duplicate check")

    pl = sub.add_parser("plan", help="show train / val / test per class of a build with these options; writes nothing")
    split_args(pl)
    pl.set_defaults(func=cmd_plan)

    b = sub.add_parser("build", help="assemble releases/<version>/ from the store's tables (manifest last)")
    b.add_argument("--version", required=True, help="new, never used version name, e.g. 2026.1")
    split_args(b)
    b.add_argument("--no-report", action="store_true", help="do not write report.html and card.md")
    b.add_argument("--dry-run", action="store_true", help="show the plan (as `release plan`) and write nothing")
    b.add_argument("--force", action="store_true",
                   help="build even if a class would have no train or no val image")
    b.add_argument("--challenge", action="store_true",
                   help="hide the test labels: test images are listed without labels, their labels and boxes go under "
                        "private/releases/<version>/ for the challenge server")
    b.add_argument("--fresh-test", action="store_true",
                   help="with --challenge: draw the test images only from images no release of the store has "
                        "published with a label (published test images of the parent become val images)")
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
