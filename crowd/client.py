"""A thin wrapper around label-studio-sdk 2.x: retries with backoff, clear errors, no secret in any message.

Typed SDK calls go through `call(what, fn, ...)`; the few endpoints where the SDK's models would cost a
parse per task (task listing, JSON export, the annotator's next-task call) go through `request`, which
uses the same retry policy. Every failure that survives the retries becomes a `CrowdError` naming the
server URL and the operation, never the token.

    >>> c = CrowdClient("http://127.0.0.1:8080", "secret-token", retries=0)
    >>> "secret-token" in repr(c)
    False
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import httpx

from pipeline.errors import RETRY_STATUS, ServiceError

log = logging.getLogger("synsetforge.crowd")
T = TypeVar("T")


class CrowdError(ServiceError):
    """Label Studio could not be reached, refused a request or answered something malformed; the message says
    what to do. `status` is the HTTP status of the last answer (None: no answer or an unreadable one)."""


class MalformedAnswer(ValueError):
    """A 2xx answer whose body is not what the endpoint returns (truncated JSON, wrong shape): retried."""


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an SDK or httpx error carries, if any."""
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, CrowdError):
        return exc.status
    if isinstance(exc, ApiError):
        return exc.status_code
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code
    return None


def _is_transient(exc: BaseException) -> bool:
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, (httpx.TransportError, MalformedAnswer, json.JSONDecodeError)):
        return True  # a reply cut off mid-body decodes as malformed JSON: the next try usually reads it whole
    if isinstance(exc, (ApiError, httpx.HTTPStatusError)):
        status = status_of(exc)
        return status is None or status in RETRY_STATUS or status >= 500
    return False


class CrowdClient:
    """One Label Studio account (admin or annotator) on one server."""

    def __init__(
        self, url: str, token: str, *, retries: int = 5, backoff_s: float = 0.5, timeout_s: float = 300.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not url:
            raise CrowdError("no Label Studio URL: set SYNSETFORGE__CROWD__URL or pass --url")
        if not token:
            raise CrowdError("no Label Studio token: set SYNSETFORGE__CROWD__TOKEN (an API token of an admin)")
        self.url = url.rstrip("/")
        self._token = token
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.url, timeout=timeout_s, headers={"Authorization": f"Token {token}"}, follow_redirects=True,
        )
        self._sdk: Any = None

    def __repr__(self) -> str:
        return f"CrowdClient({self.url!r})"

    @property
    def sdk(self) -> Any:
        if self._sdk is None:
            from label_studio_sdk import LabelStudio

            # The SDK retries twice on its own; we keep it at 0 so one policy (ours) applies.
            self._sdk = LabelStudio(base_url=self.url, api_key=self._token, timeout=self.timeout_s, max_retries=0)
        return self._sdk

    def close(self) -> None:
        self._http.close()

    # -- retry policy -----------------------------------------------------------------------------------
    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run an SDK call; retry transient failures (connection refused, 5xx, 429) with exponential backoff."""
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - classified just below
                status = status_of(exc)
                if not _is_transient(exc):
                    raise CrowdError(f"Label Studio at {self.url} refused {what}: {_describe(exc, self._token)}",
                                     status=status, transient=False) from None
                if attempt == self.retries:
                    raise CrowdError(
                        f"Label Studio at {self.url} did not answer {what} after {self.retries + 1} tries "
                        f"({_describe(exc, self._token)}); check the server is running (`synsetforge crowd serve`) "
                        "and rerun: completed work is kept and nothing is pushed or pulled twice",
                        status=status, transient=True,
                    ) from None
                log.warning("%s failed (%s); retry %d/%d in %.1fs", what, type(exc).__name__, attempt + 1,
                            self.retries, delay)
                self._sleep(delay)
                delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, what: str | None = None, **kwargs: Any) -> httpx.Response:
        """A raw API request under the same retry policy; raises CrowdError on a non-2xx answer."""

        def go() -> httpx.Response:
            resp = self._http.request(method, path, **kwargs)
            resp.raise_for_status()
            return resp

        return self.call(what or f"{method} {path}", go)

    def request_json(self, method: str, path: str, what: str | None = None, **kwargs: Any) -> Any:
        """`request` and decode the JSON body inside the same retries: a truncated answer is tried again."""

        def go() -> Any:
            resp = self._http.request(method, path, **kwargs)
            resp.raise_for_status()
            try:
                return resp.json()
            except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
                raise MalformedAnswer(f"answer is not JSON ({exc}): {resp.text[:80]!r}") from None

        return self.call(what or f"{method} {path}", go)

    def get_json(self, path: str, **params: Any) -> Any:
        return self.request_json("GET", path, params=params or None)

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]],
                     existing: Callable[[], Mapping[str, int]], what: str = "the task import") -> list[int | None]:
        """Import tasks (each with a unique `data.request_id`) once, whatever the network does; returns their task
        ids in order (None where the server holds no such task afterwards).

        A POST that reached the server and then timed out may have created the tasks, so after a transient failure
        `existing()` (request_id -> task_id of the server's tasks) is asked before retrying, and only the tasks
        still missing are sent again. Verify, grid and box tasks all import through here."""
        body = list(tasks)
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                resp = self._http.post(f"/api/projects/{project_id}/import", params={"return_task_ids": "true"},
                                       json=body)
                resp.raise_for_status()
                answer = resp.json()
                ids = answer.get("task_ids") if isinstance(answer, dict) else None
                if ids is not None and len(ids) == len(body) and len(body) == len(tasks):
                    return [int(i) for i in ids]
                break  # an answer without ids (or a partial resend): map by listing below
            except Exception as exc:  # noqa: BLE001 - classified just below
                if not _is_transient(exc):
                    raise CrowdError(f"Label Studio at {self.url} refused {what}: {_describe(exc, self._token)}",
                                     status=status_of(exc), transient=False) from None
                if attempt == self.retries:
                    raise CrowdError(
                        f"Label Studio at {self.url} did not answer {what} after {attempt + 1} tries; start it again "
                        "and rerun: requests are logged and reconciled, nothing is pushed twice",
                        status=status_of(exc), transient=True) from None
                log.warning("%s failed (%s); retry %d/%d in %.1fs", what, type(exc).__name__, attempt + 1,
                            self.retries, delay)
                self._sleep(delay)
                delay = min(delay * 2, 30.0)
                try:
                    have = existing()
                except CrowdError:
                    continue
                body = [t for t in body if t["data"]["request_id"] not in have]
                if not body:
                    break
        found = existing()
        return [found.get(t["data"]["request_id"]) for t in tasks]

    # -- generic helpers used by provision/push/pull and the boxes stage -------------------------------
    def iter_tasks(self, project_id: int, page_size: int = 1000, fields: str = "all") -> Iterator[dict[str, Any]]:
        """Every task of a project (data, id, is_labeled, total_annotations), page by page."""
        page = 1
        while True:
            try:
                body = self.get_json("/api/tasks", project=project_id, page=page, page_size=page_size, fields=fields)
            except CrowdError as exc:
                if exc.status == 404 and page > 1:  # the Data Manager answers 404 past the last page
                    return
                raise
            tasks = body.get("tasks", body) if isinstance(body, dict) else body
            yield from tasks
            total = body.get("total") if isinstance(body, dict) else None
            if not tasks or len(tasks) < page_size or (total is not None and page * page_size >= total):
                return
            page += 1

    def export_json(self, project_id: int, task_ids: list[int] | None = None) -> list[dict[str, Any]]:
        """Annotated tasks of a project with their annotations, in one call (the project's JSON export)."""
        params: dict[str, Any] = {"exportType": "JSON", "download_all_tasks": "false"}
        if task_ids:
            params["ids"] = task_ids
        return self.request_json("GET", f"/api/projects/{project_id}/export", "export annotations", params=params)


def _describe(exc: BaseException, token: str) -> str:
    """A short error text with the token scrubbed (an SDK error may echo request headers)."""
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    if isinstance(exc, httpx.HTTPStatusError):
        status, body = exc.response.status_code, exc.response.text[:300]
    text = f"HTTP {status}: {body}" if status else f"{type(exc).__name__}: {exc}"
    return text.replace(token, "***")[:500]
