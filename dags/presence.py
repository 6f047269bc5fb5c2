"""DET presence loop (ILSVRC DET, Deng et al. CHI 2014): provision -> adopt + pull -> refresh controls -> plan (QC,
image states) -> push -> settled? Wiring only; the work is in crowd.presence (Label Studio side) and
pipeline.presence (the pure replay), the same code `synsetforge det sync|plan|gold` runs.

Every accepted image is asked about the DET classes through the question tree of `synsetforge vocab --det`
(det_questions): one question or a checklist of related questions per task (det.scheme); a "no" clears a subtree,
a "yes" opens its children, the next question per image is the one with the most labels settled per second given
co-occurrence. No state lives in the DAG: each run replays the presence tables, so a failed run is repaired by the
next one.

Runs every 10 minutes and whenever ingest publishes new images (the `images` Asset). When nothing is left to ask
or wait for after new answers came in, `settled` publishes the `det_images` Asset, which starts the DET box loop
(synsetforge_det_boxes); otherwise it is skipped. Scheduled runs skip quietly with no Label Studio configured.
"""

from __future__ import annotations

from airflow.sdk import Asset, dag, task

from pipeline.dagtools import DAG_DEFAULTS, SERVER_RETRIES, fail_fast, label_studio_params, loop_schedule

PRESENCE_TASKS = Asset("synsetforge://tables/presence_tasks")
PRESENCE_VOTES = Asset("synsetforge://tables/presence_votes")
PRESENCE_GOLD = Asset("synsetforge://tables/presence_gold")
PRESENCE_LABELS = Asset("synsetforge://tables/presence_labels")
DET_IMAGES = Asset("synsetforge://tables/det_images")


def _settings(params):
    from pipeline.dagtools import settings_from_params

    return settings_from_params(params, "crowd", ["url", "project_prefix", "files_root"])


def _ctx(params):
    from crowd.presence import admin_from_settings
    from pipeline.store import store_from_settings

    settings = _settings(params)
    return settings, store_from_settings(settings), admin_from_settings(settings)


@dag(
    dag_id="synsetforge_presence",
    schedule=loop_schedule("synsetforge://tables/images"),
    **DAG_DEFAULTS,
    max_active_runs=1,  # two loops at once would race on the tables
    tags=["synsetforge", "det"],
    params=label_studio_params(),
    doc_md=__doc__,
)
def synsetforge_presence():
    @task(**SERVER_RETRIES)
    @fail_fast
    def provision(params=None, dag_run=None) -> dict:
        from crowd.presence import provision_presence
        from pipeline.dagtools import skip_scheduled_run_without_crowd

        skip_scheduled_run_without_crowd(_settings(params), dag_run)  # before _ctx: it connects to Label Studio
        settings, store, client = _ctx(params)
        return provision_presence(client, settings, store)

    @task(outlets=[PRESENCE_TASKS, PRESENCE_VOTES], **SERVER_RETRIES)
    @fail_fast
    def pull(projects: dict, params=None) -> dict:
        from crowd.presence import adopt, pull_presence

        settings, store, client = _ctx(params)
        tasks, _ = adopt(store, client, projects)
        return {"pulled": pull_presence(store, client, settings, projects, tasks), "tasks": len(tasks)}

    @task(outlets=[PRESENCE_GOLD])
    @fail_fast
    def refresh_gold(pulled: dict, params=None) -> dict:
        from pipeline.presence import refresh_presence_gold
        from pipeline.store import store_from_settings

        settings = _settings(params)
        return refresh_presence_gold(store_from_settings(settings), settings)

    @task(outlets=[PRESENCE_LABELS])
    @fail_fast
    def plan(gold: dict, params=None) -> dict:
        from pipeline.presence import run_presence_plan, summarize
        from pipeline.store import store_from_settings

        settings = _settings(params)
        result = run_presence_plan(store_from_settings(settings), settings)
        s = summarize(result.images, result.labels)
        return {k: v for k, v in s.items() if isinstance(v, (int, float, str)) or v is None} | {
            "next_tasks": len(result.actions)}

    @task(outlets=[PRESENCE_TASKS], **SERVER_RETRIES)
    @fail_fast
    def push(planned: dict, projects: dict, params=None) -> dict:
        from crowd.presence import push_presence
        from pipeline.presence import run_presence_plan

        settings, store, client = _ctx(params)
        result = run_presence_plan(store, settings)  # a pure replay of the same tables: the actions `plan` saw
        return {"pushed": push_presence(store, client, settings, projects, result.actions)}

    @task(outlets=[DET_IMAGES])
    def settled(pulled: dict, planned: dict, pushed: dict, params=None) -> dict:
        from pipeline.dagtools import announce, skip

        waiting = planned.get("images", 0) - planned.get("done", 0)
        if planned.get("next_tasks", 1) or waiting:
            skip(f"{waiting} images not fully annotated yet")
        if not pulled.get("pulled"):
            skip("settled, and no new answers since the last run: det_images unchanged")
        announce(_settings(params), DET_IMAGES)
        return {"done": planned.get("done")}

    projects = provision()
    pulled = pull(projects)
    planned = plan(refresh_gold(pulled))
    settled(pulled, planned, push(planned, projects))


synsetforge_presence()
