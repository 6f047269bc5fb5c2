"""`synsetforge` command line. Each stage module registers its own subcommands.

A stage module exposes `register_cli(subparsers)`, adding a parser whose `func(args, settings)` returns
an exit code. The list below is the only place that names them, so adding a stage is one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.config import ConfigError, load_settings
from pipeline.errors import SynsetforgeError

COMMAND_MODULES = (
    "pipeline.vocabulary",
    "pipeline.sources.cli",
    "pipeline.ingest.cli",
    "pipeline.qc.cli",
    "pipeline.boxes",
    "crowd.cli",  # after pipeline.boxes: it adds `boxes sync`
    "pipeline.presence",  # DET: `det status|plan|release`
    "crowd.presence",  # after pipeline.presence: it adds `det sync|boxes`
    "pipeline.release.cli",
    "pipeline.evaluate",
    "pipeline.airflow_local",
    "pipeline.config_cli",
    "challenge.cli",
    "pipeline.store_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synsetforge",
        description="Build ImageNet-style datasets: vocabulary -> collect -> ingest -> crowd/qc -> boxes -> release -> evaluate.",
    )
    parser.add_argument("--config", help="TOML configuration file (also SYNSETFORGE_CONFIG)")
    parser.add_argument("--store", help="store URL: a folder, file://... or s3://bucket/prefix (overrides the config)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):  # that stage is not part of this build
                continue
            raise
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        overrides = {"store": {"url": args.store}} if args.store else None
        settings = load_settings(args.config, overrides=overrides)
        return int(args.func(args, settings) or 0)
    except (ConfigError, SynsetforgeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
