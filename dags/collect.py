"""Collect + ingest DAG: search the sources for every synset, then download and validate the candidates.

Dynamic task mapping over synset shards: `plan_shards` cuts the synsets table into at most 1,000 shards (the
shard size grows with the vocabulary, so 20k synsets stay well under Airflow's max_map_length of 1024). Each
mapped task writes a part; one merge task per stage folds the parts into the table, so parallel shards never
write the same object. Wiring only; the work is in pipeline.sources.collect and pipeline.ingest.stage, the
same code `synsetforge collect` / `synsetforge ingest` run. Every task is idempotent: rerun the DAG to resume.

Started by the `synsets` Asset (a finished vocabulary run) or by hand; `images` starts the crowd loop.
"""

from __future__ import annotations

from airflow.sdk import Asset, Param, dag, task

from pipeline.dagtools import DAG_DEFAULTS, SERVER_RETRIES, fail_fast, store_param

CANDIDATES = Asset("synsetforge://tables/candidates")
IMAGES = Asset("synsetforge://tables/images")
MAX_SHARDS = 1000

COLLECT_FIELDS = ["sources", "per_synset_budget", "allowed_licenses", "local_dir", "url_list", "s3_prefix"]
INGEST_FIELDS = ["concurrency", "per_host", "allowed_networks"]


def _settings(params):
    from pipeline.dagtools import settings_from_params

    settings = settings_from_params(params, "collect", COLLECT_FIELDS)
    for name in INGEST_FIELDS:
        if params.get(name) not in (None, [], ""):
            setattr(settings.ingest, name, params[name])
    from pipeline.store import store_from_settings

    return settings, store_from_settings(settings)


@dag(
    dag_id="synsetforge_collect",
    schedule=[Asset("synsetforge://tables/synsets")],
    **DAG_DEFAULTS,
    tags=["synsetforge"],
    max_active_tasks=4,
    max_active_runs=1,  # one ingest merge at a time: each commits the next near-duplicate index generation
    params={
        "sources": Param([], type="array", description="openverse, wikimedia, flickr, url_list, local_dir, s3_prefix"),
        "per_synset_budget": Param(None, type=["null", "integer"], minimum=1, description="candidates per synset"),
        "allowed_licenses": Param(None, type=["null", "array"], description="e.g. [cc0, pdm, cc-by, cc-by-sa]"),
        "local_dir": Param(None, type=["null", "string"], description="folder with one sub-folder per wnid"),
        "url_list": Param(None, type=["null", "string"], description="txt / csv / parquet URL list"),
        "s3_prefix": Param(None, type=["null", "string"], description="s3://bucket/prefix, one sub-prefix per wnid"),
        "wnids": Param([], type="array", description="only these synsets (default: the whole synsets table)"),
        "shard_size": Param(None, type=["null", "integer"], minimum=1,
                            description="synsets per mapped task (raised if needed); default collect.shard_size"),
        "concurrency": Param(None, type=["null", "integer"], minimum=1, description="downloads in flight per task"),
        "per_host": Param(None, type=["null", "integer"], minimum=1, description="downloads in flight per host"),
        "allowed_networks": Param([], type="array", description="CIDRs fetched although private (tests: 127.0.0.0/8)"),
        "store": store_param(),
    },
    doc_md=__doc__,
)
def synsetforge_collect():
    @task
    @fail_fast
    def plan_shards(params=None) -> list[dict]:
        from pipeline.sources.collect import plan_shards

        settings, store = _settings(params)
        wnids = store.read_table("synsets").column("wnid").to_pylist()
        size = params.get("shard_size") or settings.collect.shard_size
        return plan_shards(wnids, params.get("wnids") or None, size, MAX_SHARDS)

    @task(max_active_tis_per_dagrun=4, **SERVER_RETRIES)
    @fail_fast
    def collect_shard(shard: dict, params=None, run_id=None) -> dict:
        from pipeline.sources.collect import run_collect

        settings, store = _settings(params)
        key = None
        if "flickr" in settings.collect.sources:
            try:  # an Airflow Connection may hold the key; env (settings) is the fallback
                from airflow.sdk import Connection

                key = Connection.get("synsetforge_flickr").password
            except Exception:  # noqa: BLE001 - no connection defined
                key = None
        part = f"{run_id}-{shard['shard']:04d}".replace(":", "_").replace("+", "_")
        summary = run_collect(store, settings, wnids=shard["wnids"], part=part, flickr_api_key=key)
        return {k: v for k, v in summary.items() if k != "errors"} | {"errors": len(summary["errors"])}

    @task(outlets=[CANDIDATES])
    @fail_fast
    def merge_candidates(_collected) -> dict:
        from pipeline.dagtools import announce
        from pipeline.sources.collect import merge_collect_parts

        settings, store = _settings(get_current_params())
        summary = merge_collect_parts(store)
        summary["errors"] = len(summary["errors"])
        announce(settings, CANDIDATES)
        return summary

    @task(max_active_tis_per_dagrun=2, **SERVER_RETRIES)
    @fail_fast
    def ingest_shard(shard: dict, params=None, run_id=None) -> dict:
        from pipeline.ingest.stage import run_ingest

        settings, store = _settings(params)
        tag = f"{run_id}-{shard['shard']:04d}".replace(":", "_").replace("+", "_")
        return run_ingest(store, settings, wnids=shard["wnids"], merge=False, tag=tag)

    @task(outlets=[IMAGES])
    @fail_fast
    def merge_images(_ingested) -> dict:
        from pipeline.dagtools import announce
        from pipeline.ingest.stage import merge_ingest

        settings, store = _settings(get_current_params())
        summary = merge_ingest(store)
        announce(settings, IMAGES)
        return summary

    shards = plan_shards()
    merged = merge_candidates(collect_shard.expand(shard=shards))
    ingested = ingest_shard.expand(shard=shards)
    merged >> ingested
    merge_images(ingested)


def get_current_params() -> dict:
    from airflow.sdk import get_current_context

    return dict(get_current_context()["params"])


synsetforge_collect()
