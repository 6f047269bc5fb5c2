"""The challenge server as it runs: uvicorn on loopback over SQLite and a PostgreSQL 15 started here.

Parallel clients against the real server never push a team past its limit and lose nothing; a walk over every
route (anonymous, as a team by session and by token) finds no test label and no other team's submission;
form posts without the session's CSRF token are refused; tokens never reach the server's log.
"""

from __future__ import annotations

import http.cookiejar
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from challenge.audit import find_test_labels
from challenge.service import open_service
from challenge.web import create_app
from pipeline.release.build import build_release
from pipeline.release.synthetic import make_fixture
from pipeline.services import free_port, start_service
from pipeline.store import LocalStore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres(artifacts_dir):
    from challenge.postgres import start_postgres

    pg = start_postgres(artifacts_dir / "postgres")
    yield pg
    pg.stop()
    assert pg.process.poll() is not None


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_parallel_uploads_never_exceed_a_teams_limit(database, request, tmp_path):
    from benchmarks.challenge import concurrent_uploads

    url = request.getfixturevalue("postgres").url if database == "postgresql" else None
    r = concurrent_uploads(url, tmp_path, teams=5, per_team=5, limit=2)
    assert r["answers"] == 25 and r["statuses"] == [201, 429]
    assert r["lost"] == 0 and r["accepted"] == 10 and r["limited"] == 15
    assert r["per_team"] == {t: 2 for t in range(5)}


class Client:
    """A browser-like client with its own cookies (no redirects followed, so 303s are seen)."""

    def __init__(self, base: str):
        self.base = base
        self.jar = http.cookiejar.CookieJar()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **k):
                return None

        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), NoRedirect)

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        return self._do(urllib.request.Request(self.base + path, headers=headers or {}))

    def post(self, path: str, fields: dict, headers: dict | None = None) -> tuple[int, bytes]:
        data = urllib.parse.urlencode(fields).encode()
        return self._do(urllib.request.Request(self.base + path, data=data, headers=headers or {}, method="POST"))

    def _do(self, req) -> tuple[int, bytes]:
        try:
            with self.opener.open(req, timeout=120) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def sign_in(self, token: str) -> None:
        status, page = self.get("/signin")
        pre = re.search(rb'name="pre" value="([^"]+)"', page).group(1).decode()
        status, _ = self.post("/signin", {"pre": pre, "token": token})
        assert status == 303


@pytest.fixture
def running(tmp_path, artifacts_dir):
    store_dir = tmp_path / "store"
    store = LocalStore(store_dir)
    make_fixture(store, n_classes=4, per_class=14, seed=11, box_fraction=0.8)
    build_release(store, "w1", val_per_class=2, test_per_class=5, neardup=False, challenge=True)
    db = f"sqlite:///{tmp_path / 'c.db'}"
    svc = open_service(str(store_dir), db)
    now = datetime.utcnow()
    svc.create_challenge("walk", "w1", "cls", [dict(name="main", opens_at=now - timedelta(hours=1),
                                                    closes_at=now + timedelta(days=2), per_week=3)])
    _, token_a = svc.add_team("alpha")
    _, token_b = svc.add_team("bravo")
    organiser = svc.add_organiser_token()
    port = free_port()
    log = artifacts_dir / f"challenge-server-{port}.log"
    server = start_service("challenge", [str(ROOT / ".venv/bin/synsetforge"), "--store", str(store_dir), "challenge",
                                         "--db", db, "serve", "--port", str(port)],
                           url=f"http://127.0.0.1:{port}", ready_path="/healthz", log_path=log)
    yield {"url": server.url, "svc": svc, "a": token_a, "b": token_b, "organiser": organiser, "log": log,
           "held": svc.held_out("w1")}
    server.stop()
    assert server.process.poll() is not None


def _upload(url: str, token: str, data: bytes, desc: str = "") -> tuple[int, bytes]:
    req = urllib.request.Request(f"{url}/api/c/walk/submissions", data=data, method="POST",
                                 headers={"Authorization": f"Bearer {token}", "X-Description": desc})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_every_route_hides_test_labels_and_other_teams_submissions(running):
    url, held, svc = running["url"], running["held"], running["svc"]
    import json

    truth = "".join(f"{t}\n" for t in held.truth).encode()  # team bravo's perfect submission
    status, body = _upload(url, running["b"], truth, "bravo-secret-marker")
    assert status == 201
    b_id = json.loads(body)["id"]
    status, body = _upload(url, running["a"], "".join(f"{t % 4 + 1}\n" for t in held.truth).encode(), "alpha run")
    a_id = json.loads(body)["id"]
    b_sha = svc.team_submissions("walk", svc.team_id("bravo"))[0]["sha256"]

    anonymous, alpha = Client(url), Client(url)
    alpha.sign_in(running["a"])
    bearer = {"Authorization": f"Bearer {running['a']}"}
    app = create_app(svc)
    seen = 0
    for route in app.routes:
        if "GET" not in (route.methods or set()):
            continue
        for sub_id in (a_id, b_id):
            path = route.path.replace("{slug}", "walk").replace("{sub_id}", str(sub_id))
            for who, client, headers in (("anonymous", anonymous, {}), ("alpha", alpha, {}),
                                         ("alpha-token", anonymous, bearer)):
                status, body = client.get(path, headers)
                seen += 1
                assert status < 500, (path, who, body[:300])
                assert find_test_labels(body, held, f"{who} GET {path}") == []
                # nothing of bravo's submission: not its file, its hash or its description
                assert truth not in body and b_sha.encode() not in body and b"bravo-secret-marker" not in body, \
                    (who, path)
                if "{sub_id}" in route.path and sub_id == b_id:
                    assert status in (303, 401, 404), (who, path, status)
    assert seen > 40
    # alpha does see its own submission and the leaderboard; the private board stays closed
    status, page = alpha.get(f"/c/walk/submissions/{a_id}")
    assert status == 200 and b"alpha" in page
    status, page = alpha.get("/c/walk/private")
    assert status == 403 and b"shown when the phase closes" in page
    status, _ = anonymous.get("/api/c/walk/leaderboard?board=private")
    assert status == 403
    # organisers see flags through the API; teams do not
    assert anonymous.get("/api/c/walk/flags", bearer)[0] == 403
    assert anonymous.get("/api/c/walk/flags", {"Authorization": f"Bearer {running['organiser']}"})[0] == 200


def test_form_posts_need_the_sessions_csrf_token_and_tokens_stay_out_of_logs(running):
    url = running["url"]
    alpha = Client(url)
    alpha.sign_in(running["a"])
    boundary = "sfboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"../../etc/x.txt\"\r\n"
            f"Content-Type: text/plain\r\n\r\n1\r\n--{boundary}--\r\n").encode()
    req = urllib.request.Request(url + "/c/walk/submit", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    status, page = alpha._do(req)
    assert status == 403 and b"CSRF" in page  # no csrf field: refused before anything is read as a submission
    assert running["svc"].quota("walk", running["svc"].team_id("alpha"))[0].used == 0
    status, _ = alpha.post("/c/walk/finals", {"final": "1"})
    assert status == 403
    # with the form's CSRF token the upload is scored; the client's file name is never used for anything
    status, page = alpha.get("/c/walk/submit")
    csrf = re.search(rb'name="csrf" value="([^"]+)"', page).group(1).decode()
    held = running["held"]
    evil = Path("/tmp") / f"sf-evil-{held.digest[:12]}.txt"
    content = "".join(f"{t}\n" for t in held.truth)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{csrf}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"../../../..{evil}\"\r\n"
            f"Content-Type: text/plain\r\n\r\n{content}\r\n--{boundary}--\r\n").encode()
    req = urllib.request.Request(url + "/c/walk/submit", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    status, page = alpha._do(req)
    assert status == 201 and b"Scored: submission" in page
    assert not evil.exists()
    import hashlib

    kept = running["svc"].store.list("private/challenges/walk/submissions")
    assert kept == [f"private/challenges/walk/submissions/{hashlib.sha256(content.encode()).hexdigest()}"]
    # sign-in without the pre-session cookie's value is refused too (login CSRF)
    status, _ = Client(url).post("/signin", {"pre": "forged", "token": running["a"]})
    assert status == 403
    # an upload larger than the cap is cut off while it arrives
    svc = running["svc"]
    from challenge.db import Challenge, write_session

    with write_session(svc.engine) as s:
        s.query(Challenge).filter(Challenge.slug == "walk").update({"max_upload_bytes": 1000})
    status, _ = _upload(url, running["a"], b"1\n" * 5000)
    assert status == 413
    log = Path(running["log"]).read_text()
    assert "/c/walk/submit" in log  # the access log is there
    for token in (running["a"], running["b"], running["organiser"]):
        assert token not in log and token[4:20] not in log


def test_boards_finals_ladder_and_snapshots_on_postgresql(postgres, tmp_path):
    from challenge.boards import build_board, snapshot
    from challenge.db import make_engine
    from challenge.service import ChallengeService

    store = LocalStore(tmp_path / "store")
    make_fixture(store, n_classes=4, per_class=14, seed=12, box_fraction=0.5)
    build_release(store, "p1", val_per_class=2, test_per_class=5, neardup=False, challenge=True)
    engine = make_engine(postgres.url)
    svc = ChallengeService(engine, store)
    now = datetime(2026, 12, 1, 12)
    svc.create_challenge("pg-cls", "p1", "cls", [dict(name="main", opens_at=now - timedelta(days=1),
                                                      closes_at=now + timedelta(days=9), per_day=3)], ladder=True)
    held = svc.held_out("p1")
    team, _ = svc.add_team("pg team")
    other, _ = svc.add_team("pg other")
    wrong = "".join(f"{t % 4 + 1}\n" for t in held.truth).encode()
    right = "".join(f"{t}\n" for t in held.truth).encode()
    first = svc.submit("pg-cls", team.id, wrong, now=now)
    second = svc.submit("pg-cls", team.id, right, now=now)
    assert first.ladder_moved and second.ladder_moved and second.shown_score == 0.0
    again = svc.submit("pg-cls", team.id, right, now=now)
    assert again.ladder_moved is False and again.shown_score == 0.0 and again.quota[0].left == 0
    svc.submit("pg-cls", other.id, wrong, now=now)
    svc.select_finals("pg-cls", team.id, [first.submission_id], now=now)
    board = build_board(svc, "pg-cls", now=now)
    assert [r.team for r in board.rows] == ["pg team", "pg other"] and board.rows[0].better_than_next
    svc.close("pg-cls", now=now + timedelta(days=1))
    private = build_board(svc, "pg-cls", "private", now=now + timedelta(days=1))
    assert {r.team: r.submission_id for r in private.rows}["pg team"] == first.submission_id
    assert snapshot(svc, "pg-cls", "public", now=now + timedelta(days=1))["version"] == 2
    engine.dispose()
