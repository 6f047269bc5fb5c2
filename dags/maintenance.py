"""Maintenance DAG: compact the working tables, refit QC from all votes, vacuum. Wiring only; the work is
`Store.compact` / `Store.vacuum` (what `synsetforge store compact|vacuum` run) and `pipeline.qc.stage.run_qc(full=True)`
(`synsetforge qc --full`).

Daily, one run at a time. `compact` merges each working table's small files (one per append) into large ones, the
votes sorted by synset so the refit's synset batches (and the crowd loop's per-synset reads) skip most of the table;
it leaves labels, push_plan, qc_pairs and qc_margin alone, whose files QC keeps cut at synset boundaries so a round
rewrites only the synsets it re-decides. `refit_qc` re-decides every synset from all votes, streamed in batches of
synsets (`refit` Param off skips it): the crowd loop's incremental rounds leave a synset's labels as they were until
it changes, and the refit brings them all to the current worker model. `vacuum` then deletes the data files no
version younger than `retention_days` needs (the commit log is kept). A QC round of the crowd loop that runs at the
same time as the refit loses the race for its done row and fails (its task retries; the next round repairs the
tables); pause the crowd DAG for the refit on a busy crowd.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from pipeline.dagtools import DAG_DEFAULTS, fail_fast, store_param


def _store(params):
    from pipeline.dagtools import settings_from_params
    from pipeline.store import store_from_settings

    settings = settings_from_params(params, "qc", ["method"])
    return settings, store_from_settings(settings)


@dag(
    dag_id="synsetforge_maintenance",
    schedule="@daily",
    **DAG_DEFAULTS,
    max_active_runs=1,
    tags=["synsetforge", "maintenance"],
    params={
        "store": store_param(),
        "refit": Param(True, type="boolean", description="refit QC from all votes (synsetforge qc --full)"),
        "retention_days": Param(30, type="number", minimum=0.05, description="vacuum keeps every version this young"),
        "method": Param(None, type=["null", "string"], enum=[None, "adaptive-ds", "ds", "mv", "confidence-table"],
                        description="QC method of the refit (default qc.method)"),
    },
    doc_md=__doc__,
)
def synsetforge_maintenance():
    @task
    @fail_fast
    def compact(params=None) -> list[dict]:
        from pipeline.qc.stage import LAYOUT_TABLES

        _, store = _store(params)
        return [store.compact(name, order_by=["wnid"] if name == "votes" else None)
                for name in store.working_tables() if name not in LAYOUT_TABLES and store.table_version(name) is not None]

    @task
    @fail_fast
    def refit_qc(compacted: list, params=None) -> dict:
        from pipeline.qc.stage import run_qc

        if not params.get("refit", True):
            return {"refit": False}
        settings, store = _store(params)
        summary = run_qc(store, settings, full=True)
        return {**{k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))},
                **{f"round_{k}": v for k, v in summary["qc_round"].items()}}

    @task
    @fail_fast
    def vacuum(refitted: dict, params=None) -> dict:
        from datetime import timedelta

        _, store = _store(params)
        keep = timedelta(days=float(params.get("retention_days") or 30))
        return {name: len(store.vacuum(name, keep)) for name in store.working_tables()
                if store.table_version(name) is not None}

    vacuum(refit_qc(compact()))


synsetforge_maintenance()
