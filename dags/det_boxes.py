"""DET box loop: a box around every instance of every present class of every fully annotated image, asked per
(image, class) as the ILSVRC box loop asks it (make a box -> quality -> coverage), with four extreme clicks instead
of a dragged rectangle when det.box_kind is `extreme` (Papadopoulos et al., ICCV 2017). Wiring only; the work is in
crowd.boxes with the DET tables (det_box_tasks, det_box_answers, det_boxes, det_coverage) and its own Label Studio
projects, and in pipeline.boxes (the pure state machine): the same code `synsetforge det boxes` runs.

Runs every 10 minutes and when the presence loop settles (the `det_images` Asset); scheduled runs skip quietly with
no Label Studio configured. A DET release (synsetforge_det_release, by hand) follows.
"""

from __future__ import annotations

from airflow.sdk import Asset, dag, task

from pipeline.dagtools import DAG_DEFAULTS, SERVER_RETRIES, fail_fast, label_studio_params, loop_schedule

DET_BOX_TASKS = Asset("synsetforge://tables/det_box_tasks")
DET_BOX_ANSWERS = Asset("synsetforge://tables/det_box_answers")
DET_BOXES = Asset("synsetforge://tables/det_boxes")
DET_COVERAGE = Asset("synsetforge://tables/det_coverage")


def _settings(params):
    from pipeline.dagtools import settings_from_params

    return settings_from_params(params, "crowd", ["url", "project_prefix", "files_root"])


def _ctx(params):
    from crowd.presence import admin_from_settings, det_tables
    from pipeline.boxes import box_settings
    from pipeline.store import store_from_settings

    settings = _settings(params)
    return (settings, store_from_settings(settings), admin_from_settings(settings), box_settings(settings),
            det_tables(settings))


@dag(
    dag_id="synsetforge_det_boxes",
    schedule=loop_schedule("synsetforge://tables/det_images"),
    **DAG_DEFAULTS,
    max_active_runs=1,  # two loops at once would race on the tables
    tags=["synsetforge", "det", "boxes"],
    params=label_studio_params(),
    doc_md=__doc__,
)
def synsetforge_det_boxes():
    @task(**SERVER_RETRIES)
    @fail_fast
    def provision(params=None, dag_run=None) -> dict:
        from crowd.boxes import provision_boxes
        from pipeline.dagtools import skip_scheduled_run_without_crowd

        skip_scheduled_run_without_crowd(_settings(params), dag_run)
        settings, store, client, policy, tables = _ctx(params)
        return provision_boxes(client, settings, store, policy, tables)

    @task(outlets=[DET_BOX_TASKS, DET_BOX_ANSWERS], **SERVER_RETRIES)
    @fail_fast
    def pull(projects: dict, params=None) -> dict:
        from crowd.boxes import adopt, pull_box_answers

        settings, store, client, policy, tables = _ctx(params)
        tasks, _ = adopt(store, client, projects, tables)
        return {"pulled": pull_box_answers(store, client, settings, projects, tasks, policy, tables),
                "tasks": len(tasks)}

    @task(outlets=[DET_BOXES, DET_COVERAGE])
    @fail_fast
    def plan(pulled: dict, params=None) -> dict:
        from crowd.presence import det_box_pairs
        from pipeline.boxes import run_plan, summarize
        from pipeline.dagtools import announce

        settings, store, client, policy, tables = _ctx(params)
        result = run_plan(store, policy, det_box_pairs(store), tables)
        announce(settings, DET_BOXES, DET_COVERAGE)
        s = summarize(result.coverage, result.boxes)
        return {k: v for k, v in s.items() if isinstance(v, (int, float, str)) or v is None} | {
            "next_tasks": len(result.actions)}

    @task(outlets=[DET_BOX_TASKS], **SERVER_RETRIES)
    @fail_fast
    def push(planned: dict, projects: dict, params=None) -> dict:
        from crowd.boxes import push_box_tasks
        from crowd.presence import det_box_pairs
        from pipeline.boxes import run_plan

        settings, store, client, policy, tables = _ctx(params)
        result = run_plan(store, policy, det_box_pairs(store), tables)  # the same replay `plan` saw
        return {"pushed": push_box_tasks(store, client, settings, projects, result.actions, result.boxes,
                                         tables=tables)}

    projects = provision()
    push(plan(pull(projects)), projects)


synsetforge_det_boxes()
