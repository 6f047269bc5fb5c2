"""Crowd reconcile loop: pull new votes -> aggregate (QC) -> push the next tasks -> settled? Wiring only; the work
is in crowd.pull, pipeline.qc.stage and crowd.push, the same code `synsetforge crowd pull|push` and `synsetforge qc`
run.

Runs every 10 minutes and whenever ingest publishes new images (the `images` Asset). Every step is idempotent
(pull dedupes by annotation id, push by request id with a write-ahead log), so any failed run is repaired by the
next one. When QC has nothing left to ask (every synset settled or out of budget) after new votes came in, the
`settled` task publishes the `labels` Asset, which starts the box loop; otherwise it is skipped. Scheduled runs
skip quietly on a machine with no Label Studio configured; a run started by hand fails and says what is missing.
The Label Studio URL comes from the configuration or the `url` Param; the token and pseudonym key only from env.
"""

from __future__ import annotations

from airflow.sdk import Asset, Param, dag, task

from pipeline.dagtools import DAG_DEFAULTS, SERVER_RETRIES, fail_fast, label_studio_params, loop_schedule

VOTES = Asset("synsetforge://tables/votes")
TASKS = Asset("synsetforge://tables/tasks")
LABELS = Asset("synsetforge://tables/labels")


def _settings(params):
    from pipeline.dagtools import settings_from_params

    return settings_from_params(params, "crowd", ["url", "project_prefix", "files_root", "gold_rate"])


def _client_and_store(settings):
    from crowd.cli import admin_client
    from pipeline.store import store_from_settings

    return admin_client(settings), store_from_settings(settings)


@dag(
    dag_id="synsetforge_crowd",
    schedule=loop_schedule("synsetforge://tables/images"),
    **DAG_DEFAULTS,
    max_active_runs=1,  # two loops at once would race on the tables
    tags=["synsetforge", "crowd"],
    params={
        **label_studio_params(),
        "gold_rate": Param(None, type=["null", "number"], minimum=0, maximum=0.9),
        "kind": Param("verify", type="string"),
    },
    doc_md=__doc__,
)
def synsetforge_crowd():
    @task(outlets=[VOTES], **SERVER_RETRIES)
    @fail_fast
    def pull_votes(params=None, dag_run=None) -> dict:
        from crowd.cli import project_ids
        from crowd.pull import pull
        from pipeline.dagtools import skip_scheduled_run_without_crowd

        settings = _settings(params)
        skip_scheduled_run_without_crowd(settings, dag_run)
        client, store = _client_and_store(settings)
        return pull(store, client, settings, project_ids=project_ids(client, settings, [params["kind"]]))

    @task
    @fail_fast
    def aggregate(pulled: dict, params=None) -> dict:
        from pipeline.qc.stage import run_qc
        from pipeline.store import store_from_settings

        # run_qc seeds the plan with ingested pairs not voted on yet (image_links, near copies left out)
        settings = _settings(params)
        summary = run_qc(store_from_settings(settings), settings)
        return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}

    @task(outlets=[TASKS], **SERVER_RETRIES)
    @fail_fast
    def push_tasks(aggregated: dict, params=None) -> dict:
        from crowd.provision import cors_origin, ensure_bucket_cors, image_dir_of, provision
        from crowd.push import push

        settings = _settings(params)
        client, store = _client_and_store(settings)
        if not store.has_table("push_plan"):
            return {"pushed": 0, "reason": "no push_plan table yet"}
        kind = params["kind"]
        pid = provision(client, settings, kinds=[kind], image_dir=image_dir_of(store))[kind]
        ensure_bucket_cors(store, cors_origin(settings, client))
        out = push(store, client, settings, project_id=pid, kind=kind)
        return {k: v for k, v in out.items() if isinstance(v, (int, float, str))}

    @task(outlets=[LABELS])
    def settled(pulled: dict, aggregated: dict, pushed: dict, params=None) -> dict:
        from pipeline.dagtools import announce, skip

        if aggregated.get("push_pairs", 1) > 0:
            skip(f"{aggregated.get('push_pairs')} pairs still need votes")
        if not pulled.get("new_votes"):
            skip("settled, and no new votes since the last run: labels unchanged")
        announce(_settings(params), LABELS)
        return {"accepted": aggregated.get("accepted"), "rejected": aggregated.get("rejected")}

    pulled = pull_votes()
    aggregated = aggregate(pulled)
    settled(pulled, aggregated, push_tasks(aggregated))


synsetforge_crowd()
