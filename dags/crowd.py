"""Crowd reconcile loop: pull new votes -> aggregate (QC) -> refresh gold controls and block flagged workers -> push
the next tasks -> settled? Wiring only; the work is in crowd.pull, pipeline.qc.stage, crowd.gold, crowd.status and
crowd.push, the same code `synsetforge crowd pull|gold|workers|push` and `synsetforge qc` run.

`refresh_gold` rebuilds the `gold` table (known positives and negatives from confident labels, plus the seed file)
while QC still has votes to ask for; `block_workers` deactivates the Label Studio accounts QC or gold flags when
crowd.auto_block (or the `auto_block` Param) is on, and does nothing otherwise.

Runs every 10 minutes and whenever ingest publishes new images (the `images` Asset). Every step is idempotent
(pull reads what changed since each project's watermark and dedupes by annotation id, push dedupes by request id with
a write-ahead log and reconciles only the batch in doubt), so any failed run is repaired by the next one. Tasks go to
sharded projects of one overlap each (crowd.project_size tasks per project; see crowd.provision). When QC has nothing
left to ask (every synset settled or out of budget, or the pairs left need an annotator who has not voted on them yet)
after new votes came in, the `settled` task publishes the `labels` Asset, which starts the box loop; otherwise it is
skipped. Its message and the aggregate task's log say the team's situation in words
(`team_note`: active annotators, pairs decided at the small-team bar, pairs that need a new annotator). Scheduled runs
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

    return settings_from_params(params, "crowd", ["url", "project_prefix", "files_root", "gold_rate", "auto_block"])


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
        "auto_block": Param(None, type=["null", "boolean"], description="block flagged workers (default crowd.auto_block)"),
        "kind": Param("verify", type="string"),
        "qc_method": Param(None, type=["null", "string"], enum=[None, "adaptive-ds", "ds", "mv", "confidence-table"],
                           description="how votes become labels (default qc.method)"),
    },
    doc_md=__doc__,
)
def synsetforge_crowd():
    @task(outlets=[VOTES], **SERVER_RETRIES)
    @fail_fast
    def pull_votes(params=None, dag_run=None) -> dict:
        from crowd.pull import pull
        from pipeline.dagtools import skip_scheduled_run_without_crowd

        settings = _settings(params)
        skip_scheduled_run_without_crowd(settings, dag_run)
        client, store = _client_and_store(settings)
        out = pull(store, client, settings, kinds=[params["kind"]])  # the kind's projects that are not archived
        return {k: v for k, v in out.items() if isinstance(v, (int, float, str, list))}

    @task
    @fail_fast
    def aggregate(pulled: dict, params=None) -> dict:
        from pipeline.qc.stage import run_qc
        from pipeline.store import store_from_settings

        # run_qc seeds the plan with ingested pairs not voted on yet (image_links, near copies left out)
        settings = _settings(params)
        summary = run_qc(store_from_settings(settings), settings, method=params.get("qc_method"))
        print(summary["team_note"])  # in the task log: who can still vote, which pairs need a new annotator
        return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}

    @task
    @fail_fast
    def refresh_gold(aggregated: dict, params=None) -> dict:
        from crowd.gold import refresh_gold as refresh
        from pipeline.store import store_from_settings

        settings = _settings(params)  # while QC still asks for votes; a settling run publishes labels as they are
        return refresh(store_from_settings(settings), settings, grow=aggregated.get("push_pairs", 1) > 0)

    @task(**SERVER_RETRIES)
    @fail_fast
    def block_workers(aggregated: dict, params=None) -> dict:
        from crowd.status import block_flagged

        settings = _settings(params)
        if not settings.crowd.auto_block:
            return {"auto_block": False, "blocked": []}
        client, store = _client_and_store(settings)
        return block_flagged(store, client, settings)

    @task(outlets=[TASKS], **SERVER_RETRIES)
    @fail_fast
    def push_tasks(aggregated: dict, params=None) -> dict:
        from crowd.cli import ensure_instructions
        from crowd.provision import cors_origin, ensure_bucket_cors
        from crowd.push import push

        settings = _settings(params)
        client, store = _client_and_store(settings)
        if not store.has_table("push_plan"):
            return {"pushed": 0, "reason": "no push_plan table yet"}
        kind = params["kind"]
        ensure_bucket_cors(store, cors_origin(settings, client))
        out = push(store, client, settings, kind=kind)  # into the kind's projects of each request's overlap
        for pid in out["projects"]:
            ensure_instructions(client, store, settings, pid, kind)
        print(out["message"])
        return {k: v for k, v in out.items() if isinstance(v, (int, float, str))}

    @task(outlets=[LABELS])
    def settled(pulled: dict, aggregated: dict, pushed: dict, params=None) -> dict:
        from pipeline.dagtools import announce, skip

        team = aggregated.get("team_note", "")  # the team's situation in words (pipeline.qc.team)
        if aggregated.get("push_pairs", 1) > 0:
            skip(f"{aggregated.get('push_pairs')} pairs still need votes. {team}")
        if not pulled.get("new_votes"):
            skip(f"settled, and no new votes since the last run: labels unchanged. {team}")
        announce(_settings(params), LABELS)
        return {"accepted": aggregated.get("accepted"), "rejected": aggregated.get("rejected"),
                "needs_new_annotator": aggregated.get("needs_new_annotator", 0), "team": team}

    pulled = pull_votes()
    aggregated = aggregate(pulled)
    pushed = push_tasks(aggregated)
    [refresh_gold(aggregated), block_workers(aggregated)] >> pushed  # controls fresh, flagged workers out, then push
    settled(pulled, aggregated, pushed)


synsetforge_crowd()
