"""Crowd status: per synset how many tasks are open or done, votes and workers; per worker gold accuracy.

    >>> import pandas as pd
    >>> tasks = pd.DataFrame({"task_id": [1, 2], "wnid": ["n1", "n1"], "is_gold": [False, True]})
    >>> remote = pd.DataFrame({"task_id": [1, 2], "is_labeled": [True, False]})
    >>> votes = pd.DataFrame({"task_id": [1], "wnid": ["n1"], "worker": ["w-a"]})
    >>> synset_status(tasks, remote, votes).to_dict("records")
    [{'wnid': 'n1', 'tasks': 2, 'gold_tasks': 1, 'open': 1, 'done': 1, 'votes': 1, 'workers': 1}]
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from crowd.client import CrowdClient
from crowd.push import server_tasks
from pipeline.store import Store


def synset_status(tasks: pd.DataFrame, remote: pd.DataFrame, votes: pd.DataFrame) -> pd.DataFrame:
    """Pure: one row per wnid. A task is done when Label Studio says it has all its annotations."""
    if tasks.empty:
        return pd.DataFrame(columns=["wnid", "tasks", "gold_tasks", "open", "done", "votes", "workers"])
    t = tasks.merge(remote[["task_id", "is_labeled"]], on="task_id", how="left")
    t["done"] = t["is_labeled"].fillna(False).astype(bool)
    out = t.groupby("wnid").agg(tasks=("task_id", "size"), gold_tasks=("is_gold", "sum"), done=("done", "sum"))
    out["open"] = out["tasks"] - out["done"]
    if len(votes):
        vg = votes.groupby("wnid").agg(votes=("task_id", "size"), workers=("worker", "nunique"))
        out = out.join(vg, how="left")
    else:
        out["votes"], out["workers"] = 0, 0
    out = out.fillna(0).astype("int64").reset_index()
    return out[["wnid", "tasks", "gold_tasks", "open", "done", "votes", "workers"]]


def status(store: Store, client: CrowdClient | None, project_ids: list[int]) -> dict[str, Any]:
    tasks = store.read_table("tasks", missing_ok=True).to_pandas()
    votes = store.read_table("votes", missing_ok=True).to_pandas()
    remote = pd.concat([server_tasks(client, p) for p in project_ids], ignore_index=True) if client and project_ids \
        else pd.DataFrame({"task_id": pd.Series(dtype="int64"), "is_labeled": pd.Series(dtype=bool)})
    workers = store.read_table("worker_gold", missing_ok=True).to_pandas()
    quarantine = store.read_table("quarantine", missing_ok=True).to_pandas()
    return {"synsets": synset_status(tasks, remote, votes), "workers": workers, "quarantined": len(quarantine)}
