"""Small helpers the DAG files share, kept here so DAG files stay wiring only (and free of Airflow imports here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.config import Settings, load_settings


def settings_from_params(params: Mapping[str, Any] | None, section: str, names: Sequence[str]) -> Settings:
    """Load the configuration and lay the DAG run's Params over it: `store` and the named fields of `section`.

    A Param left at None (or an empty list) keeps the configured value, so a DAG run only overrides what the
    data engineer actually set in the trigger form.
    """
    params = dict(params or {})
    overrides: dict[str, dict[str, Any]] = {}
    if params.get("store"):
        overrides["store"] = {"url": params["store"]}
    chosen = {n: params[n] for n in names if params.get(n) not in (None, [], "")}
    if chosen:
        overrides[section] = chosen
    return load_settings(overrides=overrides)
