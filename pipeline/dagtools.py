"""Small helpers the DAG files share, kept here so DAG files stay wiring only (Airflow is imported lazily)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.config import Settings, load_settings

# Every task: retried with exponential backoff (30 s, 60 s, ...), so a server that went away or a killed worker
# costs a retry, not a failed run. Stages are idempotent, so a retry finishes what the failed attempt began.
DEFAULT_ARGS: dict[str, Any] = {
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
}
# Tasks that talk to Label Studio or search APIs get more attempts: those outages are the common case.
SERVER_RETRIES: dict[str, Any] = {"retries": 4}
# What every DAG of the project shares: no backfill of past intervals, the retries above.
DAG_DEFAULTS: dict[str, Any] = {"start_date": datetime(2026, 1, 1, tzinfo=UTC), "catchup": False,
                                "default_args": DEFAULT_ARGS}
CROWD_SCHEDULE = "*/10 * * * *"  # the reconcile loops look for new answers this often (and on their Asset)


def store_param() -> Any:
    from airflow.sdk import Param

    return Param(None, type=["null", "string"], description="store URL; default from configuration")


def label_studio_params() -> dict[str, Any]:
    """The Params of a DAG that works in Label Studio (the crowd and box loops)."""
    from airflow.sdk import Param

    return {
        "store": store_param(),
        "url": Param(None, type=["null", "string"], description="Label Studio URL; default crowd.url"),
        "project_prefix": Param(None, type=["null", "string"]),
        "files_root": Param(None, type=["null", "string"], description="Label Studio LOCAL_FILES_DOCUMENT_ROOT"),
    }


def loop_schedule(asset_uri: str) -> Any:
    """A reconcile loop runs every CROWD_SCHEDULE and whenever the stage before it publishes `asset_uri`."""
    from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable

    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(CROWD_SCHEDULE, timezone="UTC"),
                               assets=Asset(asset_uri))


def skip_scheduled_run_without_crowd(settings: Settings, dag_run: Any) -> None:
    """A scheduled or asset-triggered loop run on a machine with no Label Studio configured ends as skipped;
    a run started by hand goes on, and fails saying what is missing."""
    if settings.crowd.url is None and dag_run is not None and dag_run.run_type != "manual":
        skip("no Label Studio configured (crowd.url); nothing to reconcile")


def settings_from_params(params: Mapping[str, Any] | None, section: str, names: Sequence[str]) -> Settings:
    """Load the configuration and lay the DAG run's Params over it: `store` and the named fields of `section`.

    A Param left at None (or an empty list) keeps the configured value, so a DAG run only overrides what the
    data engineer actually set in the trigger form. A run started by an Asset gets no Params from the run that
    triggered it, so it follows that run's store (carried in the asset event) unless its own Param says otherwise.
    """
    params = dict(params or {})
    overrides: dict[str, dict[str, Any]] = {}
    store = params.get("store") or upstream_store()
    if store:
        overrides["store"] = {"url": store}
    chosen = {n: params[n] for n in names if params.get(n) not in (None, [], "")}
    if chosen:
        overrides[section] = chosen
    return load_settings(overrides=overrides)


def _context() -> Mapping[str, Any] | None:
    """The running task's context, or None outside a task (the CLI, tests of the core). Airflow says "no task is
    running" with a RuntimeError; anything else is raised, since swallowing it would lose the store that
    `announce` hands to the next DAG."""
    from airflow.sdk import get_current_context

    try:
        return get_current_context()
    except RuntimeError:
        return None


def upstream_store() -> str | None:
    """The store named by the asset event that triggered the current run, if it was asset-triggered."""
    ctx = _context()
    events = (ctx or {}).get("triggering_asset_events") or {}
    for asset_events in events.values():
        for event in asset_events:
            if (event.extra or {}).get("store"):
                return str(event.extra["store"])
    return None


def announce(settings: Settings, *assets: Any) -> None:
    """Put the store this run wrote to on the asset events of `assets`, for the runs they trigger."""
    ctx = _context()
    if ctx is None:
        return
    for asset in assets:
        ctx["outlet_events"][asset].extra = {"store": settings.store.url}


def fail_fast(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A mistake in the input (bad Param, configuration, table or file; an existing release: a `UserError`)
    fails at once, since retrying it cannot help. Everything else (a server gone, a malformed or truncated
    answer, a killed worker) is left to the task's retries."""
    from pipeline.errors import UserError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc

    return wrapper


def skip(reason: str) -> None:
    from airflow.sdk.exceptions import AirflowSkipException

    raise AirflowSkipException(reason)
