"""Box loop (ILSVRC draw -> quality -> coverage): provision -> adopt + pull -> plan -> push. Wiring only.

The work is in crowd.boxes (Label Studio side) and pipeline.boxes (the pure state machine), the same code
`synsetforge boxes sync|plan|status` runs. No state lives in the DAG: each run replays the box tables, so
the DAG can run on a schedule and a failed run is repaired by the next one. Label Studio's URL comes from
the configuration or the `url` Param; the token and the pseudonym key only from the environment.

Runs every 10 minutes and when the verification loop settles (the `labels` Asset); scheduled runs skip quietly
on a machine with no Label Studio configured. The release that follows is started by hand (it needs a version).
"""

from __future__ import annotations

from airflow.sdk import Asset, dag, task

from pipeline.dagtools import DAG_DEFAULTS, SERVER_RETRIES, fail_fast, label_studio_params, loop_schedule

BOX_TASKS = Asset("synsetforge://tables/box_tasks")
BOX_ANSWERS = Asset("synsetforge://tables/box_answers")
BOXES = Asset("synsetforge://tables/boxes")
COVERAGE = Asset("synsetforge://tables/coverage")


def _settings(params):
    from pipeline.dagtools import settings_from_params

    return settings_from_params(params, "crowd", ["url", "project_prefix", "files_root"])


def _ctx(params):
    from crowd.boxes import admin_from_settings
    from pipeline.boxes import box_settings
    from pipeline.store import store_from_settings

    settings = _settings(params)
    store = store_from_settings(settings)
    return settings, store, admin_from_settings(settings), box_settings(settings)


@dag(
    dag_id="synsetforge_boxes",
    schedule=loop_schedule("synsetforge://tables/labels"),
    **DAG_DEFAULTS,
    max_active_runs=1,  # two loops at once would race on the tables
    tags=["synsetforge", "boxes"],
    params=label_studio_params(),
    doc_md=__doc__,
)
def synsetforge_boxes():
    @task(**SERVER_RETRIES)
    @fail_fast
    def provision(params=None, dag_run=None) -> dict:
        from crowd.boxes import provision_boxes
        from pipeline.dagtools import skip_scheduled_run_without_crowd

        skip_scheduled_run_without_crowd(_settings(params), dag_run)  # before _ctx: it connects to Label Studio
        settings, store, client, policy = _ctx(params)
        return provision_boxes(client, settings, store, policy)

    @task(outlets=[BOX_TASKS, BOX_ANSWERS], **SERVER_RETRIES)
    @fail_fast
    def pull(projects: dict, params=None) -> dict:
        from crowd.boxes import adopt, pull_box_answers

        settings, store, client, policy = _ctx(params)
        tasks, _ = adopt(store, client, projects)
        return {"pulled": pull_box_answers(store, client, settings, projects, tasks, policy), "tasks": len(tasks)}

    @task(outlets=[BOXES, COVERAGE])
    @fail_fast
    def plan(pulled: dict, params=None) -> dict:
        from pipeline.boxes import run_plan, summarize
        from pipeline.dagtools import announce

        settings, store, client, policy = _ctx(params)
        result = run_plan(store, policy)
        announce(settings, BOXES, COVERAGE)
        s = summarize(result.coverage, result.boxes)
        return {k: v for k, v in s.items() if isinstance(v, (int, float, str)) or v is None} | {
            "next_tasks": len(result.actions)}

    @task(outlets=[BOX_TASKS], **SERVER_RETRIES)
    @fail_fast
    def push(planned: dict, projects: dict, params=None) -> dict:
        from crowd.boxes import push_box_tasks
        from pipeline.boxes import run_plan

        settings, store, client, policy = _ctx(params)
        result = run_plan(store, policy)  # a pure replay of the same tables: the same actions `plan` saw
        return {"pushed": push_box_tasks(store, client, settings, projects, result.actions, result.boxes)}

    projects = provision()
    push(plan(pull(projects)), projects)


synsetforge_boxes()
