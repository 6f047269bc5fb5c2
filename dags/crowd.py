"""Crowd reconcile loop: pull new votes -> aggregate (QC) -> push the next tasks. Wiring only; the work is in
crowd.pull, pipeline.qc.stage and crowd.push, the same code `synsetforge crowd pull|push` and `synsetforge qc` run.

Every step is idempotent (pull dedupes by annotation id, push by request id with a write-ahead log), so the
DAG can run on a schedule and any failed run is repaired by the next one. The Label Studio URL comes from
the configuration or the `url` Param; the token and the pseudonym key only from the environment.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, Param, dag, task

VOTES = Asset("synsetforge://tables/votes")
TASKS = Asset("synsetforge://tables/tasks")


def _settings(params):
    from pipeline.dagtools import settings_from_params

    return settings_from_params(params, "crowd", ["url", "project_prefix", "files_root", "gold_rate"])


def _client_and_store(settings):
    from crowd.cli import admin_client
    from pipeline.store import store_from_settings

    return admin_client(settings), store_from_settings(settings)


@dag(
    dag_id="synsetforge_crowd",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # two loops at once would race on the tables
    tags=["synsetforge", "crowd"],
    params={
        "store": Param(None, type=["null", "string"], description="store URL; default from configuration"),
        "url": Param(None, type=["null", "string"], description="Label Studio URL; default crowd.url"),
        "project_prefix": Param(None, type=["null", "string"]),
        "files_root": Param(None, type=["null", "string"], description="Label Studio LOCAL_FILES_DOCUMENT_ROOT"),
        "gold_rate": Param(None, type=["null", "number"], minimum=0, maximum=0.9),
        "kind": Param("verify", type="string"),
    },
    doc_md=__doc__,
)
def synsetforge_crowd():
    @task(outlets=[VOTES])
    def pull_votes(params=None) -> dict:
        from crowd.cli import project_ids
        from crowd.pull import pull

        settings = _settings(params)
        client, store = _client_and_store(settings)
        return pull(store, client, settings, project_ids=project_ids(client, settings, [params["kind"]]))

    @task
    def aggregate(pulled: dict, params=None) -> dict:
        from pipeline.qc.stage import run_qc
        from pipeline.store import store_from_settings

        # run_qc seeds the plan with ingested pairs not voted on yet (image_links, near copies left out)
        settings = _settings(params)
        summary = run_qc(store_from_settings(settings), settings)
        return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}

    @task(outlets=[TASKS])
    def push_tasks(aggregated: dict, params=None) -> dict:
        from crowd.provision import ensure_bucket_cors, image_dir_of, provision
        from crowd.push import push

        settings = _settings(params)
        client, store = _client_and_store(settings)
        if not store.has_table("push_plan"):
            return {"pushed": 0, "reason": "no push_plan table yet"}
        kind = params["kind"]
        pid = provision(client, settings, kinds=[kind], image_dir=image_dir_of(store))[kind]
        ensure_bucket_cors(store, client.url)
        out = push(store, client, settings, project_id=pid, kind=kind)
        return {k: v for k, v in out.items() if isinstance(v, (int, float, str))}

    push_tasks(aggregate(pull_votes()))


synsetforge_crowd()
