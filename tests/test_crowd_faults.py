"""Label Studio answers that go wrong on the way back, through a faulty proxy in front of the real server.

- An import that reached the server and then lost its answer (the client sees a dropped connection after the
  tasks were created): retrying blindly would create every task twice. `CrowdClient.import_tasks` looks first,
  for verify tasks and for box tasks alike.
- A reply cut off mid-body (malformed JSON): retried inside the client, so a crowd DAG task neither crashes on a
  JSONDecodeError nor fails for good (`fail_fast` leaves it to the retries).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pandas as pd
import pytest
from fixtures_labelstudio import make_images, write_synsets

from crowd.client import CrowdClient
from crowd.provision import image_dir_of, provision
from crowd.push import push, server_tasks
from pipeline.services import ThreadServer, serve_in_thread

pytestmark = pytest.mark.slow
TENCH = "n01440764"


@dataclass
class FaultyProxy(ThreadServer):
    """Forwards to Label Studio; `faults` maps a (method, path-part) rule to how many times it still misbehaves:
    "drop" forwards the request, then closes the connection without answering; "truncate" answers with half the
    body (and a Content-Length that matches the half, so the HTTP layer is fine and only the JSON is cut)."""

    faults: list[dict[str, Any]] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, method: str, path: str) -> str | None:
        with self.lock:
            for f in self.faults:
                if f["method"] == method and f["part"] in path and f["times"] > 0:
                    f["times"] -= 1
                    self.seen.append(f"{f['action']} {method} {path}")
                    return f["action"]
        return None


def start_proxy(upstream: str) -> FaultyProxy:
    box: dict[str, FaultyProxy] = {}
    client = httpx.Client(base_url=upstream, timeout=120)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
            action = box["p"].take(self.command, self.path)
            resp = client.request(self.command, self.path, content=body, headers=headers)
            if action == "drop":  # the server did the work; its answer never arrives
                self.close_connection = True
                self.connection.shutdown(2)
                return
            data = resp.content
            if action == "truncate":
                data = data[: max(1, len(data) // 2)]
            self.send_response(resp.status_code)
            for k, v in resp.headers.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward  # noqa: N815

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box["p"] = FaultyProxy(server=server, thread=serve_in_thread(server, "faulty-proxy"))
    return box["p"]


@pytest.fixture
def proxy(labelstudio):
    p = start_proxy(labelstudio.url)
    yield p
    p.stop()


def _world(ls, n: int):
    store = ls.new_store()
    images = make_images(store, n, seed=4242 + n)
    write_synsets(store)
    settings = ls.settings(store)
    # a project of the plan's overlap (2): push sends each request to a project of its own overlap
    pid = provision(ls.admin(), settings, overlap=2, image_dir=image_dir_of(store))["verify"]
    plan = pd.DataFrame({"image_id": images["image_id"], "wnid": TENCH, "n_more": 2})
    return store, settings, pid, plan


def test_an_import_whose_answer_is_lost_creates_each_task_once(labelstudio, proxy):
    store, settings, pid, plan = _world(labelstudio, 12)
    proxy.faults.append({"method": "POST", "part": f"/api/projects/{pid}/import", "action": "drop", "times": 1})
    client = CrowdClient(proxy.url, labelstudio.token, retries=3, backoff_s=0.05)
    out = push(store, client, settings, project_id=pid, plan=plan)
    assert proxy.seen and proxy.seen[0].startswith("drop POST"), "the fault never fired"
    assert out["pushed"] == 12
    remote = server_tasks(labelstudio.admin(), pid)
    assert len(remote) == 12 and remote["request_id"].is_unique  # a blind retry would have made 24
    tasks = store.read_table("tasks").to_pandas()
    assert sorted(tasks["task_id"]) == sorted(remote["task_id"])


def test_a_box_import_whose_answer_is_lost_creates_each_task_once(labelstudio, proxy):
    from crowd import boxes as crowd_boxes

    store, settings, _pid, _plan = _world(labelstudio, 3)
    images = store.read_table("images").to_pandas()
    labels = pd.DataFrame({"image_id": images["image_id"], "wnid": TENCH, "status": "accepted", "n_votes": 3,
                           "n_yes": 3, "confidence": 0.999, "method": "adaptive-ds"})
    store.write_table("labels", labels)
    client = CrowdClient(proxy.url, labelstudio.token, retries=3, backoff_s=0.05)
    proxy.faults.append({"method": "POST", "part": "/import", "action": "drop", "times": 1})
    summary = crowd_boxes.sync(store, settings, client=client, pairs=labels[["image_id", "wnid"]])
    assert any(s.startswith("drop POST") for s in proxy.seen), "the fault never fired"
    box_tasks = store.read_table("box_tasks").to_pandas()
    admin = labelstudio.admin()
    remote = [t for pid in summary["projects"].values() for t in admin.iter_tasks(int(pid))]
    rids = [t["data"]["request_id"] for t in remote]
    assert len(rids) == len(set(rids)) == len(box_tasks) == 3, (summary, rids)  # one draw task per image, once


def test_a_truncated_answer_is_read_again_not_taken_as_a_mistake(labelstudio, proxy):
    store, settings, pid, plan = _world(labelstudio, 4)
    push(store, labelstudio.admin(), settings, project_id=pid, plan=plan)
    proxy.faults.append({"method": "GET", "part": "/api/tasks", "action": "truncate", "times": 1})
    client = CrowdClient(proxy.url, labelstudio.token, retries=2, backoff_s=0.05)
    assert len(server_tasks(client, pid)) == 4
    assert proxy.seen == [f"truncate GET {proxy.seen[0].split(' ', 2)[2]}"]
    # Truncated every time: a CrowdError that says the server did not answer, retried by the DAG (not fail-fast).
    proxy.faults.append({"method": "GET", "part": "/api/tasks", "action": "truncate", "times": 10})
    from crowd.client import CrowdError
    from pipeline.errors import UserError

    with pytest.raises(CrowdError) as err:
        server_tasks(client, pid)
    assert err.value.transient and not isinstance(err.value, UserError) and "not JSON" in str(err.value)


def test_fail_fast_fails_input_mistakes_and_leaves_server_faults_to_the_retries():
    from airflow.sdk.exceptions import AirflowFailException

    from crowd.client import CrowdError
    from pipeline.dagtools import fail_fast
    from pipeline.errors import UserError

    def raising(exc):
        @fail_fast
        def task():
            raise exc
        return task

    with pytest.raises(AirflowFailException):
        raising(UserError("bad Param"))()
    for exc in (json.JSONDecodeError("Expecting value", "", 0), CrowdError("gone", status=503), ValueError("x")):
        with pytest.raises(type(exc)):
            raising(exc)()


def test_dagtools_context_is_none_only_outside_a_task(monkeypatch):
    """Outside a task there is no context (the CLI); any other failure to get it is raised, not taken as "outside
    a task", which would silently lose the store `announce` hands to the next DAG."""
    import airflow.sdk

    from pipeline import dagtools
    from pipeline.config import load_settings

    assert dagtools.upstream_store() is None
    dagtools.announce(load_settings(env={}))  # outside a task: nothing to announce, no error

    def broken():
        raise KeyError("ti")

    monkeypatch.setattr(airflow.sdk, "get_current_context", broken)
    with pytest.raises(KeyError):
        dagtools.announce(load_settings(env={}))
